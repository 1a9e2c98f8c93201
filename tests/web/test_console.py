"""The browser console in a real headless Chromium that presents a client certificate from its NSS database.

Set-up (what a branch PC does by hand, automated): `qwen-appliance cert client NAME --p12` issues a PKCS#12,
`pk12util` imports it into an NSS database under a temporary HOME, `certutil` trusts the appliance's CA there,
and the profile's Preferences carry an `auto_select_certificate` content setting for the console's origin,
which is what the `AutoSelectCertificateForUrls` policy sets; it needs no root and no /etc/chromium/policies
file. Debian's `chromium`, `chromium-driver` and `libnss3-tools` come from `make test` (target `browser`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Daemon, TinyModel, free_port, make_setup, start_daemon

from appliance.web.console import CONSOLE_CSP

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
P12_PASSWORD = "console-test-p12"
DOCS = ROOT / "docs"
ANSWER = "#conversation li.assistant:last-child .answer"


def _require_tools() -> None:
    """Fail loudly, never skip: the console is only proven in a real browser."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    missing += [tool for tool in ("certutil", "pk12util") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: run `make browser` (part of `make test`), which installs "
            "Debian's chromium, chromium-driver and libnss3-tools"
        )


@dataclass
class Browser:
    daemon: Daemon
    driver: Any
    token: str

    @property
    def origin(self) -> str:
        return self.daemon.url

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def css(self, selector: str) -> Any:
        return self.driver.find_element("css selector", selector)

    def text(self, selector: str) -> str:
        return str(self.js("return document.querySelector(arguments[0]).textContent", selector))

    def wait(self, predicate: Any, timeout: float = 30, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")


def _nss_db(home: Path, p12: Path, ca: Path) -> None:
    """Chromium on Linux reads client certificates and extra roots from ~/.pki/nssdb."""
    db = f"sql:{home / '.pki' / 'nssdb'}"
    (home / ".pki" / "nssdb").mkdir(parents=True)
    env = {**os.environ, "HOME": str(home)}
    for cmd in (
        ["certutil", "-d", db, "-N", "--empty-password"],
        ["pk12util", "-i", str(p12), "-d", db, "-W", P12_PASSWORD],
        ["certutil", "-A", "-d", db, "-n", "qwen-appliance CA", "-t", "C,,", "-i", str(ca)],
    ):
        subprocess.run(cmd, check=True, capture_output=True, env=env)


def _auto_select(profile: Path, origin: str, cn: str) -> None:
    """The per-profile form of AutoSelectCertificateForUrls: present the cert whose CN matches, no dialog."""
    setting = {"filters": [{"SUBJECT": {"CN": cn}}]}
    prefs = {
        "profile": {
            "content_settings": {
                "exceptions": {"auto_select_certificate": {f"{origin},*": {"setting": setting}}}
            }
        }
    }
    (profile / "Default").mkdir(parents=True)
    (profile / "Default" / "Preferences").write_text(json.dumps(prefs))


def _issue_p12(daemon: Daemon, out: Path) -> Path:
    tls = daemon.setup.policy.parent / "tls"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "cert",
            "client",
            "browser",
            "--ca-dir",
            str(tls),
            "--out",
            str(out),
            "--p12",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "QWEN_APPLIANCE_P12_PASSWORD": P12_PASSWORD},
        check=True,
    )
    assert "from $QWEN_APPLIANCE_P12_PASSWORD" in r.stdout
    return out / "browser.p12"


