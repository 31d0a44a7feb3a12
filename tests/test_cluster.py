"""cluster/ deploys: every definition is checked offline against what will read it.

- KubeRay objects against the CRDs of a pinned KubeRay release (tests/schemas/), strictly: a field
  the CRD does not define is an error (what `kubectl apply` does with strict field validation).
- Kubernetes core objects: their pod templates against the PodTemplateSpec schema inside the same
  CRDs, their other fields against the short allowlists below.
- `ray-up-aws.yaml` through Ray's own `prepare_config` + `validate_config`.
- The MLflow server's arguments through MLflow's own `mlflow server` parser and Host check.
- Across files: namespace, service DNS names, ServiceAccounts, images and versions, entry points.

Every validator also gets a broken copy and must reject it.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import hashlib
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from unittest import mock
from urllib.parse import urlsplit

import jsonschema  # a dependency of ray itself, which also validates with it
import pytest
import yaml

from tfa_ray.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER_DIR = ROOT / "cluster"
CLUSTER = sorted(p for p in CLUSTER_DIR.iterdir() if p.is_file())
SCHEMAS = pathlib.Path(__file__).resolve().parent / "schemas" / "kuberay-v1.7.0"
NAMESPACE = "tfa-ray"
TFA_IMAGE_REPO = "ghcr.io/example/tfa-ray"
SUBMIT_IMAGE_REPO = "ghcr.io/example/tfa-ray-submit"  # the Dockerfile's `submit` target
COMMAND = re.compile(r"python\s+(\S*jobs/[\w.-]+\.py)((?:[ \t]+(?:\\\n\s*)?[^\s\\#`|&;]+)*)")
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB


# --------------------------------------------------------------------------- loading


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _find(node, key):
    """Every value stored under `key` anywhere in node."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _find(v, key)


def _yaml_docs(path: pathlib.Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _texts(path: pathlib.Path) -> list[str]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        docs = _yaml_docs(path)
        assert docs, f"{path.name} is empty"
        return [text, *(s for d in docs for s in _strings(d))]
    return [text]


def _manifests() -> list[dict]:
    """Every Kubernetes object in cluster/ (a deep copy: tests may break their copy)."""
    return [
        d
        for p in CLUSTER
        if p.suffix == ".yaml"
        for d in _yaml_docs(p)
        if isinstance(d, dict) and "apiVersion" in d and "kind" in d
    ]


def _one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER_DIR / "ray-up-aws.yaml").read_text())


def _dockerfile() -> str:
    return (CLUSTER_DIR / "Dockerfile").read_text()


# --------------------------------------------------------------------------- KubeRay CRDs


