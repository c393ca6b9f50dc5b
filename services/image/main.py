"""Wires the image service together, serves it, and shuts it down in order."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import aiobotocore.session
import asyncpg
import grpc
import httpx

from casefile.credits.v1 import credits_service_pb2_grpc
from casefile.image.v1 import image_service_pb2
from casefile.story.v1 import story_service_pb2_grpc
from services.image.cdn import CdnSignedObjects, CloudFrontUrls, load_private_key
from services.image.config import Config
from services.image.handlers import ALLOWED_CALLERS, SERVICE_NAME, ImageServicer
from services.image.image_urls import SignedObjects
from services.image.jobs.credits_client import CreditsClient
from services.image.jobs.domain import JobDeps, JobSettings
from services.image.jobs.previews import PreviewBus
from services.image.jobs.messaging import JOB_OUTBOX, JobConsumerSettings, job_consumer, job_outbox_relay
from services.image.jobs.worker import WorkerDeps, WorkerSettings, batched_renewals, run_job
from services.image.lease import LeaseTiming
from services.image.objects import ObjectStore, s3_client_config
from services.image.portraits.domain import (
    PortraitDeps,
    PortraitEvent,
    PortraitTimeouts,
    end_abandoned_portrait,
    paint_portrait,
)
from services.image.portraits.messaging import DeadLetters, PortraitConsumerSettings, portrait_consumer
from services.image.portraits.story_client import StoryClient
from services.image.providers import build_generation_providers, build_portrait_provider
from services.image.providers.download import HostConnections
from services.image.routing import BreakerSettings, ProviderRouter
from shared.auth import AuthInterceptor
from shared.background import start_supervised
from shared.change_feed import ChangeFeed
from shared.db import close_pool, create_pool
from shared.http_transport import ShardedTransport
from shared.grpc_server import RunningServer, ServiceSpec, add_strictly_decoded, serve_main, start_grpc_server
from shared.migrations import apply_migrations
from shared.notices import Notices
from shared.outbox import RelaySettings

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8 * 1024 * 1024

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Connections beyond the painting slots: the jobs (each holds one only for a statement),
# lease renewals and the dead-letter consumer.
JOB_POOL_CONNECTIONS = 16
EXTRA_POOL_CONNECTIONS = 4
# What the service NOTIFYs after every change of a job (migration 0006).
JOB_CHANGES_CHANNEL = "image_job_changes"
# Every provider call of a job (at most 10), its statements and S3 and credits calls.
JOB_STEPS_PER_DELIVERY = 60
# A lease outlives the consumer's ack wait by this much: a redelivery after a crash finds
# it lapsed, or lapsing within this margin.
LEASE_MARGIN_SECONDS = 2.0


async def build(config: Config, stack: contextlib.AsyncExitStack) -> RunningServer:
    """Everything the service needs, each cleanup pushed on `stack`; returns the server."""
    pool = await _open_database(config, stack)
    objects = await _open_object_store(config, stack)
    # One HTTP client for the process, so provider calls and downloads reuse connections;
    # redirects stay off because the downloader checks every hop itself.
    # Every job and portrait in flight may be waiting on a provider at once: httpx's default
    # of 100 connections would queue the rest behind them. So many connections go in shards
    # (shared/http_transport.py: httpcore's one pool costs O(connections^2) per request).
    connections = config.jobs.concurrency + config.portrait_concurrency
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=100)
    http = await stack.enter_async_context(
        httpx.AsyncClient(follow_redirects=False, limits=limits, transport=ShardedTransport(max_connections=connections))
    )
    # Image downloads keep their connections alive per host name (downloads.HostConnections).
    downloads = HostConnections()
    stack.push_async_callback(downloads.aclose)
    timeouts = PortraitTimeouts(
        provider_seconds=config.portrait_provider_timeout_seconds,
        step_seconds=config.portrait_step_timeout_seconds,
    )
    deps = PortraitDeps(
        pool=pool,
        provider=build_portrait_provider(
            config.portrait_provider,
            recraft_api_key=config.recraft_api_key.reveal() if config.recraft_api_key else None,
            recraft_base_url=config.recraft_base_url,
            allow_private_downloads=config.allow_private_downloads,
            client=http,
            downloads=downloads,
        ),
        objects=objects,
        stories=_open_story_client(config, stack),
        lease=LeaseTiming(seconds=config.portrait_ack_wait_seconds + LEASE_MARGIN_SECONDS),
        timeouts=timeouts,
        provider_budget_seconds=config.portrait_attempt_budget_seconds,
    )
    _start_consumers(config, deps, stack)
    router = provider_router(config, http, downloads)
    jobs_deps = await _start_jobs(config, pool, objects, router, stack)
    changes = ChangeFeed(
        config.database_url,
        channel=JOB_CHANGES_CHANNEL,
        max_watchers=config.jobs.max_watchers,
        application_name="casefile-image-watch",
        name="job",
    )
    changes.start()
    stack.push_async_callback(changes.stop)
    servicer = ImageServicer(_url_signer(config, objects), router, jobs_deps, changes)
    server = await start_grpc_server(
        listen_addr=config.listen_addr,
        listen_addr_name="IMAGE_ADDR",
        services=[
            ServiceSpec(
                SERVICE_NAME,
                lambda grpc_server: add_strictly_decoded(
                    grpc_server, image_service_pb2.DESCRIPTOR.services_by_name["ImageService"], servicer
                ),
            )
        ],
        interceptors=[AuthInterceptor(config.auth_tokens.reveal(), ALLOWED_CALLERS)],
        metrics_addr=config.metrics_addr,
        # A 4 MB inpaint mask and the rest of its request: past this gRPC refuses the call.
        max_receive_bytes=MAX_REQUEST_BYTES,
    )
    server.on_stop.append(changes.end_watches)
    # Stopping twice is harmless; this covers callers (tests) that only close the stack.
    stack.push_async_callback(server.stop, 0)
    return server


async def _start_jobs(
    config: Config, pool: asyncpg.Pool, objects: ObjectStore, router: ProviderRouter, stack: contextlib.AsyncExitStack
) -> JobDeps:
    """The jobs' outbox relay and consumer; the dependencies the RPCs share with them."""
    settings = config.jobs
    relay = job_outbox_relay(
        pool,
        config.database_url,
        config.nats,
        settings=RelaySettings(poll_interval_seconds=min(settings.outbox_poll_interval_seconds, settings.intent_seconds)),
        stream_replicas=config.nats_stream_replicas,
    )
    stack.push_async_callback(relay.close)  # runs after the relay task is cancelled
    stack.callback(relay.backlog_metrics().close)
    await start_supervised(stack, relay.run, "job-outbox-relay")
    notices = await _start_notices(config, stack)
    previews = PreviewBus(config.nats)
    await start_supervised(stack, previews.run, "job-previews")

    def queued() -> None:
        relay.kick()
        notices.notify(JOB_OUTBOX.channel)  # the other processes' relays

    step = config.portrait_step_timeout_seconds
    deps = JobDeps(
        pool=pool,
        credits=_open_credits_client(config, stack),
        models=router,
        objects=objects,
        settings=JobSettings(intent_seconds=settings.intent_seconds, step_seconds=step,
                             watch_max_seconds=settings.watch_max_seconds,
                             watch_recheck_seconds=settings.watch_recheck_seconds),  # fmt: skip
        on_queued=queued,
        on_changed=lambda job_id: notices.notify(JOB_CHANGES_CHANNEL, str(job_id)),
        previews=previews,
    )
    lease = LeaseTiming(seconds=settings.ack_wait_seconds + LEASE_MARGIN_SECONDS)
    worker = WorkerDeps(
        jobs=deps,
        provider=router,
        lease=lease,
        renewals=batched_renewals(await _open_lease_pool(config, stack), lease, step),
        settings=WorkerSettings(
            retry_backoff_seconds=settings.retry_backoff_seconds,
            provider_seconds=config.providers.request_timeout_seconds,
            job_max_seconds=settings.max_seconds,
        ),
    )

    async def run(job_id):
        return await run_job(worker, job_id)

    consumer = job_consumer(
        JobConsumerSettings(
            nats=config.nats,
            concurrency=settings.concurrency,
            max_ack_pending=settings.max_ack_pending,
            ack_wait_seconds=settings.ack_wait_seconds,
            max_work_seconds=10 * config.providers.request_timeout_seconds + JOB_STEPS_PER_DELIVERY * step,
            stream_replicas=config.nats_stream_replicas,
            shutdown_grace_seconds=config.portrait_shutdown_grace_seconds,
        ),
        run,
    )
    consumer.start()
    stack.push_async_callback(consumer.stop)
    stack.callback(consumer.metrics().close)
    return deps


