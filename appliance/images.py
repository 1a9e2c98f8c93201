"""Image intake: only PNG, JPEG and WebP, from data URIs or files confined to data_dir, bounded, re-decoded.

llama.cpp gets raw RGB pixels decoded here by Pillow, so its own image parser (stb_image) never sees
user bytes, and no URL is ever opened, which closes the bindings' SSRF hole.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from .inference import RGBImage

FORMATS = ("PNG", "JPEG", "WEBP")
# ASCII letters in either case, spelled out: re.IGNORECASE would also let U+017F (long s) stand for "s"
# and U+212A (Kelvin) for "k". The OpenAPI document uses the same patterns.
DATA_URI_PATTERN = (r"^[Dd][Aa][Tt][Aa]:[Ii][Mm][Aa][Gg][Ee]/"
                    r"([Pp][Nn][Gg]|[Jj][Pp][Ee]?[Gg]|[Ww][Ee][Bb][Pp]);[Bb][Aa][Ss][Ee]64,")
BASE64_PATTERN = r"([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"  # what b64decode accepts
_DATA_URI = re.compile(DATA_URI_PATTERN)
_BASE64 = re.compile(r"^[A-Za-z0-9+/]{16,}={0,2}$")
_MAX_SIDE = 32768

# A decompression-bomb warning from Pillow is an error here, never a log line.
warnings.simplefilter("error", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageLimits:
    """The [limits] and [model] keys that bound one image."""

    max_image_bytes: int
    max_image_pixels: int
    data_dir: Path | None


def from_image_url(url: str, limits: ImageLimits) -> RGBImage:
    """An OpenAI `image_url`: only `data:image/(png|jpeg|webp);base64,` is accepted, nothing is fetched."""
    if not _DATA_URI.match(url):
        scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else "a bare path"
        scheme = scheme if re.fullmatch(r"[a-z][a-z0-9+.-]{0,14}", scheme) else "such"
        raise BadRequest(
            f"image_url must be a data:image/png, image/jpeg or image/webp base64 URI; "
            f"{scheme!s} URLs are never fetched by this appliance")
    return decode(_b64(url.split(",", 1)[1], limits), limits)


def from_api_field(value: str, limits: ImageLimits) -> RGBImage:
    """The /api/v1/chat `image` field: a data URI, bare base64 of an image, or a path under data_dir."""
    if value[:5].lower() == "data:":
        return from_image_url(value, limits)
    raw = _maybe_base64_image(value, limits)
    if raw is not None:
        return decode(raw, limits)
    return decode(read_confined(value, limits), limits)


def _maybe_base64_image(value: str, limits: ImageLimits) -> bytes | None:
    """Bare base64 is recognised by an image signature or a length no path has; else it is a path."""
    if not _BASE64.match(value[:4096]):
        return None
    try:
        head = base64.b64decode(value[:16], validate=True)
    except (binascii.Error, ValueError):
        return None
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff")) or head[8:12] == b"WEBP" or len(value) > 1024:
        return _b64(value, limits)
    return None


def _b64(text: str, limits: ImageLimits) -> bytes:
    if len(text) > (limits.max_image_bytes * 4) // 3 + 4:
        raise PayloadTooLarge(f"image is larger than {limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64 (standard alphabet, padded, "
                         "no whitespace)") from None


def read_confined(value: str, limits: ImageLimits) -> bytes:
    """Read a file that must lie inside data_dir after resolving `..` and symlinks."""
    root = limits.data_dir
    if root is None:
        raise BadRequest("image paths are not enabled on this appliance ([model] data_dir is "
                         "unset); send the image as base64")
    if not value or "\x00" in value or "\\" in value or ".." in PurePosixPath(value).parts \
            or ".." in PureWindowsPath(value).parts:
        raise BadRequest("image path must name a file inside the data directory")
    root = root.resolve()
    candidate = Path(value) if value.startswith("/") else root / value
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise BadRequest("image path was not found in the data directory") from None
    if not resolved.is_relative_to(root):
        raise BadRequest("image path must name a file inside the data directory")
    return _read_bounded(resolved, limits.max_image_bytes)


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise BadRequest("image path was not found in the data directory") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest("image path must name a regular file")
        if st.st_size > max_bytes:
            raise PayloadTooLarge(f"image is larger than {max_bytes} bytes")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes + 1)[:max_bytes]
    finally:
        os.close(fd)


def decode(data: bytes, limits: ImageLimits) -> RGBImage:
    """Decode with Pillow under the byte and pixel limits and return plain RGB pixels."""
    if len(data) > limits.max_image_bytes:
        raise PayloadTooLarge(f"image is larger than {limits.max_image_bytes} bytes")
    if not data:
        raise BadRequest("image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            fmt = str(img.format)
            _check_size(img.size, limits.max_image_pixels)
            img.load()
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"image has more than {limits.max_image_pixels} pixels") from None
    except UnidentifiedImageError:
        if _looks_accepted(data):
            raise BadRequest("image is corrupt: its PNG/JPEG/WebP header is invalid") from None
        raise UnsupportedMediaType("image format not accepted; send PNG, JPEG or WebP") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise BadRequest("image is corrupt or truncated") from None
    return RGBImage(width=rgb.width, height=rgb.height, rgb=rgb.tobytes(),
                    source_bytes=len(data), source_format=fmt,
                    source_sha256=hashlib.sha256(data).hexdigest())


def _looks_accepted(data: bytes) -> bool:
    return data.startswith((b"\x89PNG", b"\xff\xd8\xff")) or data[8:12] == b"WEBP"


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise BadRequest("image has no pixels")
    if width * height > max_pixels or max(width, height) > _MAX_SIDE:
        raise PayloadTooLarge(f"image is {width}x{height}; the limit is {max_pixels} pixels "
                              f"and {_MAX_SIDE} per side")
