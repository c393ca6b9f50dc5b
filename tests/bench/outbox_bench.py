"""The outbox hop: a story's commit to a JetStream pull consumer holding its `story.created`.

A real story service process (its own outbox relay, woken by the commit) runs on a fresh
database and a nats-server of its own; this process plays the image side with a durable
pull consumer set up as the image service sets up its own (explicit ack, 16 messages in
work, the same max_ack_pending), acking each message after it has recorded it.

- Latency: CreateStory at a steady rate; for each event, the time from the story's insert
  (its create_time, stamped by PostgreSQL inside the transaction, so the figure includes
  the commit) to the consumer holding the message.
- Throughput: 20,000 stories and their outbox rows committed in one transaction, then the
  time until the consumer holds every event: relayed and consumed from a backlog.

The baseline, in the same run on the same server with the same consumer: raw JetStream
publish -> pull (a publish with a Nats-Msg-Id and its ack, nothing else), at the same rate
and from a backlog of the same size.

The image service's own DurableConsumer is measured on the same hop as context: its fetch
asks for as many messages as it has free slots and nats-py then waits for all of them (or
the fetch timeout) before it returns the first; see the note on that figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc
import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from casefile.story.v1 import story_events_pb2
from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from services.image.durable_consumer import ConsumerSettings, Delivery, DurableConsumer, Outcome, ack
from services.story.events import story_created_msg_id
from shared.nats import StreamSpec, ensure_pull_consumer, ensure_stream, msg_id_headers
from shared.streams import STORY_CREATED_SUBJECT, STORY_EVENTS
from tests.bench.harness import AS_GATEWAY, base_env, bench_database, process_cpu_seconds
from tests.bench.report import Figure, figure, ratio_figure
from tests.case_files import case_file
from tools.infra import NatsServer, ServiceProcess, free_port

P50_AIM_MS = "value <= 2.5"
P99_AIM_MS = "value <= 10"
BACKLOG_AIM = "value >= 5000"
# As the image service's portrait consumer (services/image/config.py defaults).
CONSUMER_CONCURRENCY = 16
MAX_ACK_PENDING = 1000
ACK_WAIT_SECONDS = 15.0
# The raw baseline's own stream, so its messages never reach the story consumers.
RAW_STREAM = StreamSpec(name="BENCH_RAW", subjects=("bench.raw",), duplicate_window_seconds=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("outbox")
    group.add_argument("--outbox-rate", type=float, default=200.0, help="stories per second for the latency")
    group.add_argument("--outbox-seconds", type=float, default=5.0, help="length of the latency run")
    group.add_argument("--outbox-backlog", type=int, default=20_000, help="events in the backlog run")


class Receipts:
    """What a consumer has received: per event, the milliseconds from its stamp to here."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.count = 0
        self._wanted = 0
        self._since = float("inf")
        self._all_here = asyncio.Event()

    def expect(self, count: int) -> None:
        """Counts from now on: events stamped earlier (a warm-up's, a stream's history) are not."""
        self.latencies_ms, self.count, self._wanted = [], 0, count
        self._since = time.time()
        self._all_here.clear()

    def record(self, stamped_at: float) -> None:
        if stamped_at < self._since:
            return
        self.latencies_ms.append((time.time() - stamped_at) * 1000)
        self.count += 1
        if self.count >= self._wanted:
            self._all_here.set()

    async def wait_all(self, timeout: float) -> float:
        """Seconds until every expected event has arrived."""
        started = time.perf_counter()
        async with asyncio.timeout(timeout):
            await self._all_here.wait()
        return time.perf_counter() - started


def story_created_time(data: bytes) -> float:
    event = story_events_pb2.StoryCreated.FromString(data)
    return event.create_time.seconds + event.create_time.nanos / 1e9


