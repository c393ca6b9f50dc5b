"""`make bench`: GetStory throughput, portrait latency and WatchStory fan-out.

Everything runs as real processes on loopback, started here: a fresh PostgreSQL database,
a nats-server, moto's S3 server, the story and image services, and a bare grpc.aio echo
server as the baseline. The machine is shared and noisy, so throughput is reported as a
ratio to the echo server measured in the same run with the same client, alternating
rounds so that a burst of noise hits both. WatchStory fan-out is the time from a change to
its arrival at every watcher of one story, for many watchers as a ratio to one watcher.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from shared.auth import bearer_metadata
from tests.bench import echo_server
from tests.case_files import case_file
from tools.infra import (
    DEFAULT_DATABASE_URL,
    MotoS3Server,
    NatsServer,
    ServiceProcess,
    create_database,
    drop_database,
    dsn_with_database,
    ensure_postgres_running,
    free_port,
    wait_for_tcp,
)

TOKENS = {"admin": "bench-admin", "gateway": "bench-gateway", "story": "bench-story", "image": "bench-image"}
GATEWAY = bearer_metadata(TOKENS["gateway"])


async def calls_per_second(call, seconds: float, concurrency: int) -> float:
    """Runs `concurrency` callers back to back for `seconds`; returns completed calls/s."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def measure_throughput(story_addr: str, echo_addr: str, story_id: str, rounds: int, seconds: float, concurrency: int) -> dict:
    request = pb.GetStoryRequest(story_id=story_id)
    async with grpc.aio.insecure_channel(story_addr) as story_channel, grpc.aio.insecure_channel(echo_addr) as echo_channel:
        stub = story_service_pb2_grpc.StoryServiceStub(story_channel)
        # Same client work on both sides: serialize a GetStoryRequest, parse a GetStoryResponse.
        echo = echo_channel.unary_unary(
            echo_server.METHOD,
            request_serializer=pb.GetStoryRequest.SerializeToString,
            response_deserializer=pb.GetStoryResponse.FromString,
        )

        async def get_story() -> None:
            await stub.GetStory(request, metadata=GATEWAY)

        async def echo_call() -> None:
            await echo(request, metadata=GATEWAY)

        await calls_per_second(get_story, 1.0, concurrency)  # warm-up: connections, caches
        await calls_per_second(echo_call, 1.0, concurrency)
        story_rates, echo_rates = [], []
        for _ in range(rounds):
            echo_rates.append(await calls_per_second(echo_call, seconds, concurrency))
            story_rates.append(await calls_per_second(get_story, seconds, concurrency))
    ratios = [s / e for s, e in zip(story_rates, echo_rates, strict=True)]
    return {
        "get_story_calls_per_s": round(statistics.median(story_rates)),
        "echo_calls_per_s": round(statistics.median(echo_rates)),
        "ratio_get_story_to_echo": round(statistics.median(ratios), 3),
        "ratio_per_round": [round(r, 3) for r in ratios],
    }


async def measure_portrait_latency(story_addr: str, stories: int, poll_seconds: float) -> dict:
    """Time from GenerateStory's answer to the portrait READY, one story at a time."""
    latencies = []
    async with grpc.aio.insecure_channel(story_addr) as channel:
        stub = story_service_pb2_grpc.StoryServiceStub(channel)
        for _ in range(stories):
            story = (await stub.GenerateStory(pb.GenerateStoryRequest(user_id="bench"), metadata=GATEWAY)).story
            answered = time.perf_counter()
            while story.portrait_status == pb.PORTRAIT_STATUS_PENDING:
                await asyncio.sleep(poll_seconds)
                story = (await stub.GetStory(pb.GetStoryRequest(story_id=story.story_id), metadata=GATEWAY)).story
            if story.portrait_status != pb.PORTRAIT_STATUS_READY:
                raise RuntimeError(f"portrait of {story.story_id} ended {story.portrait_status}: {story.portrait_error}")
            latencies.append((time.perf_counter() - answered) * 1000)
    latencies.sort()
    return {
        "stories": stories,
        "portrait_latency_ms_p50": round(_percentile(latencies, 50), 1),
        "portrait_latency_ms_p99": round(_percentile(latencies, 99), 1),
        "portrait_latency_ms_max": round(latencies[-1], 1),
        "poll_interval_ms": poll_seconds * 1000,
    }