def _strict(schema):
    """The CRD schema with unknown fields rejected: every object that lists its properties gets
    additionalProperties: false, unless it keeps unknown fields on purpose."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_validator(kind: str):
    path = SCHEMAS / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.load(path.read_text(), Loader=YAML_LOADER)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # The API server owns metadata; these are the fields a manifest here may set.
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name", "namespace"],
        "properties": {
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "additionalProperties": False,
    }
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


@functools.cache
def _pod_template_schema() -> dict:
    """Kubernetes' PodTemplateSpec as KubeRay's CRD embeds it (the head group template)."""
    spec = _crd_validator("RayCluster").schema["properties"]["spec"]
    return spec["properties"]["headGroupSpec"]["properties"]["template"]


def _errors(validator, doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


# --------------------------------------------------------------------------- core objects

_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name"],
    "additionalProperties": False,
}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}


def _obj(properties: dict, required=()) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


def _core_schema(api_version: str, kind: str, **top) -> dict:
    return _obj(
        {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _META, **top},
        required=["apiVersion", "kind", "metadata"],
    )


# Fields of the core kinds used here, from the Kubernetes API reference (v1.30): a short,
# hand-kept allowlist, so a typo or a field in the wrong place fails here, not at apply time.
# Pod templates are checked against the full upstream schema instead.
_JOB_SPEC = _obj(
    {
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "completions": {"type": "integer"},
        "parallelism": {"type": "integer"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "template": {"$ref": "#/definitions/podTemplate"},
    },
    required=["template"],
)
CORE_SCHEMAS = {
    ("v1", "Namespace"): _core_schema("v1", "Namespace"),
    ("v1", "ServiceAccount"): _core_schema(
        "v1", "ServiceAccount", automountServiceAccountToken={"type": "boolean"}
    ),
    ("v1", "Service"): _core_schema(
        "v1",
        "Service",
        spec=_obj(
            {
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
                "selector": _LABELS,
                "ports": {
                    "type": "array",
                    "items": _obj(
                        {
                            "name": {"type": "string"},
                            "port": {"type": "integer"},
                            "targetPort": {"type": ["integer", "string"]},
                            "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                        },
                        required=["port"],
                    ),
                },
            },
            required=["selector", "ports"],
        ),
    ),
    ("apps/v1", "Deployment"): _core_schema(
        "apps/v1",
        "Deployment",
        spec=_obj(
            {
                "replicas": {"type": "integer", "minimum": 0},
                "selector": _obj({"matchLabels": _LABELS}, required=["matchLabels"]),
                "strategy": {"type": "object"},
                "template": {"$ref": "#/definitions/podTemplate"},
            },
            required=["selector", "template"],
        ),
    ),
    ("batch/v1", "CronJob"): _core_schema(
        "batch/v1",
        "CronJob",
        spec=_obj(
            {
                "schedule": {"type": "string"},
                "timeZone": {"type": "string"},
                "concurrencyPolicy": {"enum": ["Allow", "Forbid", "Replace"]},
                "startingDeadlineSeconds": {"type": "integer", "minimum": 0},
                "successfulJobsHistoryLimit": {"type": "integer", "minimum": 0},
                "failedJobsHistoryLimit": {"type": "integer", "minimum": 0},
                "suspend": {"type": "boolean"},
                "jobTemplate": _obj({"metadata": _META, "spec": _JOB_SPEC}, required=["spec"]),
            },
            required=["schedule", "jobTemplate"],
        ),
    ),
}


def _core_validator(doc):
    schema = CORE_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    assert schema is not None, f"no schema for {doc['apiVersion']} {doc['kind']}"
    schema = {**schema, "definitions": {"podTemplate": _pod_template_schema()}}
    return jsonschema.Draft7Validator(schema)


def _schema_errors(doc) -> list[str]:
    if doc["apiVersion"] == "ray.io/v1":
        return _errors(_crd_validator(doc["kind"]), doc)
    return _errors(_core_validator(doc), doc)


# --------------------------------------------------------------------------- cross-file checks


def _pod_specs(doc):
    """The pod spec of every pod template in a manifest."""
    for template in _find(doc.get("spec", {}), "template"):
        if isinstance(template, dict) and "containers" in template.get("spec", {}):
            yield template["spec"]


def _containers(doc):
    for spec in _pod_specs(doc):
        yield from spec["containers"]


def _worker_groups(doc):
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
    return cluster, cluster.get("workerGroupSpecs", [])


def _cluster_problems(docs: list[dict]) -> list[str]:
    """What makes a set of manifests fail to deploy together, as readable lines."""
    problems = []
    namespaces = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    accounts = {
        (d["metadata"].get("namespace"), d["metadata"]["name"])
        for d in docs
        if d["kind"] == "ServiceAccount"
    }
    services = {}  # (name, namespace) -> ports
    for d in docs:
        ns = d["metadata"].get("namespace")
        if d["kind"] == "Service":
            services[(d["metadata"]["name"], ns)] = {p["port"] for p in d["spec"]["ports"]}
        if d["kind"] == "RayCluster":  # KubeRay's head Service: <cluster>-head-svc
            head = d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
            ports = {p["containerPort"] for p in head.get("ports", [])}
            services[(d["metadata"]["name"] + "-head-svc", ns)] = ports

    for d in docs:
        where = f"{d['kind']} {d['metadata']['name']}"
        ns = d["metadata"].get("namespace")
        if d["kind"] != "Namespace":
            if ns != NAMESPACE:
                problems.append(f"{where}: namespace {ns!r}, not {NAMESPACE!r}")
            if ns not in namespaces:
                problems.append(f"{where}: namespace {ns!r} is created by no manifest")
        for sa in _find(d, "serviceAccountName"):
            if (ns, sa) not in accounts:
                problems.append(f"{where}: ServiceAccount {sa!r} is defined nowhere in {ns!r}")
        for text in _strings(d):
            for host, port in re.findall(r"([\w.-]+\.svc\.cluster\.local):(\d+)", text):
                name, svc_ns = host.removesuffix(".svc.cluster.local").split(".", 1)
                if svc_ns != ns:
                    problems.append(f"{where}: {host} is outside the object's namespace {ns!r}")
                if int(port) not in services.get((name, svc_ns), set()):
                    problems.append(f"{where}: no Service {name}.{svc_ns} with port {port}")
        for c in _containers(d):
            defined = {e["name"] for e in c.get("env", [])}
            for arg in [*c.get("command", []), *c.get("args", [])]:
                for var in re.findall(r"\$\(([A-Za-z_]\w*)\)", arg):
                    if var not in defined:  # Kubernetes would pass "$(VAR)" on literally
                        problems.append(f"{where}: $({var}) is not in the container's env")
            for e in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|TOKEN|_KEY|DB_URI", e["name"]) and "value" in e:
                    problems.append(f"{where}: {e['name']} is inline, not from a Secret")
        if d["kind"] in ("RayCluster", "RayJob"):
            cluster, groups = _worker_groups(d)
            for g in groups:
                gwhere = f"{where} group {g['groupName']}"
                pod = g["template"]["spec"]
                wants_gpu = any(
                    "nvidia.com/gpu" in c.get("resources", {}).get(kind, {})
                    for c in pod["containers"]
                    for kind in ("limits", "requests")
                )
                tolerated = any(
                    t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])
                )
                if wants_gpu and not tolerated:
                    problems.append(f"{gwhere}: GPU pods without the nvidia.com/gpu toleration")
                bounds = {g.get("minReplicas"), g.get("maxReplicas")} - {None}
                if bounds - {g.get("replicas")} and not cluster.get("enableInTreeAutoscaling"):
                    problems.append(f"{gwhere}: min/maxReplicas without autoscaling are ignored")
            for gwhere, group in [(f"{where} head", cluster["headGroupSpec"])] + [
                (f"{where} group {g['groupName']}", g) for g in groups
            ]:
                problems += _shm_problems(gwhere, group)
            if d["kind"] == "RayCluster" and not (
                any(_wants_gpu(g) for g in groups) and any(not _wants_gpu(g) for g in groups)
            ):
                problems.append(f"{where}: no CPU-only worker group beside the GPU group")
    return problems


def _wants_gpu(group: dict) -> bool:
    return any(
        "nvidia.com/gpu" in c.get("resources", {}).get(kind, {})
        for c in group["template"]["spec"]["containers"]
        for kind in ("limits", "requests")
    )


def _bytes(quantity: str) -> float:
    """A Kubernetes quantity (``18Gi``, ``512Mi``, ``2147483648``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(quantity))
    assert m, f"not a quantity: {quantity!r}"
    return float(m.group(1)) * units.get(m.group(2) or "", 1)


