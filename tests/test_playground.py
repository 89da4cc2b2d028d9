"""The playground page (``GET /``) in headless Chromium against a real local Ray Serve with the tiny model.

Chromium is driven over the Chrome DevTools Protocol with a small client on ``websockets`` (which
Ray Serve already installs through uvicorn[standard]); ``make test`` installs Debian's ``chromium``.
"""

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import requests
from conftest import FIXTURE_DIR, REPO
from PIL import Image
from ray import serve
from websockets.sync.client import connect

from serve_apps.irg_app import PLAYGROUND

SCREENSHOT = REPO / "out" / "playground.png"
CHROMIUM = "/usr/bin/chromium"
PROMPT = "a red cube on the left of a blue ball"
WAIT_S = 60


@pytest.fixture(scope="module")
def server(serve_url):
    return serve_url


# --- a minimal Chrome DevTools Protocol client --------------------------------------------------------


class CDP:
    """One page target: ``call`` sends a command and returns its result; events that arrive meanwhile
    are kept in ``events``."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self.next_id += 1
        call_id = self.next_id
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = WAIT_S, what: str = ""):
        """Polls ``expression`` in the page until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = self.evaluate("document.body.innerText")
                raise AssertionError(f"timed out after {timeout} s waiting for {what or expression}; page:\n{state}")
            time.sleep(0.2)

    def page_errors(self) -> list[str]:
        errors = []
        for event in self.events:
            if event["method"] == "Runtime.exceptionThrown":
                errors.append(json.dumps(event["params"]["exceptionDetails"])[:500])
            elif event["method"] == "Runtime.consoleAPICalled" and event["params"]["type"] == "error":
                errors.append(json.dumps(event["params"]["args"])[:500])
        return errors


def stop_browser(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
    with contextlib.suppress(ProcessLookupError):  # helpers (zygote, renderers) left in the session it started
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium; yields a function that opens a fresh page target as a :class:`CDP`."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    profile = tmp_path_factory.mktemp("chromium-profile")
    log_path = profile.parent / "chromium.log"
    # Unwound in reverse: the pages' sockets, then the browser, then its log and profile (each even if one fails).
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, profile, ignore_errors=True)
        log = stack.enter_context(open(log_path, "wb"))
        # Port 0: Chromium picks a free port and writes it to DevToolsActivePort (no race with other processes).
        process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,860", "--force-color-profile=srgb",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stack.callback(stop_browser, process)
        active_port = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active_port.exists() and active_port.read_text().count("\n") >= 1):
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"Chromium did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        devtools = f"http://127.0.0.1:{int(active_port.read_text().splitlines()[0])}"

        def open_page() -> CDP:
            target = requests.put(f"{devtools}/json/new?about:blank", timeout=10).json()
            page = CDP(stack.enter_context(connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30)))
            page.call("Page.enable")
            page.call("Runtime.enable")
            page.call("Emulation.setDeviceMetricsOverride", width=1280, height=860, deviceScaleFactor=1, mobile=False)
            return page

        yield open_page


LOADED = """(() => {
    const badge = document.getElementById('model');  // null while the previous document is still shown
    return document.readyState === 'complete' && badge !== null && badge.dataset.state !== 'loading';
})()"""


def open_playground(browser, server) -> CDP:
    page = browser()
    page.call("Page.navigate", url=f"{server}/")
    page.wait_for(LOADED, timeout=30, what="the page and its model badge")
    return page


def fill_form(page: CDP, prompt: str, **settings) -> None:
    """Types the prompt (as keyboard input) and sets the settings' fields."""
    page.evaluate("document.getElementById('prompt').focus()")
    page.call("Input.insertText", text=prompt)
    for field, value in settings.items():
        page.evaluate(f"""(() => {{
            const input = document.getElementById({json.dumps(field)});
            input.value = {json.dumps(str(value))};
            input.dispatchEvent(new Event('input', {{bubbles: true}}));
            input.dispatchEvent(new Event('change', {{bubbles: true}}));
            return input.value;
        }})()""")