def _start_chromium(home: Path, profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1200,1000",
        "--lang=en-US",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = Service(str(CHROMEDRIVER), env={**os.environ, "HOME": str(home)})
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(30)
    # A test-only listener, injected by DevTools before any page script runs (CSP does not apply to it).
    driver.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": """
        window.__csp = [];
        document.addEventListener("securitypolicyviolation",
            (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));"""
        },
    )
    return driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Iterator[Browser]:
    _require_tools()
    root = tmp_path_factory.mktemp("console")
    port = free_port()
    daemon = start_daemon(make_setup(root / "setup", tiny_model, port), port, root / "daemon.log")
    driver = None
    try:
        p12 = _issue_p12(daemon, root / "bundle")
        _nss_db(root / "home", p12, daemon.setup.ca_cert)
        _auto_select(root / "profile", daemon.url, "browser")
        driver = _start_chromium(root / "home", root / "profile")
        yield Browser(daemon, driver, daemon.setup.token)
    finally:
        if driver is not None:
            driver.quit()
        daemon.stop()


def _record_answer_growth(b: Browser) -> None:
    """Note the answer's length once per batch of DOM changes. Pieces from one network read land in one
    batch, so two or more lengths mean the answer arrived and was rendered in separate reads."""
    b.js(
        """
        window.__lengths = [];
        new MutationObserver(() => {
            const a = document.querySelector(arguments[0]);
            if (a) window.__lengths.push(a.textContent.length);
        }).observe(document.getElementById("conversation"),
                   {childList: true, subtree: true, characterData: true});""",
        ANSWER,
    )


def _ask(b: Browser, question: str, image: Path | None = None) -> str:
    if image is not None:
        b.css("#file").send_keys(str(image))
        b.wait(lambda: b.js("return !document.getElementById('preview').hidden"), what="the preview")
        assert b.css("#preview").get_attribute("src").startswith("blob:")
    b.css("#question").send_keys(question)
    _record_answer_growth(b)
    b.css("#ask").click()
    b.wait(lambda: b.css(ANSWER).get_attribute("data-state") in ("done", "error"), what="the answer")
    assert b.css(ANSWER).get_attribute("data-state") == "done", b.text(ANSWER)
    return b.text(ANSWER)


def _screenshot(b: Browser, name: str, tmp: Path) -> None:
    """The whole page, not just the viewport. docs/ gets it when missing or with QWA_SCREENSHOTS=update,
    so that a test run does not rewrite tracked images (the tiny model's answer differs every run)."""
    size = b.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = b.driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    data = base64.b64decode(shot["data"])
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    (tmp / name).write_bytes(data)
    if os.environ.get("QWA_SCREENSHOTS") == "update" or not (DOCS / name).exists():
        (DOCS / name).write_bytes(data)


def test_console_page_loads_without_a_token_and_keeps_it_in_session_storage(browser: Browser) -> None:
    b = browser
    b.driver.get(f"{b.origin}/console")  # presenting the client certificate is the only way in
    assert b.css("#login").is_displayed() and not b.css("#chat").is_displayed()
    assert b.text("h1") == "Document assistant" and b.driver.title == "Document assistant"
    b.css("#token").send_keys(b.token)
    b.css("#save-token").click()
    assert b.css("#chat").is_displayed()
    assert b.js("return sessionStorage.getItem('qwen-appliance.token')") == b.token
    assert b.js("return document.cookie") == "" and b.token not in b.driver.current_url
    assert b.js("return localStorage.length") == 0


def test_ask_about_an_uploaded_png_streams_the_answer(browser: Browser, tmp_path: Path) -> None:
    b = browser
    answer = _ask(b, "What is the total on this statement?", ROOT / "tests" / "data" / "statement.png")
    assert answer.strip()
    lengths = b.js("return window.__lengths")
    growth = sorted({n for n in lengths if n > 0})
    assert len(growth) >= 2, f"the answer appeared in one piece: {lengths}"
    assert int(b.css(ANSWER).get_attribute("data-chunks")) >= 2
    assert b.css("#conversation li.user img").get_attribute("src").startswith("blob:")
    assert b.text("#status") in ("Done.", "The answer reached its length limit.")
    _screenshot(b, "console-en.png", tmp_path)


def test_switch_to_chinese(browser: Browser, tmp_path: Path) -> None:
    b = browser
    b.css("#lang").click()
    assert b.text("h1") == "文档助手" and b.text("#ask") == "提问" and b.text("#clear") == "清空对话"
    assert b.js("return document.documentElement.lang") == "zh-CN"
    assert b.text("#conversation li.assistant .who") == "助手"
    b.css("#clear").click()
    assert b.text("#status") == "对话已清空。"
    question = "这张报表的总额是多少？"  # noqa: RUF001 - a Chinese question mark
    assert _ask(b, question, ROOT / "tests" / "data" / "statement.png").strip()
    assert b.text("#status") in ("完成。", "回答已达到长度上限。")
    _screenshot(b, "console-zh.png", tmp_path)


def test_default_language_follows_the_browser(browser: Browser) -> None:
    b = browser
    ua = b.js("return navigator.userAgent")
    b.driver.execute_cdp_cmd("Emulation.setUserAgentOverride", {"userAgent": ua, "acceptLanguage": "zh-CN"})
    try:
        b.js("sessionStorage.removeItem('qwen-appliance.lang')")
        b.driver.refresh()
        assert b.js("return navigator.language") == "zh-CN"
        assert b.text("h1") == "文档助手"
    finally:
        b.driver.execute_cdp_cmd(
            "Emulation.setUserAgentOverride", {"userAgent": ua, "acceptLanguage": "en-US"}
        )
        b.js("sessionStorage.removeItem('qwen-appliance.lang')")
        b.driver.refresh()
    assert b.text("h1") == "Document assistant"
    assert b.css("#chat").is_displayed(), "the token survives a reload in the same tab"


def test_clear_conversation_and_a_rejected_token(browser: Browser) -> None:
    b = browser
    b.css("#clear").click()
    assert b.js("return document.querySelectorAll('#conversation li').length") == 0
    b.js("sessionStorage.setItem('qwen-appliance.token', 'qwa_not-a-real-token')")
    b.css("#question").send_keys("Hello")
    b.css("#ask").click()
    b.wait(lambda: b.css("#login").is_displayed(), what="the sign-in form after a 401")
    assert "token was not accepted" in b.text("#login-error")
    assert b.js("return sessionStorage.getItem('qwen-appliance.token')") is None


def test_no_request_left_the_origin_and_no_csp_violation(browser: Browser) -> None:
    b = browser
    events = [json.loads(e["message"])["message"] for e in b.driver.get_log("performance")]
    sent = [e["params"] for e in events if e["method"] == "Network.requestWillBeSent"]
    from_console = [p["request"]["url"] for p in sent if p.get("documentURL", "").startswith(b.origin)]
    assert any(u.endswith("/v1/chat/completions") for u in from_console), from_console
    assert [u for u in from_console if not u.startswith((b.origin + "/", "data:", "blob:"))] == []
    # Nothing else went onto the network either (the browser's own chrome:// pages are not network).
    network = [p["request"]["url"] for p in sent if p["request"]["url"].startswith(("http", "ws"))]
    assert [u for u in network if not u.startswith(b.origin + "/")] == []
    resources = b.js("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith((b.origin + "/", "blob:")) for u in resources), resources
    log = b.driver.get_log("browser")
    csp = [e["message"] for e in log if "Content Security Policy" in e["message"]]
    assert csp == [] and b.js("return window.__csp") == []
    # The listener does see a violation, so an empty list above means something:
    b.js("document.body.setAttribute('style', 'color: red')")
    b.wait(lambda: b.js("return window.__csp.length") > 0, 5, "the control violation")


def test_console_headers_and_routes(browser: Browser) -> None:
    """Page and assets carry the console CSP and every other security header; the API keeps its own."""
    with browser.daemon.client(token="qwa_unknown") as c:
        page, js = c.get("/console"), c.get("/console/static/console.js")
        api, missing, post = c.get("/v1/models"), c.get("/console/static/nope.js"), c.post("/console")
    for r in (page, js):
        assert r.status_code == 200
        assert r.headers["content-security-policy"] == CONSOLE_CSP
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer" and r.headers["cache-control"] == "no-store"
        assert r.headers["strict-transport-security"].startswith("max-age=")
    assert page.headers["content-type"].startswith("text/html")
    assert js.headers["content-type"].startswith("text/javascript")
    assert "<script>" not in page.text and " style=" not in page.text and "innerHTML" not in js.text
    assert "http://" not in page.text + js.text and "https://" not in page.text + js.text
    assert api.status_code == 401 and api.headers["content-security-policy"] == "default-src 'none'"
    assert missing.status_code == 404 and missing.headers["content-security-policy"] == "default-src 'none'"
    assert post.status_code == 401  # only GET is public; anything else needs the token
    assert post.headers["content-security-policy"] == "default-src 'none'"


@pytest.mark.parametrize(
    ("method", "path", "public"),
    [
        ("GET", "/console", True),
        ("HEAD", "/console/static/console.js", False),  # GET only (issue 11)
        ("GET", "/console/static/icon.svg", True),
        ("POST", "/console", False),
        ("POST", "/console/static/console.js", False),
        ("GET", "/console/", False),
        ("GET", "/console/static/", False),
        ("GET", "/console/static/../../v1/models", False),
        ("GET", "/console/static/x/../../api/v1/health", False),
        ("GET", "/console/static/.hidden", False),
        ("GET", "/console/static//v1/models", False),
        ("GET", "/console/staticx.js", False),
        ("GET", "/healthz", True),
        ("GET", "/v1/models", False),
    ],
)
def test_only_the_console_page_and_single_asset_names_skip_the_token(
    method: str, path: str, public: bool
) -> None:
    from appliance.security.identity import is_public

    assert is_public({"method": method, "path": path}) is public
