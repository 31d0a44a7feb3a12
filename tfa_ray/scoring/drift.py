"""Drift: has the line changed under a model? Per category, a scoring run's flag rate against
the model's target false-positive rate and its score distribution against the calibration
normals' scores (``Calibration.normal_scores``), written into the run's ``_SUCCESS``.

The rules (:class:`DriftRules`), chosen so a stable line stays quiet:

* **Flag rate far above target**: the flagged fraction is at least ``flag_ratio`` (3) times the
  expected rate *and* an exact one-sided binomial test rejects the expected rate at
  ``flag_alpha`` (0.001). The expected rate is ``max(target_fpr, supported_fpr)``: a target
  below what the calibration images can demonstrate is not a measured rate, so it does not
  raise alarms. The ratio keeps huge runs from alarming on a tiny excess, the test keeps small
  runs from alarming on a few flags. A nightly run holds real defects too, so a high flag rate
  means the line changed *or* many parts were defective; the warning says both.
* **Score distribution shifted**: population stability index (PSI) over bins cut at the
  calibration scores' quantiles (at least ``min_per_bin`` calibration images per bin, at most
  ``max_bins`` bins; proportions smoothed by ``eps``) and the two-sample Kolmogorov-Smirnov
  statistic with its asymptotic p-value. PSI > 0.25 or KS p < ``ks_alpha`` (0.001) is
  ``shifted``, PSI > 0.1 is ``moderate``. With ~75 calibration images the reference itself is
  noisy: PSI between two samples of one distribution is about (bins - 1) / n_calibration
  (0.05 at 5 bins), which is why bins are few and the thresholds the usual 0.1 / 0.25.
* The calibration is the entry of the precision the scorer computed at (a package holds one
  per precision, :class:`tfa_ray.calibration.Calibrations`): the one whose threshold the
  run's rows carry. Rows with no matching entry (an older package) use the fp32 entry.
* A calibration without normal scores (a package from before they were recorded) makes the
  distribution check ``unavailable``, never an error; so does a category without a model.

Rows are streamed one record batch at a time: per category, counts at the calibration scores
(exact KS), PSI bin counts and a bounded uniform sample of scores (the median).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tfa_ray import storage
from tfa_ray.calibration import REFERENCE_PRECISION, Calibration, Calibrations
from tfa_ray.scoring.contract import OK as STATUS_OK
from tfa_ray.scoring.contract import OUTPUT_SCHEMA

log = logging.getLogger(__name__)

__all__ = [
    "DriftRules",
    "category_drift",
    "flag_rate_check",
    "ks_statistic",
    "load_calibrations",
    "psi",
    "run_drift",
    "scored_precision",
]

OK, WARNING, UNAVAILABLE = "ok", "warning", "unavailable"
NONE, MODERATE, SHIFTED = "none", "moderate", "shifted"


@dataclass(frozen=True)
class DriftRules:
    """Thresholds of the drift warnings (see the module docstring for why these)."""

    flag_ratio: float = 3.0
    flag_alpha: float = 1e-3
    psi_moderate: float = 0.1
    psi_shifted: float = 0.25
    ks_alpha: float = 1e-3
    min_per_bin: int = 15
    max_bins: int = 10
    eps: float = 1e-4
    sample_size: int = 100_000  # scores kept per category for the median


# --------------------------------------------------------------------------------------
# statistics


def psi_edges(reference: np.ndarray, rules: DriftRules = DriftRules()) -> np.ndarray:
    """Interior bin edges at the reference's quantiles: at least ``min_per_bin`` reference
    values per bin, 2 to ``max_bins`` bins (fewer where ties merge edges)."""
    ref = np.asarray(reference, dtype=np.float64)
    bins = int(min(rules.max_bins, max(2, ref.size // rules.min_per_bin)))
    return np.unique(np.quantile(ref, np.arange(1, bins) / bins))


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin; bin i holds edges[i-1] < v <= edges[i], the outer bins are open."""
    idx = np.searchsorted(edges, np.asarray(values, dtype=np.float64), side="left")
    return np.bincount(idx, minlength=edges.size + 1)


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of two histograms over the same bins,
    sum (a - e) * ln(a / e) over the bins' proportions, each floored at ``eps``."""
    e = np.maximum(np.asarray(expected, np.float64) / max(np.sum(expected), 1), eps)
    a = np.maximum(np.asarray(actual, np.float64) / max(np.sum(actual), 1), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_from_counts(
    reference: np.ndarray, below: np.ndarray, at_or_below: np.ndarray, n: int
) -> float:
    """Two-sample KS statistic from the counts of sample values ``< r`` and ``<= r`` at each
    value ``r`` of the sorted ``reference`` (``n`` sample values in all).

    Between reference values the reference CDF is flat and the sample CDF only rises, so the
    largest gap lies at a reference value or just before one: these counts give it exactly."""
    ref = np.asarray(reference, dtype=np.float64)
    if n == 0 or ref.size == 0:
        return float("nan")
    f_ref_at = np.searchsorted(ref, ref, side="right") / ref.size
    f_ref_before = np.searchsorted(ref, ref, side="left") / ref.size
    d_at = np.abs(np.asarray(at_or_below) / n - f_ref_at)
    d_before = np.abs(np.asarray(below) / n - f_ref_before)
    return float(max(d_at.max(), d_before.max()))


def ks_statistic(sample: np.ndarray, reference: np.ndarray) -> float:
    """Two-sample KS statistic (as ``scipy.stats.ks_2samp``), through :func:`ks_from_counts`."""
    s = np.sort(np.asarray(sample, dtype=np.float64))
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    below = np.searchsorted(s, ref, side="left")
    at_or_below = np.searchsorted(s, ref, side="right")
    return ks_from_counts(ref, below, at_or_below, s.size)


def ks_p_value(d: float, n: int, m: int) -> float:
    """Asymptotic two-sided p-value of a two-sample KS statistic (scipy's ``asymp`` method)."""
    from scipy.stats import kstwo

    if not (n and m) or not math.isfinite(d):
        return float("nan")
    return float(kstwo.sf(d, max(1, round(n * m / (n + m)))))


def flag_rate_check(
    flagged: int, n: int, target_fpr: float, supported_fpr: float, rules: DriftRules = DriftRules()
) -> dict[str, Any]:
    """The flag rate against the expected rate ``max(target_fpr, supported_fpr)``: rate, the
    binomial p-value of seeing this many flags or more, and whether it is far above."""
    from scipy.stats import binom

    expected = max(float(target_fpr), float(supported_fpr))
    rate = flagged / n if n else float("nan")
    p = float(binom.sf(flagged - 1, n, expected)) if n and expected > 0 else float("nan")
    high = bool(n and expected > 0 and rate >= rules.flag_ratio * expected and p < rules.flag_alpha)
    return {"flag_rate": rate, "expected_fpr": expected, "flag_rate_p": p, "flag_rate_high": high}


# --------------------------------------------------------------------------------------
# one category


class _Accumulator:
    """A category's running counts over record batches (bounded memory)."""

    def __init__(self, reference: np.ndarray, rules: DriftRules, seed: int = 0):
        self.ref = np.sort(np.asarray(reference, dtype=np.float64))
        self.edges = psi_edges(self.ref, rules) if self.ref.size else np.empty(0)
        self.rules = rules
        self.n = self.flagged = self.errors = 0
        self.below = np.zeros(self.ref.size, np.int64)
        self.at_or_below = np.zeros(self.ref.size, np.int64)
        self.bins = np.zeros(self.edges.size + 1, np.int64)
        self.rng = np.random.default_rng(seed)
        self.sample = np.empty(0)
        self.keys = np.empty(0)

    def add(self, scores: np.ndarray, flagged: int, errors: int) -> None:
        scores = np.sort(np.asarray(scores, dtype=np.float64))
        self.n += scores.size
        self.flagged += int(flagged)
        self.errors += int(errors)
        if self.ref.size:
            self.below += np.searchsorted(scores, self.ref, side="left")
            self.at_or_below += np.searchsorted(scores, self.ref, side="right")
            self.bins += bin_counts(scores, self.edges)
        # a uniform sample: the ``sample_size`` smallest of independent random keys
        self.sample = np.concatenate([self.sample, scores])
        self.keys = np.concatenate([self.keys, self.rng.random(scores.size)])
        if self.sample.size > self.rules.sample_size:
            keep = np.argpartition(self.keys, self.rules.sample_size)[: self.rules.sample_size]
            self.sample, self.keys = self.sample[keep], self.keys[keep]


def category_drift(
    acc: _Accumulator, calibration: Calibration | None, model: str | None, reason: str = ""
) -> dict[str, Any]:
    """A category's drift entry for ``_SUCCESS`` (JSON-ready: NaN becomes None)."""
    rules = acc.rules
    out: dict[str, Any] = {
        "model": model,
        "scored": acc.n,
        "errors": acc.errors,
        "flagged": acc.flagged,
        "median_score": float(np.median(acc.sample)) if acc.sample.size else None,
        "warnings": [],
    }
    if calibration is None:
        out.update(status=UNAVAILABLE, shift=UNAVAILABLE, note=reason or "no calibration")
        return _json_ready(out)
    out.update(target_fpr=calibration.target_fpr, supported_fpr=calibration.supported_fpr)
    fprs = (calibration.target_fpr, calibration.supported_fpr)
    out.update(flag_rate_check(acc.flagged, acc.n, *fprs, rules))
    if out["flag_rate_high"]:
        supported = (
            f" ({100 * out['expected_fpr']:.2g} % supported by {calibration.num_images} "
            "calibration images)"
            if out["expected_fpr"] > calibration.target_fpr
            else ""
        )
        out["warnings"].append(
            f"flag rate {100 * out['flag_rate']:.1f} % vs target "
            f"{100 * calibration.target_fpr:.2g} %{supported}: line changed or many defects"
        )
    ref = acc.ref
    if not ref.size:
        out.update(shift=UNAVAILABLE, note="calibration has no normal scores (an older package)")
    elif not acc.n:
        out.update(shift=UNAVAILABLE, note="no scored images")
    else:
        ref_bins = bin_counts(ref, acc.edges)
        d = ks_from_counts(ref, acc.below, acc.at_or_below, acc.n)
        out.update(
            reference_images=int(ref.size),
            reference_median=float(np.median(ref)),
            psi=psi(ref_bins, acc.bins, rules.eps),
            psi_bins=int(acc.edges.size + 1),
            ks=d,
            ks_p=ks_p_value(d, acc.n, ref.size),
        )
        shifted = out["psi"] > rules.psi_shifted or out["ks_p"] < rules.ks_alpha
        out["shift"] = SHIFTED if shifted else MODERATE if out["psi"] > rules.psi_moderate else NONE
        if shifted:
            direction = "up" if out["median_score"] > out["reference_median"] else "down"
            out["warnings"].append(
                f"score distribution shifted {direction} from the calibration normals "
                f"(PSI {out['psi']:.2f}, KS {d:.2f}, p {out['ks_p']:.1g}): "
                "line changed or many defects"
            )
    out["status"] = WARNING if out["warnings"] else OK
    return _json_ready(out)


def _json_ready(d: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}


# --------------------------------------------------------------------------------------
# a run


def load_calibrations(
    models: dict[str, dict[str, Any]], resolver: Callable[..., tuple[str, int, str]], alias: str
) -> dict[str, Calibrations | str]:
    """Each category's calibrations (one per precision) from the model version the run pinned,
    or why not."""
    out: dict[str, Calibrations | str] = {}
    for cat, m in models.items():
        if "error" in m:
            out[cat] = "no model"
            continue
        try:
            _, _, url = resolver(cat, alias, version=m["version"])
            text = storage.read_bytes(storage.join(url, "calibration.json")).decode()
            out[cat] = Calibrations.from_json(text)
        except Exception as e:  # noqa: BLE001 - drift is reported unavailable, never fatal
            out[cat] = f"calibration unavailable: {type(e).__name__}: {e}"
    return out


def scored_precision(calibrations: Calibrations, thresholds: set[float]) -> tuple[str, str]:
    """(precision, note): the entry whose threshold the scorer wrote into the rows, which is
    the precision it computed at; the fp32 entry, and why, when no single entry matches."""
    found = {calibrations.precision_of(t) for t in thresholds}
    if len(found) == 1 and None not in found:
        return found.pop(), ""
    return REFERENCE_PRECISION, (
        f"rows' thresholds {sorted(thresholds)} match no single calibrated precision: "
        f"compared with the {REFERENCE_PRECISION} calibration"
    )


def _thresholds(dataset, ok_status: str) -> dict[str, set[float]]:
    """The thresholds the ok rows of each category carry (one pass over two columns)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out: dict[str, set[float]] = {}
    for batch in dataset.to_batches(columns=["category", "status", "threshold"], use_threads=False):
        ok = pc.equal(batch.column("status"), ok_status).fill_null(False)
        rows = batch.filter(ok)
        cats = _np(pc.cast(rows.column("category"), pa.string()).fill_null("(none)"))
        thr = _np(rows.column("threshold").fill_null(np.nan)).astype(np.float64)
        for cat, t in set(zip(cats, thr, strict=True)):
            if math.isfinite(t):
                out.setdefault(str(cat), set()).add(float(t))
    return out


def _entry(cal: Calibrations | Calibration | str | None, thresholds: set[float]):
    """(Calibration or None, its precision, a note) for a category."""
    if isinstance(cal, Calibration):
        return cal, REFERENCE_PRECISION, ""
    if isinstance(cal, Calibrations):
        precision, note = scored_precision(cal, thresholds)
        return cal.at(precision), precision, note
    return None, None, ""


def run_drift(
    run_dir: str | storage.Location,
    models: dict[str, dict[str, Any]],
    calibrations: dict[str, Calibrations | Calibration | str],
    endpoint_url: str | None = None,
    rules: DriftRules = DriftRules(),
) -> dict[str, Any]:
    """The drift section of a finished run's ``_SUCCESS``: the rules and one entry per
    category found in the output (ok rows scored, error rows counted), each against the
    calibration of the precision its rows were scored at. ``run_dir``: a URL, or a location
    already resolved (the driver's)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    run = storage.locate(run_dir, endpoint_url)
    dataset = pads.dataset(run.path, filesystem=run.fs, format="parquet", schema=OUTPUT_SCHEMA)
    thresholds = _thresholds(dataset, STATUS_OK)
    entries = {c: _entry(cal, thresholds.get(c, set())) for c, cal in calibrations.items()}
    accs: dict[str, _Accumulator] = {}
    for batch in dataset.to_batches(
        columns=["category", "status", "score", "is_anomalous"], use_threads=False
    ):
        cats = _np(pc.cast(batch.column("category"), pa.string()).fill_null("(none)"))
        ok = _np(pc.equal(batch.column("status"), STATUS_OK).fill_null(False))
        score = _np(batch.column("score").fill_null(np.nan)).astype(np.float64)
        flag = _np(batch.column("is_anomalous").fill_null(False)).astype(bool)
        for cat in np.unique(cats):
            rows = cats == cat
            if cat not in accs:
                cal = entries.get(cat, (None,))[0]
                ref = cal.normal_scores if cal is not None else ()
                accs[cat] = _Accumulator(np.asarray(ref, dtype=np.float64), rules)
            sel = rows & ok
            accs[cat].add(score[sel], int(flag[sel].sum()), int((rows & ~ok).sum()))
    categories = {}
    for cat in sorted(accs):
        cal, precision, note = entries.get(cat, (None, None, ""))
        m = models.get(cat, {})
        model = f"{m['name']} v{m['version']}" if "name" in m else None
        if cal is not None:
            categories[cat] = category_drift(accs[cat], cal, model)
            categories[cat]["precision"] = precision
            if note:
                log.warning("drift of %s: %s", cat, note)
                categories[cat]["precision_note"] = note
        else:
            reason = calibrations.get(cat)
            categories[cat] = category_drift(accs[cat], None, model, reason or "no model")
    return {"rules": dataclasses.asdict(rules), "categories": categories}


def _np(array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False)


def drift_section(
    run_dir: str | storage.Location,
    models: dict[str, dict[str, Any]],
    resolver: Callable[..., tuple[str, int, str]],
    alias: str,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """:func:`run_drift` for the driver: a failure is recorded and logged, never raised (the
    run's output is verified and complete; drift is a report on it)."""
    try:
        return run_drift(run_dir, models, load_calibrations(models, resolver, alias), endpoint_url)
    except Exception as e:  # noqa: BLE001
        where = getattr(run_dir, "url", run_dir)
        log.warning("drift of %s not computed: %s", where, e, exc_info=True)
        return {"error": f"{type(e).__name__}: {e}", "categories": {}}
