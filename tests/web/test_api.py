"""The real daemon over real mTLS, answering with real llama.cpp inference on the tiny model."""

from __future__ import annotations

import base64
import json
import os
import ssl
import warnings
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Daemon, data_uri, png_bytes

SECURITY_HEADERS = {
    "strict-transport-security": "max-age=63072000",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}


def chat_body(content: object, **extra: object) -> dict[str, object]:
    return {
        "model": "tiny-qwen3vl",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }


def image_content(url: str, text: str = "What is in this image?") -> list[dict[str, object]]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


def assert_error(r: httpx.Response, status: int, words: str = "") -> dict[str, str]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"type", "message"} and err["message"]
    assert words.lower() in err["message"].lower(), err["message"]
    for k, v in SECURITY_HEADERS.items():
        assert r.headers[k] == v
    assert "traceback" not in r.text.lower()
    return dict(err)


def assert_still_serving(d: Daemon) -> None:
    with d.client() as c:
        r = c.post("/v1/chat/completions", json=chat_body("still there?"))
    assert r.status_code == 200, r.text
    assert d.proc.poll() is None


# --- health and discovery -----------------------------------------------------------------------


def test_health_and_ready(daemon: Daemon) -> None:
    with daemon.client(token="none") as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["model"] == "tiny-qwen3vl" and body["images"]
    offload = body["gpu_offload"]  # its values depend on the build and the box: a CUDA one may offload
    assert set(offload) == {"supported", "active"} and all(isinstance(v, bool) for v in offload.values())
    assert offload["supported"] or not offload["active"]
    assert ready.headers["x-request-id"]


def test_models_lists_loaded_model(daemon: Daemon) -> None:
    with daemon.client() as c:
        data = c.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny-qwen3vl"]
    assert len(data[0]["sha256"]) == 64


# --- chat -------------------------------------------------------------------------------------


def test_text_chat_httpx(daemon: Daemon) -> None:
    with daemon.client() as c:
        r = c.post("/v1/chat/completions", json=chat_body("Hello there", max_tokens=5))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 3 and 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert r.headers["x-request-id"] in body["id"]


def test_image_chat_httpx_counts_image_tokens(daemon: Daemon) -> None:
    with daemon.client() as c:
        text_only = c.post("/v1/chat/completions", json=chat_body("What is in this image?"))
        with_image = c.post(
            "/v1/chat/completions", json=chat_body(image_content(data_uri(png_bytes())), seed=1)
        )
    assert with_image.status_code == 200, with_image.text
    assert with_image.json()["choices"][0]["message"]["content"]
    assert with_image.json()["usage"]["prompt_tokens"] > text_only.json()["usage"]["prompt_tokens"] + 4


def test_same_seed_same_answer_and_images_matter(daemon: Daemon) -> None:
    def ask(color: tuple[int, int, int]) -> str:
        with daemon.client() as c:
            r = c.post(
                "/v1/chat/completions",
                json=chat_body(
                    image_content(data_uri(png_bytes(color))), max_tokens=16, temperature=1.0, seed=7
                ),
            )
        return str(r.json()["choices"][0]["message"]["content"])

    red = ask((255, 0, 0))
    assert red == ask((255, 0, 0))
    assert ask((0, 0, 255)) != red or ask((0, 255, 0)) != red


def openai_client(d: Daemon) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=d.url + "/v1",
        api_key=d.setup.token,
        http_client=httpx.Client(verify=d.ssl_context()),
        max_retries=0,
    )


def test_openai_client_text_and_image(daemon: Daemon) -> None:
    client = openai_client(daemon)
    text = client.chat.completions.create(
        model="tiny-qwen3vl", messages=[{"role": "user", "content": "Summarise the risk."}], max_tokens=6
    )
    assert text.choices[0].message.content and text.usage and text.usage.completion_tokens >= 1
    img = client.chat.completions.create(
        model="tiny-qwen3vl",
        max_tokens=6,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Read the statement"},
                    {
                        "type": "image_url",
                        "image_url": {"url": data_uri(png_bytes(fmt="JPEG"), "image/jpeg")},
                    },
                ],
            }
        ],
    )
    assert img.choices[0].message.content
    assert [m.id for m in client.models.list()] == ["tiny-qwen3vl"]


def test_openai_client_streaming(daemon: Daemon) -> None:
    client = openai_client(daemon)
    stream = client.chat.completions.create(
        model="tiny-qwen3vl",
        messages=[{"role": "user", "content": image_content(data_uri(png_bytes(fmt="WEBP"), "image/webp"))}],
        max_tokens=10,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_raw_sse_ends_with_done(daemon: Daemon) -> None:
    with (
        daemon.client() as c,
        c.stream("POST", "/v1/chat/completions", json=chat_body("stream please", stream=True)) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_api_chat_with_path_and_base64(daemon: Daemon) -> None:
    data_dir = daemon.setup.policy.parent / "data"
    (data_dir / "reports").mkdir(exist_ok=True)
    (data_dir / "reports" / "q3.png").write_bytes(png_bytes())
    with daemon.client() as c:
        by_path = c.post(
            "/api/v1/chat", json={"prompt": "分析这张财务报表", "image": "reports/q3.png", "max_tokens": 6}
        )
        absolute = c.post(
            "/api/v1/chat",
            json={"prompt": "Summarise", "image": str(data_dir / "reports" / "q3.png"), "max_tokens": 4},
        )
        by_b64 = c.post(
            "/api/v1/chat",
            json={"prompt": "Summarise", "image": base64.b64encode(png_bytes()).decode(), "max_tokens": 4},
        )
        text = c.post("/api/v1/chat", json={"prompt": "测试安全连接", "max_tokens": 4})
    for r in (by_path, absolute, by_b64, text):
        assert r.status_code == 200, r.text
        assert set(r.json()) >= {"response", "model", "usage"}
    assert by_path.json()["usage"]["prompt_tokens"] > text.json()["usage"]["prompt_tokens"]


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.png",
        "https://example.com/a.png",
        "file:///etc/hostname",
        "ftp://example.com/a.png",
        "/etc/passwd",
        "gopher://x",
        "data:text/plain;base64,aGVsbG8=",
        "data:image/svg+xml;base64,PHN2Zz4=",
        "data:image/png,rawbytes",
    ],
)
def test_url_images_refused_never_fetched(daemon: Daemon, url: str) -> None:
    with daemon.client() as c:
        r = c.post("/v1/chat/completions", json=chat_body(image_content(url)))
    assert_error(r, 400, "data:image")


