"""API keys and budgets on a real local Serve app, driven by the official ``openai`` client: the app
requires keys (``require_api_key: true``) from its own variable and has a small budget."""

import pytest
import requests
from conftest import FIXTURE_DIR, serving

pytestmark = pytest.mark.integration

KEYS_ENV = "IRG_TEST_API_KEYS"
KEY = "sk-test-alice"
SMALL = {"steps": 4, "rounds": 2, "max_think_tokens": 8, "seed": 7}
PIXEL_STEPS = 64 * 64 * 4 * 2  # the budget: one SMALL 64x64 image


@pytest.fixture(scope="module")
def serve_url():  # this module's app: keys required, a one-image budget
    with serving({KEYS_ENV: f"alice:{KEY},sk-test-bob"}, require_api_key=True, api_keys_env=KEYS_ENV,
                 max_request_pixel_steps=PIXEL_STEPS, max_think_tokens_per_request=16,
                 max_concurrent_per_key=2) as url:
        yield url


def client(url, key):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_a_wrong_or_missing_key_is_refused_and_the_right_one_generates(serve_url):
    import openai

    with pytest.raises(openai.AuthenticationError) as info:
        client(serve_url, "sk-wrong").images.generate(prompt="a red cube", size="64x64", extra_body=SMALL)
    assert (info.value.status_code, info.value.code) == (401, "invalid_api_key")
    for path in ("v1/models", "v1/limits"):
        missing = requests.get(f"{serve_url}/{path}", timeout=30)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer", missing.text
        assert missing.json()["error"]["code"] == "invalid_api_key"
    stream = requests.post(f"{serve_url}/v1/images/generations/stream", json={"prompt": "a", **SMALL}, timeout=30)
    assert stream.status_code == 401
    assert requests.get(f"{serve_url}/healthz", timeout=30).status_code == 200  # open
    assert requests.get(serve_url, timeout=30).status_code == 200  # the playground page, open

    response = client(serve_url, KEY).images.generate(prompt="a red cube", size="64x64", extra_body=SMALL)
    assert response.data[0].b64_json
    assert client(serve_url, "sk-test-bob").models.list().data[0].id


def test_an_over_budget_request_is_a_400_naming_the_limit_and_its_value(serve_url):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client(serve_url, KEY).images.generate(prompt="a red cube", size="64x64", extra_body={**SMALL, "steps": 8})
    error = info.value
    assert (error.status_code, error.code, error.param) == (400, "budget_exceeded", "steps"), error.body
    assert f"max_request_pixel_steps of {PIXEL_STEPS}" in error.message
    with pytest.raises(openai.BadRequestError, match="max_think_tokens_per_request of 16"):
        client(serve_url, KEY).images.generate(prompt="a", size="64x64", extra_body={**SMALL, "max_think_tokens": 9})
    native = requests.post(f"{serve_url}/v1/images/generations/stream", headers={"authorization": f"Bearer {KEY}"},
                           json={"prompt": "a", "size": "128x128", **SMALL}, timeout=30)
    assert native.status_code == 400 and "max_request_pixel_steps" in native.json()["detail"]
    limits = requests.get(f"{serve_url}/v1/limits", headers={"authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert limits["budget"] == {"max_request_pixel_steps": PIXEL_STEPS, "max_think_tokens_per_request": 16,
                                "max_concurrent_per_key": 2}


def test_the_app_refuses_to_build_when_keys_are_required_and_none_are_set(serve_url, monkeypatch):
    from irg.serve.auth import MissingKeysError
    from irg.serve.options import AppArgs
    from serve_apps import irg_app

    fixture = str(FIXTURE_DIR)
    with pytest.raises(MissingKeysError, match="IRG_NO_SUCH_KEYS"):
        irg_app.bind_app(AppArgs(model=fixture, require_api_key=True, api_keys_env="IRG_NO_SUCH_KEYS"))
    assert irg_app._http_host() == "127.0.0.1"  # this Serve's http_options host: keys not required by default
    irg_app.bind_app(AppArgs(model=fixture, api_keys_env="IRG_NO_SUCH_KEYS"))
    monkeypatch.setattr(irg_app, "_http_host", lambda: "0.0.0.0")  # any other host requires them
    with pytest.raises(MissingKeysError, match="IRG_NO_SUCH_KEYS"):
        irg_app.bind_app(AppArgs(model=fixture, api_keys_env="IRG_NO_SUCH_KEYS"))
