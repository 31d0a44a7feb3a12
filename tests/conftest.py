"""Shared pytest fixtures: real local services the tests talk to."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL.

    Tests set dummy credentials and ``AWS_ENDPOINT_URL`` themselves (monkeypatch) and use a
    fresh bucket name each, so they never see each other's objects.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> Iterator[str]:
    """Dummy credentials and ``AWS_ENDPOINT_URL`` pointing at the moto server for one test;
    the filesystem cache is cleared around it so no client keeps another test's settings."""
    from tfa_ray import storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    storage.clear_cache()
    yield s3_server
    storage.clear_cache()


def _start_ray() -> None:
    import os

    import ray

    dummy = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    added = [k for k in dummy if k not in os.environ]
    os.environ.update({k: dummy[k] for k in added})
    try:
        ray.init(
            address="local",  # never join another cluster on the machine (ray start --head)
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=256 * 1024 * 1024,
        )
    finally:  # the workers have them; the test process itself stays as it was
        for k in added:
            os.environ.pop(k, None)


@pytest.fixture(scope="session")
def _ray_session() -> Iterator[None]:
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_cluster(_ray_session) -> str:
    """A small local Ray cluster (2 CPUs) shared by the session; yields its GCS address.

    Started once (and again only if a test module shut it down) with dummy AWS credentials in
    its environment where none are set, so Ray workers, which inherit the environment at start,
    can talk to the moto S3 server. Subprocess drivers join it with ``RAY_ADDRESS=<address>``.
    """
    return _ensure_ray()


@pytest.fixture(scope="module")
def ray_cluster_module(_ray_session) -> str:
    """``ray_cluster`` for module-scoped fixtures."""
    return _ensure_ray()


def _ensure_ray() -> str:
    import ray

    if not ray.is_initialized():
        _start_ray()
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A test-tiny model package trained on synthetic 'texture' images (a few seconds)."""
    from tfa_ray.config import get_preset
    from tfa_ray.data import discover
    from tfa_ray.package import save_model
    from tfa_ray.synth import make_dataset
    from tfa_ray.training import fit

    root = tmp_path_factory.mktemp("tiny-model")
    data = root / "data"
    make_dataset(
        str(data), categories=("texture",), n_train=12, n_test_good=1, n_test_defect=1, size=64
    )
    result = fit(
        discover(str(data), "texture"),
        get_preset("test-tiny"),
        device="cpu",
        echo=lambda _msg: None,
    )
    out = str(root / "model")
    save_model(
        out,
        result.detector,
        result.preset,
        result.calibration,
        {"category": "texture", "version": 3},
    )
    return out


@pytest.fixture
def failing_train_loop():
    """``failing_train_loop(epoch)``: the Ray Train worker body, but rank 0 of the first attempt
    dies right after reporting that epoch's checkpoint (the restarted group has a checkpoint
    and runs normally). A closure, so Ray ships it by value to workers that cannot import tests.
    """

    def make(epoch: int):
        def loop(config: dict) -> None:
            import os
            import time

            import ray.train

            from tfa_ray.train_ray import worker_loop

            first = ray.train.get_checkpoint() is None
            if first and ray.train.get_context().get_world_rank() == 0:
                report = ray.train.report

                def report_then_die(metrics, checkpoint=None, **kw):
                    report(metrics, checkpoint=checkpoint, **kw)
                    if checkpoint is not None and metrics.get("epoch") == epoch:
                        # the controller takes reports off the worker's queue every health
                        # check (2 s): give it time to register this checkpoint before dying
                        time.sleep(5.0)
                        os._exit(1)

                ray.train.report = report_then_die
            worker_loop(config)

        return loop

    return make


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of a real service (moto's S3, an ``mlflow server``)
    that answers chosen requests itself instead of forwarding them.

    ``fail(method, path)`` decides per request: None forwards it, ``"slowdown"`` answers S3's
    ``503 SlowDown``, ``"unavailable"`` answers ``503`` with an empty body. ``counts`` says
    how often each answer was given; ``keys`` the access key ids the requests were signed with.
    """

    def __init__(self, target: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.fail = lambda method, path: None
        self.counts: dict[str, int] = {"forwarded": 0, "slowdown": 0, "unavailable": 0}
        self.keys: set[str] = set()
        self._lock = threading.Lock()
        target_netloc = urlsplit(target).netloc
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _answer(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                if self.command == "HEAD":
                    length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                    self.send_header("Content-Length", length)
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                verdict = proxy.fail(self.command, self.path)
                auth = self.headers.get("Authorization") or ""
                with proxy._lock:
                    proxy.counts[verdict or "forwarded"] += 1
                    if "Credential=" in auth:
                        proxy.keys.add(auth.split("Credential=", 1)[1].split("/", 1)[0])
                if verdict == "slowdown":
                    xml = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    self._answer(503, xml, [("Content-Type", "application/xml")])
                    return
                if verdict == "unavailable":
                    self._answer(503, b"", [])
                    return
                conn = http.client.HTTPConnection(target_netloc, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    headers["Host"] = target_netloc
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self._answer(resp.status, data, resp.getheaders())
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_proxy():
    """``fault_proxy(target_url)`` -> a :class:`FaultProxy`, closed after the test."""
    proxies: list[FaultProxy] = []

    def make(target: str) -> FaultProxy:
        proxies.append(FaultProxy(target))
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


@pytest.fixture
def sim_cuda() -> Iterator[None]:
    """A simulated CUDA device (tests/simcuda.py): ``torch.cuda.is_available()`` is true and
    ``cuda`` tensors keep their data on the CPU but refuse what a real GPU refuses."""
    from simcuda import simulated_cuda

    with simulated_cuda():
        yield
