"""The HTML run report: counts, histogram with threshold, top-N overlays; rendered in a real
headless Chromium."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfa_ray import report, scoring
from tfa_ray.synth import make_image, paint_defect


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def scored_run(ray_cluster_module, tiny_model_dir, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("report-in")
    d = root / "texture"
    d.mkdir()
    for i in range(6):
        rng = np.random.default_rng(100 + i)
        img = make_image("texture", 64, rng)
        if i % 2:
            img, _ = paint_defect(img, rng, "blob")
        (d / f"{i:02d}.png").write_bytes(_png(img))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = root / "out"
    summary = scoring.score(
        scoring.ScoreConfig(input=str(root), output=str(out), run_id="rep"),
        scoring.LocalResolver({"texture": tiny_model_dir}),
        echo=lambda _m: None,
    )
    return summary.run_dir, root


def test_histogram_svg_draws_threshold():
    svg = report.histogram_svg(np.array([0.1, 0.2, 0.2, 0.9]), threshold=0.5, bins=4)
    assert svg.count("<rect") == 5 and 'class="threshold"' in svg and "threshold 0.5" in svg
    assert "no scored images" in report.histogram_svg(np.array([]), 1.0)


def test_overlay_marks_the_mask_red():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    mask = np.zeros((20, 40), bool)
    mask[5:10, 5:10] = True
    out = Image.open(io.BytesIO(report.overlay_png(img, _png(mask), max_side=256)))
    arr = np.asarray(out)
    assert out.size == (40, 20) and arr[7, 7, 0] > 100 and arr[0, 0].max() == 0


def test_report_content(scored_run, tmp_path):
    run_dir, _ = scored_run
    out = report.write_report(run_dir, str(tmp_path / "r.html"), top_n=3)
    text = Path(out).read_text()
    assert '<tr class="counts" data-category="texture">' in text
    row = re.search(r'data-category="texture">(.*?)</tr>', text, re.S).group(1)
    cells = re.findall(r"<td>(\d+)</td>", row)
    assert cells[:3] == ["7", "6", "1"]  # images, ok, error
    assert text.count("data:image/png;base64,") == 3
    assert 'class="threshold"' in text and "truncated or corrupt" in text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_success_and_report_carry_drift(scored_run):
    """A real run's ``_SUCCESS`` has the drift section (the tiny model's calibration records
    its normals' scores) and the report shows it."""
    import json

    run_dir, _ = scored_run
    success = json.loads((Path(run_dir) / "_SUCCESS").read_text())
    d = success["drift"]["categories"]["texture"]
    assert (d["scored"], d["errors"], d["model"]) == (6, 1, "tfa-texture v3")
    assert d["flagged"] == success["per_category"]["texture"]["anomalous"]
    assert d["psi"] is not None and d["ks"] is not None and d["shift"] != "unavailable"
    assert d["status"] in ("ok", "warning") and d["target_fpr"] > 0
    text = report.build_report(run_dir, top_n=1)
    assert re.search(r'<table class="drift">.*data-category="texture"', text, re.S)
    assert f"{d['psi']:.3f}" in text


def test_report_escapes_what_it_shows(ray_cluster, tiny_model_dir, tmp_path):
    """Paths and error messages are data, never markup (Jinja2 autoescaping)."""
    d = tmp_path / "in" / "texture"
    d.mkdir(parents=True)
    (d / "<script>alert(1)<script>.png").write_bytes(b"<b>not an image</b>")
    summary = scoring.score(
        scoring.ScoreConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")),
        scoring.LocalResolver({"texture": tiny_model_dir}),
        echo=lambda _m: None,
    )
    text = report.build_report(summary.run_dir)
    assert "<script>" not in text and "&lt;script&gt;alert(1)" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('img')];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images', imgs.length + '/' + ok);
  const svg = document.querySelector('svg.hist');
  document.body.setAttribute('data-svg', svg ? String(svg.getBoundingClientRect().width) : '0');
});
</script></body>"""


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (apt-get install -y chromium); .ci/run should install it",
)
def test_report_renders_in_headless_chromium(scored_run, tmp_path):
    run_dir, _ = scored_run
    html = report.build_report(run_dir, top_n=4)
    page = tmp_path / "report.html"
    page.write_text(html.replace("</body>", _CHECK))
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    m = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert m, f"chromium did not run the page's load handler:\n{dom[:500]}"
    assert m.group(1) == m.group(2) == "4"  # every embedded image decoded
    assert float(re.search(r'data-svg="([\d.]+)"', dom).group(1)) > 100
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    arr = np.asarray(Image.open(shot).convert("RGB"))
    assert arr.std() > 5  # not a blank page
