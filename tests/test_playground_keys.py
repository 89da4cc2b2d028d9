"""The playground (``GET /``) in headless Chromium against an app that requires API keys: the page is
open, but its calls (models, limits, the stream) need ``Authorization: Bearer``, so the page asks for
a key, says when one is refused, and generates once it has the right one."""

import pytest
import test_playground
from conftest import FIXTURE_DIR, REPO, serving
from test_playground import (
    LOADED,
    PROMPT,
    STATE,
    check_round_images,
    click,
    fill_form,
    save_screenshot,
    wait_until_drawn,
)

pytestmark = pytest.mark.integration

browser = test_playground.browser  # the module's headless Chromium, as a fixture of this module too
KEYS_ENV = "IRG_TEST_API_KEYS"
KEY = "sk-test-alice"
SCREENSHOT = REPO / "out" / "playground_key.png"

# The key form's message while it is shown and the key box is focused (to type in); null otherwise.
KEY_ASKED = """(() => {
    const form = document.getElementById('key-form');
    const asking = form !== null && !form.hidden && document.activeElement.id === 'api-key';
    return asking && form.querySelector('label').textContent;
})()"""


@pytest.fixture(scope="module")
def serve_url():  # this module's app: keys required
    with serving({KEYS_ENV: f"alice:{KEY}"}, require_api_key=True, api_keys_env=KEYS_ENV) as url:
        yield url


def enter_key(page, key: str) -> None:
    """Types ``key`` into the key form (as keyboard input) and submits it with a click."""
    page.evaluate("document.getElementById('api-key').focus()")
    page.call("Input.insertText", text=key)
    click(page, "use-key")


def test_the_playground_asks_for_a_key_says_when_it_is_refused_and_generates_with_the_right_one(
        serve_url, browser):
    page = browser()
    page.call("Page.navigate", url=f"{serve_url}/")
    asked = page.wait_for(KEY_ASKED, timeout=30, what="the page to ask for a key")
    assert "needs an API key" in asked, asked
    assert page.evaluate("document.getElementById('model').dataset.state") == "loading"  # nothing loaded without it

    enter_key(page, "sk-wrong")
    refused = page.wait_for(f"(() => {{ const m = {KEY_ASKED}; return m && m.includes('not accepted') && m; }})()",
                            timeout=30, what="the page to say the key was refused")
    assert page.evaluate("document.getElementById('api-key').value") == ""  # the refused key is not left there
    assert page.evaluate("sessionStorage.getItem('irg-api-key')") is None, refused

    enter_key(page, KEY)
    page.wait_for(LOADED, timeout=30, what="the model badge, with the key")
    assert page.evaluate("document.getElementById('model-id').textContent") == str(FIXTURE_DIR)
    assert page.evaluate("document.getElementById('key-form').hidden") is True
    assert page.evaluate("sessionStorage.getItem('irg-api-key')") == KEY  # kept for this tab
    assert page.evaluate("document.getElementById('rounds').min") != ""  # the limits came, with the key

    fill_form(page, PROMPT, size="64x64", steps=4, rounds=2, max_think_tokens=8, seed=7)
    click(page, "generate")
    wait_until_drawn(page, images=2)
    state = page.evaluate(STATE)
    assert state["error"] is None, state["error"]
    assert state["status"].startswith("Done"), state["status"]
    check_round_images(state["images"], rounds=2, size=(64, 64))
    assert all(t.strip() for t in state["thinks"]), state["thinks"]
    assert page.evaluate("document.getElementById('key-form').hidden") is True  # not asked again
    assert page.page_errors() == []
    size = save_screenshot(page, SCREENSHOT)
    print(f"key refused with {refused!r}; screenshot {SCREENSHOT} ({size} bytes)")
