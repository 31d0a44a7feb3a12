"""The run report: one self-contained HTML file (PNGs embedded as data URIs, inline SVG charts),
rendered from a Jinja2 template with autoescaping.

Per category: counts (ok / error / anomalous), the model that scored it, its drift (flag rate
against target, scores against the calibration normals, from the run's ``_SUCCESS``), a
histogram of image scores with the decision threshold drawn in, the top-N most anomalous images
with their predicted defect mask drawn over them, and the first error messages. Given the
output root and ``last``, the report is that of the latest finished run with a trend of the
last runs per category (small inline SVG line charts).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from tfa_ray import storage

__all__ = ["build_report", "histogram_svg", "overlay_png", "trend_svg", "write_report"]

LIGHT_COLUMNS = [
    "path",
    "category",
    "model_name",
    "model_version",
    "score",
    "threshold",
    "is_anomalous",
    "width",
    "height",
    "status",
    "error",
    "run_id",
]

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1200px}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.2rem .6rem;text-align:right;
border-bottom:1px solid #eee}th{background:#f4f4f4}td.l,th.l{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:.8rem}.card{border:1px solid #ddd;padding:.4rem;
font-size:.8rem;max-width:260px;word-break:break-all}.card img{display:block;max-width:256px}
.bad{color:#b00}.muted{color:#777}tr.warning td{background:#fde2e2}
tr.moderate td{background:#fff4d6}.trend{display:flex;flex-wrap:wrap;gap:.6rem}
.trend figure{margin:0;font-size:.8rem}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def overlay_png(image: Image.Image, mask_png: bytes | None, max_side: int = 256) -> bytes:
    """The image with the predicted mask drawn over it in translucent red, at most
    ``max_side`` pixels on its longer side."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if mask_png:
        mask = Image.open(io.BytesIO(mask_png)).convert("L")
        if mask.size != image.size:  # stored at the model's map resolution
            mask = mask.resize(image.size, Image.Resampling.NEAREST)
        mask = np.asarray(mask) > 0
        red = np.array([255.0, 0.0, 0.0], np.float32)
        rgb[mask] = 0.5 * rgb[mask] + 0.5 * red
    out = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    out.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def _svg_frame(
    width: int, height: int, attrs: str, pad_l: int, pad_t: int, plot_w: int, plot_h: int
) -> list[str]:
    """The opening of an inline SVG chart: the element and its plot area's background."""
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'{attrs} role="img">',
        f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" fill="#fafafa"/>',
    ]


