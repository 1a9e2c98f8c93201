"""schemathesis hooks for tests/test_fuzz.py: real images for the document's image formats.

JSON Schema cannot say "a decodable PNG", so the OpenAPI document names custom formats and these strategies
produce exactly that; cross-field rules it cannot state (images per request) are filtered here too.
Loaded by the schemathesis CLI through SCHEMATHESIS_HOOKS; settings come from the environment.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any

import schemathesis
from hypothesis import strategies as st
from PIL import Image

MAX_IMAGES = int(os.environ.get("QWA_FUZZ_MAX_IMAGES", "4"))
DATA_FILES = [f for f in os.environ.get("QWA_FUZZ_DATA_FILES", "").split(",") if f]
MIME = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


def encode(fmt: str, width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A small real image in one of the accepted formats."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), rgb).save(buf, format=fmt)
    return buf.getvalue()


def _image(fmt: str, width: int, height: int, rgb: tuple[int, int, int]) -> tuple[str, bytes]:
    return fmt, encode(fmt, width, height, rgb)


def _data_uri(image: tuple[str, bytes]) -> str:
    return f"data:image/{MIME[image[0]]};base64," + base64.b64encode(image[1]).decode()


def _bare(image: tuple[str, bytes]) -> str:
    return base64.b64encode(image[1]).decode()


# Named functions, not lambdas: hypothesis parses a lambda's source to describe it, which fails deep in
# schemathesis's stack.
side = st.integers(min_value=1, max_value=48)
colour = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
images = st.builds(_image, st.sampled_from(sorted(MIME)), side, side, colour)
data_uris = images.map(_data_uri)
refs = st.one_of(data_uris, images.map(_bare), *([st.sampled_from(DATA_FILES)] if DATA_FILES else []))

schemathesis.openapi.format("image-data-uri", data_uris)
schemathesis.openapi.format("image-ref", refs)


def _image_refs(body: Any) -> list[tuple[dict[str, Any], str]]:
    """Every (container, key) in a request body that holds an image string."""
    if not isinstance(body, dict):
        return []
    found = [(body, "image")] if isinstance(body.get("image"), str) else []
    for m in body.get("messages") if isinstance(body.get("messages"), list) else []:
        for p in m.get("content") if isinstance(m, dict) and isinstance(m.get("content"), list) else []:
            if isinstance(p, dict) and p.get("type") == "image_url":
                ref = p.get("image_url")
                found.append((ref, "url") if isinstance(ref, dict) else (p, "image_url"))
    return [(c, k) for c, k in found if isinstance(c.get(k), str)]


def _decodable(value: str) -> bool:
    if value in DATA_FILES:
        return True
    try:
        with Image.open(io.BytesIO(base64.b64decode(value.split(",")[-1], validate=True))) as img:
            img.load()
    except Exception:
        return False
    return True


def _positive(case: Any) -> bool:
    return case.meta is not None and case.meta.generation.mode.is_positive


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    """At most [limits] max_images image parts in one valid request (a rule across messages)."""
    return (
        not _positive(case)
        or sum(k == "url" or k == "image_url" for _, k in _image_refs(case.body)) <= MAX_IMAGES
    )


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """A regex-drawn data URI (coverage phase) is no decodable image: put one in, same MIME type."""
    if _positive(case):
        for container, key in _image_refs(case.body):
            if not _decodable(container[key]):
                fmt = (
                    "JPEG"
                    if "jp" in container[key][:16].lower()
                    else "WEBP"
                    if "webp" in container[key][:16].lower()
                    else "PNG"
                )
                prefix = (
                    container[key].split(",")[0] + ","
                    if "," in container[key]
                    else f"data:image/{MIME[fmt]};base64,"
                )
                container[key] = prefix + base64.b64encode(encode(fmt, 8, 8, (1, 2, 3))).decode()
    return case
