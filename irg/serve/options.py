"""The options of the Serve application, as pydantic models so that a mistake fails where it is made.

:class:`AppArgs` is what ``serve run serve_apps.irg_app:app key=value ...`` or a Serve config's
``args`` give the application builder: Serve validates them against it before building anything, so
an unknown argument or a device or dtype name that :mod:`irg.device` does not know is refused with
the field's name instead of failing later in a replica. Whether a CUDA device is really there is
still only known where a replica starts. :class:`BatchOptions` is the ``user_config`` of the
``Generator`` deployment when it runs one pipeline call at a time (``scheduler: call``): Serve applies
a change of it to running replicas (``reconfigure``), no restart.
No Ray here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from irg.device import AUTO, device_name, dtype_name
from irg.serve.auth import DEFAULT_KEYS_ENV
from irg.serve.budget import (
    DEFAULT_MAX_CONCURRENT_PER_KEY,
    DEFAULT_MAX_REQUEST_PIXEL_STEPS,
    DEFAULT_MAX_THINK_TOKENS_PER_REQUEST,
    Budget,
)


class AppArgs(BaseModel):
    """The application builder's arguments: which model, on what, and how long a request may take."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)  # a checkpoint folder, an s3:// URI, irg:NAME or models:/NAME@ALIAS
    device: str = AUTO
    dtype: str = AUTO
    request_timeout_s: float = Field(600.0, gt=0)  # beyond it a request gets a 504
    stream_keep_alive_s: float = Field(15.0, gt=0)  # a silent stream sends an SSE comment this often
    # Where response_format="url" images go (an s3:// prefix; None: serve/images in the configured
    # store's bucket) and how long their presigned URLs last (S3 signs for at most 7 days).
    image_store: str | None = Field(None, pattern=r"^s3://[^/]+")
    image_url_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600)
    # API keys (irg.serve.auth): None requires them unless Serve's HTTP host is loopback; the keys come
    # from $api_keys_env (comma-separated) and the file $api_keys_env_FILE names (one a line, name:key).
    require_api_key: bool | None = None
    api_keys_env: str = Field(DEFAULT_KEYS_ENV, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # Budgets (irg.serve.budget): what one request may cost (None: no limit), and how many requests
    # one key may run at once (per Ingress replica; only when keys are required).
    max_request_pixel_steps: int | None = Field(DEFAULT_MAX_REQUEST_PIXEL_STEPS, ge=1)  # n*width*height*steps*rounds
    max_think_tokens_per_request: int | None = Field(DEFAULT_MAX_THINK_TOKENS_PER_REQUEST, ge=1)  # n*tokens*rounds
    max_concurrent_per_key: int | None = Field(DEFAULT_MAX_CONCURRENT_PER_KEY, ge=1)
    # How a replica schedules its requests: "engine" advances every request one think token or
    # denoising step per iteration and admits new ones between iterations (irg.serve.engine_loop);
    # "call" runs one pipeline call at a time, same-shape requests batched by the user_config's
    # BatchOptions (the earlier scheduler, kept for comparison: benchmarks/serve_load.py).
    scheduler: Literal["engine", "call"] = "engine"
    # The engine's KV memory, allocated when a replica starts: kv_slots contexts of kv_slot_tokens
    # each (a prompt holds one slot, two from its second round); None sizes a slot for the model's
    # default request with a 256-token prompt. A request whose contexts could not fit gets a 400.
    kv_slots: int = Field(8, ge=1)
    kv_slot_tokens: int | None = Field(None, ge=64)

    @property
    def budget(self) -> Budget:
        return Budget(self.max_request_pixel_steps, self.max_think_tokens_per_request)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        device_name(value)  # a name irg.device knows; whether the device is there, the replica finds out
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        dtype_name(value)  # any spelling irg.device accepts (bf16, bfloat16, ...); raises naming dtype
        return value


class BatchOptions(BaseModel):
    """How a ``Generator`` replica batches concurrent requests of one shape into a pipeline call.

    ``max_batch_size`` requests at most go into one call (a replica's ``max_ongoing_requests`` should
    allow as many, or batches never fill); the first request of a batch waits up to
    ``batch_wait_timeout_s`` for company, trading that much latency for throughput.
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(4, ge=1)
    batch_wait_timeout_s: float = Field(0.1, ge=0)