def _shm_problems(where: str, group: dict) -> list[str]:
    """Ray's object store lives in /dev/shm: a container's default 64 MiB would spill it."""
    pod = group["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        for mount in c.get("volumeMounts", []):
            if mount["mountPath"] != "/dev/shm":
                continue
            empty = volumes.get(mount["name"], {}).get("emptyDir")
            if not empty or empty.get("medium") != "Memory":
                return [f"{where}: /dev/shm is not a memory-backed emptyDir"]
            store = group.get("rayStartParams", {}).get("object-store-memory")
            if store and _bytes(empty.get("sizeLimit", "0")) < _bytes(store):
                return [f"{where}: /dev/shm sizeLimit is below object-store-memory {store}"]
            return []
    return [f"{where}: no memory-backed /dev/shm for Ray's object store"]


def _image_problems(docs: list[dict], launcher: dict, dockerfile: str) -> list[str]:
    problems = []
    images = [(f"{d['kind']} {d['metadata']['name']}", i) for d in docs for i in _find(d, "image")]
    images.append(("ray-up-aws.yaml docker", launcher["docker"]["image"]))
    for where, image in images:
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        if "@sha256:" not in image and (not tag or tag == "latest"):
            problems.append(f"{where}: image {image} is not pinned")
    ours = {i for _, i in images if i.startswith(TFA_IMAGE_REPO + ":")}
    if len(ours) != 1:
        problems.append(f"the tfa-ray image differs between files: {sorted(ours)}")
    cron = [d for d in docs if d["kind"] == "CronJob"]
    for image in (i for d in cron for c in _containers(d) for i in [c["image"]]):
        if image.startswith(TFA_IMAGE_REPO + ":"):
            problems.append(
                f"CronJob: submits with the CUDA image {image}, not {SUBMIT_IMAGE_REPO}"
            )
        elif image.startswith(SUBMIT_IMAGE_REPO + ":") and ours:
            if image.rpartition(":")[2] != next(iter(ours)).rpartition(":")[2]:
                problems.append(f"CronJob: {image} is not the tag of {sorted(ours)}")
    stages = _dockerfile_stages(dockerfile)
    if "submit" not in stages:
        problems.append("Dockerfile: no `submit` stage for the CronJob's image")
    elif re.search(r'"(torch|torchvision|mlflow)\b', stages["submit"]):
        problems.append("Dockerfile: the submit stage installs torch / mlflow")

    pin = re.compile(r'"([\w-]+)(?:\[[\w,]+\])?==([\w.+-]+)"')
    pins = dict(pin.findall(list(stages.values())[-1]))  # the node image: the last stage
    for name in ("torch", "torchvision", "ray", "mlflow"):
        if name not in pins:
            problems.append(f"Dockerfile: {name} is not pinned with ==")
    ray_versions = {v for d in docs for v in _find(d, "rayVersion")}
    for stage, text in stages.items():
        ray = dict(pin.findall(text)).get("ray")
        if ray_versions != {ray}:
            problems.append(f"rayVersion {sorted(ray_versions)} != stage {stage}'s ray {ray}")
    servers = [i for _, i in images if i.startswith("ghcr.io/mlflow/mlflow:")]
    for image in servers:
        if not image.endswith(f":v{pins.get('mlflow')}-full"):
            problems.append(
                f"{image}: not the -full image of the client's mlflow {pins.get('mlflow')}"
            )
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    for base in bases or [None]:
        if not base or not re.fullmatch(r"python:3\.11[\w.-]*(@sha256:[0-9a-f]{64})?", base):
            problems.append(f"Dockerfile: base {base} is not a pinned Python 3.11")
    return problems


def _dockerfile_stages(dockerfile: str) -> dict[str, str]:
    """Each ``FROM ... AS name`` stage's text (an unnamed stage is called by its number)."""
    parts = re.split(r"^(?=FROM\s)", dockerfile, flags=re.M)[1:]
    return {
        (m.group(1) if (m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", p, re.I)) else str(i)): p
        for i, p in enumerate(parts)
    }


# --------------------------------------------------------------------------- the files


def test_cluster_dir_has_the_pieces():
    names = {p.name for p in CLUSTER}
    assert {
        "namespace.yaml",
        "raycluster.yaml",
        "rayjob-train.yaml",
        "cronjob-score.yaml",
        "mlflow-server.yaml",
        "ray-up-aws.yaml",
        "runtime-env.yaml",
        "Dockerfile",
        "README.md",
    } <= names
    kinds = {d["kind"] for d in _manifests()}
    assert {"Namespace", "ServiceAccount", "RayCluster", "RayJob", "CronJob"} <= kinds
    assert {"Deployment", "Service"} <= kinds
    readme = (CLUSTER_DIR / "README.md").read_text()
    for p in CLUSTER:  # the runbook covers every file
        assert p.name == "README.md" or p.name in readme, f"cluster/README.md omits {p.name}"


def test_vendored_schemas_are_the_pinned_release():
    notice = (SCHEMAS / "NOTICE").read_text()
    assert "v1.7.0" in notice and "Apache License" in (SCHEMAS / "LICENSE").read_text()
    for path in sorted(SCHEMAS.glob("*.yaml")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert f"{digest}  {path.name}" in notice, f"{path.name} differs from the vendored file"


@pytest.mark.parametrize("doc", _manifests(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_manifest_matches_its_schema(doc):
    assert _schema_errors(doc) == []


@pytest.mark.parametrize(
    "kind, break_it, expected",
    [
        # a typo in a container field, deep inside the RayJob's worker pod
        (
            "RayJob",
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"][
                "containers"
            ][0].update(imagePullPolicyy="Always"),
            "imagePullPolicyy",
        ),
        # a real field in the wrong place
        ("RayCluster", lambda d: d["spec"].update(minReplicas=0), "minReplicas"),
        ("RayCluster", lambda d: d["spec"].update(rayVersion=2.6), "is not of type 'string'"),
        ("RayJob", lambda d: d["metadata"].update(generateName="x-"), "generateName"),
        (
            "CronJob",
            lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"].update(
                activeDeadlineSeconds="1h"
            ),
            "'1h' is not of type 'integer'",
        ),
        ("CronJob", lambda d: d["spec"].update(backoffLimit=0), "backoffLimit"),
        ("Deployment", lambda d: d["spec"]["template"]["spec"].update(tolerance=[]), "tolerance"),
        ("Service", lambda d: d["spec"]["ports"][0].update(prot=1), "prot"),
        ("ServiceAccount", lambda d: d.update(automountToken=False), "automountToken"),
    ],
)
def test_schema_rejects_a_broken_copy(kind, break_it, expected):
    doc = copy.deepcopy([d for d in _manifests() if d["kind"] == kind][0])
    assert _schema_errors(doc) == []
    break_it(doc)
    errors = _schema_errors(doc)
    assert any(expected in e for e in errors), errors


def test_manifests_fit_together():
    assert _cluster_problems(_manifests()) == []


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda ds: _one(ds, "Namespace").update(metadata={"name": "default"}), "created by no"),
        (lambda ds: _one(ds, "Deployment")["metadata"].pop("namespace"), "namespace None"),
        (
            lambda ds: _one(ds, "Service", "mlflow")["metadata"].update(name="mlflow-svc"),
            "no Service mlflow.tfa-ray with port 5000",
        ),
        (
            lambda ds: _one(ds, "Service")["spec"]["ports"][0].update(port=80),
            "no Service mlflow.tfa-ray with port 5000",
        ),
        (
            lambda ds: ds.remove(_one(ds, "ServiceAccount", "tfa-ray")),
            "ServiceAccount 'tfa-ray' is defined nowhere",
        ),
        (
            lambda ds: _one(ds, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0][
                "template"
            ]["spec"].pop("tolerations"),
            "without the nvidia.com/gpu toleration",
        ),
        (
            lambda ds: _one(ds, "RayJob")["spec"]["rayClusterSpec"].pop("enableInTreeAutoscaling"),
            "without autoscaling are ignored",
        ),
        (
            lambda ds: _one(ds, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"][
                "containers"
            ][0]["args"].__setitem__(
                0, "ray job submit --address http://tfa-ray-svc.tfa-ray.svc.cluster.local:8265"
            ),
            "no Service tfa-ray-svc.tfa-ray with port 8265",
        ),
        (
            lambda ds: _one(ds, "Deployment")["spec"]["template"]["spec"]["containers"][0][
                "env"
            ].clear(),
            "$(MLFLOW_DB_URI) is not in the container's env",
        ),
        (
            lambda ds: _one(ds, "Deployment")["spec"]["template"]["spec"]["containers"][0][
                "env"
            ].__setitem__(0, {"name": "MLFLOW_DB_URI", "value": "postgresql+psycopg2://u:p@h/db"}),
            "MLFLOW_DB_URI is inline",
        ),
        (
            lambda ds: _one(ds, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"][
                "spec"
            ].pop("volumes"),
            "group gpu: /dev/shm is not a memory-backed emptyDir",
        ),
        (
            lambda ds: _one(ds, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"][
                "spec"
            ]["containers"][0].pop("volumeMounts"),
            "head: no memory-backed /dev/shm",
        ),
        (
            lambda ds: _one(ds, "RayCluster")["spec"]["workerGroupSpecs"][1]["template"]["spec"][
                "volumes"
            ][0]["emptyDir"].update(sizeLimit="1Gi"),
            "group cpu: /dev/shm sizeLimit is below object-store-memory",
        ),
        (
            lambda ds: _one(ds, "RayCluster")["spec"]["workerGroupSpecs"].pop(1),
            "no CPU-only worker group",
        ),
    ],
)
def test_cross_file_checks_catch_a_broken_copy(break_it, expected):
    docs = _manifests()
    break_it(docs)
    problems = _cluster_problems(docs)
    assert any(expected in p for p in problems), problems


def test_images_are_pinned_and_agree():
    assert _image_problems(_manifests(), _launcher(), _dockerfile()) == []


@pytest.mark.parametrize(
    "where, old, new, expected",
    [
        ("raycluster.yaml", "tfa-ray:0.1.0", "tfa-ray:0.1.1", "differs between files"),
        ("rayjob-train.yaml", "tfa-ray:0.1.0", "tfa-ray:latest", "is not pinned"),
        ("mlflow-server.yaml", "mlflow:v3.17.2-full", "mlflow:v3.17.2", "not the -full image"),
        ("raycluster.yaml", 'rayVersion: "2.60.0"', 'rayVersion: "2.59.0"', "rayVersion"),
        ("Dockerfile", '"ray[data,train,default]==2.60.0"', '"ray[data,train,default]"', "ray is"),
        ("Dockerfile", "FROM python:3.11-slim-bookworm", "FROM python:latest", "base"),
        ("ray-up-aws.yaml", "tfa-ray:0.1.0", "tfa-ray:0.2.0", "differs between files"),
        ("cronjob-score.yaml", "tfa-ray-submit:0.1.0", "tfa-ray:0.1.0", "the CUDA image"),
        ("cronjob-score.yaml", "tfa-ray-submit:0.1.0", "tfa-ray-submit:0.0.9", "not the tag"),
        ("Dockerfile", '"ray[default]==2.60.0"', '"ray[default]==2.59.0"', "stage submit's ray"),
        (
            "Dockerfile",
            '"ray[default]==2.60.0"',
            '"ray[default]==2.60.0" "torch==2.14.1"',
            "submit",
        ),
        ("Dockerfile", "AS submit", "AS client", "no `submit` stage"),
    ],
)
def test_image_checks_catch_a_mismatch(where, old, new, expected):
    texts = {p.name: p.read_text() for p in CLUSTER}
    assert old in texts[where]
    texts[where] = texts[where].replace(old, new)
    docs = [
        d
        for name, text in texts.items()
        if name.endswith(".yaml")
        for d in yaml.safe_load_all(text)
        if isinstance(d, dict) and "kind" in d
    ]
    launcher = yaml.safe_load(texts["ray-up-aws.yaml"])
    problems = _image_problems(docs, launcher, texts["Dockerfile"])
    assert any(expected in p for p in problems), problems


def _dockerfile_problems(dockerfile: str) -> list[str]:
    problems = []
    for line in dockerfile.splitlines():
        if m := re.match(r"COPY\s+(.+)\s+\S+$", line):
            for src in m.group(1).split():
                if src in (".", "./", "*"):  # the whole checkout: data, runs, .git
                    problems.append(f"Dockerfile: {line!r} copies the whole checkout")
                elif not (ROOT / src).exists():
                    problems.append(f"Dockerfile: {line!r} copies {src}, which does not exist")
    if not re.search(r"^RUN .*pip install \.", dockerfile, re.M):
        problems.append("Dockerfile: the package itself is not installed")
    last = list(_dockerfile_stages(dockerfile).values())[-1]  # what a plain `docker build` makes
    apt = " ".join(re.findall(r"apt-get install([^&]*)", last.replace("\\\n", " ")))
    for tool in ("rsync", "openssh-client"):  # `ray up`'s docker mode syncs and ssh-es from it
        if not re.search(rf"(^|\s){tool}(\s|$)", apt):
            problems.append(f"Dockerfile: the node image lacks {tool} (ray up docker mode)")
    return problems


def test_dockerfile_copies_only_what_exists():
    assert _dockerfile_problems(_dockerfile()) == []
    broken = _dockerfile().replace("COPY jobs ./jobs", "COPY . ./")
    assert any("whole checkout" in p for p in _dockerfile_problems(broken))
    broken = _dockerfile().replace("COPY jobs ./jobs", "COPY job ./jobs")
    assert any("job, which does not exist" in p for p in _dockerfile_problems(broken))
    broken = _dockerfile().replace(" rsync openssh-client", " openssh-client")
    assert "Dockerfile: the node image lacks rsync (ray up docker mode)" in _dockerfile_problems(
        broken
    )


# --------------------------------------------------------------------------- MLflow server


def _mlflow_server_context(deployment: dict):
    from mlflow.cli import server

    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    # MLflow's own click command: an unknown or misspelt option raises here. Its options also
    # read MLFLOW_* variables: only the manifest may decide, not this machine's environment.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with mock.patch.dict(os.environ, clean, clear=True):
        ctx = server.make_context("mlflow server", list(container["args"]))
    return container, ctx


def _tracking_netlocs(docs) -> set[str]:
    """host:port of every MLFLOW_TRACKING_URI a pod or job in the manifests is given."""
    uris = []
    for d in docs:
        for env in _find(d, "env"):
            uris += [e.get("value") for e in env if e.get("name") == "MLFLOW_TRACKING_URI"]
        for text in _find(d, "runtimeEnvYAML"):
            uris.append(yaml.safe_load(text)["env_vars"]["MLFLOW_TRACKING_URI"])
    return {urlsplit(u).netloc for u in uris}


def _rejected_hosts(docs) -> list[str]:
    from mlflow.server.security_utils import is_allowed_host_header

    _, ctx = _mlflow_server_context(_one(docs, "Deployment", "mlflow"))
    allowed = (ctx.params.get("allowed_hosts") or "").split(",")
    if allowed == [""]:  # no --allowed-hosts: MLflow falls back to localhost / private IPs
        from mlflow.server.security_utils import get_default_allowed_hosts

        allowed = get_default_allowed_hosts()
    return sorted(h for h in _tracking_netlocs(docs) if not is_allowed_host_header(allowed, h))


def test_mlflow_server_accepts_the_clients_host_header():
    docs = _manifests()
    container, ctx = _mlflow_server_context(_one(docs, "Deployment", "mlflow"))
    assert "mlflow.tfa-ray.svc.cluster.local:5000" in _tracking_netlocs(docs)
    assert _rejected_hosts(docs) == []
    assert ctx.params["host"] == "0.0.0.0" and ctx.params["serve_artifacts"]
    assert ctx.params["backend_store_uri"] == "$(MLFLOW_DB_URI)"  # from the Secret
    # Nothing installed at pod start: the image carries the drivers.
    assert "pip" not in " ".join(container["command"] + container["args"])


def test_mlflow_host_check_rejects_a_broken_copy():
    from click.exceptions import NoSuchOption

    docs = _manifests()
    args = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    args[:] = [a for a in args if not a.startswith("--allowed-hosts")]
    # MLflow's default list is why the service name needs --allowed-hosts at all.
    assert _rejected_hosts(docs) == ["mlflow.tfa-ray.svc.cluster.local:5000"]

    args.append("--allowed-hosts=mlflow:5000")
    assert _rejected_hosts(docs) == ["mlflow.tfa-ray.svc.cluster.local:5000"]

    args.append("--allowed-host=*")
    with pytest.raises(NoSuchOption):
        _rejected_hosts(docs)


def test_database_uris_name_their_driver():
    # SQLAlchemy reads a bare postgresql:// as psycopg (3); say which driver is meant.
    for p in CLUSTER:
        bare = re.findall(r"postgresql://[\w$]", p.read_text())
        assert not bare, f"{p.name}: postgresql:// without a driver"
    text = (CLUSTER_DIR / "mlflow-server.yaml").read_text()
    assert "postgresql+psycopg2://" in text


# --------------------------------------------------------------------------- ray up


def _launcher_errors(config: dict) -> list[str]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError) as exc:
        return [str(exc).splitlines()[0]]
    return []


