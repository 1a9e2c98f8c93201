"""Issue 11 defects 10 and 17: refusals that must not tell the client what exists.

An image path outside data_dir (or missing, a directory, a FIFO, a device, a link out, too long) gets one
answer, byte for byte; unknown, disabled and expired tokens get one 401, while the audit trail and the log
tell the admin which.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, TinyModel, add_client, free_port, make_setup, png_bytes, start_daemon
from helpers import records

from appliance.config.load import load_policy
from appliance.errors import BadRequest
from appliance.web.images import ImageLimits, read_confined


@pytest.fixture(scope="module")
def oracle(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel
) -> Iterator[tuple[Daemon, dict[str, str]]]:
    root = tmp_path_factory.mktemp("oracle")
    port = free_port()
    setup = make_setup(root / "s", tiny_model, port)
    tokens = {
        "dave": add_client(setup.policy, "dave", expires="2020-01-01"),
        "erin": add_client(setup.policy, "erin", disabled="true"),
        "unknown": "qwa_" + "A" * 43,
    }
    d = start_daemon(setup, port, root / "daemon.log")
    try:
        yield d, tokens
    finally:
        d.stop()


def _record(d: Daemon, r: httpx.Response) -> dict[str, Any]:
    rid = r.headers["x-request-id"]
    found = [x for x in records(d) if x.get("request_id") == rid and x["event"] == "request"]
    assert len(found) == 1, rid
    return found[0]


def _shape(r: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Everything a client sees, less what differs per request (its id and the date)."""
    return (
        r.status_code,
        r.content,
        sorted((k, v) for k, v in r.headers.items() if k not in ("x-request-id", "date")),
    )


# --- defect 10: the image path oracle ----------------------------------------------------------------


def _refused_paths(data: Path, outside: Path) -> dict[str, str]:
    """Every kind of refused path; the existing and missing twins must look the same."""
    (outside / "secret.png").write_bytes(png_bytes())
    (data / "sub").mkdir(exist_ok=True)
    os.mkfifo(data / "fifo.png")
    os.symlink(outside / "secret.png", data / "out.png")
    os.symlink(outside / "missing.png", data / "dangling.png")
    os.symlink("/dev/null", data / "null.png")
    cases = {
        "absolute, exists": str(outside / "secret.png"),
        "absolute, missing": str(outside / "missing.png"),
        "absolute directory": str(outside),
        "absolute /etc/passwd": "/etc/passwd",
        "dotdot, exists": f"../{outside.name}/secret.png",
        "dotdot, missing": f"../{outside.name}/nope.png",
        "link out, exists": "out.png",
        "link out, missing": "dangling.png",
        "link to a device": "null.png",
        "missing inside": "nope.png",
        "directory inside": "sub",
        "data_dir itself": str(data),
        "fifo": "fifo.png",
        "too long component": "a" * 300 + ".png",
        "too long path": "a/" * 600 + "x.png",
        "proc": "/proc/self/environ",
    }
    if os.geteuid() == 0:
        os.mknod(data / "zero.png", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
        cases["character device"] = "zero.png"
    return cases


def test_every_refused_image_path_gets_one_answer(oracle: tuple[Daemon, dict[str, str]]) -> None:
    d, _ = oracle
    data = load_policy(d.setup.policy).model.data_dir
    assert data is not None
    outside = data.parent / "outside"
    outside.mkdir()
    cases = _refused_paths(data, outside)
    (data / "fine.png").write_bytes(png_bytes())
    answers = {}
    with d.client() as c:
        for name, path in cases.items():
            answers[name] = _shape(
                c.post("/api/v1/chat", json={"prompt": "hi", "image": path, "max_tokens": 1})
            )
        ok = c.post("/api/v1/chat", json={"prompt": "hi", "image": "fine.png", "max_tokens": 1})
    assert ok.status_code == 200, ok.text  # the control: a file inside is read
    first = answers["absolute, exists"]
    assert first[0] == 400 and b"image path" in first[1]
    assert {name: a for name, a in answers.items() if a != first} == {}


def test_a_file_the_service_cannot_read_is_refused_like_a_missing_one() -> None:
    """As an unprivileged user (a forked child), an unreadable file and a missing one raise alike."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user in a child process")
    base = Path(tempfile.mkdtemp(prefix="qwa-oracle-"))
    try:
        os.chmod(base, 0o755)  # noqa: S103 - the unprivileged child must reach the files to be refused
        (base / "locked.png").write_bytes(png_bytes())
        os.chmod(base / "locked.png", 0o000)
        (base / "locked").mkdir(mode=0o700)
        (base / "locked" / "x.png").write_bytes(png_bytes())
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop to nobody, report each refusal's message
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            limits = ImageLimits(1_000_000, 1_000_000, base)
            out = []
            for name in ("locked.png", "locked/x.png", "missing.png"):
                try:
                    read_confined(name, limits)
                    out.append("read!")
                except BadRequest as exc:
                    out.append(exc.message)
            os.write(write, json.dumps(out).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            messages = json.loads(f.read())
        assert os.waitpid(pid, 0)[1] == 0
        assert len(set(messages)) == 1 and "read!" not in messages, messages
    finally:
        shutil.rmtree(base)


# --- defect 17: unknown, disabled and expired tokens look alike ------------------------------------


def test_unknown_disabled_and_expired_tokens_look_alike_but_are_audited_apart(
    oracle: tuple[Daemon, dict[str, str]],
) -> None:
    d, tokens = oracle
    responses = {}
    for i, who in enumerate(("unknown", "erin", "dave")):
        with d.client(token=tokens[who], source=f"127.0.0.{30 + i}") as c:  # each its own refusal budget
            responses[who] = c.get("/v1/models")
    with httpx.Client(base_url=d.url, verify=d.ssl_context(), timeout=30) as bare:
        responses["none"] = bare.get("/v1/models")
    shapes = {who: _shape(r) for who, r in responses.items()}
    assert shapes["unknown"][0] == 401 and b"valid bearer token" in shapes["unknown"][1]
    assert all(s == shapes["unknown"] for s in shapes.values()), shapes
    reasons = {who: _record(d, r)["reason"] for who, r in responses.items()}
    assert "unknown token" in reasons["unknown"]
    assert "'erin', which is disabled" in reasons["erin"]
    assert "'dave' expired on 2020-01-01" in reasons["dave"]
    assert _record(d, responses["dave"])["client"] == "dave"  # the admin's record names the holder
    assert "no usable bearer token" in reasons["none"]
    log = d.log()
    assert "'dave' expired on 2020-01-01" in log and "'erin', which is disabled" in log
    assert tokens["dave"] not in log and tokens["erin"] not in log  # names, never tokens