class PullConsumer:
    """A durable pull consumer with the image service's settings that takes each message as
    soon as it is there: 16 workers (the image service's messages in work), each with its own
    pull request outstanding, each acking after it recorded its message, as the image service
    acks after its effect."""

    def __init__(self, js: JetStreamContext, stream: StreamSpec, durable: str, subject: str,
                 stamp: Callable[[bytes], float], receipts: Receipts) -> None:
        self._js, self._stream, self._durable, self._subject = js, stream, durable, subject
        self._stamp, self._receipts = stamp, receipts
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await ensure_stream(self._js, self._stream)
        await ensure_pull_consumer(
            self._js, stream=self._stream.name, durable=self._durable, filter_subject=self._subject,
            ack_wait_seconds=ACK_WAIT_SECONDS, max_deliver=5, backoff_seconds=None, max_ack_pending=MAX_ACK_PENDING,
        )
        for _ in range(CONSUMER_CONCURRENCY):
            subscription = await self._js.pull_subscribe_bind(self._durable, stream=self._stream.name)
            self._tasks.append(asyncio.create_task(self._work(subscription)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _work(self, subscription: JetStreamContext.PullSubscription) -> None:
        while True:
            try:
                messages = await subscription.fetch(1, timeout=1.0)
            except TimeoutError:
                continue
            for message in messages:
                self._receipts.record(self._stamp(message.data))
                await message.ack()


def durable_consumer(nats_url: str, receipts: Receipts) -> DurableConsumer:
    """The image service's own consumer loop on the same stream, under a durable of its own."""

    async def handle(delivery: Delivery) -> Outcome:
        receipts.record(story_created_time(delivery.data))
        return ack()

    return DurableConsumer(
        ConsumerSettings(
            nats=nats_url, stream=STORY_EVENTS, durable="bench-image-durable", filter_subject=STORY_CREATED_SUBJECT,
            concurrency=CONSUMER_CONCURRENCY, max_deliver=5, max_ack_pending=MAX_ACK_PENDING,
            redelivery_backoff_seconds=(1.0,), max_work_seconds=60.0, ack_wait_seconds=ACK_WAIT_SECONDS,
            client_name="bench-durable-consumer",
        ),
        handle,
    )


async def at_rate(rate: float, seconds: float, send: Callable[[], Awaitable[object]]) -> int:
    """Starts `send` `rate` times a second for `seconds` (open loop: a slow answer never
    delays the next start); returns how many were sent."""
    count = int(rate * seconds)
    started = time.perf_counter()
    tasks = []
    for n in range(count):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send()))
    await asyncio.gather(*tasks)
    return count


def _percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(percent / 100 * len(ordered)) - 1))]


async def commit_backlog(database_url: str, count: int) -> None:
    """`count` stories and their outbox rows in ONE transaction, as a burst of commits would
    leave them: the relay's NOTIFY fires at the commit."""
    content = case_file()
    patient = content.patient
    story_ids = [str(uuid.uuid4()) for _ in range(count)]
    now = time.time()
    payloads = [
        story_events_pb2.StoryCreated(
            story_id=story_id, user_id="bench-backlog", image_generation_prompt=content.image_generation_prompt,
            create_time={"seconds": int(now), "nanos": int((now % 1) * 1e9)}, portrait_attempt=1,
        ).SerializeToString()
        for story_id in story_ids
    ]
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute(
                """
                INSERT INTO story.stories (story_id, user_id, title, patient, chapters, image_generation_prompt,
                                           patient_gender, admission_date, typing_difficulty, writer)
                SELECT id, 'bench-backlog', $2, $3::jsonb, $4::jsonb, $5, $6, $7::text::date, 1, 'caller'
                FROM unnest($1::uuid[]) AS id
                """,
                story_ids,
                content.title,
                json.dumps({"name": patient.name, "age": patient.age, "diagnosis": patient.diagnosis,
                            "appearance": patient.appearance}),
                json.dumps([{"title": c.title, "text": c.text} for c in content.chapters]),
                content.image_generation_prompt,
                "female",
                patient.admission_date,
            )
            await conn.execute(
                """
                INSERT INTO story.outbox (story_id, portrait_attempt, subject, msg_id, payload)
                SELECT id, 1, $2, msg_id, payload FROM unnest($1::uuid[], $3::text[], $4::bytea[]) AS r(id, msg_id, payload)
                """,
                story_ids,
                STORY_CREATED_SUBJECT,
                [story_created_msg_id(story_id, 1) for story_id in story_ids],
                payloads,
            )
    finally:
        await conn.close()


async def raw_publish(js: JetStreamContext, count: int, *, rate: float | None) -> None:
    """The baseline's producer: publish with a message id and wait for JetStream's ack, at
    `rate` per second, or all at once in batches of the relay's size."""

    async def publish_one() -> None:
        stamp = str(time.time()).encode()
        await js.publish(RAW_STREAM.subjects[0], stamp, headers=msg_id_headers(f"raw:{uuid.uuid4()}"))

    if rate is not None:
        await at_rate(rate, count / rate, publish_one)
        return
    for start in range(0, count, 100):
        await asyncio.gather(*(publish_one() for _ in range(min(100, count - start))))


async def run(args: argparse.Namespace) -> list[Figure]:
    work = Path(tempfile.mkdtemp(prefix="casefile-bench-outbox-"))
    processes = []
    async with bench_database() as database_url:
        try:
            nats_server = NatsServer(work / "nats", log_path=work / "nats.log").start()
            processes.append(nats_server)
            env = {**base_env(database_url), "NATS_URL": nats_server.url, "STORY_ADDR": f"127.0.0.1:{free_port()}"}
            story = ServiceProcess("story", env, work / "story.log").start()
            processes.append(story)
            await story.wait_healthy(env["STORY_ADDR"])
            nc = await nats.connect(nats_server.url)
            try:
                return await measure(nc, nats_server.url, env["STORY_ADDR"], database_url, args, story.pid)
            finally:
                await nc.close()
        finally:
            for process in reversed(processes):
                process.terminate()