def _launcher_problems(config: dict) -> list[str]:
    problems = _launcher_errors(config)
    for name, node in config["available_node_types"].items():
        ami = node["node_config"].get("ImageId", "")
        if not ami.startswith("resolve:ssm:/aws/service/") and (
            not re.fullmatch(r"ami-[0-9a-f]{17}", ami) or ami == "ami-0123456789abcdef0"
        ):
            problems.append(f"{name}: ImageId {ami!r} is a placeholder")
    commands = [
        c
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
        for c in config.get(key, [])
    ]
    if any("pip install" in c for c in commands):
        problems.append("nodes pip-install at boot; the image should carry the dependencies")
    if "docker" not in config or not config["docker"].get("image"):
        problems.append("no docker image: nodes would run whatever the AMI has")
    for c in config.get("head_start_ray_commands", []):
        if re.search(r"--dashboard-host[= ](0\.0\.0\.0|::)", c):
            problems.append("dashboard bound to all interfaces; use `ray dashboard` instead")
    if "." in config.get("file_mounts", {}).values() and not (
        config.get("rsync_filter") or config.get("rsync_exclude")
    ):
        problems.append("the whole checkout (data included) is rsynced to every node")
    if any(".svc.cluster.local" in s for s in _strings(config)):
        problems.append("a Kubernetes service name, which does not resolve on EC2")
    return problems


