"""Image intake: only PNG, JPEG and WebP, from data URIs or files confined to data_dir, bounded, re-decoded.

llama.cpp gets raw RGB pixels decoded here by Pillow, so its own image parser (stb_image) never sees
user bytes, and no URL is ever opened, which closes the bindings' SSRF hole.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import math
import os
import re
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image, ImageOps, UnidentifiedImageError

from appliance.engine.types import RGBImage
from appliance.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

FORMATS = ("PNG", "JPEG", "WEBP")
# ASCII letters in either case, spelled out: re.IGNORECASE would also let U+017F (long s) stand for "s"
# and U+212A (Kelvin) for "k". The OpenAPI document uses the same patterns.
DATA_URI_PATTERN = (
    r"^[Dd][Aa][Tt][Aa]:[Ii][Mm][Aa][Gg][Ee]/"
    r"([Pp][Nn][Gg]|[Jj][Pp][Ee]?[Gg]|[Ww][Ee][Bb][Pp]);[Bb][Aa][Ss][Ee]64,"
)
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
    max_output_pixels: int = 0  # image_max_tokens in pixels: larger images are scaled down (0: never)


@dataclass(frozen=True)
class Encoded:
    """An image's bytes with its header read (format and size checked); no pixel decoded yet."""

    data: bytes
    width: int
    height: int
    format: str

    def scaled_size(self, limits: ImageLimits) -> tuple[int, int]:
        """Its size once scaled down to what the projector keeps (what decode returns, give or take a
        pixel: a JPEG decoded at a reduced scale first)."""
        return _fit((self.width, self.height), limits.max_output_pixels)

    def decode(self, limits: ImageLimits) -> RGBImage:
        return decode(self.data, limits)


def from_image_url(url: str, limits: ImageLimits) -> RGBImage:
    """An OpenAI `image_url`, decoded (see read_image_url)."""
    return read_image_url(url, limits).decode(limits)


def from_api_field(value: str, limits: ImageLimits) -> RGBImage:
    """The /api/v1/chat `image` field, decoded (see read_api_field)."""
    return read_api_field(value, limits).decode(limits)


def read_image_url(url: str, limits: ImageLimits) -> Encoded:
    """An OpenAI `image_url`: only `data:image/(png|jpeg|webp);base64,` is accepted, nothing is fetched."""
    if not _DATA_URI.match(url):
        scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else "a bare path"
        scheme = scheme if re.fullmatch(r"[a-z][a-z0-9+.-]{0,14}", scheme) else "such"
        raise BadRequest(
            f"image_url must be a data:image/png, image/jpeg or image/webp base64 URI; "
            f"{scheme!s} URLs are never fetched by this appliance"
        )
    return read_header(_b64(url.split(",", 1)[1], limits), limits)


def read_api_field(value: str, limits: ImageLimits) -> Encoded:
    """The /api/v1/chat `image` field: a data URI, bare base64 of an image, or a path under data_dir."""
    if value[:5].lower() == "data:":
        return read_image_url(value, limits)
    raw = _maybe_base64_image(value, limits)
    if raw is not None:
        return read_header(raw, limits)
    return read_header(read_confined(value, limits), limits)


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
        raise BadRequest("image is not valid base64 (standard alphabet, padded, no whitespace)") from None


REFUSED_PATH = "image path must name a readable regular file inside the data directory"
_MAX_PATH = 1024  # characters; longer is refused like any other path, before the file system is asked


def read_confined(value: str, limits: ImageLimits) -> bytes:
    """Read a regular file inside data_dir. Every refused path (outside, `..`, a link out, missing, a
    directory, unreadable, a FIFO or device, too long) gets one answer, so none tells what exists."""
    root = limits.data_dir
    if root is None:
        raise BadRequest(
            "image paths are not enabled on this appliance ([model] data_dir is "
            "unset); send the image as base64"
        )
    real_root = root.resolve()
    rel = _lexically_inside(value, root, real_root)
    try:
        resolved = (real_root / rel).resolve(strict=True)  # links inside data_dir may point inside it
    except (OSError, RuntimeError):
        raise BadRequest(REFUSED_PATH) from None
    if not resolved.is_relative_to(real_root) or resolved == real_root:
        raise BadRequest(REFUSED_PATH)
    return _read_bounded(real_root, resolved.relative_to(real_root), limits.max_image_bytes)


def _lexically_inside(value: str, root: Path, real_root: Path) -> PurePosixPath:
    """The path relative to data_dir, judged from the text alone: nothing outside it is ever looked up."""
    if (
        not value
        or len(value) > _MAX_PATH
        or "\x00" in value
        or "\\" in value
        or ".." in PurePosixPath(value).parts
        or ".." in PureWindowsPath(value).parts
    ):
        raise BadRequest(REFUSED_PATH)
    path = PurePosixPath(value)
    if not path.is_absolute():
        return path
    for base in (PurePosixPath(root), PurePosixPath(real_root)):
        if path.is_relative_to(base):
            return path.relative_to(base)
    raise BadRequest(REFUSED_PATH)


