"""The portrait pipeline's own cost beyond the provider (issue 11, aim 3) and its scale-out
over image processes (aim 5).

Real processes on loopback, started here: a fresh database, a nats-server, moto's S3, the
story and image services, a bare grpc.aio echo server, and a Recraft-speaking fake
(tests/bench/instant_recraft.py) that answers with one pre-made 1024x1024 PNG, at once or
after a fixed delay, so the figures are the pipeline's and not a painter's.

- Latency: GenerateStory at a steady rate (20 stories/s); for each, the time from its
  answer to READY arriving on a WatchStory stream of that story. p50 and p99 have fixed
  aims, because the provider answers at once: this is what the pipeline adds. Beside them,
  for context, one echo call after the same idle pause against the same call back to back:
  what each of the path's cross-process hops pays for starting from idle on this machine.
- Backlog: stories made while the image process is stopped wait as story.created in the
  stream; the process starts and drains them. Its portraits/s against the raw chain run
  in the same rounds, from a backlog of the same size with the same concurrency: JetStream
  pull + S3 put of the same PNG + one unary gRPC call (the echo) + ack, no logic.
- Scale-out: the fake answers in 200 ms and each image process paints at most
  SCALE_CONCURRENCY portraits at a time (low enough that one process is held by its own
  limit, not by the machine); two processes against one, the same backlog.

Rates from a backlog are taken over the middle of the completions (from the 10th to the
90th percentile of completion times), so neither the start-up of a process nor the last
few stragglers count; the raw chain is measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import nats
from aiobotocore.session import get_session
from PIL import Image

from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from tests.bench import echo_server, instant_recraft
from tests.bench.harness import AS_GATEWAY, base_env, bench_database
from tests.bench.report import Figure, figure, ratio_figure
from tools.infra import MotoS3Server, NatsServer, ServiceProcess, free_port, wait_for_tcp

P50_AIM = "value <= 20"
P99_AIM = "value <= 100"
BACKLOG_AIM = "ratio >= 0.5"
SCALE_AIM = "ratio >= 1.7"
SCALE_PROVIDER_SECONDS = 0.2
SCALE_CONCURRENCY = 4
BUCKET = "bench"
# What a StoryCreated event weighs on the wire, near enough, for the raw chain's messages.
RAW_MESSAGE_BYTES = 64
# SetStoryImage's request and answer, near enough, for the raw chain's one unary call.
RAW_CALL_BYTES = 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("portraits")
    group.add_argument("--portrait-rate", type=float, default=20.0, help="stories/s while timing answer -> READY")
    group.add_argument("--portrait-stories", type=int, default=200, help="stories timed from answer to READY")
    group.add_argument("--portrait-backlog", type=int, default=200, help="stories in each backlog drained")
    group.add_argument("--portrait-concurrency", type=int, default=16, help="portraits in flight per image process")
    group.add_argument("--scale-backlog", type=int, default=80, help="stories in each scale-out backlog")


def portrait_png() -> bytes:
    """A 1024x1024 PNG of about the size a painted portrait has (smooth shapes and grain)."""
    rng = random.Random(11)
    picture = Image.radial_gradient("L").resize((1024, 1024)).convert("RGB")
    grain = Image.effect_noise((1024, 1024), 24).convert("RGB")
    picture = Image.blend(picture, grain, 0.35)
    for _ in range(40):
        x, y = rng.randrange(1024), rng.randrange(1024)
        colour = tuple(rng.randrange(256) for _ in range(3))
        picture.paste(colour, (x, y, min(1024, x + rng.randrange(40, 200)), min(1024, y + rng.randrange(40, 200))))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Stack:
    """The processes of one run and what they need to find each other."""

    work: Path
    database_url: str
    env: dict[str, str]
    png: bytes
    nats_url: str
    s3_url: str
    echo_addr: str
    processes: list

    def image_process(self, label: str, provider_url: str, concurrency: int) -> tuple[ServiceProcess, str]:
        addr = f"127.0.0.1:{free_port()}"
        env = {**self.env, "IMAGE_ADDR": addr, "RECRAFT_BASE_URL": provider_url,
               "PORTRAIT_CONCURRENCY": str(concurrency)}  # fmt: skip
        process = ServiceProcess("image", env, self.work / f"{label}.log")
        self.processes.append(process)
        return process, addr


async def start_stack(work: Path, database_url: str) -> Stack:
    processes: list = []
    nats_server = NatsServer(work / "nats", log_path=work / "nats.log").start()
    processes.append(nats_server)
    s3 = MotoS3Server(work / "moto.log").start()
    processes.append(s3)
    png = portrait_png()
    (work / "portrait.png").write_bytes(png)
    echo_port = free_port()
    echo = ServiceProcess("echo", base_env(database_url), work / "echo.log",
                          argv=[sys.executable, "-m", "tests.bench.echo_server", str(echo_port),
                                str(RAW_CALL_BYTES)]).start()  # fmt: skip
    processes.append(echo)
    env = {
        **base_env(database_url),
        "NATS_URL": nats_server.url, "S3_ENDPOINT_URL": s3.endpoint_url, "S3_BUCKET": BUCKET,
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
        "STORY_ADDR": f"127.0.0.1:{free_port()}", "IMAGE_ADDR": f"127.0.0.1:{free_port()}",
        "CREDITS_ADDR": f"127.0.0.1:{free_port()}",
        "PORTRAIT_PROVIDER": "recraft", "RECRAFT_API_KEY": instant_recraft.API_KEY,
        "ALLOW_PRIVATE_DOWNLOADS": "true",
    }  # fmt: skip
    story = ServiceProcess("story", env, work / "story.log").start()
    processes.append(story)
    await story.wait_healthy(env["STORY_ADDR"])
    await wait_for_tcp("127.0.0.1", echo_port, 15)
    return Stack(work, database_url, env, png, nats_server.url, s3.endpoint_url, f"127.0.0.1:{echo_port}", processes)


async def start_provider(stack: Stack, label: str, delay_seconds: float) -> str:
    url_file = stack.work / f"{label}-url"
    provider = ServiceProcess(label, stack.env, stack.work / f"{label}.log",
                              argv=[sys.executable, "-m", "tests.bench.instant_recraft", str(url_file),
                                    str(stack.work / "portrait.png"), str(delay_seconds)]).start()  # fmt: skip
    stack.processes.append(provider)
    deadline = time.perf_counter() + 30
    while not (url_file.exists() and url_file.read_text()):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{label} never wrote its URL")
        await asyncio.sleep(0.05)
    return url_file.read_text()


# ---------------------------------------------------------------- answer -> READY


async def answer_to_ready_ms(stub, user_id: str) -> float:
    story = (await stub.GenerateStory(pb.GenerateStoryRequest(user_id=user_id), metadata=AS_GATEWAY)).story
    answered = time.perf_counter()
    stream = stub.WatchStory(pb.WatchStoryRequest(story_id=story.story_id), metadata=AS_GATEWAY)
    try:
        while story.portrait_status == pb.PORTRAIT_STATUS_PENDING:
            story = (await stream.read()).story
    finally:
        stream.cancel()
    if story.portrait_status != pb.PORTRAIT_STATUS_READY:
        raise RuntimeError(f"portrait of {story.story_id} ended {story.portrait_status}: {story.portrait_error}")
    return (time.perf_counter() - answered) * 1000


async def latencies_at_rate(story_addr: str, rate: float, stories: int) -> list[float]:
    """Starts a story every 1/rate s (open loop: a slow portrait delays no later story)."""
    async with grpc.aio.insecure_channel(story_addr) as channel:
        stub = story_service_pb2_grpc.StoryServiceStub(channel)
        tasks = []
        started = time.perf_counter()
        for n in range(stories):
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(answer_to_ready_ms(stub, f"bench-latency-{n % 50}")))
        return sorted(await asyncio.gather(*tasks))


def percentile(sorted_values: list[float], percent: float) -> float:
    """The nearest-rank percentile of values sorted ascending."""
    index = min(len(sorted_values) - 1, max(0, round(percent / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def middle_rate(completion_times: list[float]) -> float:
    """Completions per second between the 10th and the 90th percentile of their times."""
    times = sorted(completion_times)
    low, high = round(0.1 * (len(times) - 1)), round(0.9 * (len(times) - 1))
    return (high - low) / (times[high] - times[low])


# ---------------------------------------------------------------- backlogs


async def make_stories(story_addr: str, count: int, label: str) -> list[uuid.UUID]:
    gate = asyncio.Semaphore(16)
    async with grpc.aio.insecure_channel(story_addr) as channel:
        stub = story_service_pb2_grpc.StoryServiceStub(channel)

        async def one(n: int) -> uuid.UUID:
            async with gate:
                reply = await stub.GenerateStory(pb.GenerateStoryRequest(user_id=f"bench-{label}-{n % 50}"),
                                                 metadata=AS_GATEWAY)  # fmt: skip
            return uuid.UUID(reply.story.story_id)

        return list(await asyncio.gather(*(one(n) for n in range(count))))


async def wait_relayed(conn: asyncpg.Connection, timeout: float = 120) -> None:
    """Until the story service's outbox has published every event (the backlog is in the stream)."""
    deadline = time.perf_counter() + timeout
    while await conn.fetchval("SELECT count(*) FROM story.outbox WHERE published_at IS NULL"):
        if time.perf_counter() > deadline:
            raise RuntimeError("the story outbox was never relayed")
        await asyncio.sleep(0.1)


