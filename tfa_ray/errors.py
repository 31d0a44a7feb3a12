"""Failures a person can read: one line naming the cause and the file or URL involved, and
exit codes a scheduler can tell apart. The full traceback belongs in the log file.

Exit codes of every ``tfa-ray`` command (and ``jobs/*.py``):

* ``0`` -- finished, every input ``ok``;
* ``1`` -- did not finish (I/O, a service, a bad model, a run already in progress, ...);
* ``2`` -- did not finish: the command line or its input is wrong (argparse's code too);
* ``3`` -- finished, with error rows (the run is complete; someone should look at them).
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR_ROWS = 3

MAX_LINE = 400  # characters of a cause on the console (the log file has all of it)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it, outermost first: ``__cause__`` / ``__context__``, and the
    ``cause`` that Ray's task errors carry."""
    out: list[BaseException] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        nxt = getattr(e, "cause", None)
        e = nxt if isinstance(nxt, BaseException) else (e.__cause__ or e.__context__)
    return out


def _is_ray(e: BaseException) -> bool:
    return any(c.__module__.split(".")[0] == "ray" for c in type(e).__mro__[:-1])


# "OSError: [Errno 28] No space left on device: '/out/part-00001.parquet'" in a remote traceback
_REMOTE = re.compile(r"^(?!ray\.)([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.+)$", re.M)


class RemoteError(Exception):
    """An error raised in a Ray worker that reached the driver only as traceback text (Ray
    Data's ``UserCodeException`` keeps the original's text, not the original)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def root_cause(exc: BaseException) -> BaseException:
    """The error a person should see: the first ``OSError`` that is not one of Ray's wrappers
    (it names the file: ``PermissionError``, ``ENOSPC``), else the first non-Ray error, else
    the first error named in a Ray worker's traceback text."""
    chain = _chain(exc)
    mine = [e for e in chain if not _is_ray(e)]
    if mine:
        return next((e for e in mine if isinstance(e, OSError)), mine[0])
    for e in chain:
        m = _REMOTE.search(str(e))
        if m:
            return RemoteError(m.group(1).rsplit(".", 1)[-1], m.group(2))
    return chain[0]


def one_line(exc: BaseException) -> str:
    """``Type: message`` of :func:`root_cause`, on one line, at most ``MAX_LINE`` characters."""
    cause = root_cause(exc)
    text = " ".join(str(cause).split()) or "(no message)"
    if len(text) > MAX_LINE:
        text = text[: MAX_LINE - 3] + "..."
    if type(cause) in (ValueError, LookupError):
        return text  # our own messages say what is wrong already
    name = cause.name if isinstance(cause, RemoteError) else type(cause).__name__
    return f"{name}: {text}"
