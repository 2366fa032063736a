"""Image inputs of the Fooocus-API contract: v2 strings (base64, data URI or http(s) URL) and v1 uploads.

Everything here is untrusted. Sizes are checked before work is done: bytes before decoding base64 or
reading an upload, and the pixel count from the image header before the pixels are decoded (a few
kilobytes of PNG can claim gigabytes of pixels). URLs go through `netguard` (SSRF). Every failure is
an ImageInputError naming the request field, for a 422 (or 413) body.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from frontend import netguard

# Swagger UI fills string fields with "string"; Fooocus-API reads these as "no image".
_ABSENT = {"", "None", "none", "null", "string"}
_DATA_URI = re.compile(r"^data:[^,]*?;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
# Some clients send the URL-safe alphabet; no character means different things in the two alphabets.
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


class ImageInputError(ValueError):
    """A bad image input: `field` is the request field, `status` the HTTP status (422 or 413)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


@dataclass
class ImageLimits:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    allow_private_urls: bool = False


def is_absent(value: object) -> bool:
    """True when the value means "no image"."""
    return value is None or (isinstance(value, str) and value.strip() in _ABSENT)


async def load_image_input(value: str | None, field: str, limits: ImageLimits) -> Image.Image | None:
    """A v2 image string as an RGB image, or None when absent."""
    if is_absent(value):
        return None
    if not isinstance(value, str):
        raise ImageInputError(field, "must be a base64 string, a data URI or an http(s) URL")
    text = value.strip()
    if text[:8].lower().startswith(("http://", "https://")):
        data = await _fetch(text, field, limits)
    else:
        data = _decode_base64(text, field, limits)
    return decode_image_bytes(data, field, limits)


async def load_upload(upload: object, field: str, limits: ImageLimits) -> Image.Image | None:
    """A v1 multipart file (Starlette UploadFile) as an RGB image, or None when absent."""
    if is_absent(upload):
        return None
    if not hasattr(upload, "read"):
        raise ImageInputError(field, "must be an uploaded file")
    # One byte more than allowed is enough to know the file is too large without reading all of it.
    data = await upload.read(limits.max_bytes + 1)
    if not data:
        return None  # a browser form sends an empty part for a file input left empty
    return decode_image_bytes(data, field, limits)


def decode_image_bytes(data: bytes, field: str, limits: ImageLimits) -> Image.Image:
    """Decode an encoded image (any format PIL reads) into an upright RGB image, within the limits."""
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(field, limits)
    try:
        with warnings.catch_warnings():
            # PIL only warns between its own two bomb limits; a warning must stop us as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            _check_pixels(image, field, limits)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(field, f"image has too many pixels: {exc}", 413) from None
    except Exception as exc:  # PIL raises a zoo of types on corrupt input (OSError, SyntaxError, ...)
        raise ImageInputError(field, f"not an image PIL can read ({type(exc).__name__}: {exc})") from None


def image_to_png_b64(image: Image.Image) -> str:
    """Raw base64 PNG (no data-URI prefix): the form the pipeline takes images in."""
    buffer = io.BytesIO()
    # An internal hop that is decoded straight away: speed matters more than size.
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _too_many_bytes(field: str, limits: ImageLimits) -> ImageInputError:
    return ImageInputError(field, f"image is larger than the {limits.max_bytes} bytes allowed", 413)


def _check_pixels(image: Image.Image, field: str, limits: ImageLimits) -> None:
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageInputError(field, f"image is {width}x{height}, more than the {limits.max_pixels} "
                                     "pixels allowed", 413)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Three 8-bit channels. Alpha is dropped, not composited: masks are read from channel 0 as sent."""
    if image.mode.startswith("I"):
        # convert("RGB") clips 16-bit values at 255, turning most of a 16-bit image white.
        pixels = np.asarray(image, dtype=np.int64)
        if pixels.max(initial=0) > 255:
            pixels = pixels >> 8
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


async def _fetch(url: str, field: str, limits: ImageLimits) -> bytes:
    try:
        return await netguard.fetch(url, allow_private=limits.allow_private_urls, max_bytes=limits.max_bytes)
    except netguard.UnsafeURL as exc:
        raise ImageInputError(field, f"URL refused: {exc}") from None
    except netguard.FetchError as exc:
        raise ImageInputError(field, str(exc), exc.status) from None


def _decode_base64(text: str, field: str, limits: ImageLimits) -> bytes:
    match = _DATA_URI.match(text)
    if match:
        text = text[match.end():]
    elif text[:5].lower() == "data:":
        raise ImageInputError(field, "a data URI must be base64 encoded (data:image/...;base64,...)")
    text = _WHITESPACE.sub("", text)
    # Base64 is 4 characters per 3 bytes: refuse before decoding a string that cannot fit.
    if len(text) > (limits.max_bytes + 2) // 3 * 4:
        raise _too_many_bytes(field, limits)
    text = text.translate(_URLSAFE_TO_STANDARD)
    text += "=" * (-len(text) % 4)  # many clients strip the padding
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(field, f"not valid base64 (nor an http(s) URL): {exc}") from None