@pytest.mark.parametrize(
    "path",
    [
        "../policy.toml",
        "reports/../../policy.toml",
        "%2e%2e/policy.toml",
        "/etc/passwd",
        "..\\policy.toml",
        "reports/q3.png\x00.txt",
        "escape.png",
    ],
)
def test_path_traversal_refused(daemon: Daemon, path: str) -> None:
    data_dir = daemon.setup.policy.parent / "data"
    link = data_dir / "escape.png"
    if not link.is_symlink():
        os.symlink(daemon.setup.policy, link)
    with daemon.client() as c:
        r = c.post("/api/v1/chat", json={"prompt": "x", "image": path})
    assert_error(r, 400, "image")


def test_bad_images(daemon: Daemon) -> None:
    bomb = png_bytes(size=(2000, 2000))  # 4 MP against a 1 MP limit, small on the wire
    corrupt = png_bytes()[:60]
    gif = png_bytes(fmt="GIF")
    with daemon.client() as c:
        post = c.post
        assert_error(
            post("/v1/chat/completions", json=chat_body(image_content(data_uri(bomb)))), 413, "pixels"
        )
        assert_error(
            post("/v1/chat/completions", json=chat_body(image_content(data_uri(corrupt)))), 400, "corrupt"
        )
        assert_error(post("/v1/chat/completions", json=chat_body(image_content(data_uri(gif)))), 415, "PNG")
        assert_error(
            post(
                "/v1/chat/completions", json=chat_body(image_content("data:image/png;base64,@@not base64@@"))
            ),
            400,
            "base64",
        )
    assert_still_serving(daemon)


def test_body_limits_and_malformed(daemon: Daemon) -> None:
    with daemon.client() as c:
        big = c.post(
            "/v1/chat/completions",
            content=b"{" + b" " * 3_100_000 + b"}",
            headers={"content-type": "application/json"},
        )
        assert_error(big, 413)
        assert_error(
            c.post(
                "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
            ),
            400,
            "JSON",
        )
        assert_error(
            c.post(
                "/v1/chat/completions",
                content=b"prompt=x",
                headers={"content-type": "application/x-www-form-urlencoded"},
            ),
            415,
        )
        assert_error(
            c.post("/v1/chat/completions", json=chat_body("x", max_tokens=10_000)), 400, "max_tokens"
        )
        assert_error(
            c.post("/v1/chat/completions", json=chat_body("x", temperature="hot")), 400, "temperature"
        )
        assert_error(c.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
        assert_error(c.post("/v1/chat/completions", json=chat_body("x", model="gpt-4")), 404)
        assert_error(c.get("/nope"), 404)
        assert_error(c.get("/v1/chat/completions"), 405)
    assert_still_serving(daemon)


def test_missing_or_wrong_token(daemon: Daemon) -> None:
    with daemon.client() as c:
        no_token = c.post("/v1/chat/completions", json=chat_body("x"), headers={"authorization": ""})
        wrong = c.post(
            "/v1/chat/completions", json=chat_body("x"), headers={"authorization": "Bearer qwa_wrong"}
        )
        basic = c.get("/v1/models", headers={"authorization": "Basic dXNlcjpwYXNz"})
        unknown_route = c.get("/admin/secret", headers={"authorization": ""})
    for r in (no_token, wrong, basic, unknown_route):
        assert_error(r, 401, "token")
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_handshake_requires_client_certificate(daemon: Daemon, tmp_path: Path) -> None:
    with (
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
        daemon.client(client_cert=False) as c,
    ):
        c.get("/healthz")
    # A certificate from another CA fails the handshake too.
    from appliance.security import pki

    other = pki.new_ca("rogue CA")
    pki.save(pki.new_client_cert(other, "rogue"), tmp_path / "r.crt", tmp_path / "r.key")
    ctx = ssl.create_default_context(cafile=str(daemon.setup.ca_cert))
    ctx.load_cert_chain(str(tmp_path / "r.crt"), str(tmp_path / "r.key"))
    with (
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
        httpx.Client(verify=ctx) as c,
    ):
        c.get(daemon.url + "/healthz")
    # TLS 1.1 is refused.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(daemon.setup.ca_cert))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated on purpose: we test refusal
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((httpx.ConnectError, ssl.SSLError)), httpx.Client(verify=old) as c:
        c.get(daemon.url + "/healthz")
    assert_still_serving(daemon)


def test_plain_http_not_offered(daemon: Daemon) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(daemon.url.replace("https", "http") + "/healthz", timeout=5)
    assert_still_serving(daemon)
