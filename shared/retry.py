"""Retry an async operation with exponential backoff inside a fixed time budget.

Used by every outside call that can fail for a moment: portrait providers (image) and story
writers (story); parse_retry_after reads the wait those calls are told to honour.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# +/-10 %: enough that workers failing together do not retry in lockstep.
JITTER_FRACTION = 0.1


async def call_with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    budget_seconds: float = 60,
    first_delay: float = 1.0,
    max_delay: float = 16.0,
    is_transient: Callable[[BaseException], bool],
    retry_after: Callable[[BaseException], float | None] = lambda error: None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
    max_retries: int | None = None,
    rng: random.Random | None = None,
) -> T:
    """Runs `operation` until it succeeds, fails permanently, or the budget is spent.

    A transient failure waits max(backoff, the error's retry-after), capped by what is left
    of the budget, then tries again; the wait never ends past the budget, and a retry-after
    longer than what is left re-raises at once. `max_retries`
    bounds the number of retries as well (generation jobs allow three). When either limit
    is reached the last error is re-raised unchanged.
    """
    deadline = clock() + budget_seconds
    jitter = rng or random.Random()
    retries = 0
    while True:
        try:
            return await operation()
        except Exception as error:  # CancelledError is a BaseException and is never retried
            if not is_transient(error):
                raise
            remaining = deadline - clock()
            if remaining <= 0 or (max_retries is not None and retries >= max_retries):
                raise
            told_to_wait = retry_after(error) or 0.0
            if told_to_wait > remaining:
                # The server will not answer within the budget: waiting would spend it for
                # nothing, and the caller is better told now (with that wait) than then.
                raise
            retries += 1
            backoff = _backoff(retries, first_delay, max_delay, jitter)
            delay = min(max(backoff, told_to_wait), remaining)
            if on_retry is not None:
                on_retry(error, retries, delay)
            await sleep(delay)


def _backoff(retry_number: int, first_delay: float, max_delay: float, jitter: random.Random) -> float:
    # The exponent is capped so that a long run of tiny delays cannot overflow the float.
    base = min(max_delay, first_delay * 2 ** min(retry_number - 1, 32))
    return min(max_delay, base * jitter.uniform(1 - JITTER_FRACTION, 1 + JITTER_FRACTION))


def parse_retry_after(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date (RFC 9110
    section 10.2.3); None when absent or unreadable, never negative or infinite."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        # "inf" and "nan" parse as floats; neither is a wait anyone should honour.
        return max(0.0, seconds) if seconds == seconds and seconds != float("inf") else None
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now())