# What Ray's AWS node provider calls from the head (ray/autoscaler/_private/aws/node_provider.py:
# instances.filter, create_instances, create_tags, terminate/stop/start_instances,
# describe_instance_types, describe_images), and RunInstances with a `resolve:ssm:` ImageId.
AUTOSCALER_ACTIONS = {
    "ec2:RunInstances",
    "ec2:CreateTags",
    "ec2:TerminateInstances",
    "ec2:DescribeInstances",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeImages",
    "ssm:GetParameters",
}


def _allowed(policy: dict) -> dict[str, list[str]]:
    """Action -> the resources an IAM policy allows it on."""
    allowed: dict[str, list[str]] = {}
    for s in policy["Statement"]:
        if s["Effect"] != "Allow":
            continue
        actions = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
        resources = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
        for a in actions:
            allowed.setdefault(a, []).extend(resources)
    return allowed


def _iam_problems(config: dict, policies: dict[str, dict]) -> list[str]:
    """The head launches the workers: its profile must allow that and pass the workers' role."""
    problems = []
    types = config["available_node_types"]
    profile = {
        n: t["node_config"].get("IamInstanceProfile", {}).get("Name") for n, t in types.items()
    }
    head = profile[config["head_node_type"]]
    workers = {p for n, p in profile.items() if n != config["head_node_type"]}
    for name in {head, *workers}:
        if name not in policies:
            problems.append(f"instance profile {name}: no cluster/iam-{name}.json")
    if head in workers:
        problems.append(f"the head shares the workers' profile {head}: one of them is over-granted")
    allowed = _allowed(policies.get(head, {"Statement": []}))
    for action in sorted(AUTOSCALER_ACTIONS - set(allowed)):
        problems.append(f"head profile {head}: the autoscaler needs {action}")
    for worker in sorted(workers):
        if not any(r.endswith(f":role/{worker}") for r in allowed.get("iam:PassRole", [])):
            problems.append(f"head profile {head}: no iam:PassRole for the workers' role {worker}")
    return problems