def histogram_svg(
    scores: np.ndarray, threshold: float | None, bins: int = 30, width: int = 520, height: int = 180
) -> str:
    """Score histogram as inline SVG, with the threshold as a red vertical line."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        return '<p class="muted">no scored images</p>'
    lo, hi = float(scores.min()), float(scores.max())
    if threshold is not None and math.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(scores, bins=bins, range=(lo, hi))
    pad_l, pad_b, pad_t = 40, 24, 10
    plot_w, plot_h = width - pad_l - 10, height - pad_b - pad_t
    top = max(1, int(counts.max()))
    bar_w = plot_w / bins

    def x_of(v: float) -> float:
        return pad_l + (v - lo) / (hi - lo) * plot_w

    parts = _svg_frame(
        width, height, 'class="hist" aria-label="score histogram"', pad_l, pad_t, plot_w, plot_h
    )
    for i, c in enumerate(counts):
        h = c / top * plot_h
        parts.append(
            f'<rect x="{pad_l + i * bar_w:.1f}" y="{pad_t + plot_h - h:.1f}" '
            f'width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}" fill="#4a7ab5">'
            f"<title>{edges[i]:.4g} to {edges[i + 1]:.4g}: {c}</title></rect>"
        )
    if threshold is not None and math.isfinite(threshold):
        x = x_of(threshold)
        parts.append(
            f'<line class="threshold" x1="{x:.1f}" x2="{x:.1f}" y1="{pad_t}" '
            f'y2="{pad_t + plot_h}" stroke="#d00" stroke-width="2"/>'
            f'<text x="{x + 3:.1f}" y="{pad_t + 12}" fill="#d00" font-size="11">'
            f"threshold {threshold:.4g}</text>"
        )
    y_axis = pad_t + plot_h + 16
    parts += [
        f'<text x="{pad_l}" y="{y_axis}" font-size="11">{lo:.4g}</text>',
        f'<text x="{pad_l + plot_w}" y="{y_axis}" font-size="11" text-anchor="end">{hi:.4g}</text>',
        f'<text x="{pad_l - 4}" y="{pad_t + 10}" font-size="11" text-anchor="end">{top}</text>',
        f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" font-size="11" text-anchor="end">0</text>',
        "</svg>",
    ]
    return "".join(parts)


def trend_svg(
    values: list[float | None],
    labels: list[str],
    reference: float | None = None,
    width: int = 220,
    height: int = 90,
) -> str:
    """A small line chart of one value per run (None: a gap), with an optional dashed
    reference line (the target, the calibration median, a warning threshold)."""
    pts = [(i, float(v)) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if not pts:
        return '<p class="muted">no data</p>'
    ys = [v for _, v in pts] + ([reference] if reference is not None else [])
    lo, hi = min(ys), max(ys)
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    pad_l, pad_r, pad_t, pad_b = 44, 8, 8, 8
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    n = max(len(values) - 1, 1)

    def x_of(i: int) -> float:
        return pad_l + (i / n if len(values) > 1 else 0.5) * plot_w

    def y_of(v: float) -> float:
        return pad_t + (hi - v) / (hi - lo) * plot_h

    parts = _svg_frame(width, height, 'class="trend-chart"', pad_l, pad_t, plot_w, plot_h)
    if reference is not None:
        y = y_of(reference)
        parts.append(
            f'<line class="reference" x1="{pad_l}" x2="{pad_l + plot_w}" y1="{y:.1f}" '
            f'y2="{y:.1f}" stroke="#d00" stroke-dasharray="4 3"/>'
        )
    line = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in pts)
    parts.append(f'<polyline points="{line}" fill="none" stroke="#4a7ab5" stroke-width="2"/>')
    for i, v in pts:
        parts.append(
            f'<circle cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="3" fill="#4a7ab5">'
            f"<title>{html.escape(labels[i])}: {v:.4g}</title></circle>"
        )
    parts += [
        f'<text x="{pad_l - 4}" y="{pad_t + 9}" font-size="10" text-anchor="end">{hi:.3g}</text>',
        f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" font-size="10" text-anchor="end">'
        f"{lo:.3g}</text>",
        "</svg>",
    ]
    return "".join(parts)


_TEMPLATE = """\
<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>{{ title }}</title><style>{{ css }}</style></head><body>
<h1>{{ title }}</h1>
<p>results: <code>{{ results_url }}</code>; run {{ run_ids | join(", ") or "-" }};
{% if finished %}finished {{ finished }}{% else %}no _SUCCESS{% endif %}</p>
<table><tr><th class="l">category</th><th class="l">model</th><th>images</th><th>ok</th>
<th>error</th><th>anomalous</th></tr>
{% for c in categories %}
<tr class="counts" data-category="{{ c.name }}"><td class="l">{{ c.name }}</td>
<td class="l">{{ c.models | join(", ") or "-" }}</td><td>{{ c.total }}</td><td>{{ c.ok }}</td>
<td>{{ c.total - c.ok }}</td><td>{{ c.anomalous }}</td></tr>
{% endfor %}<tr><th class="l">all</th><th></th><th>{{ total.total }}</th><th>{{ total.ok }}</th>
<th>{{ total.total - total.ok }}</th><th>{{ total.anomalous }}</th></tr></table>
<h2>drift</h2>
{% if drift_note %}<p class="muted">drift unavailable: {{ drift_note }}</p>{% else %}
<table class="drift"><tr><th class="l">category</th><th>scored</th><th>errors</th>
<th>flagged</th><th>flag rate</th><th>target (supported)</th><th>median score</th>
<th>calibration median</th><th>PSI</th><th>KS (p)</th><th class="l">distribution</th>
<th class="l">status</th></tr>
{% for d in drift %}<tr class="{{ d.css }}" data-category="{{ d.name }}">
<td class="l">{{ d.name }}</td><td>{{ d.scored }}</td><td>{{ d.errors }}</td>
<td>{{ d.flagged }}</td><td>{{ d.flag_rate }}</td><td>{{ d.target }}</td><td>{{ d.median }}</td>
<td>{{ d.reference_median }}</td><td>{{ d.psi }}</td><td>{{ d.ks }}</td>
<td class="l">{{ d.shift }}</td><td class="l">{{ d.status }}{% if d.note %}
<span class="muted">({{ d.note }})</span>{% endif %}</td></tr>
{% for w in d.warnings %}<tr class="warning drift-warning"><td></td>
<td class="l bad" colspan="11">{{ w }}</td></tr>{% endfor %}
{% endfor %}</table>{% endif %}
{% if trend %}<h2>trend of the last {{ trend.runs | length }} runs</h2>
<table class="runs"><tr><th class="l">run</th><th class="l">finished</th><th>images</th>
<th>anomalous</th><th>drift warnings</th></tr>
{% for r in trend.runs %}<tr class="run"><td class="l">{{ r.run_id }}</td>
<td class="l">{{ r.finished }}</td><td>{{ r.total }}</td><td>{{ r.anomalous }}</td>
<td>{{ r.warnings }}</td></tr>
{% endfor %}</table>
{% for c in trend.categories %}<div class="trend-category" data-category="{{ c.name }}">
<h3>{{ c.name }}</h3><div class="trend">
{% for chart in c.charts %}<figure><figcaption>{{ chart.title }}</figcaption>{{ chart.svg }}
</figure>{% endfor %}</div></div>
{% endfor %}{% endif %}
{% for c in categories %}<section data-category="{{ c.name }}"><h2>{{ c.name }}</h2>
{{ c.histogram }}
{% if c.top %}<h3>top {{ c.top | length }} most anomalous</h3><div class="grid">
{% for r in c.top %}<div class="card">{% if r.thumb %}<img src="{{ r.thumb }}" alt="{{ r.path }}">
{% else %}<p class="bad">image unavailable: {{ r.unavailable }}</p>{% endif %}
<div>score {{ "%.4g" | format(r.score) }} ({{ r.verdict }})</div>
<div class="muted">{{ r.path }}</div></div>
{% endfor %}</div>{% endif %}
{% if c.errors %}<h3>errors ({{ c.errors | length }})</h3><table>
{% for r in c.errors[:max_errors] %}<tr><td class="l">{{ r.path }}</td>
<td class="l bad">{{ r.error or "" }}</td></tr>
{% endfor %}{% if c.errors | length > max_errors %}<tr><td class="l muted">...
{{ c.errors | length - max_errors }} more</td></tr>{% endif %}</table>{% endif %}
</section>
{% endfor %}</body></html>
"""


def _thumb(image: storage.Location, mask_png: bytes | None, max_side: int) -> dict:
    """``thumb`` (a PNG data URI with the mask drawn in) or ``unavailable`` (why not)."""
    from tfa_ray.data import decode_image

    try:
        img = decode_image(image.read_bytes())
    except Exception as e:  # noqa: BLE001 - the image may be gone since scoring
        return {"thumb": None, "unavailable": str(e)}
    return {"thumb": _data_uri(overlay_png(img, mask_png, max_side))}


def _fmt(v: Any, spec: str = ".4g", scale: float = 1.0, unit: str = "") -> str:
    return "-" if v is None else f"{v * scale:{spec}}{unit}"


def _drift_rows(success: dict | None) -> tuple[list[dict[str, Any]], str | None]:
    """The drift table's rows from a run's ``_SUCCESS``, or why there is none."""
    if success is None:
        return [], "no _SUCCESS (not a finished run)"
    drift = success.get("drift")
    if drift is None:
        return [], "the run predates drift checks"
    if drift.get("error"):
        return [], drift["error"]
    rows = []
    for name, d in sorted(drift["categories"].items()):
        target = d.get("target_fpr")
        rows.append(
            {
                "name": name,
                "css": "warning" if d["warnings"] else d.get("shift", ""),
                "scored": d["scored"],
                "errors": d["errors"],
                "flagged": d["flagged"],
                "flag_rate": _fmt(d.get("flag_rate"), ".2f", 100, " %"),
                "target": "-"
                if target is None
                else f"{_fmt(target, '.3g', 100, ' %')} "
                f"({_fmt(d['supported_fpr'], '.2g', 100, ' %')})",
                "median": _fmt(d.get("median_score")),
                "reference_median": _fmt(d.get("reference_median")),
                "psi": _fmt(d.get("psi"), ".3f"),
                "ks": "-" if d.get("ks") is None else f"{d['ks']:.3f} ({d['ks_p']:.2g})",
                "shift": d.get("shift", "-"),
                "status": d["status"],
                "note": d.get("note"),
                "warnings": d["warnings"],
            }
        )
    return rows, None


_TREND = (  # (title, drift key, reference: a drift key or a number)
    ("flag rate (target dashed)", "flag_rate", "expected_fpr"),
    ("median score (calibration dashed)", "median_score", "reference_median"),
    ("PSI (0.25 dashed)", "psi", 0.25),
    ("KS statistic", "ks", None),
)


def _trend(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per category, one small chart per drift value over ``runs`` (oldest first)."""
    from markupsafe import Markup

    labels = [str(r.get("run_id")) for r in runs]
    per_run = [(r.get("drift") or {}).get("categories") or {} for r in runs]
    names = sorted(
        {c for r in runs for c in r.get("per_category", {})} | {c for d in per_run for c in d}
    )
    categories = []
    for name in names:
        entries = [dict(d.get(name, {})) for d in per_run]
        for e, r in zip(entries, runs, strict=True):  # runs from before drift: counts only
            counts = r.get("per_category", {}).get(name)
            if "flag_rate" not in e and counts and counts.get("ok"):
                e["flag_rate"] = counts["anomalous"] / counts["ok"]
        charts = []
        for title, key, ref in _TREND:
            if isinstance(ref, str):
                known = [e[ref] for e in entries if e.get(ref) is not None]
                ref = known[-1] if known else None
            values = [e.get(key) for e in entries]
            charts.append({"title": title, "svg": Markup(trend_svg(values, labels, ref))})
        categories.append({"name": name, "charts": charts})
    return {
        "runs": [
            {
                "run_id": r.get("run_id"),
                "finished": r.get("finished"),
                "total": r.get("total"),
                "anomalous": r.get("anomalous"),
                "warnings": sum(len(e.get("warnings", [])) for e in d.values()),
            }
            for r, d in zip(runs, per_run, strict=True)
        ],
        "categories": categories,
    }


