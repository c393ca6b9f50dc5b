"""Generation jobs: a thousand in flight in one image process, CreateGenerationJob's
throughput against a bare echo, and the latency of Create and List at a steady 200 calls/s.

Everything runs as real processes on loopback: a fresh database, a nats-server, moto, the
credits service, one image process, a fake provider answering in 2 s (its own process)
and the bare grpc.aio echo server as the throughput baseline.

Last, tests.bench.jobs_scale: one image process, then two, draining a backlog from a provider
answering in 200 ms (the scale-out aim).

The thousand jobs are created while the nats-server is stopped (they wait in the outbox,
as they would during an outage), then NATS comes back and the one image process takes
them all at once: every job is in flight together. The jobs' own timestamps say how long
each took from PROCESSING to COMPLETED and how long the whole batch took; the aim is the
batch within 1.3x of the provider's 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import grpc

from casefile.credits.v1 import credits_service_pb2 as credits_pb
from casefile.credits.v1 import credits_service_pb2_grpc
from casefile.image.v1 import image_service_pb2 as pb
from casefile.image.v1 import image_service_pb2_grpc
from tests.bench import echo_server, jobs_scale
from tests.bench.harness import AS_ADMIN, AS_GATEWAY, base_env, bench_database, calls_per_second, paired_rates
from tests.bench.report import Figure, figure, ratio_figure
from tools.infra import MotoS3Server, NatsServer, ServiceProcess, free_port, wait_for_tcp

PROVIDER_SECONDS = 2.0
BATCH_AIM = "ratio <= 1.3"
RSS_AIM = "value <= 300"
CREATE_AIM = "ratio >= 0.4"
CREATE_P99_AIM = "value <= 20"
LIST_P99_AIM = "value <= 10"
FUNDING = 10**12
# The batch's jobs belong to this many players, as a thousand jobs in flight would: the
# credits service serializes each player's storage and usage updates on their account row.
BATCH_USERS = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("jobs")
    group.add_argument("--jobs", type=int, default=1000, help="jobs in flight at once in the one image process")
    group.add_argument("--jobs-concurrency", type=int, default=16, help="CreateGenerationJob calls in flight")
    group.add_argument("--steady-rate", type=float, default=200.0, help="calls/s for the latency figures")
    group.add_argument("--scale-jobs", type=int, default=400, help="backlog drained by one, then two image processes")


async def run(args: argparse.Namespace) -> list[Figure]:
    work = Path(tempfile.mkdtemp(prefix="casefile-bench-jobs-"))
    processes: list = []
    figures: list[Figure] = []
    async with bench_database() as database_url:
        try:
            nats_server = NatsServer(work / "nats", log_path=work / "nats.log").start()
            s3 = MotoS3Server(work / "moto.log").start()
            url_file = work / "provider-url"
            provider = ServiceProcess("provider", base_env(database_url),
                                      work / "provider.log", argv=[sys.executable, "-m", "tests.bench.slow_provider",
                                                                   str(url_file), str(PROVIDER_SECONDS)]).start()  # fmt: skip
            processes += [nats_server, s3, provider]
            provider_url = await _read_when_written(url_file)
            env = {
                **jobs_scale.services_env(database_url, nats_server, s3, provider_url),
                "JOB_CONCURRENCY": str(args.jobs), "JOB_MAX_ACK_PENDING": str(max(10_000, args.jobs * 2)),
                "JOB_INTENT_SECONDS": "120",
            }  # fmt: skip
            image = await jobs_scale.start_credits_and_image(env, work, processes)
            async with grpc.aio.insecure_channel(env["IMAGE_ADDR"]) as channel, \
                    grpc.aio.insecure_channel(env["CREDITS_ADDR"]) as credits_channel:  # fmt: skip
                stub = image_service_pb2_grpc.ImageServiceStub(channel)
                await _fund(credits_service_pb2_grpc.CreditsServiceStub(credits_channel), ["bench", "bench-list", *_batch_users("provider_2s")])
                sample = await stub.CreateGenerationJob(_request("bench"), metadata=AS_GATEWAY)
                echo_port = free_port()
                echo = ServiceProcess("echo", env, work / "echo.log", argv=[
                    sys.executable, "-m", "tests.bench.echo_server", str(echo_port), str(sample.ByteSize())]).start()  # fmt: skip
                processes.append(echo)
                await wait_for_tcp("127.0.0.1", echo_port, 15)
                # With NATS away the jobs created wait in the outbox: the rates and latencies
                # measure the create path, not the workers painting what it queued.
                nats_server.stop()
                figures.append(await _create_throughput(stub, f"127.0.0.1:{echo_port}", sample.ByteSize(), args))
                figures += await _steady_latencies(stub, args)
                # Those jobs measured the create path; painting them all would only make the bench long.
                await _forget_queued(database_url)
                nats_server.start()
                # The batch with the provider's 2 s only: the aim's run. The same batch with the
                # local painter measured its drawing, not the jobs, and took a fifth of the part.
                figures += await _batch(stub, nats_server, database_url, image, "openai/dall-e-2", "provider_2s", args)
        finally:
            for process in reversed(processes):
                process.terminate()
    return figures + await jobs_scale.scale_out(args, read_when_written=_read_when_written, fund=_fund, drained=_drained)


def _request(user_id: str, model: str = "local/sketch") -> pb.CreateGenerationJobRequest:
    size = 256 if model == "openai/dall-e-2" else 64
    return pb.CreateGenerationJobRequest(user_id=user_id, request_id=uuid.uuid4().hex, prompt="a pale ward at night",
                                         model=model, width=size, height=size, num_images=1)  # fmt: skip


def _batch_users(label: str) -> list[str]:
    return [f"bench-batch-{label}-{n}" for n in range(BATCH_USERS)]


async def _fund(stub, users: list[str]) -> None:
    gate = asyncio.Semaphore(16)

    async def grant(user: str) -> None:
        async with gate:
            await stub.Grant(credits_pb.GrantRequest(user_id=user, amount=FUNDING, reason="bench",
                                                     request_id=f"fund-{user}"), metadata=AS_ADMIN)  # fmt: skip

    await asyncio.gather(*(grant(user) for user in users))


async def _create_throughput(stub, echo_addr: str, response_bytes: int, args: argparse.Namespace) -> Figure:
    concurrency = args.jobs_concurrency
    async with grpc.aio.insecure_channel(echo_addr) as echo_channel:
        echo = echo_channel.unary_unary(
            echo_server.METHOD, request_serializer=pb.CreateGenerationJobRequest.SerializeToString,
            response_deserializer=pb.CreateGenerationJobResponse.FromString,
        )  # fmt: skip

        async def create() -> None:
            await stub.CreateGenerationJob(_request("bench"), metadata=AS_GATEWAY)

        async def echo_call() -> None:
            await echo(_request("bench"), metadata=AS_GATEWAY)

        await calls_per_second(create, 1.0, concurrency)  # warm-up
        await calls_per_second(echo_call, 1.0, concurrency)
        paired = await paired_rates(
            lambda: calls_per_second(create, args.seconds, concurrency),
            lambda: calls_per_second(echo_call, args.seconds, concurrency),
            args.rounds,
        )
    return ratio_figure(
        "jobs.create_generation_job", paired.value, paired.baseline, "calls/s", aim=CREATE_AIM,
        baseline_is="bare grpc.aio echo, same request and response sizes", concurrency=concurrency,
        response_bytes=response_bytes, ratio_per_round=paired.ratios,
    )  # fmt: skip


async def _steady(call, rate: float, seconds: float) -> list[float]:
    """Latencies (ms) of calls started at a steady `rate` (open loop) for `seconds`."""
    latencies: list[float] = []

    async def timed() -> None:
        started = time.perf_counter()
        await call()
        latencies.append((time.perf_counter() - started) * 1000)

    tasks = []
    start = time.perf_counter()
    for n in range(int(rate * seconds)):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(timed()))
    await asyncio.gather(*tasks)
    return sorted(latencies)


async def _steady_latencies(stub, args: argparse.Namespace) -> list[Figure]:
    for _ in range(25):
        await stub.CreateGenerationJob(_request("bench-list"), metadata=AS_GATEWAY)
    seconds = max(args.seconds, 3.0)

    async def create() -> None:
        await stub.CreateGenerationJob(_request("bench"), metadata=AS_GATEWAY)

    async def list_jobs() -> None:
        await stub.ListGenerationJobs(pb.ListGenerationJobsRequest(user_id="bench-list", page_size=20), metadata=AS_GATEWAY)

    await _steady(create, args.steady_rate, 1.0)  # warm-up
    creates = await _steady(create, args.steady_rate, seconds)
    await _steady(list_jobs, args.steady_rate, 1.0)
    lists = await _steady(list_jobs, args.steady_rate, seconds)
    notes = {"rate_per_second": args.steady_rate, "calls": len(creates)}
    return [
        figure("jobs.create_p99_at_steady_rate", _percentile(creates, 99), "ms", aim=CREATE_P99_AIM,
               p50_ms=round(_percentile(creates, 50), 2), **notes),
        figure("jobs.list_p99_at_steady_rate", _percentile(lists, 99), "ms", aim=LIST_P99_AIM,
               p50_ms=round(_percentile(lists, 50), 2), page_size=20, **notes),
    ]  # fmt: skip


async def _batch(stub, nats_server, database_url: str, image, model: str, label: str, args) -> list[Figure]:
    """`args.jobs` jobs created while NATS is away, then all taken at once by the one process."""
    users = _batch_users(label)
    nats_server.stop()
    gate = asyncio.Semaphore(64)

    async def create(n: int) -> None:
        async with gate:
            await stub.CreateGenerationJob(_request(users[n % len(users)], model), metadata=AS_GATEWAY)

    await asyncio.gather(*(create(n) for n in range(args.jobs)))
    rss_before = _peak_rss_mb(image)
    cpu_before = _cpu_seconds(image)
    nats_server.start()
    conn = await _drained(database_url, timeout=300, users=users)
    cpu_per_job_ms = (_cpu_seconds(image) - cpu_before) * 1000 / args.jobs
    try:
        row = await conn.fetchrow(
            """SELECT extract(epoch FROM max(complete_time) - min(start_time)) AS batch_s,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM complete_time - start_time)) AS p99_s,
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM complete_time - start_time)) AS p50_s,
                      count(*) FILTER (WHERE status = 'COMPLETED') AS completed, count(*) AS jobs
                 FROM image.jobs WHERE user_id = ANY($1::text[])""",
            users,
        )
        peak = await conn.fetchval(
            """SELECT max(running) FROM (
                   SELECT sum(d) OVER (ORDER BY t, d ROWS UNBOUNDED PRECEDING) AS running FROM (
                       SELECT start_time AS t, 1 AS d FROM image.jobs WHERE user_id = ANY($1::text[])
                       UNION ALL SELECT complete_time, -1 FROM image.jobs WHERE user_id = ANY($1::text[])) AS events
               ) AS counted""",
            users,
        )
    finally:
        await conn.close()
    notes = {"users": len(users), "jobs": row["jobs"], "completed": row["completed"], "model": model, "p50_job_s": round(row["p50_s"], 3),
             "p99_job_s": round(row["p99_s"], 3), "peak_in_flight": peak,
             # The batch cannot end before the provider's latency plus the image process's
             # own CPU for every job (one event loop): the floor this machine allows.
             "image_cpu_ms_per_job": round(cpu_per_job_ms, 2),
             "floor_s": round(PROVIDER_SECONDS + cpu_per_job_ms * args.jobs / 1000, 2)}  # fmt: skip
    return [
        ratio_figure(f"jobs.batch_of_{args.jobs}_{label}", float(row["batch_s"]), PROVIDER_SECONDS, "s",
                     aim=BATCH_AIM, baseline_is="the provider's own latency (2 s)", **notes),
        figure(f"jobs.peak_rss_{label}", _peak_rss_mb(image), "MB", aim=RSS_AIM, rss_before_batch_mb=rss_before),
    ]  # fmt: skip


async def _drained(database_url: str, *, timeout: float, users: list[str]) -> asyncpg.Connection:
    """Waits until every job of `users` is settled; returns an open connection."""
    conn = await asyncpg.connect(database_url)
    deadline = time.perf_counter() + timeout
    while True:
        open_jobs = await conn.fetchval(
            "SELECT count(*) FROM image.jobs WHERE NOT settled AND status <> 'ABANDONED' AND user_id = ANY($1::text[])",
            users,
        )
        if open_jobs == 0:
            return conn
        if time.perf_counter() > deadline:
            await conn.close()
            raise RuntimeError(f"{open_jobs} jobs still open after {timeout:g} s")
        await asyncio.sleep(0.2)


async def _forget_queued(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DELETE FROM image.job_outbox WHERE published_at IS NULL")
    finally:
        await conn.close()


def _peak_rss_mb(process) -> float:
    """VmHWM of the process: the most resident memory it ever had."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _cpu_seconds(process) -> float:
    """User plus system CPU the process has used so far (/proc/<pid>/stat, in clock ticks)."""
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(sorted_values: list[float], percent: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(percent / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def _read_when_written(path: Path, timeout: float = 30.0) -> str:
    deadline = time.perf_counter() + timeout
    while not (path.exists() and path.read_text()):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{path} was never written")
        await asyncio.sleep(0.05)
    return path.read_text()