def _iam_policies() -> dict[str, dict]:
    return {
        p.stem.removeprefix("iam-"): json.loads(p.read_text())
        for p in CLUSTER
        if p.name.startswith("iam-")
    }


def test_launcher_config_is_valid_for_ray_up():
    assert _launcher_problems(_launcher()) == []
    assert _iam_problems(_launcher(), _iam_policies()) == []
    types = _launcher()["available_node_types"]
    assert any(t["node_config"]["InstanceType"].startswith("c") for t in types.values())
    assert not _launcher()["docker"].get("disable_shm_size_detection")
    assert not any("--shm-size" in o for o in _launcher()["docker"].get("run_options", []))


def _drop_action(policies: dict, action: str) -> None:
    for s in policies["tfa-ray-head"]["Statement"]:
        if isinstance(s["Action"], list) and action in s["Action"]:
            s["Action"].remove(action)
        elif s["Action"] == action:
            s["Action"] = []


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda c, p: _drop_action(p, "ec2:RunInstances"), "needs ec2:RunInstances"),
        (lambda c, p: _drop_action(p, "iam:PassRole"), "no iam:PassRole for the workers' role"),
        (
            lambda c, p: c["available_node_types"]["head"]["node_config"].update(
                IamInstanceProfile={"Name": "tfa-ray-node"}
            ),
            "shares the workers' profile",
        ),
        (lambda c, p: p.pop("tfa-ray-head"), "no cluster/iam-tfa-ray-head.json"),
    ],
)
def test_iam_checks_reject_a_broken_copy(break_it, expected):
    config, policies = _launcher(), _iam_policies()
    break_it(config, policies)
    problems = _iam_problems(config, policies)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda c: c.update(max_worker=8), "'max_worker' was unexpected"),
        (lambda c: c["docker"].update(imag="x"), "'imag' was unexpected"),
        (lambda c: c.update(head_node_type="cpu-head"), "head_node_type"),
        (
            lambda c: c["available_node_types"]["gpu"]["node_config"].update(
                ImageId="ami-0123456789abcdef0"
            ),
            "placeholder",
        ),
        (lambda c: c.update(setup_commands=["pip install -e ."]), "pip-install at boot"),
        (
            lambda c: c["head_start_ray_commands"].append(
                "ray start --head --dashboard-host=0.0.0.0"
            ),
            "all interfaces",
        ),
        (lambda c: c.update(file_mounts={"/home/ubuntu/tfa-ray": "."}), "whole checkout"),
        (lambda c: c.pop("docker"), "no docker image"),
    ],
)
def test_launcher_checks_reject_a_broken_copy(break_it, expected):
    config = _launcher()
    break_it(config)
    problems = _launcher_problems(config)
    assert any(expected in p for p in problems), problems


