"""Entry point for ``ray job submit --working-dir . -- python jobs/train.py ARGS``.

ARGS are those of ``tfa-ray train`` (e.g. ``--data s3://bucket/mvtec --categories all``). Inside a
Ray job ``RAY_ADDRESS`` is set, so training joins the job's cluster instead of starting one.
Exit code: 0 when every category trained, 1 when any failed, 2 for bad input.
"""

from __future__ import annotations

import os
import sys

# --working-dir ships the repository: make its package importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfa_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--categories" not in args and "--category" not in args:
        args += ["--categories", "all"]
    sys.exit(main(["train", *args]))
