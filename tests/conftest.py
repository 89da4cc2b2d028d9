"""Shared test helpers: where the tiny checkpoint lives and how to read its golden outputs."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file

from irg.embedded_store import free_port

if TYPE_CHECKING:
    from irg.model import PackedBatch

REPO = Path(__file__).resolve().parent.parent
FIXTURE_DIR = Path(__file__).parent / "fixtures" / "bagel_tiny"
GOLDEN_DIR = FIXTURE_DIR / "golden"


class PicklePayload:
    """A pickled object that, unpickled without ``weights_only``, creates the folder ``marker``: proof of
    code run from a file that should hold only tensors."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def load_golden(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and JSON scalars of one golden file, e.g. ``load_golden("irg_turn2")``."""
    tensors = load_file(str(GOLDEN_DIR / f"{name}.safetensors"))
    with open(GOLDEN_DIR / f"{name}.json") as f:
        meta = json.load(f)
    return tensors, meta


def load_case() -> dict:
    with open(FIXTURE_DIR / "case.json") as f:
        return json.load(f)


def golden_batch(tensors: dict[str, torch.Tensor], meta: dict) -> PackedBatch:
    """The reference's packed training batch of ``load_golden("train_forward")`` as a ``PackedBatch``."""
    from irg.model import PackedBatch

    b = {k.removeprefix("batch_"): v for k, v in tensors.items() if k.startswith("batch_")}
    return PackedBatch(
        sequence_length=meta["sequence_length"],
        sample_lens=meta["sample_lens"],
        packed_position_ids=b["packed_position_ids"],
        attention_masks=[b["nested_attention_mask_0"], b["nested_attention_mask_1"]],
        packed_text_ids=b["packed_text_ids"],
        packed_text_indexes=b["packed_text_indexes"],
        padded_images=b["padded_images"],
        patchified_vae_latent_shapes=[tuple(s) for s in meta["patchified_vae_latent_shapes"]],
        packed_latent_position_ids=b["packed_latent_position_ids"],
        packed_vae_token_indexes=b["packed_vae_token_indexes"],
        packed_timesteps=b["packed_timesteps"],
        mse_loss_indexes=b["mse_loss_indexes"],
        packed_vit_tokens=b["packed_vit_tokens"],
        packed_vit_position_ids=b["packed_vit_position_ids"],
        packed_vit_token_indexes=b["packed_vit_token_indexes"],
        vit_token_seqlens=b["vit_token_seqlens"],
        ce_loss_indexes=b["ce_loss_indexes"],
        packed_label_ids=b["packed_label_ids"],
        ce_loss_weights=b["ce_loss_weights"],
    )


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE_DIR


# --- markers: `pytest -m "not integration"` runs the unit tests alone -------------------------------

# Fixtures that start a service: a test using any of them (directly or through another fixture) is an
# integration test even if its module forgot to say so.
SERVICE_FIXTURES = frozenset({"s3_server", "s3_env", "serve_url", "ray_head"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


# After the summary is written, leave without interpreter teardown. Native finalizers of third-party
# libraries (the AWS SDK inside pyarrow's S3 filesystem, apache/arrow#38352; Ray's core worker threads)
# crash now and then while Python tears down, which turned a run whose tests all passed into exit 139.
# Every service a test started is stopped by its fixture before this point, so nothing is lost.
@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    status = getattr(config, "_irg_exit_status", None)
    if status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(status))


def pytest_sessionfinish(session, exitstatus):
    session.config._irg_exit_status = exitstatus


@pytest.fixture
def fake():
    """A fake OpenAI-compatible judge endpoint (``test_judge.FakeJudge``), for every test of a judge client."""
    from test_judge import FakeJudge

    server = FakeJudge()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(scope="module")
def pipe():
    """The tiny checkpoint's pipeline in float32 on the CPU, one per test module."""
    from irg.pipeline import IRGPipeline

    return IRGPipeline.from_pretrained(FIXTURE_DIR)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The goldens were computed with 2 CPU threads; keep results independent of the host's core count.
    torch.set_num_threads(2)
    yield


# --- S3-compatible object storage (SeaweedFS `weed mini` on 127.0.0.1) -----------------------------

S3_ACCESS_KEY = "irg-test-key"
S3_SECRET_KEY = "irg-test-secret"
S3_BUCKET = "irg-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One ``weed mini`` for the whole session, on free 127.0.0.1 ports (``weed`` is a test dependency:
    a missing binary fails the tests that need it rather than skipping them)."""
    from irg.embedded_store import SeaweedS3

    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs"), S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKET) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS environment pointed at ``s3_server``; yields the server.

    s3fs caches filesystem instances by their options, not by the environment they read credentials
    from, so the cache is cleared before and after: a test that changes credentials gets a fresh one.
    """
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def serving(env: dict[str, str] | None = None, ray_init: dict | None = None, **app_args):
    """A local Ray + Serve running the IRG app on the tiny model (app "irg" at "/") built from
    ``AppArgs(model=..., device="cpu", **app_args)``, with ``env`` set before Ray starts (so its
    replicas see it too) and ``ray_init`` added to ``ray.init``'s arguments; its base URL."""
    import ray
    from ray import serve

    from irg.serve.options import AppArgs
    from serve_apps.irg_app import build_app

    patch = pytest.MonkeyPatch()
    for name, value in (env or {}).items():
        patch.setenv(name, value)
    port = free_port()
    ray.init(**{"num_cpus": 2, "include_dashboard": False, "log_to_driver": False, **(ray_init or {})})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(AppArgs(model=str(FIXTURE_DIR), device="cpu", **app_args)), name="irg", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        patch.undo()


@pytest.fixture(scope="module")
def serve_url():
    """A local Ray + Serve running the IRG app on the tiny model (app "irg" at "/"); its base URL.
    A module may override it with its own app (:func:`serving`)."""
    with serving() as url:
        yield url


# --- a Ray cluster started the way users start one (`ray start --head`, jobs submitted to it) -------

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def ray_env():
    """Token authentication on, with a token of this test's own, for the head and every CLI call."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # `python` is this venv's, as when it is activated
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture
def ray_head(ray_env):
    """A head node started the way a user starts one, stopped afterwards whatever happens."""
    dashboard = free_port()
    env = ray_env
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                    "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
