"""A bounded, pure-Python GGUF header reader: an untrusted file is described without ever reaching llama.cpp.

Every count and length is checked against the file's remaining bytes and a fixed limit before it is read.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from appliance.engine.types import FTYPE_NAMES
from appliance.errors import SetupError
from appliance.files import CHUNK
from appliance.text import escape_unprintable

GGUF_MAGIC = b"GGUF"
MAX_KV = 65_536
MAX_KEY_BYTES = 65_535
MAX_STRING_BYTES = 16 << 20
MAX_ARRAY_ITEMS = 1 << 24
KEEP_ARRAY_ITEMS = 16  # longer arrays (vocabularies) are walked and summarised, never kept
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_STRING, _ARRAY = 8, 9
_SCALARS = {
    0: ("uint8", "<B"),
    1: ("int8", "<b"),
    2: ("uint16", "<H"),
    3: ("int16", "<h"),
    4: ("uint32", "<I"),
    5: ("int32", "<i"),
    6: ("float32", "<f"),
    7: ("bool", "<B"),
    10: ("uint64", "<Q"),
    11: ("int64", "<q"),
    12: ("float64", "<d"),
}


class GGUFError(SetupError):
    """A file that is not a well-formed GGUF header: reported, never a crash or a huge allocation."""


class _Malformed(Exception):
    """Why the header is unusable; turned into a GGUFError naming the file."""


@dataclass(frozen=True)
class ArraySummary:
    """A long array (e.g. the vocabulary): its item type and length only."""

    item_type: str
    count: int

    def __str__(self) -> str:
        return f"[{self.count} x {self.item_type}]"


@dataclass(frozen=True)
class GGUFHeader:
    """The fixed header and the metadata key/value section of a GGUF file."""

    version: int
    tensor_count: int
    metadata: dict[str, Any]


class _Cursor:
    """Little-endian reads that refuse any length running past the end of the file, before reading it."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f, self.size, self.pos = f, size, 0

    def remaining(self) -> int:
        return self.size - self.pos

    def _need(self, n: int, what: str) -> None:
        if n > self.remaining():
            raise _Malformed(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, only {self.remaining()} remain"
            )

    def read(self, n: int, what: str) -> bytes:
        self._need(n, what)
        data = self._f.read(n)
        if len(data) != n:
            raise _Malformed(f"truncated: {what} at offset {self.pos} (the file shrank while being read)")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self._f.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def length(self, limit: int, what: str) -> int:
        n: int = self.unpack("<Q", f"length of {what}")
        if n > limit or n > self.remaining():
            raise _Malformed(
                f"{what} claims {n} bytes at offset {self.pos - 8} (limit {limit}, "
                f"{self.remaining()} bytes remain)"
            )
        return n

    def string(self, limit: int, what: str) -> str:
        raw = self.read(self.length(limit, what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"{what} is not valid UTF-8 (offset {self.pos - len(raw)})") from None


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse the header and metadata of a GGUF v2/v3 file, with every count and length bounded."""
    try:
        with open(path, "rb", buffering=CHUNK) as f:
            return _parse(_Cursor(f, os.fstat(f.fileno()).st_size))
    except _Malformed as e:
        raise GGUFError(
            f"{path}: not a valid GGUF file: {e}",
            hint="the file is damaged, truncated or not a GGUF model; fetch it again",
        ) from None
    except IsADirectoryError:
        raise SetupError(f"{path} is a directory", hint="name a .gguf file") from None
    except OSError as e:
        raise SetupError(f"cannot read {path}: {e.strerror}", hint="check the path and permissions") from None


def _parse(cur: _Cursor) -> GGUFHeader:
    magic = cur.read(4, "magic") if cur.remaining() >= 4 else b""
    if magic != GGUF_MAGIC:
        raise _Malformed(f"bad magic {escape_unprintable(repr(magic))} (a GGUF file starts with b'GGUF')")
    version: int = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise _Malformed(
            f"unsupported GGUF version {version} (versions 2 and 3 are read; "
            "a huge number means a big-endian file)"
        )
    n_tensors: int = cur.unpack("<Q", "tensor count")
    n_kv: int = cur.unpack("<Q", "metadata count")
    if n_kv > MAX_KV or n_kv * _MIN_KV_BYTES > cur.remaining():
        raise _Malformed(
            f"claims {n_kv} metadata entries; the limit is {MAX_KV} and {cur.remaining()} bytes remain"
        )
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(MAX_KEY_BYTES, f"key #{i + 1}")
        if not key or key in metadata:
            raise _Malformed(f"empty or duplicate key {escape_unprintable(repr(key))}")
        shown = escape_unprintable(key)
        metadata[key] = _value(cur, cur.unpack("<I", f"type of {shown}"), shown)
    if n_tensors * _MIN_TENSOR_INFO_BYTES > cur.remaining():
        raise _Malformed(f"claims {n_tensors} tensors, more than the {cur.remaining()} remaining bytes hold")
    return GGUFHeader(version, n_tensors, metadata)


def _value(cur: _Cursor, vtype: int, key: str, in_array: bool = False) -> Any:
    if vtype in _SCALARS:
        value = cur.unpack(_SCALARS[vtype][1], key)
        return bool(value) if vtype == 7 else value
    if vtype == _STRING:
        return cur.string(MAX_STRING_BYTES, f"value of {key}")
    if vtype == _ARRAY and not in_array:
        return _array(cur, key)
    raise _Malformed(f"{key}: value type {vtype} is not supported")


def _array(cur: _Cursor, key: str) -> list[Any] | ArraySummary:
    item: int = cur.unpack("<I", f"item type of {key}")
    count: int = cur.unpack("<Q", f"item count of {key}")
    if item == _ARRAY:
        raise _Malformed(f"{key}: nested arrays are not supported (llama.cpp refuses them too)")
    if item not in _SCALARS and item != _STRING:
        raise _Malformed(f"{key}: array item type {item} is not supported")
    item_size = struct.calcsize(_SCALARS[item][1]) if item in _SCALARS else 8
    if count > MAX_ARRAY_ITEMS or count * item_size > cur.remaining():
        raise _Malformed(
            f"{key}: array claims {count} items; the limit is {MAX_ARRAY_ITEMS} and "
            f"{cur.remaining()} bytes remain"
        )
    if count <= KEEP_ARRAY_ITEMS:
        return [_value(cur, item, key, in_array=True) for _ in range(count)]
    if item in _SCALARS:
        cur.skip(count * item_size, key)
    else:
        for _ in range(count):
            cur.skip(cur.length(MAX_STRING_BYTES, f"item of {key}"), key)
    return ArraySummary("string" if item == _STRING else _SCALARS[item][0], count)


def describe_gguf(path: Path, header: GGUFHeader) -> dict[str, Any]:
    """What an admin needs to recognise a file: architecture, name, quantization, context, template."""
    meta = header.metadata
    arch = _str(meta.get("general.architecture"))
    ftype = _int(meta.get("general.file_type"))
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "gguf_version": header.version,
        "tensors": header.tensor_count,
        "metadata_keys": len(meta),
        "architecture": arch,
        "name": _str(meta.get("general.name")),
        "file_type": None if ftype is None else FTYPE_NAMES.get(ftype, f"ftype {ftype}"),
        "context_length": _int(meta.get(f"{arch}.context_length")) if arch else None,
        "parameter_count": _int(meta.get("general.parameter_count")),
        "size_label": _str(meta.get("general.size_label")),
        "projector_type": _str(meta.get("clip.projector_type")),
        "description": _str(meta.get("general.description")),
        "chat_template": _str(meta.get("tokenizer.chat_template")),
    }


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def role_of(header: GGUFHeader) -> str:
    """A projector declares architecture `clip`; everything else is a text model."""
    return "mmproj" if header.metadata.get("general.architecture") == "clip" else "model"
