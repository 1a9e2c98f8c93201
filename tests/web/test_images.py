"""Image intake with real Pillow decoding: what is accepted, what is refused, and that nothing is fetched."""

from __future__ import annotations

import base64
import os
import struct
import zlib
from pathlib import Path

import pytest
from conftest import data_uri, png_bytes

from appliance.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from appliance.web.images import ImageLimits, from_api_field, from_image_url


@pytest.fixture
def limits(tmp_path: Path) -> ImageLimits:
    (tmp_path / "data").mkdir()
    return ImageLimits(max_image_bytes=200_000, max_image_pixels=1_000_000, data_dir=tmp_path / "data")


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_accepted_formats_become_rgb(limits: ImageLimits, fmt: str, mime: str) -> None:
    img = from_image_url(data_uri(png_bytes(size=(40, 30), fmt=fmt), mime), limits)
    assert (img.width, img.height, img.source_format) == (40, 30, fmt)
    assert len(img.rgb) == 40 * 30 * 3


def test_rgba_and_palette_are_flattened(limits: ImageLimits) -> None:
    from io import BytesIO

    from PIL import Image

    for mode in ("RGBA", "P", "L", "I;16"):
        buf = BytesIO()
        Image.new(mode, (8, 8)).save(buf, format="PNG")
        assert len(from_image_url(data_uri(buf.getvalue()), limits).rgb) == 8 * 8 * 3


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest",
        "https://x/y.png",
        "file:///etc/passwd",
        "ftp://h/f",
        "/etc/passwd",
        "x.png",
        "data:image/gif;base64,R0lGOD",
        "DATA:text/html;base64,PGgx",
    ],
)
def test_non_data_urls_refused(limits: ImageLimits, url: str) -> None:
    with pytest.raises(BadRequest, match="never fetched"):
        from_image_url(url, limits)


def test_bombs_and_limits(limits: ImageLimits) -> None:
    with pytest.raises(PayloadTooLarge, match="pixels"):
        from_image_url(data_uri(bomb_png(20000, 20000)), limits)
    with pytest.raises(PayloadTooLarge, match="pixels"):
        from_image_url(data_uri(bomb_png(1, 100000)), limits)
    with pytest.raises(BadRequest, match=r"pixels|corrupt"):
        from_image_url(data_uri(bomb_png(0, 0)), limits)
    with pytest.raises(PayloadTooLarge, match="bytes"):
        from_image_url("data:image/png;base64," + "A" * 300_000, limits)


def test_corrupt_wrong_type_bad_base64(limits: ImageLimits) -> None:
    with pytest.raises(BadRequest, match="corrupt"):
        from_image_url(data_uri(png_bytes()[:80]), limits)
    with pytest.raises(UnsupportedMediaType):
        from_image_url(data_uri(png_bytes(fmt="GIF")), limits)
    with pytest.raises(UnsupportedMediaType):
        from_image_url(data_uri(png_bytes(fmt="BMP")), limits)
    with pytest.raises(BadRequest, match="base64"):
        from_image_url("data:image/png;base64,iVBOR w0KGgo=", limits)
    with pytest.raises(BadRequest, match="empty"):
        from_image_url("data:image/png;base64,", limits)


def test_api_field_path_base64_and_confinement(limits: ImageLimits, tmp_path: Path) -> None:
    assert limits.data_dir is not None
    (limits.data_dir / "a").mkdir()
    (limits.data_dir / "a" / "scan.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    os.symlink(tmp_path / "secret.png", limits.data_dir / "link.png")
    os.symlink(limits.data_dir / "a" / "scan.png", limits.data_dir / "inner.png")
    assert from_api_field("a/scan.png", limits).width == 64
    assert from_api_field(str(limits.data_dir / "a/scan.png"), limits).width == 64
    assert from_api_field("inner.png", limits).width == 64  # a link that stays inside is fine
    assert from_api_field(base64.b64encode(png_bytes()).decode(), limits).width == 64
    for bad in [
        "../secret.png",
        "a/../../secret.png",
        str(tmp_path / "secret.png"),
        "link.png",
        "a\\..\\..\\secret.png",
        "a/scan.png\x00",
        "missing.png",
        "a",
    ]:
        with pytest.raises(BadRequest):
            from_api_field(bad, limits)


def test_paths_disabled_without_data_dir() -> None:
    with pytest.raises(BadRequest, match="data_dir"):
        from_api_field("scan.png", ImageLimits(1000, 1000, None))
