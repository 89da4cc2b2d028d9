"""The HTTP API of the IRG generator: request bodies, their checks, and the response and event shapes.

No Ray here: the Serve application (``serve_apps/irg_app.py``) wires these to deployments. A body is
checked twice before any model work: its fields by pydantic (types, ranges, unknown fields), then
the whole request against the model configuration by :func:`irg.pipeline.validate_request`; both
errors name the field.
"""

from __future__ import annotations

import base64
import io
import json

from pydantic import BaseModel, ConfigDict, Field, field_validator

from irg.model import BagelConfig
from irg.pipeline import GenerationRequest, validate_request

MAX_PROMPT_CHARS = 4000


class GenerationBody(BaseModel):
    """``POST /v1/images/generations``: one prompt, ``n`` images per round (different seeds)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1, le=4)
    size: str = "1024x1024"  # WIDTHxHEIGHT, multiples of 16
    steps: int = Field(50, ge=2, le=200)
    rounds: int = Field(2, ge=1, le=4)
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_think_tokens: int = Field(256, ge=1, le=1000)

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        parts = value.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError("must be WIDTHxHEIGHT, e.g. 1024x1024")
        return value.lower()

    @property
    def width_height(self) -> tuple[int, int]:
        width, height = (int(p) for p in self.size.split("x"))
        return width, height

    def to_request(self, config: BagelConfig, default_seed: int) -> GenerationRequest:
        """The pipeline request (raises InvalidRequestError naming the field)."""
        width, height = self.width_height
        seed = self.seed if self.seed is not None else default_seed
        return validate_request(config, [self.prompt] * self.n, height=height, width=width, num_steps=self.steps,
                                rounds=self.rounds, seed=[seed + i for i in range(self.n)],
                                max_think_tokens=self.max_think_tokens)


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
