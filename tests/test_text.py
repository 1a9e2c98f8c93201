"""appliance.text, the one owner of terminal-safe text: no log line forged, no terminal driven by a server."""

from __future__ import annotations

from appliance.text import escape_unprintable, one_line, strip_control, strip_control_deep

EVIL = "ok\x1b[31mred\x07\r\nnext\u2028line\x9b\ttab"


def test_strip_control_removes_escapes_and_keeps_what_is_asked() -> None:
    assert strip_control(EVIL) == "ok[31mrednextlinetab"
    assert strip_control(EVIL, keep="\t\n") == "ok[31mred\nnextline\ttab"


def test_deep_stripping_reaches_keys_and_nested_values() -> None:
    assert strip_control_deep({"k\x1b": ["a\nb", ("c\u2029",)], "n": 3}) == {"k": ["ab", ["c"]], "n": 3}


def test_one_line_and_escapes() -> None:
    assert one_line("a\x1b]0;title\x07\n  b", 8) == "a ]0;tit"
    assert escape_unprintable("x\x1b\u202ey\n") == "x\\u001b\\u202ey\n"
    assert escape_unprintable("abcdef", limit=3) == "abc..."
