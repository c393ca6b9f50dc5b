"""A streaming job's first preview: from the moment the fake GPT Image API has written its
first `image_generation.partial_image` event to the moment WatchGenerationJob hands that
preview to the watcher, through the real image service (its worker, the preview scaled to a
small JPEG, core NATS, the watching process's subscription, the gRPC stream).

The `previews` part of `make bench` (`--only previews`). The fake runs in this process, so
its send time and the watcher's receive time are read from the same clock; the database,
nats-server, moto, credits and the image service are processes of their own. The baseline,
measured in the same rounds, is a raw core NATS publish -> subscribe of the same bytes (the
JobPreview the watcher received) between two connections of this process. Aim: p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import nats

from casefile.credits.v1 import credits_service_pb2_grpc
from casefile.image.v1 import image_service_pb2 as pb
from casefile.image.v1 import image_service_pb2_grpc
from tests.bench import jobs_scale
from tests.bench.harness import AS_GATEWAY, bench_database
from tests.bench.jobs_bench import _fund, _percentile
from tests.bench.report import Figure, figure, ratio_figure
from tests.fakes.openai_images import FakeOpenAIImages
from tools.infra import MotoS3Server, NatsServer

FIRST_PREVIEW_AIM = "value <= 50"
# Seconds a baseline message may take before it counts as lost.
BASELINE_SAMPLE_TIMEOUT = 2.0
USER = "bench-previews"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("previews")
    group.add_argument("--preview-jobs", type=int, default=30, help="streaming jobs per round")


async def run(args: argparse.Namespace) -> list[Figure]:
    work = Path(tempfile.mkdtemp(prefix="casefile-bench-previews-"))
    processes: list = []
    fake = FakeOpenAIImages(api_key="bench-openai-key")
    async with bench_database() as database_url:
        try:
            await fake.start()
            nats_server = NatsServer(work / "nats", log_path=work / "nats.log").start()
            s3 = MotoS3Server(work / "moto.log").start()
            processes += [nats_server, s3]
            env = {**jobs_scale.services_env(database_url, nats_server, s3, fake.api_base_url),
                   "OPENAI_API_KEY": fake.api_key}  # fmt: skip
            await jobs_scale.start_credits_and_image(env, work, processes)
            async with grpc.aio.insecure_channel(env["IMAGE_ADDR"]) as channel, \
                    grpc.aio.insecure_channel(env["CREDITS_ADDR"]) as credits_channel:  # fmt: skip
                await _fund(credits_service_pb2_grpc.CreditsServiceStub(credits_channel), [USER])
                stub = image_service_pb2_grpc.ImageServiceStub(channel)
                await _first_preview_ms(stub, fake)  # warm-up: connections, the stream, the JIT of nothing
                previews: list[float] = []
                baseline: list[float] = []
                payload = b""
                for _ in range(args.rounds):
                    for _ in range(args.preview_jobs):
                        latency, payload = await _first_preview_ms(stub, fake)
                        previews.append(latency)
                    baseline += await _nats_round_trips_ms(nats_server.url, payload, args.preview_jobs)
                    fake.requests.clear()
        finally:
            for process in reversed(processes):
                process.terminate()
            await fake.stop()
    previews.sort()
    baseline.sort()
    notes = {"samples": len(previews), "rounds": args.rounds, "preview_bytes": len(payload),
             "p50_ms": round(_percentile(previews, 50), 2), "baseline_p50_ms": round(_percentile(baseline, 50), 3)}  # fmt: skip
    return [
        ratio_figure("previews.first_preview_p99_vs_raw_nats", _percentile(previews, 99), _percentile(baseline, 99),
                     "ms", **notes),  # fmt: skip
        figure("previews.first_preview_p99", _percentile(previews, 99), "ms", aim=FIRST_PREVIEW_AIM, **notes),
    ]


async def _first_preview_ms(stub, fake: FakeOpenAIImages) -> tuple[float, bytes]:
    """One gpt-image-1 job with a preview: ms from the fake's send to the watcher's receipt."""
    fake.start_stream = asyncio.Event()
    request = pb.CreateGenerationJobRequest(user_id=USER, request_id=uuid.uuid4().hex, prompt="a pale ward at night",
                                            model="openai/gpt-image-1", width=1024, height=1024, num_images=1,
                                            partial_images=1)  # fmt: skip
    created = await stub.CreateGenerationJob(request, metadata=AS_GATEWAY)
    stream = stub.WatchGenerationJob(pb.WatchGenerationJobRequest(job_id=created.job.job_id, user_id=USER),
                                     metadata=AS_GATEWAY, timeout=60)  # fmt: skip
    await stream.read()  # the current state: the watcher is subscribed to the job's previews
    sent_before = len(fake.partial_sent_at)
    fake.start_stream.set()
    latency, payload = None, b""
    while (reply := await stream.read()) is not grpc.aio.EOF:
        if reply.HasField("preview") and latency is None:
            latency = (time.perf_counter() - fake.partial_sent_at[sent_before]) * 1000
            payload = reply.preview.SerializeToString()
    if latency is None:
        raise RuntimeError(f"job {created.job.job_id}: no preview reached the watcher")
    return latency, payload


async def _nats_round_trips_ms(url: str, payload: bytes, samples: int) -> list[float]:
    """The same bytes published on one core NATS connection and received on another."""
    publisher, subscriber = await nats.connect(url), await nats.connect(url)
    try:
        received: asyncio.Queue[float] = asyncio.Queue()
        lost = 0

        async def on_message(_message) -> None:
            received.put_nowait(time.perf_counter())

        await subscriber.subscribe("bench.preview", cb=on_message)
        await subscriber.flush()
        latencies: list[float] = []
        while len(latencies) < samples:
            while not received.empty():  # a late arrival of a sample already counted lost
                received.get_nowait()
            sent = time.perf_counter()
            await publisher.publish("bench.preview", payload)
            try:
                latencies.append((await asyncio.wait_for(received.get(), BASELINE_SAMPLE_TIMEOUT) - sent) * 1000)
            except TimeoutError:
                # Core NATS is at-most-once: a message it dropped (a reconnect on a loaded
                # machine) is a lost sample, not a latency; the next one measures again.
                lost += 1
                if lost > samples:
                    raise
        return latencies
    finally:
        await publisher.close()
        await subscriber.close()


if __name__ == "__main__":
    import sys

    from tests.bench.__main__ import main

    sys.exit(main(["--only", "previews", *sys.argv[1:]]))
