"""Retries with backoff: transient failures are retried, definite answers are not."""

from __future__ import annotations

import pytest

from tfa_ray.retry import RetryPolicy, call_with_retries, is_transient


def test_transient_failures_are_retried_until_success():
    attempts, slept = [], []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("registry blip")
        return "ok"

    policy = RetryPolicy(attempts=4, base_s=1.0, max_s=1.5)
    assert call_with_retries(flaky, policy, sleep=slept.append) == "ok"
    assert len(attempts) == 3 and len(slept) == 2
    assert 0.5 <= slept[0] <= 1.0 and 0.75 <= slept[1] <= 1.5  # doubled, capped, jittered


def test_permanent_failures_and_the_last_attempt_raise():
    slept = []
    with pytest.raises(LookupError):
        call_with_retries(
            lambda: (_ for _ in ()).throw(LookupError("no model")), sleep=slept.append
        )
    assert slept == []  # a definite answer is not retried
    with pytest.raises(TimeoutError):
        call_with_retries(
            lambda: (_ for _ in ()).throw(TimeoutError()), RetryPolicy(3), sleep=slept.append
        )
    assert len(slept) == 2


def test_classification():
    assert is_transient(OSError("connection reset")) and is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError("gone")) and not is_transient(ValueError("bad"))