def _percentile(sorted_values: list[float], percent: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(percent / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def fan_out_seconds(stub, watchers: int) -> float:
    """From SetStoryImage's answer until all `watchers` of the story have READY."""
    story = (
        await stub.CreateStory(
            pb.CreateStoryRequest(
                user_id="bench-watch",
                content=case_file(),
            ),
            metadata=GATEWAY,
        )
    ).story
    streams = [stub.WatchStory(pb.WatchStoryRequest(story_id=story.story_id), metadata=GATEWAY) for _ in range(watchers)]
    await asyncio.gather(*(stream.read() for stream in streams))  # every watcher has the current state
    await stub.SetStoryImage(
        pb.SetStoryImageRequest(story_id=story.story_id, storage_id="portraits/bench/1.png", attempt=1),
        metadata=bearer_metadata(TOKENS["image"]),
    )
    changed = time.perf_counter()
    await asyncio.gather(*(stream.read() for stream in streams))
    elapsed = time.perf_counter() - changed
    for stream in streams:
        stream.cancel()
    return elapsed


async def measure_watch_fan_out(story_addr: str, watchers: int, rounds: int) -> dict:
    async with grpc.aio.insecure_channel(story_addr) as channel:
        stub = story_service_pb2_grpc.StoryServiceStub(channel)
        one, many = [], []
        for _ in range(rounds):  # alternating, so that noise hits both
            one.append(await fan_out_seconds(stub, 1))
            many.append(await fan_out_seconds(stub, watchers))
    return {
        "watchers": watchers,
        "one_watcher_ms": round(statistics.median(one) * 1000, 1),
        "many_watchers_ms": round(statistics.median(many) * 1000, 1),
        "ratio": round(statistics.median(many) / statistics.median(one), 1),
    }


async def run(args: argparse.Namespace) -> dict:
    server_dsn = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    ensure_postgres_running(server_dsn)
    admin_dsn = dsn_with_database(server_dsn, "postgres")
    database = f"casefile_bench_{uuid.uuid4().hex[:8]}"
    await create_database(admin_dsn, database)
    work = Path(tempfile.mkdtemp(prefix="casefile-bench-"))
    processes = []
    try:
        nats_server = NatsServer(work / "nats", log_path=work / "nats.log").start()
        s3 = MotoS3Server(work / "moto.log").start()
        processes += [nats_server, s3]
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", ""),
            "DATABASE_URL": dsn_with_database(admin_dsn, database),
            "NATS_URL": nats_server.url,
            "S3_ENDPOINT_URL": s3.endpoint_url,
            "S3_BUCKET": "bench",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AUTH_TOKENS": ",".join(f"{name}:{token}" for name, token in TOKENS.items()),
            "STORY_ADDR": f"127.0.0.1:{free_port()}",
            "IMAGE_ADDR": f"127.0.0.1:{free_port()}",
            "CREDITS_ADDR": f"127.0.0.1:{free_port()}",
        }
        story = ServiceProcess("story", env, work / "story.log").start()
        image = ServiceProcess("image", env, work / "image.log").start()
        # The same service with METRICS_ADDR set (its RPC interceptor and /metrics on), on the
        # same database: GetStory's ratio to the echo with metrics and without, in one run.
        metered_env = {**env, "STORY_ADDR": f"127.0.0.1:{free_port()}", "METRICS_ADDR": f"127.0.0.1:{free_port()}"}
        metered = ServiceProcess("story", metered_env, work / "story-metered.log").start()
        processes += [story, image, metered]
        await story.wait_healthy(env["STORY_ADDR"])
        await image.wait_healthy(env["IMAGE_ADDR"])
        await metered.wait_healthy(metered_env["STORY_ADDR"])

        async with grpc.aio.insecure_channel(env["STORY_ADDR"]) as channel:
            stub = story_service_pb2_grpc.StoryServiceStub(channel)
            sample = (await stub.GenerateStory(pb.GenerateStoryRequest(user_id="bench"), metadata=GATEWAY))
        echo_port = free_port()
        echo = ServiceProcess(
            "echo",
            env,
            work / "echo.log",
            argv=[sys.executable, "-m", "tests.bench.echo_server", str(echo_port), str(sample.ByteSize())],
        ).start()
        processes.append(echo)
        await wait_for_tcp("127.0.0.1", echo_port, 15)

        throughput = await measure_throughput(
            env["STORY_ADDR"], f"127.0.0.1:{echo_port}", sample.story.story_id, args.rounds, args.seconds, args.concurrency
        )
        with_metrics = await measure_throughput(
            metered_env["STORY_ADDR"], f"127.0.0.1:{echo_port}", sample.story.story_id, args.rounds, args.seconds,
            args.concurrency,
        )
        metered.terminate()
        latency = await measure_portrait_latency(env["STORY_ADDR"], args.stories, args.poll_ms / 1000)
        image.terminate()  # from here on the bench plays the image service itself
        fan_out = await measure_watch_fan_out(env["STORY_ADDR"], args.watchers, args.rounds)
        return {
            "get_story": {**throughput, "concurrency": args.concurrency, "response_bytes": sample.ByteSize()},
            "get_story_with_metrics": with_metrics,
            "portrait": latency,
            "watch_fan_out": fan_out,
        }
    finally:
        for process in reversed(processes):
            process.terminate()
        await drop_database(admin_dsn, database)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stories", type=int, default=200)
    parser.add_argument("--poll-ms", type=float, default=5.0)
    parser.add_argument("--watchers", type=int, default=1000)
    result = asyncio.run(run(parser.parse_args()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
