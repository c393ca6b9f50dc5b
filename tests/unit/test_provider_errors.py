"""The one HTTP classification, the vendors' documented exceptions to it, the breaker's states."""

from __future__ import annotations

import pytest

from services.image.providers.errors import (
    ContentRefused,
    FailureKind,
    InvalidRequest,
    ProviderAccountUnusable,
    ProviderError,
    ProviderNotConfigured,
    ProviderUnavailable,
    is_transient,
    retry_after_of,
)
from services.image.providers.gemini import classify_gemini_error
from services.image.providers.http import ApiError, error_for_status, failure_kind_for_status
from services.image.providers.openai_images import classify_openai_error
from services.image.routing import BreakerSettings, CircuitBreaker, CircuitState


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        *((status, FailureKind.TRANSIENT) for status in (408, 409, 425, 429, 500, 502, 503, 504, 520, 529)),
        *((status, FailureKind.USER) for status in (400, 413, 415, 422)),
        *((status, FailureKind.SERVER) for status in (401, 402, 403, 404, 501, 505)),
    ],
)
def test_status_classification(status, kind):
    assert failure_kind_for_status(status) is kind


def test_error_classes_follow_the_kind():
    def error_of(status: int) -> ProviderError:
        return error_for_status("x", ApiError(status, "m", retry_after=3.0))

    assert isinstance(error_of(503), ProviderUnavailable) and error_of(503).retry_after == 3.0
    assert isinstance(error_of(422), InvalidRequest) and not error_of(422).refundable
    assert isinstance(error_of(401), ProviderAccountUnusable) and error_of(401).refundable
    assert type(error_of(404)) is ProviderError and error_of(404).kind is FailureKind.SERVER


def test_the_portrait_pipelines_constructor_still_works():
    transient = ProviderError("timeout", transient=True, retry_after=2.0, status=503)
    permanent = ProviderError("unreadable", transient=False)
    assert (transient.kind, transient.transient, is_transient(transient), retry_after_of(transient)) == (
        FailureKind.TRANSIENT, True, True, 2.0,
    )  # fmt: skip
    assert (permanent.kind, permanent.refundable) == (FailureKind.SERVER, True)
    missing = ProviderNotConfigured("RECRAFT_API_KEY is not set")
    assert (missing.transient, missing.kind, missing.reason) == (False, FailureKind.SERVER, "RECRAFT_API_KEY is not set")
    assert ContentRefused("no").kind is FailureKind.USER


def test_openai_codes_refine_the_table():
    quota = classify_openai_error(ApiError(429, "quota", "insufficient_quota", {"type": "insufficient_quota"}, 20.0))
    assert isinstance(quota, ProviderAccountUnusable) and quota.retry_after is None
    refused = classify_openai_error(ApiError(400, "rejected", "moderation_blocked", {"code": "moderation_blocked"}))
    assert isinstance(refused, ContentRefused)
    dall_e = classify_openai_error(ApiError(400, "blocked", "content_policy_violation", {}))
    assert isinstance(dall_e, ContentRefused)
    assert isinstance(classify_openai_error(ApiError(429, "slow down", "rate_limit_exceeded", {})), ProviderUnavailable)


def test_gemini_details_refine_the_table():
    def quota(quota_id: str, value: str = "50") -> dict:
        return {"details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                             "violations": [{"quotaId": quota_id, "quotaValue": value}]},
                            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12.5s"}]}  # fmt: skip

    per_minute = classify_gemini_error(ApiError(429, "m", "RESOURCE_EXHAUSTED", quota("PerMinute"), 3.0))
    assert isinstance(per_minute, ProviderUnavailable) and per_minute.retry_after == 12.5
    assert isinstance(classify_gemini_error(ApiError(429, "m", "x", quota("GenerateRequestsPerDay"))), ProviderAccountUnusable)
    assert isinstance(classify_gemini_error(ApiError(429, "m", "x", quota("PerMinute", "0"))), ProviderAccountUnusable)
    bad_key = {"details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}
    assert isinstance(classify_gemini_error(ApiError(400, "key", "INVALID_ARGUMENT", bad_key)), ProviderAccountUnusable)
    assert classify_gemini_error(ApiError(400, "region", "FAILED_PRECONDITION", {})).kind is FailureKind.SERVER
    assert isinstance(classify_gemini_error(ApiError(400, "bad", "INVALID_ARGUMENT", {})), InvalidRequest)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_the_threshold_and_lets_one_trial_through_after_the_cool_down():
    clock = Clock()
    breaker = CircuitBreaker("p", BreakerSettings(failure_threshold=2, cool_down_seconds=10), clock)
    breaker.record_failure(ProviderUnavailable("x"))
    assert breaker.state is CircuitState.CLOSED
    breaker.record_failure(ProviderUnavailable("x"))
    assert (breaker.state, breaker.try_acquire(), breaker.seconds_until_retry()) == (CircuitState.OPEN, False, 10)
    clock.now += 10
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.try_acquire() is True
    assert breaker.try_acquire() is False  # one trial at a time
    breaker.record_success()
    assert (breaker.state, breaker.try_acquire()) == (CircuitState.CLOSED, True)


def test_a_success_resets_the_count_and_user_errors_never_count():
    breaker = CircuitBreaker("p", BreakerSettings(failure_threshold=2, cool_down_seconds=10), Clock())
    for error in (ProviderUnavailable("x"), InvalidRequest("bad"), ProviderUnavailable("x"), ContentRefused("no")):
        breaker.record_failure(error)
    assert breaker.state is CircuitState.CLOSED


def test_an_account_refusal_opens_at_once():
    breaker = CircuitBreaker("p", BreakerSettings(failure_threshold=5, cool_down_seconds=10), Clock())
    breaker.record_failure(ProviderAccountUnusable("out of credits"))
    assert breaker.state is CircuitState.OPEN
