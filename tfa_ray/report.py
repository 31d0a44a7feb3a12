"""The run report: one self-contained HTML file (PNGs embedded as data URIs, inline SVG charts),
rendered from a Jinja2 template with autoescaping.

Per category: counts (ok / error / anomalous), the model that scored it, a histogram of image
scores with the decision threshold drawn in, the top-N most anomalous images with their
predicted defect mask drawn over them, and the first error messages.
"""

from __future__ import annotations

import base64
import io
import json
import math
from typing import Any

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from tfa_ray import storage

__all__ = ["build_report", "histogram_svg", "overlay_png", "write_report"]

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
.bad{color:#b00}.muted{color:#777}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def overlay_png(image: Image.Image, mask_png: bytes | None, max_side: int = 256) -> bytes:
    """The image with the predicted mask drawn over it in translucent red, at most
    ``max_side`` pixels on its longer side."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if mask_png:
        mask = np.asarray(Image.open(io.BytesIO(mask_png)).convert("L")) > 0
        if mask.shape == rgb.shape[:2]:
            red = np.array([255.0, 0.0, 0.0], np.float32)
            rgb[mask] = 0.5 * rgb[mask] + 0.5 * red
    out = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    out.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


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

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'class="hist" role="img" aria-label="score histogram">',
        f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" fill="#fafafa"/>',
    ]
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


def _thumb(path: str, mask_png: bytes | None, endpoint_url: str | None, max_side: int) -> dict:
    """``thumb`` (a PNG data URI with the mask drawn in) or ``unavailable`` (why not)."""
    from tfa_ray.data import decode_image

    try:
        img = decode_image(storage.read_bytes(path, endpoint_url))
    except Exception as e:  # noqa: BLE001 - the image may be gone since scoring
        return {"thumb": None, "unavailable": str(e)}
    return {"thumb": _data_uri(overlay_png(img, mask_png, max_side))}


def build_report(
    results_url: str,
    endpoint_url: str | None = None,
    top_n: int = 8,
    max_errors: int = 20,
    max_side: int = 256,
    title: str | None = None,
) -> str:
    """The HTML report of the scoring results under ``results_url`` (a run directory or an
    output root), rendered from a Jinja2 template with autoescaping."""
    import jinja2
    from markupsafe import Markup

    from tfa_ray.scoring import SUCCESS_FILE, read_results

    rows = read_results(results_url, endpoint_url, LIGHT_COLUMNS).to_pylist()
    success = None
    success_url = storage.join(results_url, SUCCESS_FILE)
    if storage.exists(success_url, endpoint_url):
        success = json.loads(storage.read_bytes(success_url, endpoint_url))
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
        t = read_results(
            results_url, endpoint_url, ["path", "mask_png"], pc.field("path").isin(want)
        )
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
                        **_thumb(r["path"], masks.get(r["path"]), endpoint_url, max_side),
                    }
                    for r in top[cat]
                ],
                "errors": [r for r in rs if r["status"] != "ok"],
            }
        )
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(_TEMPLATE).render(
        title=title or "tfa-ray scoring report",
        css=Markup(_CSS),
        results_url=results_url,
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
    results_url: str, output: str, endpoint_url: str | None = None, top_n: int = 8
) -> str:
    """Build the report and write it to ``output`` (local path or URL); returns ``output``."""
    text = build_report(results_url, endpoint_url=endpoint_url, top_n=top_n)
    storage.write_bytes(output, text.encode("utf-8"), endpoint_url)
    return output
