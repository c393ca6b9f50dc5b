"""The provider clients' CPU per image: request, answer parsing, base64 decode, validation,
and with the upload to S3 a job makes, against the raw S3 put of the same bytes.

The `providers` part of `make bench` (`--only providers`); standalone, with the whole JSON
report: `.venv/bin/python -m tests.bench.provider_bench --images 30 --rounds 3`.

Every fake provider runs in a child process and answers at once, so what this process
spends is the client's own work. The baseline, measured in the same rounds, is a plain
HTTP GET of the same PNG bytes from the same child (no JSON, no base64, no validation):
each client's figure is reported in CPU milliseconds per image and as a ratio to that
baseline. The S3 figures put each client's image to moto through the image service's own
ObjectStore (existence check, server-side encryption) and compare the CPU of generate + put
with a raw aiobotocore put_object of the same bytes. The images are the `local` renderer's pictures (gradients, noise, a figure), not
flat colour, so decoding and verifying them costs what a real picture costs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import itertools
import tempfile
from pathlib import Path

import httpx
from aiohttp import web

from services.image.providers import (
    GeminiClient,
    GenerationRequest,
    ImageDownloader,
    OpenAIImagesClient,
    OpenRouterClient,
    RecraftClient,
    StabilityClient,
)
from services.image.providers.download import image_from_bytes
from tests.bench.report import Figure, ratio_figure
from tools.infra import MotoS3Server

KEY = "bench-key"


def _realistic_png(width: int, height: int, *_colour: Any) -> bytes:
    """The `local` renderer's picture with film grain: about the size a provider's PNG is
    (1-2 MB at 1024x1024), where a flat picture would compress to nothing."""
    import io

    from PIL import Image

    from services.image.providers.local import render_portrait

    with Image.open(io.BytesIO(render_portrait(f"bench picture {width}x{height}", width, height))) as portrait:
        grain = Image.effect_noise((width, height), 24).convert("RGB")
        picture = Image.blend(portrait.convert("RGB"), grain, 0.25)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _serve_fakes(connection, size: int) -> None:
    """Child process: the fake providers, answering with realistic pictures, until told to stop."""
    import functools

    from tests.fakes import gemini, image_api, openai_images, openrouter, recraft, stability

    picture = functools.lru_cache(maxsize=16)(_realistic_png)

    def b64_picture(width: int, height: int, *_colour: Any) -> str:
        return base64.b64encode(picture(width, height)).decode("ascii")

    for module in (image_api, openai_images, gemini, openrouter, stability):
        if hasattr(module, "b64_png"):
            module.b64_png = b64_picture
        if hasattr(module, "png_of_size"):
            module.png_of_size = picture
    recraft.make_png = lambda width=64, height=64, colour=None: picture(width, height)

    async def serve() -> None:
        fakes = {
            "openai": openai_images.FakeOpenAIImages(api_key=KEY),
            "gemini": gemini.FakeGemini(api_key=KEY),
            "openrouter": openrouter.FakeOpenRouter(api_key=KEY),
            "stability": stability.FakeStability(api_key=KEY),
            "recraft": recraft.FakeRecraft(api_key=KEY, image_size=None),
        }
        for fake in fakes.values():
            await fake.start()
        raw = web.Application()
        raw.router.add_get("/raw/{size}", lambda request: web.Response(body=picture(size, size), content_type="image/png"))
        runner = web.AppRunner(raw, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        urls = {name: fake.api_base_url for name, fake in fakes.items()}
        urls["raw"] = f"http://127.0.0.1:{runner.addresses[0][1]}/raw/{size}"
        picture(size, size)  # rendered before the clock starts
        connection.send(urls)
        await asyncio.get_running_loop().run_in_executor(None, connection.recv)
        for fake in fakes.values():
            await fake.stop()
        await runner.cleanup()

    asyncio.run(serve())


def _clients(urls: dict[str, str], http: httpx.AsyncClient) -> dict[str, Callable[[GenerationRequest], Awaitable]]:
    downloader = ImageDownloader(http, allow_private=True)
    openai = OpenAIImagesClient(KEY, urls["openai"], client=http, downloader=downloader)
    recraft_b64 = RecraftClient(KEY, urls["recraft"], client=http, downloader=downloader, response_format="b64_json")
    recraft_url = RecraftClient(KEY, urls["recraft"], client=http, downloader=downloader)
    return {
        "openai/gpt-image-1 (b64)": lambda r: openai.generate(_as(r, "openai/gpt-image-1")),
        "gemini (inlineData)": GeminiClient(KEY, urls["gemini"], client=http).generate,
        "openrouter (data URL)": OpenRouterClient(KEY, urls["openrouter"], client=http).generate,
        "stability (artifacts)": StabilityClient(KEY, urls["stability"], client=http).generate,
        "recraft (b64_json)": lambda r: recraft_b64.generate(_as(r, "recraft/recraftv3")),
        "recraft (url + safe download)": lambda r: recraft_url.generate(_as(r, "recraft/recraftv3")),
    }


def _as(request: GenerationRequest, model: str) -> GenerationRequest:
    return GenerationRequest(model, request.prompt, request.width, request.height)


async def _cpu_per_image(call: Callable[[], Awaitable], images: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per image over `images` sequential calls (threads included in CPU)."""
    await call()  # warm the connection and the code paths
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(images):
        await call()
    return ((time.process_time() - cpu) * 1000 / images, (time.perf_counter() - wall) * 1000 / images)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("providers")
    group.add_argument("--provider-images", type=int, default=8, help="images per client per round")


