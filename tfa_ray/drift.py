"""Drift, as a finished run says it: the drift section the scoring driver writes into each
run's ``_SUCCESS`` (computed in :mod:`tfa_ray.scoring.drift`, whose rules and statistics are
re-exported here), and the last finished runs of an output root, for the trend report.

The computation lives in ``scoring/`` because the driver needs it while it finishes a run;
this module sits above ``scoring/`` and reads what the runs wrote.
"""

from __future__ import annotations

import json
from typing import Any

from tfa_ray import storage
from tfa_ray.scoring.contract import SUCCESS_FILE
from tfa_ray.scoring.drift import (
    DriftRules,
    category_drift,
    drift_section,
    flag_rate_check,
    ks_p_value,
    ks_statistic,
    load_calibrations,
    psi,
    run_drift,
    scored_precision,
)

__all__ = [
    "DriftRules",
    "category_drift",
    "drift_section",
    "finished_runs",
    "flag_rate_check",
    "ks_p_value",
    "ks_statistic",
    "load_calibrations",
    "psi",
    "run_drift",
    "scored_precision",
]


def finished_runs(root: str, last: int, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """The ``_SUCCESS`` contents (with ``run_dir``) of the last ``last`` finished runs under
    the output root ``root``, oldest first, ordered by their ``finished`` time."""
    runs = []
    for d in storage.list_dirs(root, endpoint_url):
        if not d.rstrip("/").rsplit("/", 1)[-1].startswith("run_id="):
            continue
        url = storage.join(d, SUCCESS_FILE)
        try:
            success = json.loads(storage.read_bytes(url, endpoint_url))
        except FileNotFoundError:
            continue  # not finished (yet)
        runs.append(dict(success, run_dir=d))
    runs.sort(key=lambda r: (str(r.get("finished") or ""), str(r.get("run_id") or "")))
    return runs[-last:] if last > 0 else []
