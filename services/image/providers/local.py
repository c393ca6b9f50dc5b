"""The `local` provider (model local/sketch): draws deterministic pictures from the prompt.

No network and no key, so the whole system runs anywhere: it generates, edits (every
operation, by blending its drawing with the source) and streams coarse previews before
the final picture, like the vendors that stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random

from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from services.image.catalog import EditOperation, ProviderName
from services.image.providers.base import (
    EditInstructions,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    PortraitAdapter,
    Preview,
    PreviewCallback,
    deliver_preview,
)
from services.image.providers.download import image_from_bytes

# What the renderer can draw; the catalog offers jobs 64..2048 of it.
MIN_SIDE = 16
MAX_SIDE = 4096
CAPTION_WORDS = 6
# Previews are drawn at these fractions of the final size, coarsest first.
PREVIEW_SCALES = (16, 8, 4)  # coarse first; n previews are the finest n
DEFAULT_PREVIEWS = 2
MAX_IMAGES_PER_CALL = 10


class SketchRenderer:
    """The same request gives byte-identical PNGs; different prompts look different."""

    name = ProviderName.LOCAL

    async def generate(
        self, request: GenerationRequest, *, on_preview: PreviewCallback | None = None
    ) -> GenerationResult:
        _check_size(request.width, request.height)
        if not 1 <= request.count <= MAX_IMAGES_PER_CALL:
            raise InvalidRequest(f"local: count must be 1 to {MAX_IMAGES_PER_CALL}", provider=self.name)
        numbers = request.image_numbers or tuple(range(request.count))
        if on_preview is not None:
            for index, scale in enumerate(PREVIEW_SCALES[-(request.partial_images or DEFAULT_PREVIEWS):]):
                preview = await asyncio.to_thread(_render_one, request, numbers[0], scale)
                await deliver_preview(on_preview, Preview(preview, index), self.name)
        # Drawing a 1024x1024 picture takes tens of milliseconds: keep it off the event loop.
        images = [await asyncio.to_thread(_render_one, request, number, 1) for number in numbers[: request.count]]
        return GenerationResult(tuple(images), provider=self.name, model=request.model, cost_microdollars=0)


class LocalProvider(PortraitAdapter):
    """The portrait pipeline's `local` painter: local/sketch, one picture per call."""

    def __init__(self) -> None:
        super().__init__(SketchRenderer(), "local/sketch")
        self.name = "local"


def _check_size(width: int, height: int) -> None:
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise InvalidRequest(f"width and height must be between {MIN_SIDE} and {MAX_SIDE}", provider="local")


def _render_one(request: GenerationRequest, index: int, scale: int) -> GeneratedImage:
    width, height = max(1, request.width // scale), max(1, request.height // scale)
    # The first image of a plain request is the portrait the `local` painter always drew.
    seed_text = request.prompt if index == 0 else f"{request.prompt}\x00{index}"
    drawing = _render_image(seed_text, max(width, MIN_SIDE), max(height, MIN_SIDE))
    if drawing.size != (width, height):
        drawing = drawing.resize((width, height))
    if request.edit is not None:
        drawing = _apply_edit(drawing, request.edit, index)
    data = _png_bytes(drawing)
    return GeneratedImage(data=data, content_type="image/png", width=width, height=height)


def _apply_edit(drawing: Image.Image, edit: EditInstructions, index: int) -> Image.Image:
    """Blends the drawing with the source the way each operation changes a picture."""
    source = _open_rgba(edit.source.data)
    size = drawing.size
    operation = edit.operation
    if operation is EditOperation.OUTPAINT:
        canvas = drawing.convert("RGBA")
        fitted = ImageOps.contain(source, (max(1, size[0] * 3 // 4), max(1, size[1] * 3 // 4)))
        canvas.alpha_composite(fitted, ((size[0] - fitted.width) // 2, (size[1] - fitted.height) // 2))
        return canvas.convert("RGB")
    source = source.resize(size)
    if operation is EditOperation.INPAINT:
        # Transparent mask pixels are repainted, as in OpenAI's convention.
        mask = _open_rgba(edit.mask).resize(size).getchannel("A") if edit.mask else _centre_mask(size)
        return Image.composite(source.convert("RGB"), drawing, mask)
    if operation is EditOperation.VARIATION:
        return Image.blend(source.convert("RGB"), drawing, 0.35 + 0.1 * (index % 3))
    if operation is EditOperation.REMOVE_BACKGROUND:
        cut = source.copy()
        cut.putalpha(_subject_mask(size))
        return cut
    # RESTYLE: the source's shapes in the drawing's palette.
    edges = source.convert("L").filter(ImageFilter.FIND_EDGES)
    return Image.composite(drawing, ImageOps.posterize(source.convert("RGB"), 3), ImageOps.invert(edges))


def _open_rgba(data: bytes) -> Image.Image:
    # Checked like any provider image first: only PNG, JPEG, GIF and WEBP get to Pillow.
    image_from_bytes(data)
    with Image.open(io.BytesIO(data)) as opened:
        return opened.convert("RGBA")


def _centre_mask(size: tuple[int, int]) -> Image.Image:
    """Without a mask, the middle of the picture is repainted (L mode: 255 keeps the source)."""
    mask = Image.new("L", size, 255)
    ImageDraw.Draw(mask).ellipse((size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4), fill=0)
    return mask


def _subject_mask(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((size[0] // 6, size[1] // 8, size[0] * 5 // 6, size[1] * 9 // 8), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(max(1, min(size) // 40)))


def render_portrait(prompt: str, width: int, height: int) -> bytes:
    return _png_bytes(_render_image(prompt, width, height))


def _render_image(prompt: str, width: int, height: int) -> Image.Image:
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    rng = random.Random(digest)
    image = _background(digest, width, height)
    draw = ImageDraw.Draw(image)
    _draw_scratches(draw, rng, width, height)
    _draw_silhouette(draw, rng, digest, width, height)
    image = _vignette(image)
    _draw_caption(ImageDraw.Draw(image), prompt, width, height)
    return image


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
