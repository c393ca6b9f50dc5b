"""What the generation-job tests share: the image service (build()) wired to a real credits
service, both in this process on free ports, plus the database, S3 and calls as the gateway."""

from __future__ import annotations

import contextlib
import uuid
from urllib.parse import urlsplit
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiobotocore.session
import nats
import asyncpg
import grpc
import pytest

from casefile.image.v1 import image_service_pb2 as pb
from casefile.image.v1 import image_service_pb2_grpc as pb_grpc
from services.image.config import Config
from services.image.main import build
from shared.auth import bearer_metadata
from shared.grpc_errors import ErrorDetails, details_of
from casefile.image.v1 import image_events_pb2
from nats.js.errors import NotFoundError
from shared.streams import IMAGE_JOBS, JOB_COMPLETED_SUBJECT, JOBS_DURABLE
from tests.fakes.tcp_proxy import TcpProxy
from tests.polling import eventually
from tests.integration.credits.helpers import CreditsUnderTest, serve_credits

CALL_TIMEOUT_S = 10
# Short enough that retries, intents and redeliveries play out within a test's seconds.
FAST_JOB_SETTINGS = {
    "JOB_RETRY_BACKOFF_SECONDS": "0.1,0.2,0.3",
    "JOB_ACK_WAIT_SECONDS": "2",
    "JOB_INTENT_SECONDS": "2",
    "OUTBOX_POLL_INTERVAL_SECONDS": "0.2",
    "JOB_CONCURRENCY": "16",
    "PORTRAIT_STEP_TIMEOUT_SECONDS": "3",
}
FINAL = (pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED)


def image_env(
    *, database_url: str, nats_url: str, s3_endpoint_url: str, s3_bucket: str, credits_addr: str,
    tokens: dict[str, str], **overrides: str,
) -> dict[str, str]:  # fmt: skip
    return {
        "IMAGE_ADDR": "127.0.0.1:0",
        "DATABASE_URL": database_url,
        "NATS_URL": nats_url,
        "S3_ENDPOINT_URL": s3_endpoint_url,
        "S3_BUCKET": s3_bucket,
        # Portraits are not exercised here; nothing listens there.
        "STORY_ADDR": "127.0.0.1:9",
        "CREDITS_ADDR": credits_addr,
        "AUTH_TOKENS": ",".join(f"{caller}:{token}" for caller, token in tokens.items()),
        "PORTRAIT_PROVIDER": "local",
        **FAST_JOB_SETTINGS,
        **overrides,
    }


@dataclass
class JobsStack:
    image: pb_grpc.ImageServiceStub
    credits: CreditsUnderTest
    db: asyncpg.Connection
    s3: Any
    bucket: str
    tokens: dict[str, str]
    port: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def as_gateway(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.tokens["gateway"])

    async def call(self, method: str, request: Any, *, caller: str = "gateway") -> Any:
        return await getattr(self.image, method)(
            request, metadata=bearer_metadata(self.tokens[caller]), timeout=CALL_TIMEOUT_S
        )

    async def refused(self, method: str, request: Any, *, caller: str = "gateway") -> ErrorDetails:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await self.call(method, request, caller=caller)
        return details_of(raised.value)

    async def create(self, user_id: str = "u1", **fields: Any) -> pb.CreateGenerationJobResponse:
        return await self.call("CreateGenerationJob", job_request(user_id, **fields))

    async def get(self, job_id: str, user_id: str = "u1") -> pb.GenerationJob:
        return (await self.call("GetGenerationJob", pb.GetGenerationJobRequest(job_id=job_id, user_id=user_id))).job

    async def final(self, job_id: str, user_id: str = "u1", *, timeout: float = 20) -> pb.GenerationJob:
        async def done():
            job = await self.get(job_id, user_id)
            return job if job.status in FINAL else None

        return await eventually(done, timeout=timeout, what=f"job {job_id} final")

    async def settled(self, job_id: str, *, timeout: float = 20) -> None:
        await eventually(lambda: self.db.fetchval("SELECT settled FROM image.jobs WHERE job_id = $1", uuid.UUID(job_id)),
                         timeout=timeout, what=f"job {job_id} settled")  # fmt: skip

    async def balance(self, user_id: str = "u1") -> int:
        return (await self.credits.account(user_id)).balance


def job_request(user_id: str = "u1", **fields: Any) -> pb.CreateGenerationJobRequest:
    values = {"prompt": "a pale ward at night", "model": "local/sketch", "width": 64, "height": 64, "num_images": 1,
              "request_id": uuid.uuid4().hex, **fields}  # fmt: skip
    return pb.CreateGenerationJobRequest(user_id=user_id, **values)


