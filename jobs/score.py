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

from tfa_ray.cli import run_score
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
    except (FileNotFoundError, ValueError) as exc:
        print(f"score: error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary.total else 1


if __name__ == "__main__":
    sys.exit(main())