async def run(args: argparse.Namespace) -> list[Figure]:
    """The figures of `make bench`: each client's CPU per image against a raw GET, and with
    its upload against a raw S3 put of the same bytes."""
    options = argparse.Namespace(images=args.provider_images, rounds=args.rounds, size=1024)
    work = Path(tempfile.mkdtemp(prefix="casefile-bench-providers-"))
    moto = MotoS3Server(work / "moto.log").start()
    try:
        report = await _report(options, s3_endpoint=moto.endpoint_url)
    finally:
        moto.stop()
    figures = []
    raw_get = report["clients"]["baseline: raw GET of the bytes"]["cpu_ms_per_image"]
    raw_put = report["s3"]["baseline: raw S3 put of the bytes"]["cpu_ms_per_image"]
    for name, client in report["clients"].items():
        if name.startswith("baseline"):
            continue
        figures.append(ratio_figure(f"providers.cpu_per_image[{name}]", client["cpu_ms_per_image"], raw_get, "cpu ms",
                                    baseline_is="raw HTTP GET of the same PNG", image=report["image"]))  # fmt: skip
    for name, client in report["s3"].items():
        if name.startswith("baseline"):
            continue
        figures.append(ratio_figure(f"providers.cpu_per_image_with_upload[{name}]", client["cpu_ms_per_image"], raw_put,
                                    "cpu ms", baseline_is="raw aiobotocore put_object of the same bytes to moto",
                                    image=report["image"]))  # fmt: skip
    return figures


async def _report(args: argparse.Namespace, s3_endpoint: str | None = None) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve_fakes, args=(child, args.size), daemon=True)
    process.start()
    try:
        urls = parent.recv()
        report = await _measure(urls, args)
        if s3_endpoint is not None:
            report["s3"] = await _measure_with_upload(urls, args, s3_endpoint)
        return report
    finally:
        parent.send("stop")
        process.join(timeout=10)


async def _measure_with_upload(urls: dict[str, str], args: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    """CPU per image of generate + ObjectStore.put_new, and of a raw put of the same bytes."""
    import aiobotocore.session

    from services.image.objects import ObjectStore, s3_client_config

    request = GenerationRequest("google/gemini-2.5-flash-image", "bench", args.size, args.size)
    keys = itertools.count()
    samples: dict[str, list[tuple[float, float]]] = {}
    session = aiobotocore.session.get_session()
    credentials = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench", "region_name": "us-east-1"}
    async with httpx.AsyncClient(follow_redirects=False, timeout=60) as http, session.create_client(
        "s3", endpoint_url=endpoint, config=s3_client_config(custom_endpoint=True), **credentials
    ) as s3:  # fmt: skip
        store = ObjectStore(s3, "bench", region="us-east-1", server_side_encryption="AES256")
        await store.ensure_bucket()
        png = _realistic_png(args.size, args.size)

        async def raw_put() -> None:
            await s3.put_object(Bucket="bench", Key=f"raw/{next(keys)}.png", Body=png, ContentType="image/png")

        def with_upload(generate):
            async def call() -> None:
                result = await generate(request)
                await store.put_new(f"jobs/{next(keys)}.png", result.images[0].data, "image/png", encrypted=True)

            return call

        clients = _clients(urls, http)
        for _ in range(args.rounds):
            samples.setdefault("baseline: raw S3 put of the bytes", []).append(await _cpu_per_image(raw_put, args.images))
            for name, generate in clients.items():
                samples.setdefault(name, []).append(await _cpu_per_image(with_upload(generate), args.images))
    baseline = statistics.median(cpu for cpu, _ in samples["baseline: raw S3 put of the bytes"])
    return {
        name: {
            "cpu_ms_per_image": round(statistics.median(cpu for cpu, _ in runs), 3),
            "cpu_ratio_to_raw_put": round(statistics.median(cpu for cpu, _ in runs) / baseline, 2),
        }
        for name, runs in samples.items()
    }


async def _measure(urls: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    request = GenerationRequest("google/gemini-2.5-flash-image", "bench", args.size, args.size)
    samples: dict[str, list[tuple[float, float]]] = {}
    async with httpx.AsyncClient(follow_redirects=False, timeout=60) as http:
        raw_bytes = len((await http.get(urls["raw"])).content)

        async def raw_get() -> None:
            (await http.get(urls["raw"])).raise_for_status()

        encoded = base64.b64encode(_realistic_png(args.size, args.size))

        def decode_only() -> None:
            image_from_bytes(base64.b64decode(encoded))

        clients = _clients(urls, http)
        for _ in range(args.rounds):
            # Alternating with the baseline in every round, so a burst of noise hits both.
            samples.setdefault("baseline: raw GET of the bytes", []).append(await _cpu_per_image(raw_get, args.images))
            for name, generate in clients.items():
                samples.setdefault(name, []).append(await _cpu_per_image(lambda g=generate: g(request), args.images))
    baseline_cpu = statistics.median(cpu for cpu, _ in samples["baseline: raw GET of the bytes"])
    report = {
        name: {
            "cpu_ms_per_image": round(statistics.median(cpu for cpu, _ in runs), 3),
            "wall_ms_per_image": round(statistics.median(wall for _, wall in runs), 3),
            "cpu_ratio_to_raw_get": round(statistics.median(cpu for cpu, _ in runs) / baseline_cpu, 2),
        }
        for name, runs in samples.items()
    }
    started = time.process_time()
    for _ in range(args.images):
        decode_only()
    return {
        "image": f"{args.size}x{args.size} PNG, {raw_bytes} bytes",
        "images_per_round": args.images,
        "rounds": args.rounds,
        "b64_decode_plus_validate_ms_per_image": round((time.process_time() - started) * 1000 / args.images, 3),
        "clients": report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30, help="images per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024, choices=(1024,), help="square size (every fake serves it)")
    print(json.dumps(asyncio.run(_report(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
