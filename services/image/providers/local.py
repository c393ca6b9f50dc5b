"""The `local` provider: draws a deterministic portrait from the prompt, no network, no key."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random

from PIL import Image, ImageDraw, ImageFont

from services.image.providers.base import GeneratedImage, ProviderError

MIN_SIDE = 16
MAX_SIDE = 4096
CAPTION_WORDS = 6


class LocalProvider:
    """Same (prompt, width, height) gives byte-identical PNGs; different prompts look different."""

    name = "local"

    async def generate(
        self, *, prompt: str, width: int = 1024, height: int = 1024, model: str | None = None
    ) -> GeneratedImage:
        if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
            raise ProviderError(
                f"width and height must be between {MIN_SIDE} and {MAX_SIDE}", transient=False
            )
        # Drawing a 1024x1024 picture takes tens of milliseconds: keep it off the event loop.
        data = await asyncio.to_thread(render_portrait, prompt, width, height)
        return GeneratedImage(data=data, content_type="image/png", width=width, height=height)


def render_portrait(prompt: str, width: int, height: int) -> bytes:
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    rng = random.Random(digest)
    image = _background(digest, width, height)
    draw = ImageDraw.Draw(image)
    _draw_scratches(draw, rng, width, height)
    _draw_silhouette(draw, rng, digest, width, height)
    image = _vignette(image)
    _draw_caption(ImageDraw.Draw(image), prompt, width, height)
    return _png_bytes(image)


def _background(digest: bytes, width: int, height: int) -> Image.Image:
    # Dark, desaturated colours: the game is a horror game, whatever the prompt says.
    top = (digest[0] // 3, digest[1] // 4, digest[2] // 4)
    bottom = (20 + digest[3] // 2, 10 + digest[4] // 3, 10 + digest[5] // 3)
    mask = Image.linear_gradient("L").resize((width, height))
    return Image.composite(Image.new("RGB", (width, height), bottom), Image.new("RGB", (width, height), top), mask)


def _draw_scratches(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int) -> None:
    tint = (rng.randrange(60, 140),) * 3
    for _ in range(rng.randrange(8, 24)):
        start = (rng.randrange(width), rng.randrange(height))
        end = (start[0] + rng.randrange(-width // 4, width // 4 + 1), start[1] + rng.randrange(height // 3 + 1))
        draw.line([start, end], fill=tint, width=max(1, width // 400))


def _draw_silhouette(
    draw: ImageDraw.ImageDraw, rng: random.Random, digest: bytes, width: int, height: int
) -> None:
    unit = min(width, height)
    body = (digest[6] // 8, digest[7] // 8, digest[8] // 8)
    center_x = width // 2 + rng.randrange(-unit // 10, unit // 10 + 1)
    head_w = unit * rng.uniform(0.18, 0.28)
    head_h = head_w * rng.uniform(1.1, 1.45)
    head_top = height * rng.uniform(0.18, 0.3)
    head = (center_x - head_w / 2, head_top, center_x + head_w / 2, head_top + head_h)
    shoulders_w = unit * rng.uniform(0.55, 0.85)
    shoulders_top = head[3] - head_h * 0.05
    shoulders = (center_x - shoulders_w / 2, shoulders_top, center_x + shoulders_w / 2, height + unit)
    draw.rounded_rectangle(shoulders, radius=shoulders_w * rng.uniform(0.3, 0.45), fill=body)
    neck_w = head_w * 0.45
    neck = (center_x - neck_w / 2, head[1] + head_h / 2, center_x + neck_w / 2, shoulders_top + unit * 0.05)
    draw.rectangle(neck, fill=body)
    draw.ellipse(head, fill=body)
    _draw_eyes(draw, rng, digest, head)


def _draw_eyes(draw: ImageDraw.ImageDraw, rng: random.Random, digest: bytes, head: tuple) -> None:
    left, top, right, bottom = head
    glow = (150 + digest[9] % 106, 40 + digest[10] % 120, digest[11] % 90)
    eye_y = top + (bottom - top) * rng.uniform(0.35, 0.48)
    spread = (right - left) * rng.uniform(0.18, 0.28)
    radius = max(1.0, (right - left) * rng.uniform(0.04, 0.09))
    hollow = digest[12] % 3 == 0
    for eye_x in ((left + right) / 2 - spread, (left + right) / 2 + spread):
        box = (eye_x - radius, eye_y - radius * 0.7, eye_x + radius, eye_y + radius * 0.7)
        if hollow:
            draw.ellipse(box, outline=glow, width=max(1, int(radius / 3)))
        else:
            draw.ellipse(box, fill=glow)


def _vignette(image: Image.Image) -> Image.Image:
    edges = Image.radial_gradient("L").resize(image.size).point(lambda value: min(255, int(value * 1.1)))
    return Image.composite(Image.new("RGB", image.size, (0, 0, 0)), image, edges)


def _draw_caption(draw: ImageDraw.ImageDraw, prompt: str, width: int, height: int) -> None:
    font = ImageFont.load_default(size=max(8, min(width, height) // 28))
    margin = width // 20
    caption = _fit_words(draw, font, prompt.split()[:CAPTION_WORDS], width - 2 * margin)
    if caption:
        draw.text((margin, height - margin), caption, font=font, fill=(200, 190, 170), anchor="ls")


def _fit_words(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, words: list[str], room: float) -> str:
    caption = ""
    for word in words:
        longer = f"{caption} {word}".strip().upper()
        if draw.textlength(longer, font=font) > room:
            break
        caption = longer
    return caption


def _png_bytes(image: Image.Image) -> bytes:
    # No pnginfo and fixed compression: the bytes depend on the pixels alone.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
