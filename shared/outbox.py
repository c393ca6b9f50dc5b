"""A transactional outbox relay: publishes committed rows of an outbox table to JetStream.

A service writes its event into its outbox table in the same transaction as the change the
event announces; this relay publishes it afterwards, so a broker outage only delays events
and a rolled-back change never produces one. Any service can run one per process over its
own table (`OutboxTable`); the table needs these columns (see the story migrations):

    outbox_id bigserial, subject text, msg_id text UNIQUE, payload bytea,
    created_at timestamptz, published_at timestamptz, claimed_until timestamptz,
    attempts integer, last_error text

and a trigger that calls `pg_notify(<channel>, '')` after an insert. A table may also hold
rows back: with `available_column` set, a row is relayed only once that column is NULL or
past (the image service writes a job's message before charging and releases it after).

Each round is three short steps, none holding a transaction or a row lock across the
network: claim a batch (one UPDATE ... SKIP LOCKED that stamps `claimed_until`, so several
relays share the work), publish the batch with each row's `msg_id` as `Nats-Msg-Id`, then
mark what was acknowledged. A relay that dies between publish and mark leaves its claim to
expire; the next relay republishes with the same message id and JetStream, whose duplicate
window outlasts the claim, keeps one copy. LISTEN/NOTIFY wakes the relay within
milliseconds of a commit; a slow poll remains as a safety net. Published rows are pruned
after a retention period.

The handoff: a service may insert its row already claimed (`claimed_until` = now() +
`claim_seconds`, the claim a relay round would have stamped) and, once the transaction has
committed, give the row to `hand_off`: the relay of the same process publishes it at once
and marks it, skipping the wake-up and the claim round trip, which were most of the hop
from commit to consumer. Nothing else changes: a process that dies before the mark leaves
a claim that expires, and any relay sends the row again under the same message id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from shared.config import Secret
from shared.logs import logged_step
from shared.metrics import ScrapeCollector
from shared.nats import NatsTarget, connect_nats_until_ready, msg_id_headers

log = logging.getLogger(__name__)

_QUALIFIED_NAME = re.compile(r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")
_CHANNEL_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
# Deleting published rows in slices keeps each prune transaction short.
_PRUNE_SLICE = 1000
_LISTEN_RETRY_SECONDS = 1.0
_BACKLOG_READ_TIMEOUT_SECONDS = 2.0
# Rows handed off while NATS is away wait in memory up to this many batches; beyond that
# they are left to their claim's expiry and the relay (the table holds them all anyway).
_HANDOFF_BATCHES_HELD = 10

PUBLISHED = Counter("casefile_outbox_published_total", "Outbox rows JetStream acknowledged.", ["outbox"])
PUBLISH_FAILURES = Counter(
    "casefile_outbox_publish_failures_total", "Publishes of outbox rows that failed (each is tried again).", ["outbox"]
)
PUBLISH_LAG_SECONDS = Histogram(
    "casefile_outbox_publish_lag_seconds",
    "From an outbox row's commit to JetStream's acknowledgement of it.",
    ["outbox"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)


@dataclass(frozen=True)
class OutboxTable:
    """Which table a relay drains, and which NOTIFY channel its insert trigger uses."""

    table: str  # schema-qualified, e.g. "story.outbox"
    channel: str  # e.g. "story_outbox"
    # Columns whose values go on each row's log lines, as log key -> column, e.g.
    # {"story_id": "story_id", "attempt": "portrait_attempt"}: what an operator greps for.
    log_columns: Mapping[str, str] = field(default_factory=dict)
    # A timestamptz column: rows whose value is in the future wait (NULL: at once).
    available_column: str | None = None

    def __post_init__(self) -> None:
        # All are spliced into SQL text, so they must be plain identifiers.
        if not _QUALIFIED_NAME.match(self.table):
            raise ValueError(f"outbox table must be schema.table in lowercase, got {self.table!r}")
        if not _CHANNEL_NAME.match(self.channel):
            raise ValueError(f"outbox channel must be a lowercase identifier, got {self.channel!r}")
        for column in (*self.log_columns.values(), *filter(None, [self.available_column])):
            if not _CHANNEL_NAME.match(column):
                raise ValueError(f"outbox log column must be a lowercase identifier, got {column!r}")


@dataclass(frozen=True)
class RelaySettings:
    batch_size: int = 100
    # How long a claimed row stays out of other relays' reach; far below the stream's
    # duplicate window (120 s), so a republish after a crash is always deduplicated.
    claim_seconds: float = 30.0
    publish_timeout_seconds: float = 5.0
    # The safety net behind LISTEN/NOTIFY (a lost notification, a listener reconnecting).
    poll_interval_seconds: float = 5.0
    # Published rows older than this are deleted.
    retention_seconds: float = 24 * 3600
    prune_interval_seconds: float = 60.0
    # Every database statement of a round is bounded by this.
    statement_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class OutboxRow:
    outbox_id: int
    subject: str
    msg_id: str
    payload: bytes
    created_at: datetime
    log_ids: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _PublishedBatch:
    """A claimed batch after its publish: what JetStream acknowledged and what it refused."""

    rows: list[OutboxRow]
    published: list[int]
    failed: list[tuple[int, str]]
    started_at: float
    claimed_at: float
    acked_at: float


class OutboxRelay:
    """Publishes one outbox table's rows; run one per process, as many processes as you like."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        dsn: Secret[str] | str,
        nats: NatsTarget,
        outbox: OutboxTable,
        *,
        client_name: str,
        settings: RelaySettings = RelaySettings(),
        prepare: Callable[[JetStreamContext], Awaitable[None]] | None = None,
    ) -> None:
        self._pool = pool
        self._dsn = dsn
        self._nats_target = nats
        self._outbox = outbox
        self._client_name = client_name
        self._settings = settings
        # Declares the streams the rows go to; retried until it succeeds.
        self._prepare = prepare
        self._wake = asyncio.Event()
        self._nats: Client | None = None
        self._listener: asyncpg.Connection | None = None
        self._next_prune = 0.0
        self.published_total = 0
        self._handed_off: list[OutboxRow] = []
        self._handoff_wake = asyncio.Event()
        # This outbox's metric children, looked up once: labels() on every publish was 6 us
        # of the relay's ~110 us per event under a backlog.
        self._published = PUBLISHED.labels(outbox.table)
        self._publish_failures = PUBLISH_FAILURES.labels(outbox.table)
        self._publish_lag = PUBLISH_LAG_SECONDS.labels(outbox.table)

    @property
    def claim_seconds(self) -> float:
        """How long a row inserted for `hand_off` is claimed for (its claimed_until): long
        enough for a publish that times out to give it back, short so that a row whose
        process died before publishing it waits little for the next relay."""
        return min(self._settings.claim_seconds, 2 * self._settings.publish_timeout_seconds)

    def hand_off(self, row: OutboxRow) -> None:
        """Publishes `row`, committed by this process and inserted claimed, without a claim
        round (see the module doc)."""
        if len(self._handed_off) >= self._settings.batch_size * _HANDOFF_BATCHES_HELD:
            log.warning("outbox.handoff_left", extra={"outbox": self._outbox.table, **row.log_ids,
                                                               "msg_id": row.msg_id, "outbox_id": row.outbox_id})  # fmt: skip
            return
        self._handed_off.append(row)
        self._handoff_wake.set()

    def kick(self) -> None:
        """Wakes the relay now (LISTEN/NOTIFY does this for commits of any process too)."""
        self._wake.set()

    async def run(self) -> None:
        """Relays until cancelled; NATS or the database being away only pauses it."""
        listening = asyncio.create_task(self._listen_forever(), name=f"{self._client_name}-listen")
        try:
            if self._nats is None or self._nats.is_closed:
                self._nats = await connect_nats_until_ready(self._nats_target, name=self._client_name)
            js = self._nats.jetstream()
            await self._prepare_until_done(js)
            handing_off = asyncio.create_task(self._hand_off_forever(js), name=f"{self._client_name}-handoff")
            try:
                await self._relay_forever(js)
            finally:
                handing_off.cancel()
                await asyncio.gather(handing_off, return_exceptions=True)
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)

    async def close(self) -> None:
        # close, not drain: every publish already waited for its ack, so nothing is pending,
        # and drain could wait out its timeout on a NATS that is down.
        if self._nats is not None and not self._nats.is_closed:
            with contextlib.suppress(Exception):
                await self._nats.close()
        await self._close_listener()

    async def relay_once(self, js: JetStreamContext) -> tuple[int, int]:
        """One round: claim, publish, mark. Returns (claimed, published)."""
        batch = await self._claim_and_publish(js)
        if batch is None:
            return 0, 0
        await self._mark_batch(batch)
        return len(batch.rows), len(batch.published)

    async def _claim_and_publish(self, js: JetStreamContext) -> _PublishedBatch | None:
        """The first two steps of a round; None when nothing was there to claim."""
        started = time.perf_counter()
        rows = await self._claim()
        if not rows:
            return None
        return await self._publish_rows(js, rows, started)

    async def _publish_rows(self, js: JetStreamContext, rows: list[OutboxRow], started: float) -> _PublishedBatch:
        claimed = time.perf_counter()
        results = await asyncio.gather(*(self._publish(js, row) for row in rows))
        published = [row.outbox_id for row, error in zip(rows, results, strict=True) if error is None]
        failed = [(row.outbox_id, error) for row, error in zip(rows, results, strict=True) if error is not None]
        return _PublishedBatch(rows, published, failed, started, claimed, time.perf_counter())

    async def _hand_off_forever(self, js: JetStreamContext) -> None:
        """Publishes handed-off rows as they come, each batch marked while the next publishes."""
        marking: asyncio.Task[None] | None = None
        try:
            while True:
                await self._handoff_wake.wait()
                self._handoff_wake.clear()
                rows, self._handed_off = self._handed_off, []
                if not rows:
                    continue
                batch = await self._publish_rows(js, rows, time.perf_counter())
                if marking is not None:
                    await marking
                marking = asyncio.create_task(self._mark_handed_off(batch))
        finally:
            if marking is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(marking)

    async def _mark_handed_off(self, batch: _PublishedBatch) -> None:
        try:
            await self._mark_batch(batch)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            # The rows stay claimed: once the claim expires a relay publishes them again,
            # deduplicated by their message ids.
            log.error("outbox.handoff_mark_failed", extra={"outbox": self._outbox.table, "error": repr(error),
                                                           "outbox_ids": [row.outbox_id for row in batch.rows]})  # fmt: skip
            return
        if batch.failed:
            self.kick()  # their claims were given back: the relay tries them again (and backs off)

    async def _mark_batch(self, batch: _PublishedBatch) -> None:
        """The third step: what JetStream acknowledged is marked published, the rest given back."""
        await self._mark(batch.published, batch.failed)
        marked = time.perf_counter()
        self.published_total += len(batch.published)
        log.info(
            "outbox.batch_published",
            extra={
                "outbox": self._outbox.table,
                "claimed": len(batch.rows),
                "published": len(batch.published),
                "failed": len(batch.failed),
                "lag_ms": _lag_ms(batch.rows[0].created_at),
                # Where a slow round spent its time.
                "claim_ms": round((batch.claimed_at - batch.started_at) * 1000, 2),
                "publish_ms": round((batch.acked_at - batch.claimed_at) * 1000, 2),
                "mark_ms": round((marked - batch.acked_at) * 1000, 2),
            },
        )

    # ------------------------------------------------------------------ the loop

    async def _relay_forever(self, js: JetStreamContext) -> None:
        settings = self._settings
        # The mark of one round runs while the next round claims and publishes, on a second
        # pooled connection: rows claimed are out of every claim's reach until marked, so the
        # overlap changes nothing but the time a round takes (its mark is a third of it under
        # a backlog). At most one mark is in flight; the next round waits for it before its own.
        marking: asyncio.Task[None] | None = None
        try:
            while True:
                _honour_swallowed_cancellation()
                # Cleared before the round, so a wake-up that lands while publishing is not lost.
                self._wake.clear()
                try:
                    batch = await self._claim_and_publish(js)
                    if marking is not None:
                        await marking  # its failure is this round's failure, and handled below
                        marking = None
                    if batch is not None:
                        marking = asyncio.create_task(self._mark_batch(batch))
                    await self._prune_if_due()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                    # The database is away for a moment: the rows are still there (a batch
                    # whose mark failed is claimed; it is published again, deduplicated, once
                    # its claim expires), try again.
                    log.error("outbox.round_failed", extra={"outbox": self._outbox.table, "error": repr(error)})
                    if marking is not None:
                        await asyncio.gather(marking, return_exceptions=True)
                        marking = None
                    await self._sleep_until_woken(settings.poll_interval_seconds)
                    continue
                claimed = len(batch.rows) if batch is not None else 0
                published = len(batch.published) if batch is not None else 0
                if claimed == settings.batch_size and published == claimed:
                    continue  # a backlog: go straight on with the next batch
                if claimed and published < claimed:
                    # NATS refused some: do not hammer it; their claims let others wait too.
                    await self._sleep_until_woken(min(settings.poll_interval_seconds, 1.0), wake_early=False)
                    continue
                await self._sleep_until_woken(settings.poll_interval_seconds)
        finally:
            if marking is not None:
                # Stopping: the last mark is let finish (it is one short statement), so a
                # clean stop leaves no published row to be sent again.
                with contextlib.suppress(Exception):
                    await asyncio.shield(marking)

    async def _prepare_until_done(self, js: JetStreamContext) -> None:
        if self._prepare is None:
            return
        while True:
            try:
                await self._prepare(js)
                return
            except Exception as error:  # noqa: BLE001 - any failure here means "NATS not ready yet"
                log.warning("outbox.stream_setup_failed", extra={"outbox": self._outbox.table, "error": repr(error)})
                await asyncio.sleep(1.0)

    async def _sleep_until_woken(self, timeout: float, *, wake_early: bool = True) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # lands as the event fires, and the relay would then never stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                if wake_early:
                    await self._wake.wait()
                else:
                    await asyncio.sleep(timeout)

    # ------------------------------------------------------------------ the three steps

    async def _claim(self) -> list[OutboxRow]:
        table = self._outbox.table
        settings = self._settings
        async with self._pool.acquire(timeout=settings.statement_timeout_seconds) as conn:
            records = await conn.fetch(
                f"""
                UPDATE {table} AS o
                   SET claimed_until = now() + make_interval(secs => $2), attempts = o.attempts + 1
                 WHERE o.outbox_id IN (
                       SELECT outbox_id FROM {table}
                        WHERE published_at IS NULL
                          AND (claimed_until IS NULL OR claimed_until < now()){self._available_condition()}
                        ORDER BY outbox_id
                        LIMIT $1
                        FOR UPDATE SKIP LOCKED)
                RETURNING o.outbox_id, o.subject, o.msg_id, o.payload, o.created_at{self._log_select()}
                """,
                settings.batch_size,
                settings.claim_seconds,
                timeout=settings.statement_timeout_seconds,
            )
        rows = [self._row(record) for record in records]
        rows.sort(key=lambda row: row.outbox_id)
        return rows

    def _available_condition(self) -> str:
        column = self._outbox.available_column
        return f" AND ({column} IS NULL OR {column} <= now())" if column else ""

    def _log_select(self) -> str:
        return "".join(f", o.{column} AS log_{key}" for key, column in self._outbox.log_columns.items())

    def _row(self, record: asyncpg.Record) -> OutboxRow:
        values = dict(record)
        log_ids = {key: values.pop(f"log_{key}") for key in self._outbox.log_columns}
        return OutboxRow(**values, log_ids=log_ids)

    async def _publish(self, js: JetStreamContext, row: OutboxRow) -> str | None:
        """None once JetStream acknowledged the row, else why not. One pipeline step: its
        lines carry the row's log columns (a story's id and attempt) and its msg_id."""
        ids = {**row.log_ids, "msg_id": row.msg_id, "outbox_id": row.outbox_id}
        try:
            # No "started" line: a publish takes a millisecond, and under a backlog that line
            # was a fifth of the relay's CPU; its end (or failure) line says all there is.
            with logged_step(log, "outbox", "publish", ids, describe=repr, log_start=False,
                             subject=row.subject) as outcome:  # fmt: skip
                ack = await js.publish(
                    row.subject,
                    row.payload or b"",
                    timeout=self._settings.publish_timeout_seconds,
                    headers=msg_id_headers(row.msg_id),
                )
                outcome.update(stream_seq=ack.seq, duplicate=bool(ack.duplicate))
        except Exception as error:  # noqa: BLE001 - every publish failure is retried later
            self._publish_failures.inc()
            return repr(error)[:1000]
        self._published.inc()
        self._publish_lag.observe(max(0.0, time.time() - row.created_at.timestamp()))
        return None

    # ------------------------------------------------------------------ metrics

    def backlog_metrics(self) -> ScrapeCollector:
        """Registers this outbox's backlog with the process's metrics, read from the table at
        each scrape (so it shows while NATS is down and the relay waits); close() unregisters."""
        table = self._outbox.table

        async def read() -> list[Metric]:
            async with self._pool.acquire(timeout=_BACKLOG_READ_TIMEOUT_SECONDS) as conn:
                row = await conn.fetchrow(
                    f"""SELECT count(*) AS rows, extract(epoch FROM now() - min(created_at)) AS oldest
                          FROM {table} WHERE published_at IS NULL""",
                    timeout=_BACKLOG_READ_TIMEOUT_SECONDS,
                )
            backlog = GaugeMetricFamily(
                "casefile_outbox_backlog", "Outbox rows committed but not yet published.", labels=["outbox"]
            )
            backlog.add_metric([table], row["rows"])
            oldest = GaugeMetricFamily(
                "casefile_outbox_oldest_unpublished_seconds",
                "Age of the oldest outbox row not yet published (0 when none waits).",
                labels=["outbox"],
            )
            oldest.add_metric([table], float(row["oldest"] or 0.0))
            return [backlog, oldest]

        return ScrapeCollector(f"outbox {table}", read, timeout=_BACKLOG_READ_TIMEOUT_SECONDS + 0.5)

    async def _mark(self, published: list[int], failed: list[tuple[int, str]]) -> None:
        table = self._outbox.table
        timeout = self._settings.statement_timeout_seconds
        async with self._pool.acquire(timeout=timeout) as conn:
            if published:
                await conn.execute(
                    f"""UPDATE {table} SET published_at = now(), claimed_until = NULL, last_error = NULL
                         WHERE outbox_id = ANY($1::bigint[])""",
                    published,
                    timeout=timeout,
                )
            if failed:
                # The claim is given back so the next round (of any relay) tries again.
                await conn.execute(
                    f"""UPDATE {table} AS o SET claimed_until = NULL, last_error = f.error
                          FROM unnest($1::bigint[], $2::text[]) AS f(outbox_id, error)
                         WHERE o.outbox_id = f.outbox_id""",
                    [outbox_id for outbox_id, _ in failed],
                    [error for _, error in failed],
                    timeout=timeout,
                )

    async def _prune_if_due(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_prune:
            return
        self._next_prune = loop.time() + self._settings.prune_interval_seconds
        table = self._outbox.table
        timeout = self._settings.statement_timeout_seconds
        async with self._pool.acquire(timeout=timeout) as conn:
            while True:
                tag = await conn.execute(
                    f"""DELETE FROM {table} WHERE outbox_id IN (
                          SELECT outbox_id FROM {table}
                           WHERE published_at < now() - make_interval(secs => $1)
                           LIMIT {_PRUNE_SLICE})""",
                    self._settings.retention_seconds,
                    timeout=timeout,
                )
                deleted = int(tag.rsplit(" ", 1)[-1])
                if deleted:
                    log.info("outbox.pruned", extra={"outbox": table, "rows": deleted})
                if deleted < _PRUNE_SLICE:
                    return

    # ------------------------------------------------------------------ LISTEN/NOTIFY

    async def _listen_forever(self) -> None:
        """One connection of its own, LISTENing; reconnects after losing the database."""
        while True:
            try:
                conn = await self._open_listener()
                self.kick()  # whatever was committed while we were not listening
                while not conn.is_closed():
                    await asyncio.sleep(_LISTEN_RETRY_SECONDS)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                log.warning("outbox.listen_failed", extra={"outbox": self._outbox.table, "error": repr(error)})
            await self._close_listener()
            await asyncio.sleep(_LISTEN_RETRY_SECONDS)

    async def _open_listener(self) -> asyncpg.Connection:
        dsn = self._dsn.reveal() if isinstance(self._dsn, Secret) else self._dsn
        conn = await asyncpg.connect(
            dsn, timeout=self._settings.statement_timeout_seconds,
            server_settings={"application_name": f"{self._client_name}-listener"},
        )
        self._listener = conn
        await conn.add_listener(self._outbox.channel, self._on_notify)
        return conn

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()

    async def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await conn.close()


def _honour_swallowed_cancellation() -> None:
    """On Python 3.11, asyncio.wait_for (which nats-py uses for every request) returns the
    result instead of raising when a cancellation lands as the reply arrives; the relay
    would then loop on forever and shutdown would hang. The request is still on record."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _lag_ms(created_at: datetime) -> int:
    return int((datetime.now(created_at.tzinfo) - created_at).total_seconds() * 1000)
