"""The web page in a real browser: the real service (uvicorn in a thread, the embedded model, auth on, data dir in
tmp) driven by headless Chromium through Playwright.

The browser is Debian's /usr/bin/chromium (Playwright never downloads one here). Without it, or without playwright
or the service's dependencies, the tests skip with the reason, unless FLUXRT_REQUIRE_BROWSER=1 (set by .ci/run):
then they fail instead. FLUXRT_WEB_SHOT=path keeps a screenshot of the page after the generation.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
REQUIRED = os.environ.get("FLUXRT_REQUIRE_BROWSER") == "1"
TOKEN = "web-test-token-0123456789abcdef"
SIDE, STEPS, SEED = 64, 3, 7  # the smallest size requests allow; 3 steps keep a job near a second on 2 cores
GENERATE_TIMEOUT_MS = 45_000  # the job with two references, with room for a busy shared machine


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (FLUXRT_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(color: str, side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, "PNG")
    return buf.getvalue()


def _get(url: str, token: str | None = TOKEN) -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        assert r.status == 200
        return r.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real service with one bearer token on a free localhost port; yields its base URL once the model is ready."""
    try:
        import uvicorn

        from fluxrt.service.app import create_app
        from fluxrt.service.config import ServiceConfig
    except ImportError as e:
        _unavailable(f"the service cannot be imported: {e}")
    from service_fixtures import shared_pipeline  # one embedded pipeline per test process, shared with the API tests

    config = ServiceConfig(data_dir=tmp_path_factory.mktemp("service"), tokens=(TOKEN,), pipeline=shared_pipeline())
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            _get(base + "/healthz", None)
            break
        except OSError:  # not listening yet, or 503 while the worker starts
            if time.monotonic() > deadline or not thread.is_alive():
                pytest.fail("the service was not ready within 60 s")
            time.sleep(0.05)
    yield base
    srv.should_exit = True
    thread.join(timeout=15)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Error as e:
            _unavailable(f"{CHROMIUM} does not start: {e}")
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh browser profile (empty localStorage: no token) on the page."""
    context = browser.new_context(viewport={"width": 1200, "height": 860})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server + "/")
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _enter_token(page) -> None:
    """What a user does after the 401: open the token box, paste the token, press Save."""
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)  # the job list needs a token
    assert "bearer token" in page.inner_text("#error")
    if not page.is_visible("#token"):
        page.click("#token-box summary")
    page.fill("#token", TOKEN)
    page.click("#token-save")
    page.wait_for_selector("#error", state="hidden", timeout=5_000)
    assert page.evaluate("localStorage.getItem('fluxrt.token')") == TOKEN


def _drop_file(page, selector: str, name: str, data: bytes) -> None:
    """What a drag-and-drop of one file from the desktop dispatches: dragover, then a drop carrying the file."""
    page.evaluate(
        """([selector, name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/png"}));
            const target = document.querySelector(selector);
            target.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
            target.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        [selector, name, base64.b64encode(data).decode()],
    )


def _wait_loaded(page, img) -> None:
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=img.element_handle())


def test_page_is_self_contained(server):
    """The page and its script and stylesheet come from fluxrt itself, without a token; nothing names another
    origin, so the page works offline."""
    html = _get(server + "/", None).decode()
    assert "/static/app.js" in html and "/static/style.css" in html
    for text in [html] + [_get(f"{server}/static/{name}", None).decode() for name in ("app.js", "style.css")]:
        assert len(text) > 1000
        assert "http://" not in text and "https://" not in text and "@import" not in text


def test_generate_with_references(page, server, tmp_path):
    """Token, prompt, size, steps, seed, one reference dropped and one picked -> live previews, then the image in
    the gallery with its parameters and a download link; after a reload the job list brings the card back."""
    steps = 8 * STEPS  # previews need the job to outlast the page's event-stream connection, even on a busy CI machine
    _enter_token(page)
    page.fill("#prompt", "a large red circle in the center on a white background")
    for field, value in (("width", SIDE), ("height", SIDE), ("steps", steps), ("seed", SEED)):
        page.fill(f"#{field}", str(value))
    _drop_file(page, "#dropzone", "dropped.png", _png("blue"))
    picked = tmp_path / "picked.png"
    picked.write_bytes(_png("yellow"))
    page.set_input_files("#ref-input", str(picked))
    assert page.locator("#refs li").count() == 2
    page.evaluate("""() => {  // collect the live previews shown while the job runs
        window.previewsSeen = new Set();
        new MutationObserver(() => document.querySelectorAll("#gallery img.preview").forEach(
            (img) => img.src.startsWith("data:image/png") && window.previewsSeen.add(img.src)))
            .observe(document.querySelector("#gallery"), {subtree: true, childList: true, attributes: true});
    }""")
    page.click("#submit")

    card = page.locator(".card[data-status=succeeded]")
    card.wait_for(timeout=GENERATE_TIMEOUT_MS)
    img = card.locator("img.result")
    _wait_loaded(page, img)
    assert img.evaluate("(img) => [img.naturalWidth, img.naturalHeight]") == [SIDE, SIDE]
    assert page.evaluate("window.previewsSeen.size") >= 1
    assert "a large red circle" in card.locator(".card-prompt").inner_text()
    shown = {key: card.locator(f"[data-param={key}]").inner_text() for key in ("size", "steps", "seed", "n_refs")}
    assert shown == {"size": f"{SIDE}×{SIDE}", "steps": str(steps), "seed": str(SEED), "n_refs": "2"}
    assert page.is_hidden("#error")

    job = json.loads(_get(f"{server}/v1/jobs/{card.get_attribute('data-job-id')}"))
    assert job["status"] == "succeeded" and job["params"]["n_refs"] == 2 and len(job["images"]) == 1
    link = card.locator("a.download")
    assert link.get_attribute("download").endswith(".png")
    assert _get(server + link.get_attribute("href"), None)[:8] == b"\x89PNG\r\n\x1a\n"  # a signed URL: no token
    page.screenshot(path=str(Path(os.environ.get("FLUXRT_WEB_SHOT", tmp_path / "web.png"))), full_page=True)

    page.reload()  # the token stays in localStorage; the gallery comes back from GET /v1/jobs
    _wait_loaded(page, page.locator(f'.card[data-job-id="{job["id"]}"] img.result'))
    assert page.is_hidden("#error")


def test_error_names_the_field(page, server):
    """A request the service rejects shows its message and marks the offending field; nothing is queued."""
    _enter_token(page)
    before = len(json.loads(_get(f"{server}/v1/jobs?limit=100"))["jobs"])
    page.fill("#prompt", "a small blue square")
    page.fill("#width", "65")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert "65" in page.inner_text("#error")
    assert page.get_attribute("#width", "aria-invalid") == "true"
    page.fill("#width", "64")  # typing in the field clears its mark
    assert page.get_attribute("#width", "aria-invalid") is None
    assert len(json.loads(_get(f"{server}/v1/jobs?limit=100"))["jobs"]) == before
