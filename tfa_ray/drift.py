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


def finished_runs(
    root: str | storage.Location, last: int, endpoint_url: str | None = None
) -> list[dict[str, Any]]:
    """The ``_SUCCESS`` contents (with ``run_dir``) of the last ``last`` finished runs under
    the output root ``root`` (a URL, or a location already resolved), oldest first, ordered by
    their ``finished`` time."""
    output = storage.locate(root, endpoint_url)
    runs = []
    for d in output.list_dirs():
        if not d.rstrip("/").rsplit("/", 1)[-1].startswith("run_id="):
            continue
        try:
            success = json.loads(output.at(d).join(SUCCESS_FILE).read_bytes())
        except FileNotFoundError:
            continue  # not finished (yet)
        runs.append(dict(success, run_dir=d))
    runs.sort(key=lambda r: (str(r.get("finished") or ""), str(r.get("run_id") or "")))
    return runs[-last:] if last > 0 else []