async def ready_times(conn: asyncpg.Connection, story_ids: list[uuid.UUID], timeout: float = 300) -> list[float]:
    """When each story's portrait became READY (epoch seconds), once all of them are."""
    deadline = time.perf_counter() + timeout
    while True:
        rows = await conn.fetch(
            """SELECT status, extract(epoch FROM update_time)::float8 AS done
                 FROM image.portraits WHERE story_id = ANY($1::uuid[])""",
            story_ids,
        )
        finished = [row for row in rows if row["status"] in ("READY", "FAILED", "SKIPPED")]
        if len(finished) == len(story_ids):
            failed = [row["status"] for row in finished if row["status"] != "READY"]
            if failed:
                raise RuntimeError(f"{len(failed)} portraits of the backlog did not end READY")
            return [row["done"] for row in finished]
        if time.perf_counter() > deadline:
            raise RuntimeError(f"only {len(finished)} of {len(story_ids)} portraits finished")
        await asyncio.sleep(0.2)


async def service_backlog_rate(stack: Stack, images: list[tuple[ServiceProcess, str]], count: int, label: str) -> float:
    """Portraits/s of `images` draining `count` stories made while they were stopped."""
    for process, _addr in images:
        await process.terminate_async()
    story_ids = await make_stories(stack.env["STORY_ADDR"], count, label)
    conn = await asyncpg.connect(stack.database_url)
    try:
        await wait_relayed(conn)
        for process, _addr in images:
            process.start()
        for process, addr in images:
            await process.wait_healthy(addr)
        return middle_rate(await ready_times(conn, story_ids))
    finally:
        await conn.close()