def build_report(
    results_url: str,
    endpoint_url: str | None = None,
    top_n: int = 8,
    max_errors: int = 20,
    max_side: int = 256,
    title: str | None = None,
    last: int | None = None,
) -> str:
    """The HTML report of the scoring results under ``results_url`` (a run directory or an
    output root), rendered from a Jinja2 template with autoescaping. With ``last``,
    ``results_url`` is an output root: the report of its latest finished run, with the trend
    of its last ``last`` finished runs."""
    import jinja2
    from markupsafe import Markup

    from tfa_ray.drift import finished_runs
    from tfa_ray.scoring.contract import SUCCESS_FILE, read_results

    results = storage.resolve(results_url, endpoint_url)  # images too: on its filesystem
    trend = None
    if last is not None:
        runs = finished_runs(results, last)
        if not runs:
            raise FileNotFoundError(f"no finished run (with a _SUCCESS) under {results_url}")
        trend = _trend(runs)
        results = results.at(runs[-1]["run_dir"])
    rows = read_results(results, columns=LIGHT_COLUMNS).to_pylist()
    success = None
    success_file = results.join(SUCCESS_FILE)
    if success_file.exists():
        success = json.loads(success_file.read_bytes())
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_cat.setdefault(r["category"] or "(none)", []).append(r)

    # the masks of the top-N per category, in one filtered read
    top = {
        cat: sorted((r for r in rs if r["status"] == "ok"), key=lambda r: -r["score"])[:top_n]
        for cat, rs in by_cat.items()
    }
    want = [r["path"] for rs in top.values() for r in rs]
    masks: dict[str, bytes | None] = {}
    if want:
        t = read_results(results, columns=["path", "mask_png"], filter=pc.field("path").isin(want))
        masks = dict(
            zip(t.column("path").to_pylist(), t.column("mask_png").to_pylist(), strict=True)
        )
    categories = []
    for cat in sorted(by_cat):
        rs = by_cat[cat]
        scored = [r for r in rs if r["status"] == "ok"]
        thresholds = sorted({r["threshold"] for r in scored if r["threshold"] is not None})
        svg = histogram_svg(
            np.array([r["score"] for r in scored]), thresholds[-1] if thresholds else None
        )
        categories.append(
            {
                "name": cat,
                "models": sorted(
                    {f"{r['model_name']} v{r['model_version']}" for r in rs if r["model_name"]}
                ),
                "total": len(rs),
                "ok": len(scored),
                "anomalous": sum(bool(r["is_anomalous"]) for r in rs),
                "histogram": Markup(svg),  # built from numbers only, by histogram_svg
                "top": [
                    {
                        **r,
                        "verdict": "anomalous" if r["is_anomalous"] else "normal",
                        **_thumb(results.at(r["path"]), masks.get(r["path"]), max_side),
                    }
                    for r in top[cat]
                ],
                "errors": [r for r in rs if r["status"] != "ok"],
            }
        )
    drift_rows, drift_note = _drift_rows(success)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(_TEMPLATE).render(
        drift=drift_rows,
        drift_note=drift_note,
        trend=trend,
        title=title or "tfa-ray scoring report",
        css=Markup(_CSS),
        results_url=results.url,
        run_ids=sorted({r["run_id"] for r in rows if r["run_id"]}),
        finished=success.get("finished") if success else None,
        categories=categories,
        total={
            "total": len(rows),
            "ok": sum(r["status"] == "ok" for r in rows),
            "anomalous": sum(bool(r["is_anomalous"]) for r in rows),
        },
        max_errors=max_errors,
    )


def write_report(
    results_url: str,
    output: str,
    endpoint_url: str | None = None,
    top_n: int = 8,
    last: int | None = None,
) -> str:
    """Build the report and write it to ``output`` (local path or URL); returns ``output``."""
    text = build_report(results_url, endpoint_url=endpoint_url, top_n=top_n, last=last)
    storage.write_bytes(output, text.encode("utf-8"), endpoint_url)
    return output
