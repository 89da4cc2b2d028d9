"""Issue 14: safe unpickling (EMA shards and DeepSpeed state), secrets out of reprs, a named store config that must
exist, non-finite request numbers, chosen names checked before they become paths or filters."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PicklePayload

from irg import storage
from irg.names import InvalidName, check_name
from irg.pipeline.settings import RoundSettings
from irg.train.checkpointing import read_checkpoint


def test_a_pickled_payload_in_an_ema_shard_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    (tmp_path / "ema").mkdir()
    torch.save({"shards": PicklePayload(str(marker))}, tmp_path / "ema" / "rank00000.pt")

    class Engine:
        def load_checkpoint(self, folder, tag):
            return folder, None

    class EMA:
        def load_state_dict(self, state):
            raise AssertionError("the shard was unpickled")

    with pytest.raises(Exception, match="[Ww]eights only"):
        read_checkpoint(str(tmp_path), Engine(), EMA(), rank=0)
    assert not marker.exists()


def test_store_config_repr_hides_the_secret_key_and_session_token():
    config = storage.StoreConfig(endpoint_url="http://127.0.0.1:1", access_key="AKID",
                                 secret_key="planted-secret-123", session_token="planted-token-456")
    for text in (repr(config), str(config), repr([config])):
        assert "planted-secret-123" not in text and "planted-token-456" not in text
        assert "AKID" in text


def test_a_missing_store_config_named_by_the_environment_is_an_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.json"
    monkeypatch.setenv(storage.CONFIG_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        storage.configured_store()


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_round_settings_are_refused(value):
    with pytest.raises(ValueError, match="timestep_shift must be a finite number"):
        RoundSettings(timestep_shift=value)
    with pytest.raises(ValueError, match="cfg_text_scale must be a finite number"):
        RoundSettings(cfg_text_scale=value)


def test_a_nan_think_temperature_is_refused(fixture_dir):
    from irg.model.checkpoint import read_config
    from irg.pipeline import InvalidRequestError
    from irg.pipeline.request import validate_request

    with pytest.raises(InvalidRequestError, match="think_temperature"):
        validate_request(read_config(fixture_dir), "a red cube", think_temperature=math.nan)


@pytest.mark.parametrize("name", ["it's", "../escape", "a/b", "with space", ""])
def test_names_with_path_or_quote_characters_are_refused(name):
    with pytest.raises(InvalidName):
        check_name(name, "run.name")


def test_a_run_name_is_checked_when_the_config_is_built():
    from irg.train.config import TrainConfig

    with pytest.raises(ValueError, match=r"run\.name '\.\./other-run': first character '\.' is not allowed"):
        TrainConfig.from_dict({"stage": 1, "run": {"name": "../other-run"}})


DEEPSPEED_RESUME = """
import json, os, sys
os.environ.update({"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": sys.argv[3],
                   "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
import torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
from irg.model import load_pretrained
from irg.train.config import load_config
from irg.train.engine import deepspeed_engine, prepare_model
folder, marker, _, stage = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
cfg = load_config("jobs/configs/tiny.yaml", 1, [f"deepspeed.zero_stage={stage}"])
engine = deepspeed_engine(prepare_model(load_pretrained(cfg.model.checkpoint).model, cfg), cfg)
engine.save_checkpoint(folder, tag="engine")
loaded, _ = engine.load_checkpoint(folder, tag="engine")  # DeepSpeed's own state types load
class Payload:
    def __reduce__(self):
        return (os.mkdir, (marker,))
optim = [f for f in os.listdir(os.path.join(folder, "engine")) if "optim_states" in f][0]
state = torch.load(os.path.join(folder, "engine", optim), weights_only=False)
state["planted"] = Payload()
torch.save(state, os.path.join(folder, "engine", optim))
try:
    engine.load_checkpoint(folder, tag="engine")
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {e}"
print(json.dumps({"first_load": loaded is not None, "error": error}))
os._exit(0)
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_a_pickled_payload_in_deepspeed_state_is_refused_on_resume(tmp_path, stage):
    """DeepSpeed's own loader unpickles anything: the engine IRG builds loads its state weights-only,
    DeepSpeed's few state types allowed (one process, gloo, in a subprocess to keep this one clean)."""
    import json
    import socket
    import subprocess
    import sys

    from conftest import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    marker = tmp_path / "code-ran"
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_RESUME, str(tmp_path / "ckpt"), str(marker), str(port),
                             str(stage)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["first_load"] is True
    assert outcome["error"].startswith("CheckpointError: DeepSpeed state") and "GLOBAL posix.mkdir" in outcome["error"]
    assert not marker.exists()