async def _start_notices(config: Config, stack: contextlib.AsyncExitStack) -> Notices:
    """The jobs' NOTIFYs, sent after their commits on a connection of their own."""
    pool = await create_pool(
        config.database_url, min_size=1, max_size=1, application_name="casefile-image-notices",
        connect_timeout=config.database_connect_timeout_seconds, reset_session_state=False,
    )  # fmt: skip
    stack.push_async_callback(close_pool, pool)
    notices = Notices(pool, name="image-jobs")
    stack.push_async_callback(notices.flush)  # after the sender stops: what the last writes handed over
    await start_supervised(stack, notices.run, "job-notices")
    return notices


async def _open_lease_pool(config: Config, stack: contextlib.AsyncExitStack) -> asyncpg.Pool:
    pool = await create_pool(
        config.database_url, min_size=1, max_size=2, application_name="casefile-image-leases",
        connect_timeout=config.database_connect_timeout_seconds, reset_session_state=False,
    )  # fmt: skip
    stack.push_async_callback(close_pool, pool)
    return pool


def _open_credits_client(config: Config, stack: contextlib.AsyncExitStack) -> CreditsClient:
    channel = grpc.aio.insecure_channel(config.credits_addr)
    stack.push_async_callback(channel.close)
    stub = credits_service_pb2_grpc.CreditsServiceStub(channel)
    return CreditsClient(stub, config.outgoing_token.reveal(), timeout=config.portrait_step_timeout_seconds)


