"""call_with_retries is pure timing logic: a fake clock and sleep drive it, no server needed."""

from __future__ import annotations

import asyncio
import random

import pytest

from shared.retry import call_with_retries

pytestmark = pytest.mark.timeout(10)


class Failure(Exception):
    def __init__(self, *, transient: bool = True, retry_after: float | None = None) -> None:
        super().__init__("scripted")
        self.transient = transient
        self.retry_after = retry_after


class FakeTime:
    """A clock that only moves when the code under test sleeps (or an operation says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class Script:
    """An operation that raises the scripted errors in order, then `then` forever (or returns)."""

    def __init__(
        self, *errors: BaseException, then: BaseException | None = None, time: FakeTime | None = None, cost: float = 0.0
    ) -> None:
        self.errors = list(errors)
        self.then = then
        self.calls = 0
        self.time = time
        self.cost = cost

    async def __call__(self) -> str:
        self.calls += 1
        if self.time is not None:
            self.time.now += self.cost
        if self.errors:
            raise self.errors.pop(0)
        if self.then is not None:
            raise self.then
        return "done"


def always_failing(error: BaseException, **options) -> Script:
    return Script(then=error, **options)


async def retry(operation, time: FakeTime, **options):
    options.setdefault("rng", random.Random(7))
    return await call_with_retries(
        operation,
        is_transient=lambda error: getattr(error, "transient", False),
        retry_after=lambda error: getattr(error, "retry_after", None),
        sleep=time.sleep,
        clock=time.clock,
        **options,
    )


async def test_success_at_first_try_never_sleeps():
    time = FakeTime()
    operation = Script()
    assert await retry(operation, time) == "done"
    assert operation.calls == 1
    assert time.sleeps == []


async def test_transient_errors_are_retried_with_growing_delays():
    time = FakeTime()
    retries = []
    operation = Script(Failure(), Failure(), Failure())
    result = await retry(operation, time, on_retry=lambda error, attempt, delay: retries.append((attempt, delay)))
    assert result == "done"
    assert operation.calls == 4
    assert [attempt for attempt, _ in retries] == [1, 2, 3]
    for (_, delay), expected in zip(retries, [1.0, 2.0, 4.0], strict=True):
        assert expected * 0.9 <= delay <= expected * 1.1
    assert time.sleeps == [delay for _, delay in retries]


async def test_permanent_error_is_raised_at_once():
    time = FakeTime()
    permanent = Failure(transient=False)
    operation = Script(permanent)
    with pytest.raises(Failure) as raised:
        await retry(operation, time)
    assert raised.value is permanent
    assert operation.calls == 1
    assert time.sleeps == []


async def test_budget_spent_reraises_the_last_error_without_sleeping_past_it():
    time = FakeTime()
    start = time.now
    error = Failure()
    operation = always_failing(error)
    with pytest.raises(Failure) as raised:
        await retry(operation, time, budget_seconds=60)
    assert raised.value is error
    assert time.now - start == pytest.approx(60)
    assert sum(time.sleeps) == pytest.approx(60)
    assert all(delay <= 16.0 for delay in time.sleeps)
    # 1 + 2 + 4 + 8 + 16 + 16 + 13 (what is left): seven waits, eight attempts.
    assert operation.calls == len(time.sleeps) + 1


async def test_retry_after_is_honoured_when_longer_than_backoff():
    time = FakeTime()
    operation = Script(Failure(retry_after=5.0))
    assert await retry(operation, time) == "done"
    assert time.sleeps == [5.0]


async def test_backoff_wins_when_retry_after_is_shorter():
    time = FakeTime()
    operation = Script(Failure(), Failure(), Failure(retry_after=0.5))
    await retry(operation, time, rng=random.Random(1))
    assert 4 * 0.9 <= time.sleeps[2] <= 4 * 1.1


async def test_backoff_is_capped_by_the_remaining_budget():
    time = FakeTime()
    operation = always_failing(Failure())
    with pytest.raises(Failure):
        await retry(operation, time, budget_seconds=10, first_delay=8, max_delay=8)
    assert time.sleeps == [pytest.approx(8.0, rel=0.11), pytest.approx(10.0 - time.sleeps[0])]
    assert operation.calls == 3


async def test_a_retry_after_beyond_the_remaining_budget_ends_the_retries_at_once():
    time = FakeTime()
    error = Failure(retry_after=30.0)
    operation = always_failing(error)
    with pytest.raises(Failure) as raised:
        await retry(operation, time, budget_seconds=10)
    assert raised.value is error
    assert time.sleeps == []
    assert operation.calls == 1


async def test_time_spent_in_the_operation_counts_against_the_budget():
    time = FakeTime()
    start = time.now
    operation = always_failing(Failure(), time=time, cost=25.0)
    with pytest.raises(Failure):
        await retry(operation, time, budget_seconds=60)
    # 25 (call) + ~1 (wait) + 25 (call) + ~2 (wait) + 25 (call) > 60: no further wait.
    assert operation.calls == 3
    assert time.now - start <= 60 + 25


async def test_delays_never_exceed_max_delay_even_with_jitter():
    time = FakeTime()
    with pytest.raises(Failure):
        await retry(always_failing(Failure()), time, budget_seconds=500, first_delay=1, max_delay=4)
    assert max(time.sleeps) <= 4.0
    assert len(time.sleeps) > 100


async def test_max_retries_limits_the_number_of_retries():
    time = FakeTime()
    error = Failure()
    operation = always_failing(error)
    with pytest.raises(Failure) as raised:
        await retry(operation, time, first_delay=2, max_retries=3)
    assert raised.value is error
    assert operation.calls == 4
    assert len(time.sleeps) == 3


async def test_jitter_spreads_retries_of_different_workers():
    delays = set()
    for seed in range(5):
        time = FakeTime()
        await retry(Script(Failure()), time, rng=random.Random(seed))
        delays.add(time.sleeps[0])
    assert len(delays) > 1
    assert all(0.9 <= delay <= 1.1 for delay in delays)


async def test_cancellation_is_never_retried():
    time = FakeTime()
    operation = Script(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await call_with_retries(operation, is_transient=lambda error: True, sleep=time.sleep, clock=time.clock)
    assert operation.calls == 1
    assert time.sleeps == []


async def test_real_sleep_and_clock_by_default():
    operation = Script(Failure())
    result = await call_with_retries(
        operation, is_transient=lambda error: True, first_delay=0.01, budget_seconds=1
    )
    assert result == "done"
    assert operation.calls == 2


# ---------------------------------------------------------------- parse_retry_after


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None), ("", None), ("  ", None), ("3", 3.0), (" 2.5 ", 2.5), ("-4", 0.0), ("soon", None),
        ("inf", None), ("nan", None), ("1e400", None),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),  # ten seconds after the fake `now`
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # a date in the past: no wait
        ("Wed, 21 Oct 2015 07:28:10", None),  # no zone: not an HTTP date
    ],
)
def test_parse_retry_after(header, seconds):
    from datetime import UTC, datetime

    from shared.retry import parse_retry_after

    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after(header, now=lambda: now) == seconds


def test_one_parser_serves_both_services():
    from services.image.providers import base as providers_base
    from services.story.writers import base as writers_base
    from shared.retry import parse_retry_after

    assert providers_base.parse_retry_after is writers_base.parse_retry_after is parse_retry_after