def test_runtime_env_has_no_cluster_only_address():
    env = yaml.safe_load((CLUSTER_DIR / "runtime-env.yaml").read_text())
    assert not any(".svc.cluster.local" in s for s in _strings(env))
    assert {"data", ".git", "runs"} <= set(env["excludes"])  # the checkout travels, not the data


# --------------------------------------------------------------------------- entry points


def _app_dir() -> str:
    """Where the Dockerfile puts the repository (the WORKDIR its COPY lines write to)."""
    text = _dockerfile()
    workdir = None
    for line in text.splitlines():
        if m := re.match(r"WORKDIR\s+(\S+)", line):
            workdir = m.group(1)
        if re.match(r"COPY\s+jobs\s", line):
            return workdir
    raise AssertionError("the Dockerfile does not copy jobs/ into the image")


def _parse_job_args(script: str, args: list[str]) -> None:
    """SystemExit on an argument the job would reject."""
    if script.endswith("jobs/train.py"):
        build_parser().parse_args(["train", *args])
    else:
        import argparse

        from tfa_ray.scoring import add_score_arguments

        p = argparse.ArgumentParser()
        p.add_argument("-v", "--verbose", action="store_true")
        add_score_arguments(p)
        p.parse_args(args)


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_entry_points_exist(path):
    found = 0
    for text in _texts(path):
        for m in COMMAND.finditer(text):
            script = m.group(1)
            if script.startswith("/"):  # inside the image
                app = _app_dir()
                assert script.startswith(app + "/"), f"{path.name}: {script} is not under {app}"
                script = script.removeprefix(app + "/")
            assert (ROOT / script).is_file(), f"{path.name} names {script}, which does not exist"
            _parse_job_args(script, shlex.split(m.group(2).replace("\\\n", " ")))
            found += 1
    if path.name in ("rayjob-train.yaml", "cronjob-score.yaml", "README.md", "ray-up-aws.yaml"):
        assert found, f"{path.name} names no entry point"
    assert "AWS_SECRET_ACCESS_KEY" not in path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", path.read_text())


