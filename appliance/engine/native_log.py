"""Native logging of llama.cpp, ggml and libmtmd through filters, so prompts never reach the logs.

libmtmd logs every text chunk at DEBUG; only WARN/ERROR lines pass, and load errors are captured to explain
a ModelLoadError.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from appliance.engine.bindings import llama_cpp, mtmd_cpp

native_log = logging.getLogger("appliance.llama")

_GGML_WARN, _GGML_ERROR, _GGML_CONT = 3, 4, 5
_MAX_LOG_CHARS = 500


class _NativeLogFilter:
    """Forwards only WARN/ERROR lines of one native library to logging; prompts never pass.

    libmtmd logs every text chunk at DEBUG (`add_text: <prompt>`); anything below WARN is dropped,
    and lines mentioning add_text are dropped at any level, continuation lines included.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.capture: list[str] | None = None  # set while loading, to explain failures
        self._forwarding = False
        self._level = logging.WARNING
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes | None, _user_data: object) -> None:
        with suppress(Exception):  # an exception must never unwind into C
            self._handle(level, (text or b"").decode("utf-8", "replace"))

    def _handle(self, level: int, line: str) -> None:
        if level != _GGML_CONT:
            self._forwarding = level in (_GGML_WARN, _GGML_ERROR)
            self._level = logging.ERROR if level == _GGML_ERROR else logging.WARNING
        if "add_text" in line:
            self._forwarding = False
        line = line.strip()
        if not self._forwarding or not line:
            return
        line = line[:_MAX_LOG_CHARS]
        if self.capture is not None and self._level == logging.ERROR:
            self.capture.append(line)
        native_log.log(self._level, "%s: %s", self.source, line)


# Module-level: ctypes callbacks must outlive every native call that may log.
_LLAMA_LOG = _NativeLogFilter("llama.cpp")
_MTMD_LOG = _NativeLogFilter("mtmd")


def install_native_logging() -> None:
    """Route llama.cpp, ggml and libmtmd logging through the filters (idempotent)."""
    llama_cpp.llama_log_set(_LLAMA_LOG.callback, ctypes.c_void_p(0))
    if hasattr(mtmd_cpp, "mtmd_helper_log_set"):  # also sets mtmd_log_set (clip)
        mtmd_cpp.mtmd_helper_log_set(_MTMD_LOG.callback, ctypes.c_void_p(0))
    else:
        mtmd_cpp.mtmd_log_set(_MTMD_LOG.callback, ctypes.c_void_p(0))


install_native_logging()  # before anything can load a model and log a prompt


@contextmanager
def capture_native_errors() -> Iterator[list[str]]:
    """Collect native ERROR lines meanwhile, to put llama.cpp's reason into a ModelLoadError."""
    lines: list[str] = []
    _LLAMA_LOG.capture = _MTMD_LOG.capture = lines
    try:
        yield lines
    finally:
        _LLAMA_LOG.capture = _MTMD_LOG.capture = None