async def measure(
    nc: Client, nats_url: str, story_addr: str, database_url: str, args: argparse.Namespace, story_pid: int | None,
) -> list[Figure]:
    js = nc.jetstream()
    story_receipts, raw_receipts = Receipts(), Receipts()
    await ensure_stream(js, STORY_EVENTS)
    consumer = PullConsumer(js, STORY_EVENTS, "bench-image", STORY_CREATED_SUBJECT, story_created_time, story_receipts)
    raw_consumer = PullConsumer(js, RAW_STREAM, "bench-raw", RAW_STREAM.subjects[0],
                                lambda data: float(data), raw_receipts)
    await consumer.start()
    await raw_consumer.start()
    rate, seconds, backlog = args.outbox_rate, args.outbox_seconds, args.outbox_backlog
    try:
        async with grpc.aio.insecure_channel(story_addr) as channel:
            stub = story_service_pb2_grpc.StoryServiceStub(channel)
            request = pb.CreateStoryRequest(user_id="bench-outbox", content=case_file())

            async def create_story() -> None:
                await stub.CreateStory(request, metadata=AS_GATEWAY)

            await at_rate(rate, 1.0, create_story)  # warm-up: connections, statements
            story_receipts.expect(int(rate * seconds))
            sent = await at_rate(rate, seconds, create_story)
            await story_receipts.wait_all(30)
            hop = list(story_receipts.latencies_ms)

            raw_receipts.expect(int(rate * seconds))
            await raw_publish(js, int(rate * seconds), rate=rate)
            await raw_receipts.wait_all(30)
            raw_hop = list(raw_receipts.latencies_ms)

            durable_receipts = Receipts()
            durable = durable_consumer(nats_url, durable_receipts)
            durable.start()
            await asyncio.wait_for(durable.ready.wait(), 15)
            durable_receipts.expect(int(rate * seconds))
            await at_rate(rate, seconds, create_story)
            await durable_receipts.wait_all(60)
            durable_hop = list(durable_receipts.latencies_ms)
            await durable.stop()

        story_receipts.expect(backlog)
        committed = time.perf_counter()
        cpu_before = process_cpu_seconds(story_pid) if story_pid else 0.0
        await commit_backlog(database_url, backlog)
        await story_receipts.wait_all(120)
        backlog_rate = backlog / (time.perf_counter() - committed)
        # The relay's own CPU per event, which the machine's other load does not change much.
        relay_cpu_us = (process_cpu_seconds(story_pid) - cpu_before) / backlog * 1e6 if story_pid else None

        raw_receipts.expect(backlog)
        started = time.perf_counter()
        await raw_publish(js, backlog, rate=None)
        await raw_receipts.wait_all(120)
        raw_backlog_rate = backlog / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await raw_consumer.stop()

    notes = {"stories_per_second": rate, "events": sent, "consumer": "durable pull, explicit ack, 16 in work"}
    raw_p50, raw_p99 = _percentile(raw_hop, 50), _percentile(raw_hop, 99)
    return [
        figure("outbox.commit_to_consumer_p50", _percentile(hop, 50), "ms", aim=P50_AIM_MS,
               raw_jetstream_publish_to_pull_ms=round(raw_p50, 3), **notes),
        figure("outbox.commit_to_consumer_p99", _percentile(hop, 99), "ms", aim=P99_AIM_MS,
               raw_jetstream_publish_to_pull_ms=round(raw_p99, 3), **notes),
        ratio_figure("outbox.hop_p50_vs_raw_jetstream", _percentile(hop, 50), raw_p50, "ms",
                     baseline_is="raw JetStream publish -> pull at the same rate, same consumer", **notes),
        ratio_figure("outbox.backlog_relayed_and_consumed", backlog_rate, raw_backlog_rate, "events/s",
                     aim=BACKLOG_AIM, baseline_is="raw JetStream publish -> pull of as many messages, same consumer",
                     backlog=backlog, relay_process_cpu_us_per_event=relay_cpu_us and round(relay_cpu_us, 1)),
        figure("outbox.commit_to_durable_consumer_p50", _percentile(durable_hop, 50), "ms",
               consumer="services.image.durable_consumer.DurableConsumer as it is",
               note="fetch(free slots) returns only when all of them are filled or its 1 s timeout ends",
               mean_ms=round(statistics.fmean(durable_hop), 3), **{k: v for k, v in notes.items() if k != "consumer"}),
        figure("outbox.commit_to_durable_consumer_p99", _percentile(durable_hop, 99), "ms",
               consumer="services.image.durable_consumer.DurableConsumer as it is"),
    ]
