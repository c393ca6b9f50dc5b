"""kill -9 of an image process in the two places where money is at stake, with the real
credits service and image processes started as an operator would start them.

1. Mid-job: another process resumes the job; it is charged once and refunded never.
2. Between the charge and the job row: the charge is refunded, no job is shown, and a
   repeat of the request creates the job under a fresh charge.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import asyncpg
import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as credits_pb
from casefile.credits.v1 import credits_service_pb2_grpc
from casefile.image.v1 import image_service_pb2 as pb
from casefile.image.v1 import image_service_pb2_grpc
from services.image.jobs.domain import charge_request_id, job_id_for
from shared.auth import bearer_metadata
from tests.e2e.test_image_crash import _events, _until
from tests.fakes.openai_images import GENERATIONS_PATH, FakeOpenAIImages
from tests.fakes.tcp_proxy import TcpProxy
from tests.integration.jobs.helpers import money_problems
from tools.infra import ServiceProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CALL_TIMEOUT_S = 20
FAST_JOBS = {
    "JOB_ACK_WAIT_SECONDS": "3",
    "JOB_INTENT_SECONDS": "3",
    "OUTBOX_POLL_INTERVAL_SECONDS": "0.2",
    "JOB_RETRY_BACKOFF_SECONDS": "0.2,0.4,0.8",
}


async def _start(start_service, name: str, env: dict[str, str], addr_variable: str) -> ServiceProcess:
    process = start_service(name, env)
    await process.wait_healthy(env[addr_variable])
    return process


async def _jobs_consumer_ready(process: ServiceProcess) -> None:
    await _until(lambda: _events(process, "consumer.subscribed", consumer="image-jobs"), 20, "the jobs consumer")


async def test_a_job_whose_worker_is_killed_is_resumed_elsewhere_and_charged_once(
    start_service: Callable[..., ServiceProcess], make_env: Callable[..., dict[str, str]], auth_tokens, database_url
):
    async with FakeOpenAIImages() as openai:
        openai.delay_seconds = 2.0
        env = make_env(OPENAI_API_KEY=openai.api_key, OPENAI_BASE_URL=openai.api_base_url, **FAST_JOBS)
        await _start(start_service, "credits", env, "CREDITS_ADDR")
        second_env = {**env, "IMAGE_ADDR": f"127.0.0.1:{free_port()}"}
        envs = [env, second_env]
        images = [await _start(start_service, "image", image_env, "IMAGE_ADDR") for image_env in envs]
        for process in images:
            await _jobs_consumer_ready(process)
        async with grpc.aio.insecure_channel(env["IMAGE_ADDR"]) as channel:
            image = image_service_pb2_grpc.ImageServiceStub(channel)
            gateway = bearer_metadata(auth_tokens["gateway"])
            created = await image.CreateGenerationJob(
                pb.CreateGenerationJobRequest(user_id="u-kill", request_id="r-kill", prompt="a ward", num_images=2,
                                              model="openai/dall-e-2", width=256, height=256),
                metadata=gateway, timeout=CALL_TIMEOUT_S,
            )  # fmt: skip
            job_id = created.job.job_id
            await _until(lambda: openai.requests_to(GENERATIONS_PATH), 20, "the provider call")
            painter = next(p for p in images if _events(p, "job.step_started", step="generate", job_id=job_id))
            await asyncio.to_thread(painter.kill)
            openai.delay_seconds = 0
        survivor_env = envs[1 - images.index(painter)]
        async with grpc.aio.insecure_channel(survivor_env["IMAGE_ADDR"]) as channel:
            image = image_service_pb2_grpc.ImageServiceStub(channel)

            async def final():
                job = (await image.GetGenerationJob(pb.GetGenerationJobRequest(job_id=job_id, user_id="u-kill"),
                                                    metadata=gateway, timeout=CALL_TIMEOUT_S)).job  # fmt: skip
                return job if job.status == pb.JOB_STATUS_COMPLETED else None

            job = await _until(final, 40, "the job COMPLETED by the survivor")
        assert len(job.images) == 2 and job.credits_refunded == 0
        assert len(openai.requests_to(GENERATIONS_PATH)) == 2  # the killed call, and the survivor's
        conn = await asyncpg.connect(database_url)
        try:
            await _until(lambda: conn.fetchval("SELECT settled FROM image.jobs WHERE job_id = $1", uuid.UUID(job_id)),
                         20, "the job settled")  # fmt: skip
            ledger = await conn.fetch("SELECT kind, amount FROM credits.ledger_entries WHERE user_id = 'u-kill' ORDER BY seq")
            assert [(row["kind"], row["amount"]) for row in ledger] == [("GRANT", 1000), ("CHARGE", -400)]
            used = await conn.fetchval("SELECT storage_used_bytes FROM credits.accounts WHERE user_id = 'u-kill'")
            assert used == sum(image.size_bytes for image in job.images)
            assert await conn.fetchval("SELECT count(*) FROM credits.generations WHERE job_id = $1", job_id) == 1
            assert await money_problems(conn) == []
        finally:
            await conn.close()


async def test_a_create_killed_between_the_charge_and_the_job_keeps_no_money(
    start_service: Callable[..., ServiceProcess], make_env: Callable[..., dict[str, str]], auth_tokens, database_url
):
    env = make_env(**FAST_JOBS)
    await _start(start_service, "credits", env, "CREDITS_ADDR")
    host, port = env["CREDITS_ADDR"].rsplit(":", 1)
    # The first image process reaches credits over a slow link: each answer takes a second,
    # so it is still waiting for the Charge's answer when the charge is already committed.
    async with TcpProxy(host, int(port)) as slow_link:
        slow_link.delay_seconds = 1.0
        doomed = await _start(start_service, "image", {**env, "CREDITS_ADDR": slow_link.address}, "IMAGE_ADDR")
        survivor_env = {**env, "IMAGE_ADDR": f"127.0.0.1:{free_port()}"}
        survivor = await _start(start_service, "image", survivor_env, "IMAGE_ADDR")
        await _jobs_consumer_ready(survivor)
        conn = await asyncpg.connect(database_url)
        try:
            request = pb.CreateGenerationJobRequest(user_id="u-cut", request_id="r-cut", prompt="a ward",
                                                    model="local/sketch", width=64, height=64, num_images=3)  # fmt: skip
            gateway = bearer_metadata(auth_tokens["gateway"])
            async with grpc.aio.insecure_channel(env["IMAGE_ADDR"]) as channel:
                call = image_service_pb2_grpc.ImageServiceStub(channel).CreateGenerationJob(
                    request, metadata=gateway, timeout=CALL_TIMEOUT_S)  # fmt: skip
                job_id = job_id_for("u-cut", "r-cut")
                charged = "SELECT count(*) FROM credits.ledger_entries WHERE request_id = $1"
                await _until(lambda: conn.fetchval(charged, charge_request_id(job_id, 1)), 20, "the charge committed")
                await asyncio.to_thread(doomed.kill)
                with pytest.raises(grpc.aio.AioRpcError):
                    await call
            assert await conn.fetchval("SELECT status FROM image.jobs WHERE job_id = $1", job_id) == "CHARGING"

            await _until(lambda: _status(conn, job_id, "ABANDONED"), 30, "the survivor refunding the charge")
            ledger = await conn.fetch("SELECT kind, amount FROM credits.ledger_entries WHERE user_id = 'u-cut' ORDER BY seq")
            assert [(row["kind"], row["amount"]) for row in ledger] == [("GRANT", 1000), ("CHARGE", -300), ("REFUND", 300)]
            async with grpc.aio.insecure_channel(survivor_env["IMAGE_ADDR"]) as channel:
                image = image_service_pb2_grpc.ImageServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await image.GetGenerationJob(pb.GetGenerationJobRequest(job_id=str(job_id), user_id="u-cut"),
                                                 metadata=gateway, timeout=CALL_TIMEOUT_S)  # fmt: skip
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
                # The caller repeats the request: it is charged once more, and runs.
                created = await image.CreateGenerationJob(request, metadata=gateway, timeout=CALL_TIMEOUT_S)
                assert created.job.job_id == str(job_id) and created.credits_remaining == 700
            async with grpc.aio.insecure_channel(env["CREDITS_ADDR"]) as channel:
                account = await credits_service_pb2_grpc.CreditsServiceStub(channel).GetAccount(
                    credits_pb.GetAccountRequest(user_id="u-cut"), metadata=gateway, timeout=CALL_TIMEOUT_S)  # fmt: skip
            assert account.account.balance == 700
            assert await money_problems(conn) == []
        finally:
            await conn.close()


async def _status(conn: asyncpg.Connection, job_id: uuid.UUID, status: str) -> bool:
    return await conn.fetchval("SELECT status FROM image.jobs WHERE job_id = $1", job_id) == status