def click(page: CDP, element_id: str) -> None:
    """A real mouse click in the middle of the element (it must be visible and not covered)."""
    box = page.evaluate(f"""(() => {{
        const r = document.getElementById({json.dumps(element_id)}).getBoundingClientRect();
        return {{x: r.left + r.width / 2, y: r.top + r.height / 2}};
    }})()""")
    for kind in ("mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)


def wait_until_drawn(page: CDP, images: int) -> None:
    """Waits until the generation has ended with ``images`` decoded images, or shows an error."""
    page.wait_for(f"""(() => {{
        const s = {STATE};
        const drawn = s.images.length === {images} && s.images.every(i => i.complete && i.width > 0);
        return s.error !== null || (!s.running && drawn);
    }})()""", what=f"{images} round images")


def check_round_images(images: list[dict], rounds: int, size: tuple[int, int]) -> None:
    """One image per round, in order, each a PNG data URL that the page decoded at ``size``."""
    assert [i["round"] for i in images] == [str(r) for r in range(1, rounds + 1)], images
    for image in images:
        assert image["src"].startswith("data:image/png;base64,")
        assert (image["width"], image["height"]) == size
        decoded = Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1])))
        assert decoded.format == "PNG" and decoded.size == size


def save_screenshot(page: CDP, path) -> int:
    """Saves the top of the page as a PNG at ``path`` and checks that it is one, of a page that shows
    something (not blank); its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    shot = page.call("Page.captureScreenshot", format="png")
    path.write_bytes(base64.b64decode(shot["data"]))
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000, len(png)
    with Image.open(path) as screenshot:
        screenshot.verify()
    with Image.open(path) as screenshot:
        assert screenshot.size == (1280, 860)
        assert len(screenshot.convert("RGB").getcolors(maxcolors=1 << 20)) > 100  # not a blank page
    return len(png)


STATE = """(() => {
    const error = document.getElementById('error');
    return {
        error: error.hidden ? null : error.innerText,
        running: document.getElementById('generate').disabled,
        stopDisabled: document.getElementById('stop').disabled,
        status: document.getElementById('status').textContent,
        images: [...document.querySelectorAll('img.round-image')].map(img => ({
            src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
            round: img.closest('.card').dataset.round})),
        thinks: [...document.querySelectorAll('.card [data-role=think]')].map(t => t.textContent),
        cards: [...document.querySelectorAll('.card')].map(c => ({
            round: c.dataset.round, state: c.dataset.state,
            now: c.querySelector('[role=progressbar]').getAttribute('aria-valuenow'),
            max: c.querySelector('[role=progressbar]').getAttribute('aria-valuemax')})),
    };
})()"""


# Records the buttons' changes as they happen (a fast generation may finish between two polls).
WATCH_BUTTONS = """(() => {
    window.buttonChanges = {generateDisabled: false, stopEnabled: false};
    new MutationObserver((records) => {
        for (const r of records) {
            if (r.target.id === 'generate' && r.oldValue === null) window.buttonChanges.generateDisabled = true;
            if (r.target.id === 'stop' && r.oldValue !== null) window.buttonChanges.stopEnabled = true;
        }
    }).observe(document.getElementById('form'),
               {attributes: true, subtree: true, attributeFilter: ['disabled'], attributeOldValue: true});
})()"""


# Records, in order, what each round's card shows as it changes: every think text it displays (each
# replacement is a new text node, kept as it was then), each progress step and its image.
WATCH_ROUNDS = """(() => {
    window.shown = [];
    new MutationObserver((records) => {
        for (const r of records) {
            const card = r.target.closest('.card');
            if (!card) continue;
            const round = Number(card.dataset.round);
            if (r.type === 'attributes') window.shown.push({round, what: 'step'});
            else if (r.target.dataset.role === 'think') {
                for (const node of r.addedNodes) window.shown.push({round, what: 'think', text: node.data});
            } else if ([...r.addedNodes].some(node => node.tagName === 'IMG')) {
                window.shown.push({round, what: 'image'});
            }
        }
    }).observe(document.getElementById('run'),
               {subtree: true, childList: true, attributes: true, attributeFilter: ['aria-valuenow']});
})()"""


def check_shown_as_it_streamed(shown: list[dict], final_thinks: list[str]) -> None:
    """Each round's think text grew token by token before the round drew, and each round's image
    appeared before the next round began."""
    def first(round_number, what):
        return next(i for i, e in enumerate(shown) if (e["round"], e["what"]) == (round_number, what))

    for round_number, final in enumerate(final_thinks, start=1):
        texts = [e["text"] for e in shown if (e["round"], e["what"]) == (round_number, "think")]
        distinct = [t for i, t in enumerate(texts) if i == 0 or t != texts[i - 1]]
        assert len(distinct) > 2 and distinct[-1] == final, (round_number, distinct)
        settled = [t.rstrip("\ufffd") for t in distinct]  # but for a character whose bytes are still coming
        assert all(b.startswith(a) for a, b in zip(settled, settled[1:])), distinct
        last_think = max(i for i, e in enumerate(shown) if (e["round"], e["what"]) == (round_number, "think"))
        assert last_think < first(round_number, "step") < first(round_number, "image"), shown
        if round_number > 1:
            assert first(round_number - 1, "image") < first(round_number, "think"), shown


@pytest.mark.integration
def test_the_playground_streams_each_round_s_think_text_progress_and_image(server, browser):
    page = open_playground(browser, server)
    assert page.evaluate("document.title") == "IRG playground"
    assert page.evaluate("document.getElementById('model-id').textContent") == str(FIXTURE_DIR)
    settings = {"size": "64x64", "steps": 4, "rounds": 2, "max_think_tokens": 8, "seed": 7}
    fill_form(page, PROMPT, **settings)

    page.evaluate(WATCH_BUTTONS)
    page.evaluate(WATCH_ROUNDS)
    started = time.monotonic()
    click(page, "generate")
    wait_until_drawn(page, images=2)
    elapsed = time.monotonic() - started
    state = page.evaluate(STATE)

    assert state["error"] is None, state["error"]
    assert state["status"].startswith("Done"), state["status"]
    # While it ran, Generate was disabled and Stop offered; both are back as they were.
    assert page.evaluate("window.buttonChanges") == {"generateDisabled": True, "stopEnabled": True}
    assert not state["running"] and state["stopDisabled"]
    check_round_images(state["images"], rounds=2, size=(64, 64))
    assert len(state["thinks"]) == 2 and all(t.strip() for t in state["thinks"]), state["thinks"]
    for card in state["cards"]:  # every progress bar ran to its last step
        assert card["state"] == "done" and int(card["now"]) == int(card["max"]) == settings["steps"] - 1, card

    # The page shows exactly what the API gives for the same request and seed.
    body = requests.post(f"{server}/v1/images/generations", json={"prompt": PROMPT, **settings}, timeout=120).json()
    rounds = body["data"][0]["rounds"]
    assert state["thinks"] == [r["text"] for r in rounds]
    check_shown_as_it_streamed(page.evaluate("window.shown"), state["thinks"])
    assert [i["src"].split(",", 1)[1] for i in state["images"]] == [r["b64_png"] for r in rounds]
    assert page.page_errors() == []

    size = save_screenshot(page, SCREENSHOT)
    print(f"generation in the page took {elapsed:.1f} s; screenshot {SCREENSHOT} ({size} bytes)")


@pytest.mark.integration
def test_a_rejected_request_shows_the_server_s_message(server, browser):
    page = open_playground(browser, server)
    settings = {"size": "64x64", "steps": 1, "rounds": 2, "max_think_tokens": 8}
    fill_form(page, PROMPT, **settings)
    click(page, "generate")
    shown = "(() => { const e = document.getElementById('error'); return !e.hidden && e.innerText; })()"
    message = page.wait_for(shown, timeout=30, what="the error message")

    response = requests.post(f"{server}/v1/images/generations/stream", json={"prompt": PROMPT, **settings}, timeout=30)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail[0]["loc"][-1] == "steps"
    assert "422" in message and "steps" in message and detail[0]["msg"] in message, message
    state = page.evaluate(STATE)
    assert state["images"] == [] and not state["running"] and state["stopDisabled"]
    assert page.evaluate("getComputedStyle(document.getElementById('error')).display") != "none"
    assert page.page_errors() == []


@pytest.mark.integration
def test_stop_ends_the_generation_in_the_page_and_on_the_server(server, browser):
    page = open_playground(browser, server)
    generator = serve.get_deployment_handle("Generator", app_name="irg")
    before = generator.stats.remote().result()
    fill_form(page, "many shapes", size="256x256", steps=200, rounds=4, max_think_tokens=8)
    click(page, "generate")
    page.wait_for(f"({STATE}).cards.some(c => Number(c.now) > 0)", what="the first step")
    click(page, "stop")
    page.wait_for(f"!({STATE}).running", timeout=10, what="the page to stop")
    state = page.evaluate(STATE)
    assert state["status"].startswith("Stopped") and state["error"] is None, state
    assert state["stopDisabled"] and any(c["state"] == "stopped" for c in state["cards"]), state["cards"]
    deadline = time.monotonic() + 60  # the server stops the generation at its next step
    while generator.stats.remote().result()["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the stopped generation kept running on the server"
        time.sleep(0.2)
    assert page.page_errors() == []


def test_the_page_is_self_contained_and_uses_relative_urls():
    html = PLAYGROUND.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # no CDN or other external resource
    assert not re.search(r"""@import|url\(\s*["']?(https?:)?//""", html)
    assert not re.search(r"""["'`]/v1/""", html)  # API paths resolve against the page (route prefixes)
    assert "v1/images/generations/stream" in html and "v1/models" in html
