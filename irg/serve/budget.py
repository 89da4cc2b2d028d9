"""Per-request compute budgets and per-key concurrency of the Serve application. No Ray here.

A request's cost (:func:`request_cost`) is counted before any model work, with the served model's
defaults for what the body leaves out (``GET /v1/limits``):

- ``pixel_steps`` = n × width × height × steps × rounds, the denoising work;
- ``think_tokens`` = n × max_think_tokens × rounds, the most tokens its thinks and reflections may
  sample.

Over a limit (:class:`Budget`) is a 400 in OpenAI's error shape (code ``budget_exceeded``) naming
the limit, its value and the request's cost, with ``param`` the field the client can lower. Each key
runs at most ``max_concurrent`` requests at once (:class:`ConcurrencyLimiter`, per Ingress replica);
one more is a 429 (code ``rate_limit_exceeded``) naming the limit.
"""

from __future__ import annotations

import contextlib
import dataclasses

from irg.serve.api import GenerationBody
from irg.serve.openai_api import OpenAIError

# 4 images of 1024x1024 at 64 steps and 4 rounds: 2**30 pixel-steps.
DEFAULT_MAX_REQUEST_PIXEL_STEPS = 4 * 1024 * 1024 * 64 * 4
# 4 images, 4 rounds, the reference's 1000-token think each: 16000 tokens.
DEFAULT_MAX_THINK_TOKENS_PER_REQUEST = 4 * 1000 * 4
DEFAULT_MAX_CONCURRENT_PER_KEY = 4
RETRY_AFTER_S = 5


@dataclasses.dataclass(frozen=True)
class Cost:
    pixel_steps: int
    think_tokens: int


def request_cost(body: GenerationBody, limits: dict[str, dict]) -> Cost:
    """What ``body`` asks for, its left-out fields taken from ``limits`` (:func:`irg.serve.api.body_limits`:
    each field's ``default``)."""
    def value(name):
        given = getattr(body, name)
        return given if given is not None else limits[name]["default"]

    width, height = (int(p) for p in str(value("size")).lower().split("x"))
    rounds = int(value("rounds"))
    return Cost(pixel_steps=body.n * width * height * int(value("steps")) * rounds,
                think_tokens=body.n * int(value("max_think_tokens")) * rounds)


@dataclasses.dataclass(frozen=True)
class Budget:
    """The most one request may ask for (``None``: no limit)."""

    max_request_pixel_steps: int | None = DEFAULT_MAX_REQUEST_PIXEL_STEPS
    max_think_tokens_per_request: int | None = DEFAULT_MAX_THINK_TOKENS_PER_REQUEST

    def check(self, body: GenerationBody, limits: dict[str, dict]) -> Cost:
        """The request's cost, or a 400 :class:`OpenAIError` naming the limit it exceeds and its value."""
        cost = request_cost(body, limits)
        if self.max_request_pixel_steps is not None and cost.pixel_steps > self.max_request_pixel_steps:
            raise over_budget("max_request_pixel_steps", self.max_request_pixel_steps, cost.pixel_steps,
                              "n × width × height × steps × rounds", _largest_of(body, ("steps", "size", "n")))
        if self.max_think_tokens_per_request is not None and cost.think_tokens > self.max_think_tokens_per_request:
            raise over_budget("max_think_tokens_per_request", self.max_think_tokens_per_request, cost.think_tokens,
                              "n × max_think_tokens × rounds", _largest_of(body, ("max_think_tokens", "n")))
        return cost


def _largest_of(body: GenerationBody, names: tuple[str, ...]) -> str:
    """The first of ``names`` the client set (the one it can lower), else the first."""
    return next((name for name in names if name in body.model_fields_set), names[0])


def over_budget(limit: str, value: int, cost: int, formula: str, param: str) -> OpenAIError:
    return OpenAIError(f"{param}: the request exceeds the server's {limit} of {value} ({formula} = {cost})",
                       param=param, code="budget_exceeded")


class ConcurrencyLimiter:
    """How many requests each key has running; :meth:`hold` refuses one over ``max_concurrent`` with a 429."""

    def __init__(self, max_concurrent: int | None = DEFAULT_MAX_CONCURRENT_PER_KEY):
        self.max_concurrent = max_concurrent
        self.running: dict[str, int] = {}

    def acquire(self, key: str) -> None:
        running = self.running.get(key, 0)
        if self.max_concurrent is not None and running >= self.max_concurrent:
            raise OpenAIError(f"too many concurrent requests: max_concurrent_per_key is {self.max_concurrent} and "
                              f"this key has {running} running; retry when one finishes", code="rate_limit_exceeded",
                              status=429, type="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.running[key] = running + 1

    def release(self, key: str) -> None:
        left = self.running.get(key, 0) - 1
        if left > 0:
            self.running[key] = left
        else:
            self.running.pop(key, None)

    @contextlib.contextmanager
    def hold(self, key: str):
        self.acquire(key)
        try:
            yield
        finally:
            self.release(key)