def _read_bounded(root: Path, rel: Path, max_bytes: int) -> bytes:
    try:
        fd = _open_beneath(root, rel.parts)
    except OSError:
        raise BadRequest(REFUSED_PATH) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(REFUSED_PATH)
        if st.st_size > max_bytes:
            raise PayloadTooLarge(f"image is larger than {max_bytes} bytes")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes + 1)[:max_bytes]
    finally:
        os.close(fd)


def _open_beneath(root: Path, parts: tuple[str, ...]) -> int:
    """Open root/parts one component at a time, following no link, and only a regular file: a link
    swapped in after the check cannot lead out, and no FIFO or device is ever opened."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = inner
        if not stat.S_ISREG(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode):
            raise IsADirectoryError(parts[-1])  # any OSError: refused like a missing file
        return os.open(
            parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=fd
        )
    finally:
        os.close(fd)


def read_header(data: bytes, limits: ImageLimits) -> Encoded:
    """Check the bytes and the header's format and size; Pillow opens lazily, so nothing is decoded."""
    _check_bytes(data, limits)
    with _refused_as_client_errors(data, limits), Image.open(io.BytesIO(data), formats=FORMATS) as img:
        _check_size(img.size, limits.max_image_pixels)
        return Encoded(data, img.size[0], img.size[1], str(img.format))


def decode(data: bytes, limits: ImageLimits) -> RGBImage:
    """Decode with Pillow under the byte and pixel limits and return plain 8-bit RGB pixels, scaled
    down to what the projector would keep (max_output_pixels), so the encoder's cost is bounded."""
    _check_bytes(data, limits)
    with _refused_as_client_errors(data, limits), Image.open(io.BytesIO(data), formats=FORMATS) as img:
        fmt = str(img.format)
        _check_size(img.size, limits.max_image_pixels)
        target = _fit(img.size, limits.max_output_pixels)
        if target != img.size and fmt == "JPEG":
            img.draft(None, target)  # JPEG decodes at 1/2, 1/4 or 1/8 scale: cheaper, never smaller
        img.load()
        rgb = _fit_rgb(_to_8bit(ImageOps.exif_transpose(img)), limits.max_output_pixels)
    return RGBImage(
        width=rgb.width,
        height=rgb.height,
        rgb=rgb.tobytes(),
        source_bytes=len(data),
        source_format=fmt,
        source_sha256=hashlib.sha256(data).hexdigest(),
    )


def _check_bytes(data: bytes, limits: ImageLimits) -> None:
    if len(data) > limits.max_image_bytes:
        raise PayloadTooLarge(f"image is larger than {limits.max_image_bytes} bytes")
    if not data:
        raise BadRequest("image is empty")


@contextlib.contextmanager
def _refused_as_client_errors(data: bytes, limits: ImageLimits) -> Iterator[None]:
    """Pillow's failures as the client's errors: a bomb is 413, an unknown format 415, corruption 400."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"image has more than {limits.max_image_pixels} pixels") from None
    except UnidentifiedImageError:
        if _looks_accepted(data):
            raise BadRequest("image is corrupt: its PNG/JPEG/WebP header is invalid") from None
        raise UnsupportedMediaType("image format not accepted; send PNG, JPEG or WebP") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise BadRequest("image is corrupt or truncated") from None


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit PNG grey levels (0..65535)


def _to_8bit(img: Image.Image) -> Image.Image:
    """RGB from any accepted mode; 16-bit grey is scaled to 8 bits (a plain convert clips it to white)."""
    if img.mode in _WIDE_MODES:
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return img.convert("RGB")


def _fit(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """The largest size of the same aspect within max_pixels (0: no bound)."""
    width, height = size
    if max_pixels <= 0 or width * height <= max_pixels:
        return size
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _fit_rgb(rgb: Image.Image, max_pixels: int) -> Image.Image:
    target = _fit(rgb.size, max_pixels)
    return rgb if target == rgb.size else rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _looks_accepted(data: bytes) -> bool:
    return data.startswith((b"\x89PNG", b"\xff\xd8\xff")) or data[8:12] == b"WEBP"


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise BadRequest("image has no pixels")
    if width * height > max_pixels or max(width, height) > _MAX_SIDE:
        raise PayloadTooLarge(
            f"image is {width}x{height}; the limit is {max_pixels} pixels and {_MAX_SIDE} per side"
        )
