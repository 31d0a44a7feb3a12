"""Retries with exponential backoff, and which failures are worth retrying.

The S3 client (botocore, under s3fs) already retries throttling and connection errors itself;
this is the same for the MLflow registry and model downloads, which have no retry of their
own that covers a whole look-up + download. A failure that outlasts the retries is still
*transient*: the scoring run records it as such, and a rerun with the same run id tries again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures that retrying cannot fix: the answer is definite (no such model / file, bad data).
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    LookupError,
    ValueError,
    TypeError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
)


def is_transient(exc: BaseException) -> bool:
    """True for failures that may pass (I/O, throttling, a service that does not answer)."""
    return not isinstance(exc, PERMANENT_ERRORS)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all, sleeping ``base_s * 2**i`` (capped, with jitter) between."""

    attempts: int = 4
    base_s: float = 1.0
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.base_s * 2**attempt) * random.uniform(0.5, 1.0)


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy = RetryPolicy(),
    what: str = "call",
    retry_if: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, retried on transient failures; the last failure is raised unchanged."""
    for attempt in range(max(1, policy.attempts)):
        try:
            return fn()
        except Exception as e:
            if attempt + 1 >= policy.attempts or not retry_if(e):
                raise
            wait = policy.delay(attempt)
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(e).__name__, e, wait)
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
