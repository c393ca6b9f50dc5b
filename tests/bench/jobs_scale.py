"""Generation jobs scale out (issue 11, aim 5): with a provider answering in 200 ms, two
image processes deliver at least 1.7x the jobs per second of one.

Each image process takes at most JOB_CONCURRENCY jobs at a time, so one process can deliver
about concurrency / 0.2 s jobs per second; a second process, sharing the one durable
consumer, should double that. A backlog is made the same way for both runs: jobs created
while the nats-server is stopped wait in the outbox; NATS comes back and the process(es)
drain them. The rate is the jobs' own timestamps: completed jobs over the time from the
first start to the last completion.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import uuid
from pathlib import Path

from casefile.credits.v1 import credits_service_pb2_grpc
from casefile.image.v1 import image_service_pb2 as pb
from casefile.image.v1 import image_service_pb2_grpc
from tests.bench import slow_provider
from tests.bench.harness import AS_GATEWAY, base_env, bench_database
from tests.bench.report import Figure, ratio_figure
from tools.infra import MotoS3Server, NatsServer, ServiceProcess, free_port

import grpc

PROVIDER_SECONDS = 0.2
SCALE_AIM = "ratio >= 1.7"
# Low enough that one process is held by its own limit, not by the machine: a job costs
# about 9 ms of image-process CPU, plus the credits service's and PostgreSQL's share, so two
# processes at 16 jobs each (160 jobs/s) wanted more than this 2-core machine's cores and
# the ratio measured the machine (1.25-1.4); the portraits' scale-out holds 4 for the same
# reason.
CONCURRENCY = 8
USERS = 50


async def scale_out(args, *, read_when_written, fund, drained) -> list[Figure]:
    """jobs/s of two image processes against one, on a database and servers of its own."""
    work = Path(tempfile.mkdtemp(prefix="casefile-bench-jobs-scale-"))
    processes: list = []
    jobs = args.scale_jobs
    async with bench_database() as database_url:
        try:
            nats_server = NatsServer(work / "nats", log_path=work / "nats.log").start()
            s3 = MotoS3Server(work / "moto.log").start()
            url_file = work / "provider-url"
            provider = ServiceProcess("provider", base_env(database_url), work / "provider.log",
                                      argv=[sys.executable, "-m", "tests.bench.slow_provider", str(url_file),
                                            str(PROVIDER_SECONDS)]).start()  # fmt: skip
            processes += [nats_server, s3, provider]
            env = {**services_env(database_url, nats_server, s3, await read_when_written(url_file)),
                   "JOB_CONCURRENCY": str(CONCURRENCY)}  # fmt: skip
            credits = ServiceProcess("credits", env, work / "credits.log").start()
            processes.append(credits)
            await credits.wait_healthy(env["CREDITS_ADDR"])
            images = []
            for n in range(2):
                image_env = {**env, "IMAGE_ADDR": f"127.0.0.1:{free_port()}"}
                image = ServiceProcess("image", image_env, work / f"image-{n}.log")
                images.append((image, image_env["IMAGE_ADDR"]))
            first, first_addr = images[0]
            processes.append(first.start())
            await first.wait_healthy(first_addr)
            async with grpc.aio.insecure_channel(env["CREDITS_ADDR"]) as credits_channel:
                await fund(credits_service_pb2_grpc.CreditsServiceStub(credits_channel), _users("one") + _users("two"))
            one = await _backlog_rate(first_addr, nats_server, database_url, _users("one"), jobs, drained)
            second, second_addr = images[1]
            processes.append(second.start())
            await second.wait_healthy(second_addr)
            two = await _backlog_rate(first_addr, nats_server, database_url, _users("two"), jobs, drained)
        finally:
            for process in reversed(processes):
                process.terminate()
    return [
        ratio_figure("jobs.scale_out_two_processes", two, one, "jobs/s", aim=SCALE_AIM,
                     baseline_is="one image process, same backlog", provider_seconds=PROVIDER_SECONDS,
                     concurrency_per_process=CONCURRENCY, jobs=jobs),
    ]  # fmt: skip


def services_env(database_url: str, nats_server, s3, provider_url: str) -> dict[str, str]:
    """What the bench's credits and image processes start with (the jobs parts add to it)."""
    return {
        **base_env(database_url),
        "NATS_URL": nats_server.url, "S3_ENDPOINT_URL": s3.endpoint_url, "S3_BUCKET": "bench",
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
        "STORY_ADDR": f"127.0.0.1:{free_port()}", "IMAGE_ADDR": f"127.0.0.1:{free_port()}",
        "CREDITS_ADDR": f"127.0.0.1:{free_port()}",
        "CHARGE_RATE_PER_SECOND": "1000000000", "CHARGE_BURST": "1000000000",
        "OPENAI_API_KEY": slow_provider.API_KEY, "OPENAI_BASE_URL": provider_url,
        "OUTBOX_POLL_INTERVAL_SECONDS": "0.5",
    }  # fmt: skip


async def start_credits_and_image(env: dict[str, str], work, processes: list) -> ServiceProcess:
    """The credits service, then one image process, both healthy; added to `processes`."""
    credits = ServiceProcess("credits", env, work / "credits.log").start()
    processes.append(credits)
    await credits.wait_healthy(env["CREDITS_ADDR"])
    image = ServiceProcess("image", env, work / "image.log").start()
    processes.append(image)
    await image.wait_healthy(env["IMAGE_ADDR"])
    return image


def _users(label: str) -> list[str]:
    return [f"bench-scale-{label}-{n}" for n in range(USERS)]


async def _backlog_rate(addr: str, nats_server, database_url: str, users: list[str], jobs: int, drained) -> float:
    nats_server.stop()
    gate = asyncio.Semaphore(32)
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = image_service_pb2_grpc.ImageServiceStub(channel)

        async def create(n: int) -> None:
            request = pb.CreateGenerationJobRequest(
                user_id=users[n % len(users)], request_id=uuid.uuid4().hex, prompt="a pale ward at night",
                model="openai/dall-e-2", width=256, height=256, num_images=1,
            )  # fmt: skip
            async with gate:
                await stub.CreateGenerationJob(request, metadata=AS_GATEWAY)

        await asyncio.gather(*(create(n) for n in range(jobs)))
    nats_server.start()
    conn = await drained(database_url, timeout=300, users=users)
    try:
        row = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE status = 'COMPLETED') AS completed,
                      extract(epoch FROM max(complete_time) - min(start_time)) AS seconds
                 FROM image.jobs WHERE user_id = ANY($1::text[])""",
            users,
        )
    finally:
        await conn.close()
    return row["completed"] / float(row["seconds"])
