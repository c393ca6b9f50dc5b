"""Pictures prepared for provider calls: a source as PNG, an outpaint canvas and its mask,
the aspect ratio a size is asked for by.

Every input is first checked to be a PNG, JPEG, GIF or WEBP within the pixel limit (the
downloader's check), so Pillow never parses anything else. Called in worker threads.
"""

from __future__ import annotations

import io
from math import gcd

from PIL import Image, ImageOps

from services.image.catalog import EditOperation
from services.image.providers.base import GeneratedImage, ProviderError

# A few MB of PNG can declare a huge canvas; we never decode it, but whoever shows the
# stored portrait would. Providers produce at most 4096x4096.
MAX_PIXELS = 4096 * 4096

# Magic numbers are checked before Pillow sees the bytes, so only these four formats are
# ever parsed, whatever plugins Pillow happens to have.
_MAGIC_TO_FORMAT = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
_CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}

# How much of an outpaint canvas the source keeps: the rest is new picture.
OUTPAINT_KEEP_FRACTION = 0.75


def as_png(data: bytes) -> bytes:
    """The image as an RGBA PNG (the bytes unchanged when they already are a PNG)."""
    checked = image_from_bytes(data)
    if checked.content_type == "image/png":
        return data
    with Image.open(io.BytesIO(data)) as image:
        return _png(image.convert("RGBA"))


def padded_canvas(data: bytes, width: int, height: int) -> tuple[bytes, bytes]:
    """An outpaint canvas of width x height with the source in its middle, and the mask that
    marks the transparent border as the area to paint (OpenAI's convention: alpha 0 = edit)."""
    image_from_bytes(data)
    with Image.open(io.BytesIO(data)) as opened:
        source = opened.convert("RGBA")
    room = (max(1, int(width * OUTPAINT_KEEP_FRACTION)), max(1, int(height * OUTPAINT_KEEP_FRACTION)))
    fitted = ImageOps.contain(source, room)
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    canvas.alpha_composite(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    mask.paste((0, 0, 0, 255), (*_offset(canvas, fitted), *_end(canvas, fitted)))
    return _png(canvas), _png(mask)


def _offset(canvas: Image.Image, fitted: Image.Image) -> tuple[int, int]:
    return (canvas.width - fitted.width) // 2, (canvas.height - fitted.height) // 2


def _end(canvas: Image.Image, fitted: Image.Image) -> tuple[int, int]:
    left, top = _offset(canvas, fitted)
    return left + fitted.width, top + fitted.height


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def aspect_ratio(width: int, height: int) -> str:
    """The nearest of the ratios Gemini and OpenRouter take, e.g. 1344x768 -> "16:9"."""
    divisor = gcd(width, height) or 1
    exact = f"{width // divisor}:{height // divisor}"
    if exact in _RATIOS:
        return exact
    target = width / height
    return min(_RATIOS, key=lambda ratio: abs(_RATIOS[ratio] - target))


_RATIOS = {
    ratio: int(ratio.split(":")[0]) / int(ratio.split(":")[1])
    for ratio in ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
}


# What a conversational model (Gemini, through OpenRouter or not; GPT Image's edits) is told
# each operation means; the player's prompt follows.
EDIT_INSTRUCTIONS = {
    EditOperation.INPAINT: "Edit this picture: repaint only the area the mask leaves transparent.",
    EditOperation.OUTPAINT: "Extend this picture beyond its borders to a {width}x{height} frame, keeping what is there.",
    EditOperation.VARIATION: "Make a new variation of this picture, with the same subject and mood.",
    EditOperation.REMOVE_BACKGROUND: "Remove the background of this picture entirely; keep only the subject.",
    EditOperation.RESTYLE: "Redraw this picture with the same composition, in this style:",
}


PREVIEW_LONGEST_SIDE = 256
PREVIEW_JPEG_QUALITY = 70


def preview_picture(data: bytes, longest_side: int = PREVIEW_LONGEST_SIDE) -> tuple[bytes, int, int]:
    """A provider's partial image as a small JPEG (at most `longest_side` px), for a watcher's
    stream message: (bytes, width, height). Transparency is flattened onto white."""
    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((longest_side, longest_side))
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
        else:
            flat = image.convert("RGB")
        out = io.BytesIO()
        flat.save(out, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
        return out.getvalue(), flat.width, flat.height


def edit_prompt(operation: EditOperation, prompt: str, width: int, height: int) -> str:
    return f"{EDIT_INSTRUCTIONS[operation].format(width=width, height=height)} {prompt}".strip()


def image_from_bytes(data: bytes) -> GeneratedImage:
    """Checks that the bytes are a PNG, JPEG, WEBP or GIF and reads its size."""
    expected_format = _format_from_magic(data)
    if expected_format is None:
        raise ProviderError("downloaded file is not an image", transient=False)
    try:
        with Image.open(io.BytesIO(data), formats=[expected_format]) as image:
            width, height = image.size
            image.verify()
    except Image.DecompressionBombError:
        raise _too_many_pixels() from None
    except Exception as error:  # Pillow raises many types for corrupt files
        raise ProviderError(f"downloaded image is corrupt: {error}", transient=False) from None
    if width * height > MAX_PIXELS:
        raise _too_many_pixels()
    return GeneratedImage(data, _CONTENT_TYPES[expected_format], width, height)


def _format_from_magic(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, image_format in _MAGIC_TO_FORMAT:
        if data.startswith(magic):
            return image_format
    return None


def _too_many_pixels() -> ProviderError:
    return ProviderError(f"image has more than {MAX_PIXELS} pixels", transient=False)


# OpenAI's limit for an edit's mask, which every provider here can take.
MAX_MASK_BYTES = 4 * 1024 * 1024


def mask_problem(data: bytes, width: int, height: int) -> str | None:
    """Why `data` cannot be the inpaint mask of a width x height source, or None.

    The whole PNG is decoded (a file can have a valid header and corrupt pixels), but only
    once its header says it has the source's size, so a small file declaring a huge canvas
    is refused before anything is decompressed.
    """
    if len(data) > MAX_MASK_BYTES:
        return f"must be at most {MAX_MASK_BYTES} bytes"
    if _format_from_magic(data) != "PNG":
        return "must be a PNG"
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.size != (width, height):
                return f"must be the source image's size, {width}x{height} (it is {image.width}x{image.height})"
            image.load()
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    except Image.DecompressionBombError:
        return "must be the source image's size"
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for a corrupt file
        return f"is not a readable PNG ({type(error).__name__})"
    if not has_alpha:
        return "must have an alpha channel: its transparent pixels mark what to repaint"
    return None