async def raw_chain_rate(stack: Stack, count: int, concurrency: int) -> float:
    """The same backlog through the bare parts: pull, S3 put, one unary call, ack."""
    stream = f"BENCH_RAW_{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(stack.nats_url)
    async with contextlib.AsyncExitStack() as exits:
        exits.push_async_callback(nc.close)
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.created"])
        exits.push_async_callback(js.delete_stream, stream)
        payload = b"x" * RAW_MESSAGE_BYTES
        await asyncio.gather(*(js.publish(f"{stream}.created", payload) for _ in range(count)))
        s3 = await exits.enter_async_context(get_session().create_client(
            "s3", endpoint_url=stack.s3_url, region_name="us-east-1",
            aws_access_key_id="bench", aws_secret_access_key="bench",
        ))  # fmt: skip
        channel = await exits.enter_async_context(grpc.aio.insecure_channel(stack.echo_addr))
        call = channel.unary_unary(echo_server.METHOD)
        subscription = await js.pull_subscribe(f"{stream}.created", durable="raw")
        done: list[float] = []
        in_flight = 0
        slot_freed = asyncio.Event()
        body = b"y" * RAW_CALL_BYTES

        async def handle(message) -> None:
            nonlocal in_flight
            try:
                await s3.put_object(Bucket=BUCKET, Key=f"raw/{uuid.uuid4()}.png", Body=stack.png,
                                    ContentType="image/png")  # fmt: skip
                await call(body)
                await message.ack()
                done.append(time.time())
            finally:
                in_flight -= 1
                slot_freed.set()

        # As the durable consumer does: fetch only as many messages as there are free slots.
        tasks = []
        fetched = 0
        while fetched < count:
            while in_flight >= concurrency:
                slot_freed.clear()
                await slot_freed.wait()
            messages = await subscription.fetch(concurrency - in_flight, timeout=5)
            fetched += len(messages)
            in_flight += len(messages)
            tasks += [asyncio.create_task(handle(message)) for message in messages]
        await asyncio.gather(*tasks)
    return middle_rate(done)


# ---------------------------------------------------------------- the run


async def measure_latency(stack: Stack, args: argparse.Namespace) -> list[Figure]:
    await latencies_at_rate(stack.env["STORY_ADDR"], args.portrait_rate, 20)  # warm-up
    latencies = await latencies_at_rate(stack.env["STORY_ADDR"], args.portrait_rate, args.portrait_stories)
    notes = {"stories": args.portrait_stories, "stories_per_second": args.portrait_rate,
             "provider": "instant Recraft fake, pre-made 1024x1024 PNG", "png_bytes": len(stack.png)}  # fmt: skip
    return [
        figure("portraits.answer_to_ready_p50", percentile(latencies, 50), "ms", aim=P50_AIM, **notes),
        figure("portraits.answer_to_ready_p99", percentile(latencies, 99), "ms", aim=P99_AIM, **notes),
        figure("portraits.answer_to_ready_max", latencies[-1], "ms", **notes),
        await idle_hop_ms(stack.echo_addr, 1 / args.portrait_rate),
    ]


