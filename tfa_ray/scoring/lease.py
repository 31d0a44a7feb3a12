"""One run at a time per run id: a lease ``<run>/_lease.json`` (host, pid, expiry) created
atomically -- ``O_EXCL`` on a local disk, a conditional PUT (``If-None-Match: *``) on S3 --
renewed while the run lives and removed when it ends.

A second run with the same id waits (``--wait``) or refuses with one line naming who holds
it. A lease past its expiry, or one whose process is gone from this host (a killed driver
never removes its lease), is stale and taken over, atomically: on
S3 a PUT conditional on the stale lease's ETag (``If-Match``), locally a rename that only one
process can win.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tfa_ray import storage

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"


class RunInProgress(RuntimeError):
    """Another process holds the run's lease."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dead_here(lease: dict[str, Any]) -> bool:
    """The lease's process ran on this host and is gone (killed: it never removed its lease),
    so the lease is stale before its expiry."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    if lease["pid"] == os.getpid():
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


@dataclass
class Lease:
    at: storage.Location  # the lease file, on the run's filesystem
    run_id: str
    ttl_s: float = 120.0
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    etag: str | None = None  # S3: of our last write (renewals are conditional on it)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def body(self) -> bytes:
        return json.dumps(
            {
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "expires": _now() + self.ttl_s,
            }
        ).encode()

    # ---- storage, local and S3

    def _create(self) -> bool:
        """Write the lease if none exists; False if one does."""
        fs, path = self.at.fs, self.at.path
        if self.at.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self.body())
                f.flush()
                os.fsync(f.fileno())
            return True
        try:
            fs.pipe_file(path, self.body(), mode="create")  # PUT with If-None-Match: *
        except FileExistsError:
            return False
        self.etag = fs.info(path).get("ETag")
        return True

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the lease's content, its ETag / local stamp), (None, None) when there is none. A
        local lease being written (empty or partial JSON) reads as held until the TTL."""
        fs, path = self.at.fs, self.at.path
        try:
            if self.at.local:
                st = os.stat(path)
                with open(path, "rb") as f:
                    data = f.read()
                stamp = f"{st.st_ino}-{st.st_mtime_ns}"
                try:
                    return json.loads(data), stamp
                except ValueError:
                    return {"host": "?", "pid": "?", "expires": st.st_mtime + self.ttl_s}, stamp
            etag = fs.info(path).get("ETag")
            return json.loads(fs.cat_file(path)), etag
        except FileNotFoundError:
            return None, None

    def _take_over(self, stale: dict[str, Any], tag: str | None) -> bool:
        """Replace a stale lease with ours; False if another process got there first."""
        fs, path = self.at.fs, self.at.path
        if not self.at.local:
            try:
                fs.pipe_file(path, self.body(), IfMatch=tag)
            except (FileNotFoundError, OSError):
                return False  # changed (or gone) since we read it: someone else's now
            self.etag = fs.info(path).get("ETag")
            return True
        aside = f"{path}.stale-{self.token}"
        try:
            os.rename(path, aside)  # only one process moves a given file
        except FileNotFoundError:
            return False
        st = os.stat(aside)
        if f"{st.st_ino}-{st.st_mtime_ns}" != tag:  # we moved a newer lease: put it back
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return self._create()

    # ---- the life of a lease

    def acquire(self, wait: bool = False, poll_s: float = 5.0) -> Lease:
        """Hold the lease (waiting with ``wait``, else raising :class:`RunInProgress`) and
        renew it in the background until :meth:`release`."""
        while True:
            if self._create():
                break
            current, tag = self._read()
            if current is None:
                continue  # released between our create and our read
            if float(current.get("expires", 0)) < _now() or _dead_here(current):
                log.warning(
                    "run %s: taking over the stale lease of %s (pid %s, until %s)",
                    self.run_id,
                    current.get("host"),
                    current.get("pid"),
                    _iso(float(current.get("expires", 0))),
                )
                if self._take_over(current, tag):
                    break
                continue
            holder = (
                f"run {self.run_id!r} is in progress on {current.get('host')} "
                f"(pid {current.get('pid')}, lease until {_iso(float(current['expires']))})"
            )
            if not wait:
                raise RunInProgress(f"{holder}: wait for it with --wait, or use another --run-id")
            log.info("%s: waiting", holder)
            time.sleep(poll_s)
        self._thread = threading.Thread(target=self._renew, name="tfa-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current, tag = self._read()
                if current is None or current.get("token") != self.token:
                    log.error("run %s: lost its lease to %s", self.run_id, current)
                    return
                if self.at.local:
                    self.at.write_bytes(self.body())
                else:
                    self.at.fs.pipe_file(self.at.path, self.body(), IfMatch=tag)
            except Exception as e:  # noqa: BLE001 - try again at the next tick
                log.warning("run %s: lease renewal failed: %s", self.run_id, e)

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        current, _ = self._read()
        if current is not None and current.get("token") == self.token:
            self.at.remove()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold(
    run: storage.Location,
    run_id: str,
    wait: bool = False,
    ttl_s: float = 120.0,
    poll_s: float = 5.0,
) -> Lease:
    """The lease of the run directory ``run``, held (use as a context manager: released at the
    end)."""
    lease = Lease(run.join(LEASE_FILE), run_id, ttl_s)
    return lease.acquire(wait=wait, poll_s=poll_s)


__all__ = ["LEASE_FILE", "Lease", "RunInProgress", "hold"]
