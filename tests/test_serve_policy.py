"""Serving policy without Ray: API keys (irg.serve.auth) and budgets (irg.serve.budget)."""

import pytest
from pydantic import ValidationError

from irg.serve.api import GenerationBody, body_limits
from irg.serve.auth import KeyRing, MissingKeysError, is_loopback, keys_required, load_keys, parse_keys
from irg.serve.budget import Budget, ConcurrencyLimiter, request_cost
from irg.serve.openai_api import OpenAIError
from irg.serve.options import AppArgs

LIMITS = body_limits()  # DEFAULTS: the model's defaults for left-out fields


def test_keys_come_from_the_variable_and_its_file_with_names(tmp_path):
    assert parse_keys(" sk-a , ci:sk-b\n", "X") == {"sk-a": "key-1", "sk-b": "ci"}
    secret = tmp_path / "keys"
    secret.write_text("# mounted Secret\nalice:sk-alice\n\nsk-c:with:colons-needs-a-name\n")
    keys = load_keys("K", {"K": "sk-env", "K_FILE": str(secret)})
    assert keys == {"sk-env": "key-1", "sk-alice": "alice", "with:colons-needs-a-name": "sk-c"}
    assert load_keys("K", {}) == {}
    with pytest.raises(ValueError, match="K_FILE: cannot read"):
        load_keys("K", {"K_FILE": str(tmp_path / "missing")})


def test_keys_are_required_off_loopback_unless_configured():
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "0.0.0.0", "10.0.0.1", None)] == [
        True, True, True, True, False, False, False]
    assert keys_required(None, "0.0.0.0") and not keys_required(None, "127.0.0.1")
    assert keys_required(True, "127.0.0.1") and not keys_required(False, "0.0.0.0")
    with pytest.raises(MissingKeysError, match="IRG_API_KEYS.*IRG_API_KEYS_FILE"):
        KeyRing.from_env(True, environ={})
    assert KeyRing.from_env(False, environ={}).check(None) == "anonymous"


@pytest.mark.parametrize("header, message", [(None, "missing API key"), ("Basic sk-a", "missing API key"),
                                             ("Bearer ", "missing API key"), ("Bearer sk-x", "incorrect API key")])
def test_a_missing_or_wrong_key_is_a_401_in_openais_shape(header, message):
    ring = KeyRing({"sk-a": "alice"}, required=True)
    assert ring.check("Bearer sk-a") == ring.check("bearer  sk-a") == "alice"
    with pytest.raises(OpenAIError, match=message) as info:
        ring.check(header)
    error = info.value
    assert (error.status, error.type, error.code) == (401, "invalid_request_error", "invalid_api_key")
    assert error.headers == {"WWW-Authenticate": "Bearer"}


def test_a_requests_cost_counts_the_models_defaults_for_what_it_leaves_out():
    cost = request_cost(GenerationBody(prompt="a", n=2, size="64x32", steps=4, rounds=3, max_think_tokens=8), LIMITS)
    assert (cost.pixel_steps, cost.think_tokens) == (2 * 64 * 32 * 4 * 3, 2 * 8 * 3)
    width, height = (int(v) for v in LIMITS["size"]["default"].split("x"))
    default = request_cost(GenerationBody(prompt="a"), LIMITS)
    assert default.pixel_steps == width * height * LIMITS["steps"]["default"] * LIMITS["rounds"]["default"]
    assert default.think_tokens == LIMITS["max_think_tokens"]["default"] * LIMITS["rounds"]["default"]


def test_over_budget_is_a_400_naming_the_limit_its_value_and_the_field_to_lower():
    budget = Budget(max_request_pixel_steps=64 * 64 * 4 * 2, max_think_tokens_per_request=16)
    assert budget.check(GenerationBody(prompt="a", size="64x64", steps=4, rounds=2, max_think_tokens=8), LIMITS)
    cases = [({"size": "64x64", "steps": 8, "rounds": 2, "max_think_tokens": 8}, "max_request_pixel_steps",
              str(64 * 64 * 4 * 2), "steps"),
             ({"size": "64x64", "n": 2, "rounds": 1, "steps": 8, "max_think_tokens": 1}, "max_request_pixel_steps",
              str(64 * 64 * 4 * 2), "steps"),
             ({"size": "64x64", "steps": 4, "rounds": 2, "max_think_tokens": 9}, "max_think_tokens_per_request", "16",
              "max_think_tokens")]
    for fields, limit, value, param in cases:
        with pytest.raises(OpenAIError) as info:
            budget.check(GenerationBody(prompt="a", **fields), LIMITS)
        error = info.value
        assert (error.status, error.code, error.param) == (400, "budget_exceeded", param)
        assert f"{limit} of {value}" in error.message
    assert Budget(None, None).check(GenerationBody(prompt="a", steps=200, rounds=8), LIMITS)


def test_each_key_runs_at_most_its_concurrency():
    limiter = ConcurrencyLimiter(2)
    with limiter.hold("alice"), limiter.hold("alice"):
        limiter.acquire("bob")
        with pytest.raises(OpenAIError, match="max_concurrent_per_key is 2") as info:
            limiter.acquire("alice")
        assert (info.value.status, info.value.code, info.value.headers["Retry-After"]) == (
            429, "rate_limit_exceeded", "5")
    limiter.release("bob")
    assert limiter.running == {}
    unlimited = ConcurrencyLimiter(None)
    for _ in range(10):
        unlimited.acquire("anonymous")


def test_app_args_take_the_key_and_budget_settings():
    args = AppArgs(model="m", require_api_key=True, api_keys_env="MY_KEYS", max_request_pixel_steps=10,
                   max_think_tokens_per_request=None, max_concurrent_per_key=1)
    assert args.budget == Budget(10, None)
    assert AppArgs(model="m").require_api_key is None  # required unless Serve binds loopback
    with pytest.raises(ValidationError, match="max_concurrent_per_key"):
        AppArgs(model="m", max_concurrent_per_key=0)
    with pytest.raises(ValidationError, match="api_keys_env"):
        AppArgs(model="m", api_keys_env="not a name")