async def idle_hop_ms(echo_addr: str, pause_seconds: float, calls: int = 60) -> Figure:
    """Context for the latency aim: one unary call to the bare echo when the processes have
    been idle for `pause_seconds` (the pace of the stories above) against the same call
    back to back. At that pace every hop of the portrait's path (two story calls, two
    statements, two provider requests, the S3 put, the event, the WatchStory push) starts
    from idle, and on a machine whose idle cores sleep each one pays the wake-up."""
    async with grpc.aio.insecure_channel(echo_addr) as channel:
        call = channel.unary_unary(echo_server.METHOD)
        body = b"y" * RAW_CALL_BYTES

        async def timed_calls(pause: float) -> list[float]:
            took = []
            for _ in range(calls):
                started = time.perf_counter()
                await call(body)
                took.append((time.perf_counter() - started) * 1000)
                if pause:
                    await asyncio.sleep(pause)
            return sorted(took)

        await timed_calls(0)  # warm-up: the connection
        after_idle, back_to_back = await timed_calls(pause_seconds), await timed_calls(0)
    return ratio_figure("portraits.echo_call_after_idle_p50", percentile(after_idle, 50), percentile(back_to_back, 50), "ms",
                        baseline_is="the same call back to back", pause_ms=round(pause_seconds * 1000, 1), calls=calls)  # fmt: skip


async def measure_backlog(stack: Stack, image: tuple[ServiceProcess, str], args: argparse.Namespace) -> Figure:
    service, raw = [], []
    for round_number in range(args.rounds):
        raw.append(await raw_chain_rate(stack, args.portrait_backlog, args.portrait_concurrency))
        service.append(await service_backlog_rate(stack, [image], args.portrait_backlog, f"backlog-{round_number}"))
    ratios = [round(s / r, 3) for s, r in zip(service, raw, strict=True)]
    return ratio_figure(
        "portraits.backlog_rate", statistics.median(service), statistics.median(raw), "portraits/s", aim=BACKLOG_AIM,
        baseline_is="raw chain: JetStream pull + S3 put of the same PNG + one unary gRPC call + ack, same concurrency",
        backlog=args.portrait_backlog, concurrency=args.portrait_concurrency, png_bytes=len(stack.png),
        ratio_per_round=ratios, service_per_round=[round(v, 1) for v in service], raw_per_round=[round(v, 1) for v in raw],
    )  # fmt: skip


async def measure_scale_out(stack: Stack, args: argparse.Namespace) -> Figure:
    provider_url = await start_provider(stack, "slow-recraft", SCALE_PROVIDER_SECONDS)
    first = stack.image_process("image-scale-1", provider_url, SCALE_CONCURRENCY)
    second = stack.image_process("image-scale-2", provider_url, SCALE_CONCURRENCY)
    one, two = [], []
    for round_number in range(args.rounds):
        one.append(await service_backlog_rate(stack, [first], args.scale_backlog, f"scale-one-{round_number}"))
        two.append(await service_backlog_rate(stack, [first, second], args.scale_backlog, f"scale-two-{round_number}"))
        await second[0].terminate_async()
    await first[0].terminate_async()
    ratios = [round(t / o, 3) for t, o in zip(two, one, strict=True)]
    return ratio_figure(
        "portraits.scale_out_two_processes", statistics.median(two), statistics.median(one), "portraits/s",
        aim=SCALE_AIM, baseline_is="one image process, same backlog", provider_seconds=SCALE_PROVIDER_SECONDS,
        concurrency_per_process=SCALE_CONCURRENCY, backlog=args.scale_backlog, ratio_per_round=ratios,
        one_per_round=[round(v, 1) for v in one], two_per_round=[round(v, 1) for v in two],
    )  # fmt: skip


async def run(args: argparse.Namespace) -> list[Figure]:
    work = Path(tempfile.mkdtemp(prefix="casefile-bench-portraits-"))
    async with bench_database() as database_url:
        stack = None
        try:
            stack = await start_stack(work, database_url)
            provider_url = await start_provider(stack, "instant-recraft", 0.0)
            image = stack.image_process("image", provider_url, args.portrait_concurrency)
            image[0].start()
            await image[0].wait_healthy(image[1])
            figures = await measure_latency(stack, args)
            figures.append(await measure_backlog(stack, image, args))
            await image[0].terminate_async()
            figures.append(await measure_scale_out(stack, args))
            return figures
        finally:
            for process in reversed(stack.processes if stack else []):
                process.terminate()
