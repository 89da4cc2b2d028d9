"""The HTTP API of the IRG generator: request bodies, their checks, and the response and event shapes.

No Ray here: the Serve application (``serve_apps/irg_app.py``) wires these to deployments. A body is
checked twice before any model work: its fields by pydantic (types, ranges, unknown fields), then
the whole request against the model configuration by :func:`irg.pipeline.validate_request`; both
errors name the field. What a client leaves out is None here and gets the served model's default
(:attr:`irg.pipeline.IRGPipeline.defaults`); the bounds are the pipeline's (:data:`irg.pipeline.LIMITS`)
except for the serving budgets that have no pipeline counterpart (images per request, prompt length).
"""

from __future__ import annotations

import base64
import io
import json

from pydantic import BaseModel, ConfigDict, Field, field_validator

from irg.model import BagelConfig
from irg.pipeline import DEFAULTS, LIMITS, GenerationDefaults, GenerationRequest, PipelineEvent, validate_request
from irg.pipeline.settings import MAX_STEP_CACHE_INTERVAL

# Serving budgets (no pipeline counterpart): what one HTTP request may ask for.
MAX_PROMPT_CHARS = 4000
MAX_IMAGES_PER_REQUEST = 4
MAX_CFG_SCALE = 50.0  # ten times the reference's 4.0; beyond it the sampler only saturates


class GenerationBody(BaseModel):
    """``POST /v1/images/generations``: one prompt, ``n`` images per round (different seeds)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: str | None = None  # WIDTHxHEIGHT, multiples of 16
    steps: int | None = Field(None, ge=LIMITS.min_num_steps, le=LIMITS.max_num_steps)
    rounds: int | None = Field(None, ge=1, le=LIMITS.max_rounds)
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_think_tokens: int | None = Field(None, ge=1, le=LIMITS.max_think_tokens)
    # Classifier-free guidance over the model's round settings: the text scale in every round, the
    # image scale (guidance by the previous image) in rounds 2+, the only ones that have one.
    cfg_text_scale: float | None = Field(None, ge=0, le=MAX_CFG_SCALE, allow_inf_nan=False)
    cfg_img_scale: float | None = Field(None, ge=0, le=MAX_CFG_SCALE, allow_inf_nan=False)
    # Step caching in every round (RoundSettings.step_cache_interval): the model runs every N-th
    # denoising step and the steps between extrapolate it; left out, the model's setting (off).
    step_cache: int | None = Field(None, ge=1, le=MAX_STEP_CACHE_INTERVAL)

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = value.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError("must be WIDTHxHEIGHT, e.g. 1024x1024")
        return value.lower()

    @property
    def width_height(self) -> tuple[int | None, int | None]:
        if self.size is None:
            return None, None
        width, height = (int(p) for p in self.size.split("x"))
        return width, height

    def to_request(self, config: BagelConfig, default_seed: int,
                   defaults: GenerationDefaults = DEFAULTS) -> GenerationRequest:
        """The pipeline request (raises InvalidRequestError naming the field); what the body leaves
        out is None and takes the model's default (``defaults``)."""
        width, height = self.width_height
        seed = self.seed if self.seed is not None else default_seed
        return validate_request(config, [self.prompt] * self.n, height=height, width=width, num_steps=self.steps,
                                rounds=self.rounds, seed=[seed + i for i in range(self.n)],
                                round_settings=self.round_settings(defaults),
                                max_think_tokens=self.max_think_tokens, defaults=defaults)

    def round_settings(self, defaults: GenerationDefaults = DEFAULTS) -> list[dict] | None:
        """Each round's CFG and step-cache overrides (None: the model's settings throughout)."""
        if self.cfg_text_scale is None and self.cfg_img_scale is None and self.step_cache is None:
            return None
        rounds = self.rounds if self.rounds is not None else defaults.rounds
        every = {} if self.step_cache is None else {"step_cache_interval": self.step_cache}
        text = every if self.cfg_text_scale is None else {**every, "cfg_text_scale": self.cfg_text_scale}
        image = {} if self.cfg_img_scale is None else {"cfg_img_scale": self.cfg_img_scale}
        return [text] + [{**text, **image}] * (rounds - 1)


_BOUNDS = {"ge": "minimum", "le": "maximum", "min_length": "min_length", "max_length": "max_length"}


def body_limits(defaults: GenerationDefaults = DEFAULTS) -> dict[str, dict]:
    """Each body field's default and bounds, read off :class:`GenerationBody` (``GET /v1/limits``), so
    that a form (the playground) offers what the server accepts and cannot drift from it; a field the
    client may leave out (None in the body) shows the served model's default (``defaults``)."""
    left_out = {"size": f"{defaults.width}x{defaults.height}", "steps": defaults.num_steps,
                "rounds": defaults.rounds, "max_think_tokens": defaults.max_think_tokens}
    fields = {}
    for name, field in GenerationBody.model_fields.items():
        entry = {key: getattr(m, attr) for m in field.metadata for attr, key in _BOUNDS.items() if hasattr(m, attr)}
        default = left_out.get(name) if field.default is None else field.default
        if not field.is_required() and default is not None:
            entry["default"] = default
        fields[name] = entry
    return fields


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def response_body(model: str, outputs, created: int) -> dict:
    """Every round of every image: its think (round 1) or reflection (round 2+) text and its PNG."""
    return {
        "created": created,
        "model": model,
        "data": [{"seed": o.seed,
                  "rounds": [{"round": r + 1, "text": text, "b64_png": png_base64(image)}
                             for r, (text, image) in enumerate(zip(o.texts, o.images))]}
                 for o in outputs],
    }


def event_payload(event: PipelineEvent) -> tuple[str, dict] | None:
    """The server-sent event (name, data) for a pipeline event: a round's think text, a denoising
    step, a round's image, the end; None for think tokens, which
    :class:`irg.serve.batching.EventRouter` streams as deltas. Rounds count from 1
    as in the JSON response; ``index`` is the prompt's position in the pipeline batch (-1: all)."""
    if event.kind == "think_done":
        return "think", {"index": event.prompt_index, "round": event.round + 1, "text": event.text}
    if event.kind == "step":
        return "step", {"index": event.prompt_index, "round": event.round + 1, "step": event.step,
                        "num_steps": event.num_steps}
    if event.kind == "image":
        return "image", {"index": event.prompt_index, "round": event.round + 1, "b64_png": png_base64(event.image)}
    if event.kind == "done":
        return "done", {}
    return None


def sse(event: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def parse_sse(lines):
    """(event, data) pairs from the lines of a stream written by :func:`sse` (for clients)."""
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))