@contextlib.asynccontextmanager
async def serve_jobs(
    *, database_url: str, nats_url: str, s3_endpoint_url: str, s3_bucket: str, tokens: dict[str, str],
    credits_env: dict[str, str] | None = None, proxies: bool = False, **image_overrides: str,
) -> AsyncIterator[JobsStack]:  # fmt: skip
    """Credits and the image service; with `proxies`, the image service reaches credits and
    S3 through TCP proxies that a test can cut (extra["credits_proxy"], extra["s3_proxy"])."""
    async with contextlib.AsyncExitStack() as stack:
        credits_settings = {"CHARGE_RATE_PER_SECOND": "1000", "CHARGE_BURST": "1000", **(credits_env or {})}
        credits = await stack.enter_async_context(serve_credits(database_url, tokens, **credits_settings))
        extra: dict[str, Any] = {}
        credits_addr, s3_url = credits.addr, s3_endpoint_url
        if proxies:
            host, port = credits.addr.rsplit(":", 1)
            extra["credits_proxy"] = await stack.enter_async_context(TcpProxy(host, int(port)))
            parts = urlsplit(s3_endpoint_url)
            extra["s3_proxy"] = await stack.enter_async_context(TcpProxy(parts.hostname, parts.port))
            credits_addr, s3_url = extra["credits_proxy"].address, extra["s3_proxy"].url
        env = image_env(database_url=database_url, nats_url=nats_url, s3_endpoint_url=s3_url,
                        s3_bucket=s3_bucket, credits_addr=credits_addr, tokens=tokens, **image_overrides)  # fmt: skip
        server = await build(Config.from_env(env), stack)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        db = await asyncpg.connect(database_url)
        stack.push_async_callback(db.close)
        session = aiobotocore.session.get_session()
        s3 = await stack.enter_async_context(
            session.create_client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1")
        )
        yield JobsStack(pb_grpc.ImageServiceStub(channel), credits, db, s3, s3_bucket, tokens, server.port, extra)


async def job_rows(db: asyncpg.Connection, user_id: str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM image.jobs WHERE user_id = $1 ORDER BY create_time", user_id)


async def charges_of(db: asyncpg.Connection, user_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT entry_id, amount, reference, request_id FROM credits.ledger_entries WHERE user_id = $1 AND kind = 'CHARGE'",
        user_id,
    )


async def money_problems(db: asyncpg.Connection) -> list[str]:
    """No charge without a job, no job without a charge: every job charge is either the
    charge of a job callers can see, or refunded in full; every such job names its charge."""
    problems = []
    rows = await db.fetch(
        """
        SELECT c.entry_id, c.user_id, -c.amount AS charged, c.reference, coalesce(sum(r.amount), 0) AS refunded,
               j.status, j.charge_id
          FROM credits.ledger_entries c
          LEFT JOIN credits.ledger_entries r ON r.refund_of = c.entry_id
          LEFT JOIN image.jobs j ON 'job:' || j.job_id = c.reference
         WHERE c.kind = 'CHARGE' AND c.reference LIKE 'job:%'
         GROUP BY c.entry_id, c.user_id, c.amount, c.reference, j.status, j.charge_id
        """
    )
    visible = {"PENDING", "PROCESSING", "UPLOADING", "COMPLETED", "FAILED", "CANCELLED"}
    for row in rows:
        shown = row["status"] in visible and row["charge_id"] == str(row["entry_id"])
        if not shown and row["refunded"] != row["charged"]:
            problems.append(f"charge {row['entry_id']} ({row['reference']}) kept {row['charged'] - row['refunded']} "
                            f"without a job (job status {row['status']})")  # fmt: skip
    jobs = await db.fetch(
        f"""SELECT j.job_id, j.charge_id, j.credits_charged, e.amount FROM image.jobs j
              LEFT JOIN credits.ledger_entries e ON e.entry_id::text = j.charge_id AND e.kind = 'CHARGE'
             WHERE j.status IN ({", ".join(f"'{status}'" for status in sorted(visible))})"""
    )
    for job in jobs:
        if job["amount"] is None or -job["amount"] != job["credits_charged"]:
            problems.append(f"job {job['job_id']} shows a charge of {job['credits_charged']} that the ledger lacks")
    refunds = await db.fetch(
        """SELECT j.job_id, j.credits_refunded, coalesce(sum(r.amount), 0) AS refunded FROM image.jobs j
             LEFT JOIN credits.ledger_entries r ON r.refund_of::text = j.charge_id
            WHERE j.settled GROUP BY j.job_id, j.credits_refunded HAVING coalesce(sum(r.amount), 0) <> j.credits_refunded"""
    )
    problems += [f"settled job {row['job_id']} says refunded {row['credits_refunded']}, ledger {row['refunded']}"
                 for row in refunds]  # fmt: skip
    return problems


async def queue_drained(nats_url: str) -> bool:
    """Every job message was acknowledged: no worker is working on any job any more."""
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().consumer_info(IMAGE_JOBS.name, JOBS_DURABLE)
    except Exception:  # noqa: BLE001 - not declared yet
        return False
    finally:
        await nc.close()
    return info.num_ack_pending == 0 and info.num_pending == 0


@dataclass(frozen=True)
class CompletedEvent:
    msg_id: str
    job: pb.GenerationJob


async def completed_events(nats_url: str) -> list[CompletedEvent]:
    """Every `image.job.completed` the IMAGE_JOBS stream holds, oldest first."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            state = (await js.stream_info(IMAGE_JOBS.name)).state
        except NotFoundError:
            return []
        events = []
        for seq in range(max(state.first_seq, 1), state.last_seq + 1):  # an empty stream has first_seq 0
            try:
                message = await js.get_msg(IMAGE_JOBS.name, seq)
            except NotFoundError:
                continue
            if message.subject == JOB_COMPLETED_SUBJECT:
                job = image_events_pb2.GenerationJobCompleted.FromString(message.data).job
                events.append(CompletedEvent((message.headers or {}).get("Nats-Msg-Id", ""), job))
        return events
    finally:
        await nc.close()


async def completed_event_of(nats_url: str, job_id: str, *, timeout: float = 20) -> CompletedEvent:
    async def published():
        found = [event for event in await completed_events(nats_url) if event.job.job_id == job_id]
        return found[0] if found else None

    return await eventually(published, timeout=timeout, what=f"image.job.completed of {job_id}")
