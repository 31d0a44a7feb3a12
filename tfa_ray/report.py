"""The run report: one self-contained HTML file (PNGs embedded as data URIs, inline SVG charts).

Per category: counts (ok / error / anomalous), the model that scored it, a histogram of image
scores with the decision threshold drawn in, the top-N most anomalous images with their
predicted defect mask drawn over them, and the first error messages.
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


def _thumb(path: str, mask_png: bytes | None, endpoint_url: str | None, max_side: int) -> str:
    from tfa_ray.data import decode_image

    try:
        img = decode_image(storage.read_bytes(path, endpoint_url))
    except Exception as e:  # noqa: BLE001 - the image may be gone since scoring
        return f'<p class="bad">image unavailable: {html.escape(str(e))}</p>'
    uri = _data_uri(overlay_png(img, mask_png, max_side))
    return f'<img src="{uri}" alt="{html.escape(path)}">'


def build_report(
    results_url: str,
    endpoint_url: str | None = None,
    top_n: int = 8,
    max_errors: int = 20,
    max_side: int = 256,
    title: str | None = None,
) -> str:
    """The HTML report of the scoring results under ``results_url`` (a run directory or an
    output root)."""
    from tfa_ray.scoring import SUCCESS_FILE, read_results

    table = read_results(results_url, endpoint_url, LIGHT_COLUMNS)
    rows = table.to_pylist()
    success = None
    success_url = storage.join(results_url, SUCCESS_FILE)
    if storage.exists(success_url, endpoint_url):
        success = json.loads(storage.read_bytes(success_url, endpoint_url))
    cats = sorted({r["category"] or "(none)" for r in rows})
    run_ids = sorted({r["run_id"] for r in rows if r["run_id"]})
    title = title or "tfa-ray scoring report"

    # the masks of the top-N per category, in one filtered read
    top: dict[str, list[dict[str, Any]]] = {}
    for cat in cats:
        scored = [r for r in rows if (r["category"] or "(none)") == cat and r["status"] == "ok"]
        top[cat] = sorted(scored, key=lambda r: -r["score"])[:top_n]
    want = [r["path"] for rs in top.values() for r in rs]
    masks: dict[str, bytes | None] = {}
    if want:
        t = read_results(
            results_url, endpoint_url, ["path", "mask_png"], pc.field("path").isin(want)
        )
        masks = dict(
            zip(t.column("path").to_pylist(), t.column("mask_png").to_pylist(), strict=True)
        )

    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>results: <code>{html.escape(results_url)}</code>; run "
        f"{html.escape(', '.join(run_ids) or '-')}; "
        + ("finished " + html.escape(str(success.get("finished"))) if success else "no _SUCCESS")
        + "</p>",
        "<table><tr><th class='l'>category</th><th class='l'>model</th><th>images</th>"
        "<th>ok</th><th>error</th><th>anomalous</th></tr>",
    ]
    for cat in cats:
        rs = [r for r in rows if (r["category"] or "(none)") == cat]
        ok = sum(r["status"] == "ok" for r in rs)
        anomalous = sum(bool(r["is_anomalous"]) for r in rs)
        models = sorted({f"{r['model_name']} v{r['model_version']}" for r in rs if r["model_name"]})
        out.append(
            f"<tr class='counts' data-category='{html.escape(cat)}'><td class='l'>"
            f"{html.escape(cat)}</td><td class='l'>{html.escape(', '.join(models) or '-')}</td>"
            f"<td>{len(rs)}</td><td>{ok}</td><td>{len(rs) - ok}</td><td>{anomalous}</td></tr>"
        )
    out.append(
        f"<tr><th class='l'>all</th><th></th><th>{len(rows)}</th>"
        f"<th>{sum(r['status'] == 'ok' for r in rows)}</th>"
        f"<th>{sum(r['status'] != 'ok' for r in rows)}</th>"
        f"<th>{sum(bool(r['is_anomalous']) for r in rows)}</th></tr></table>"
    )
    for cat in cats:
        rs = [r for r in rows if (r["category"] or "(none)") == cat]
        scored = [r for r in rs if r["status"] == "ok"]
        thresholds = sorted({r["threshold"] for r in scored if r["threshold"] is not None})
        thr = thresholds[-1] if thresholds else None
        out.append(f"<section data-category='{html.escape(cat)}'><h2>{html.escape(cat)}</h2>")
        out.append(histogram_svg(np.array([r["score"] for r in scored]), thr))
        if top[cat]:
            out.append(f"<h3>top {len(top[cat])} most anomalous</h3><div class='grid'>")
            for r in top[cat]:
                verdict = "anomalous" if r["is_anomalous"] else "normal"
                out.append(
                    "<div class='card'>"
                    + _thumb(r["path"], masks.get(r["path"]), endpoint_url, max_side)
                    + f"<div>score {r['score']:.4g} ({verdict})</div>"
                    f"<div class='muted'>{html.escape(r['path'])}</div></div>"
                )
            out.append("</div>")
        errors = [r for r in rs if r["status"] != "ok"]
        if errors:
            out.append(f"<h3>errors ({len(errors)})</h3><table>")
            for r in errors[:max_errors]:
                out.append(
                    f"<tr><td class='l'>{html.escape(r['path'])}</td>"
                    f"<td class='l bad'>{html.escape(r['error'] or '')}</td></tr>"
                )
            if len(errors) > max_errors:
                out.append(f"<tr><td class='l muted'>... {len(errors) - max_errors} more</td></tr>")
            out.append("</table>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(
    results_url: str, output: str, endpoint_url: str | None = None, top_n: int = 8
) -> str:
    """Build the report and write it to ``output`` (local path or URL); returns ``output``."""
    text = build_report(results_url, endpoint_url=endpoint_url, top_n=top_n)
    storage.write_bytes(output, text.encode("utf-8"), endpoint_url)
    return output