def _url_signer(config: Config, objects: ObjectStore) -> SignedObjects:
    cdn = config.cloudfront
    if cdn is None:
        return objects
    urls = CloudFrontUrls(cdn.domain, cdn.key_pair_id, load_private_key(cdn.private_key_pem.reveal()))
    log.info("cdn.signing_configured", extra={"domain": cdn.domain, "key_pair_id": cdn.key_pair_id})
    return CdnSignedObjects(objects, urls)


def provider_router(
    config: Config, http: httpx.AsyncClient | None = None, downloads: HostConnections | None = None
) -> ProviderRouter:
    """Generation jobs' providers: local/sketch and every vendor whose key is set."""
    settings = config.providers
    breaker = BreakerSettings(settings.breaker_failure_threshold, settings.breaker_cool_down_seconds)
    log.info("providers.configured", extra={"providers": ["local", *settings.configured()]})
    return ProviderRouter(build_generation_providers(settings, client=http, downloads=downloads), breaker=breaker)


async def _open_database(config: Config, stack: contextlib.AsyncExitStack) -> asyncpg.Pool:
    pool = await create_pool(
        config.database_url,
        min_size=1,
        max_size=config.portrait_concurrency + JOB_POOL_CONNECTIONS + EXTRA_POOL_CONNECTIONS,
        application_name="casefile-image",
        connect_timeout=config.database_connect_timeout_seconds,
        # Pool connections never SET, LISTEN or keep advisory locks (the listeners have their
        # own; migrations unlock theirs): no reset round trip on every release.
        reset_session_state=False,
    )
    stack.push_async_callback(close_pool, pool)
    async with pool.acquire() as conn:
        await apply_migrations(conn, "image", MIGRATIONS_DIR)
    return pool


async def _open_object_store(config: Config, stack: contextlib.AsyncExitStack) -> ObjectStore:
    session = aiobotocore.session.get_session()
    client = await stack.enter_async_context(_s3_client(session, config, config.s3_endpoint_url))
    presign_client = None
    public = config.s3_public_endpoint_url
    if public and public != config.s3_endpoint_url:
        presign_client = await stack.enter_async_context(_s3_client(session, config, public))
    objects = ObjectStore(
        client,
        config.s3_bucket,
        region=config.s3_region,
        presign_client=presign_client,
        timeout_seconds=config.portrait_step_timeout_seconds,
        server_side_encryption=config.s3_server_side_encryption,
    )
    if not await objects.try_ensure_bucket():
        log.warning("s3.start_check_failed", extra={"bucket": config.s3_bucket})
    return objects


def _s3_client(session, config: Config, endpoint_url: str | None):
    return session.create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=config.s3_region,
        config=s3_client_config(
            custom_endpoint=endpoint_url is not None,
            timeout_seconds=config.portrait_step_timeout_seconds,
            plain_http=(endpoint_url or "").startswith("http://"),
        ),
    )


def _open_story_client(config: Config, stack: contextlib.AsyncExitStack) -> StoryClient:
    channel = grpc.aio.insecure_channel(config.story_addr)
    stack.push_async_callback(channel.close)
    stub = story_service_pb2_grpc.StoryServiceStub(channel)
    return StoryClient(stub, config.outgoing_token.reveal(), timeout=config.portrait_step_timeout_seconds)


def _start_consumers(config: Config, deps: PortraitDeps, stack: contextlib.AsyncExitStack) -> None:
    async def paint(event: PortraitEvent, delivery: int, final: bool):
        return await paint_portrait(event, deps, delivery=delivery, final=final)

    async def end_abandoned(event: PortraitEvent):
        return await end_abandoned_portrait(event, deps)

    settings = PortraitConsumerSettings(
        nats=config.nats,
        concurrency=config.portrait_concurrency,
        max_deliver=config.portrait_max_deliver,
        max_ack_pending=config.portrait_max_ack_pending,
        redelivery_backoff_seconds=config.portrait_redelivery_backoff_seconds,
        ack_wait_seconds=config.portrait_ack_wait_seconds,
        # The whole delivery is bounded by the sum of its steps' bounds; heartbeats and the
        # lease last exactly as long, so no other worker can take over work still running.
        max_work_seconds=deps.timeouts.longest_delivery_seconds,
        stream_replicas=config.nats_stream_replicas,
        shutdown_grace_seconds=config.portrait_shutdown_grace_seconds,
    )
    consumer = portrait_consumer(settings, paint)
    consumer.start()
    stack.push_async_callback(consumer.stop)
    stack.callback(consumer.metrics().close)
    dead_letters = DeadLetters(settings, end_abandoned)
    dead_letters.start()
    stack.push_async_callback(dead_letters.stop)
    stack.callback(dead_letters.consumer.metrics().close)


def main() -> None:
    serve_main("image", Config.from_env, build)


if __name__ == "__main__":
    main()
