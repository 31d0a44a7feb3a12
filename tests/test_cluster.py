"""Every file in cluster/ parses, and every entry point it names exists and accepts its args."""

from __future__ import annotations

import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from tfa_ray.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = sorted(p for p in (ROOT / "cluster").iterdir() if p.is_file())
COMMAND = re.compile(r"python\s+(jobs/[\w./-]+\.py)((?:[ \t]+(?:\\\n\s*)?[^\s\\#`|&;]+)*)")


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _texts(path: pathlib.Path) -> list[str]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        assert docs, f"{path.name} is empty"
        return [text, *(s for d in docs for s in _strings(d))]
    return [text]


def test_cluster_dir_has_the_pieces():
    names = {p.name for p in CLUSTER}
    assert {"raycluster.yaml", "rayjob-train.yaml", "ray-up-aws.yaml", "runtime-env.yaml"} <= names
    assert "mlflow-server.yaml" in names
    kinds = {
        d.get("kind")
        for p in CLUSTER
        if p.suffix == ".yaml"
        for d in yaml.safe_load_all(p.read_text())
        if isinstance(d, dict)
    }
    assert {"RayCluster", "RayJob", "Deployment"} <= kinds


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_entry_points_exist(path):
    found = 0
    for text in _texts(path):
        for m in COMMAND.finditer(text):
            script = ROOT / m.group(1)
            assert script.is_file(), f"{path.name} names {m.group(1)}, which does not exist"
            args = shlex.split(m.group(2).replace("\\\n", " "))
            if m.group(1) == "jobs/train.py":
                build_parser().parse_args(["train", *args])  # SystemExit on an unknown flag
            found += 1
    if path.name in ("rayjob-train.yaml", "README.md", "ray-up-aws.yaml"):
        assert found, f"{path.name} names no entry point"
    assert "AWS_SECRET_ACCESS_KEY" not in path.read_text()


def test_job_entry_point_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "--categories" in out.stdout
