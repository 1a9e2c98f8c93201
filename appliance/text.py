"""The one owner of terminal-safe text: untrusted strings never reach a log line or a terminal raw.

Leaf module: imports only the standard library, so every package (the staff client too) may use it.
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls (ESC starts terminal escapes), DEL, C1 controls, and the Unicode line/paragraph separators
# that some viewers treat as a new line: what could forge a log line or drive a terminal.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def strip_control(text: str, *, keep: str = "") -> str:
    """`text` without control characters, except those in `keep` (e.g. "\\t\\n" for an answer's layout)."""
    if not keep:
        return CONTROL.sub("", text)
    return CONTROL.sub(lambda m: m.group() if m.group() in keep else "", text)


def strip_control_deep(value: Any) -> Any:
    """Strip control characters from every string in a JSON-like value, at any depth (no log injection)."""
    if isinstance(value, str):
        return CONTROL.sub("", value)
    if isinstance(value, dict):
        return {strip_control_deep(k): strip_control_deep(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strip_control_deep(v) for v in value]
    return value


def one_line(text: str, limit: int = 300) -> str:
    """A server's message on one terminal line: controls become spaces, spaces collapse, cut at `limit`."""
    return " ".join(CONTROL.sub(" ", text).split())[:limit]


def escape_unprintable(text: str, limit: int = 0) -> str:
    """Untrusted text made terminal-safe: control, format and bidi characters shown as \\uXXXX escapes."""
    out = "".join(c if c.isprintable() or c in "\n\t" else f"\\u{ord(c):04x}" for c in text)
    return out[:limit] + "..." if limit and len(out) > limit else out