def test_job_entry_points_run_from_the_images_location():
    # Relative entry points depend on a working directory nobody sets: the jobs name the
    # absolute path the Dockerfile installs them to.
    job = _one(_manifests(), "RayJob")
    script = job["spec"]["entrypoint"].split()[1]
    assert script == f"{_app_dir()}/jobs/train.py"
    for script in ("train.py", "score.py"):
        out = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / script), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert out.returncode == 0, out.stderr
        assert ("--categories" if script == "train.py" else "--run-id") in out.stdout


# --------------------------------------------------------------------------- nightly scoring


def _run_nightly(tmp_path, env: dict) -> list[str]:
    """Run the CronJob's script with a stand-in `ray` that records its arguments."""
    cron = _one(_manifests(), "CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir(exist_ok=True)
    out = tmp_path / "argv.json"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(out)!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    run = subprocess.run(
        [*container["command"], *container["args"]],
        env={"PATH": f"{fake.parent}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(out.read_text())


def test_nightly_scoring_run_id_comes_from_the_date(tmp_path):
    before = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).date().isoformat()
    argv = _run_nightly(tmp_path, {})
    after = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).date().isoformat()
    night = before if f"nightly-{before}" in argv else after  # the run may straddle midnight

    assert argv[:2] == ["job", "submit"]
    job = argv[argv.index("--") + 1 :]
    assert job[:2] == ["python", f"{_app_dir()}/jobs/score.py"]
    _parse_job_args("jobs/score.py", job[2:])
    opts = dict(zip(job[2::2], job[3::2], strict=False))
    assert opts["--run-id"] == f"nightly-{night}"
    assert opts["--input"] == f"s3://line-archive/{night}/"
    assert argv[argv.index("--submission-id") + 1] == f"tfa-score-{night}"
    address = urlsplit(argv[argv.index("--address") + 1])
    assert (address.hostname, address.port) == ("tfa-ray-head-svc.tfa-ray.svc.cluster.local", 8265)

    # The same night again (a retry, or by hand with NIGHT): the same run, so it resumes.
    again = _run_nightly(tmp_path, {"NIGHT": night})
    assert again == argv
    other = _run_nightly(tmp_path, {"NIGHT": "2026-01-31"})
    assert "nightly-2026-01-31" in other and "s3://line-archive/2026-01-31/" in other
