"""`ray job submit` entry point for nightly scoring; the same options as `tfa-ray score`.

    ray job submit --address http://head:8265 --working-dir . -- \
        python jobs/score.py --input s3://line-archive/2024-06-01/ \
        --output s3://line-scores/ --concurrency 4 --num-gpus-per-actor 1 --batch-size 64

Inside a job ``ray.init()`` joins the job's cluster (RAY_ADDRESS is set by Ray); run by hand
it starts a local Ray. Rerunning with the same ``--run-id`` resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tfa_ray.cli import run_score, score_exit_code
from tfa_ray.errors import EXIT_FAILED, EXIT_USAGE, one_line
from tfa_ray.scoring import add_score_arguments


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs/score.py", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    add_score_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        summary = run_score(args)
    except Exception as exc:  # noqa: BLE001 - one line; the traceback in Ray's job log
        logging.getLogger("jobs.score").info("score failed", exc_info=exc)
        print(f"score: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, FileNotFoundError | ValueError) else EXIT_FAILED
    return score_exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())
