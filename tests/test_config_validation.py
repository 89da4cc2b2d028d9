"""Training settings are converted and checked when the config loads (and against the checkpoint and the
data in preflight), so a bad value is one line naming its field before any worker starts."""

import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from irg.names import InvalidName
from irg.train.config import ConfigError, TrainConfig, load_config, name_override

CONFIGS = REPO / "jobs" / "configs"
TINY = CONFIGS / "tiny.yaml"
NOT_IRGL = {"shapes-ae.yaml"}  # the autoencoder's own job (irg.train.autoencoder), not a TrainConfig


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in NOT_IRGL),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_for_its_stages(path):
    stages = sorted(yaml.safe_load(path.read_text()).get("stages") or {1: {}})
    for stage in stages:
        config = load_config(path, stage)
        assert config.stage == stage
        assert TrainConfig.from_dict(config.to_dict()) == config  # what the workers rebuild


def test_values_take_their_fields_types():
    config = load_config(TINY, 1, ["optim.lr=1e-5", "optim.grad_clip=1", "run.max_steps=1e3", "optim.eps='1e-8'"])
    assert config.optim.lr == 1e-5 and isinstance(config.optim.lr, float)  # YAML 1.1 reads 1e-5 as a string
    assert isinstance(config.optim.grad_clip, float) and config.optim.grad_clip == 1.0
    assert config.run.max_steps == 1000 and isinstance(config.run.max_steps, int)
    assert config.optim.eps == 1e-8
    assert config.optim.betas == (0.9, 0.95) and config.data.preprocess.vae_transform == (64, 32, 16)


@pytest.mark.parametrize("override, message", [
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage must be 0, 1, 2 or 3"),
    ("optim.ema_decay=1", "optim.ema_decay must be between 0 and 1"),
    ("optim.ema_decay=0", "optim.ema_decay must be between 0 and 1"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("optim.betas=[0.9, 1.0]", r"optim.betas must be two numbers in \[0, 1\)"),
    ("optim.betas=[0.9]", r"optim.betas: expected tuple\[float, float\], got \[0.9\]"),
    ("data.max_tokens=1000", r"data.max_tokens must be >= expected_tokens \(1536\)"),
    ("data.max_tokens_per_sample=4096", r"data.max_tokens_per_sample must be in 1..max_tokens \(2048\)"),
    ("data.weights={initial_full_learning: -1}", "data.weights must be weights >= 0"),
    ("data.weights={full: 1}", r"data.weights must be keyed by the modes .*\['full'\] is not one"),
    ("data.epoch_rows=0", "data.epoch_rows must be >= 1"),
    ("data.preprocess.vit_cond_dropout=1.5", r"data.preprocess.vit_cond_dropout must be in \[0, 1\]"),
    ("data.preprocess.vae_transform=[64, 32]", r"data.preprocess.vae_transform: expected tuple\[int, int, int\]"),
    ("scaling.num_workers=0", "scaling.num_workers must be >= 1"),
    ("scaling.use_gpu=1", "scaling.use_gpu: expected bool, got 1"),
    ("scaling.resources_per_worker={GPU: 1}", "scaling.resources_per_worker must be without GPUs"),
    ("run.max_steps=2.5", "run.max_steps: expected int, got 2.5"),
    ("run.fault_drill_step=31", r"run.fault_drill_step must be in 1..max_steps \(30\)"),
    ("tracking.sample_size=0", "tracking.sample_size must be >= 1"),
    ("optim.lr=[", "override 'optim.lr=\\[': '\\[' does not parse as YAML"),
])
def test_a_bad_value_names_its_field(override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(TINY, 1, [override])
    assert str(caught.value).startswith(f"{TINY}: ") and "\n" not in str(caught.value)


@pytest.mark.parametrize("name, char", [("it's", "'"), ("a/b", "/"), ("../runs", "."), ("-x", "-"), ('a"b', '"')])
def test_a_chosen_name_that_would_escape_a_path_or_filter_is_refused(name, char):
    with pytest.raises(ConfigError, match=f"run.name .*{char!r} is not allowed"):
        load_config(TINY, 1, [f"run.name={name}"])
    with pytest.raises(InvalidName, match=f"--name .*{char!r} is not allowed"):
        name_override(name)
    with pytest.raises(ConfigError, match="tracking.registered_model .* is not allowed"):
        load_config(TINY, 1, [f"tracking.registered_model={name}"])


def test_a_job_name_stays_a_string():
    assert load_config(TINY, 1, [name_override("2024")]).run.name == "2024"  # YAML alone reads an int


@pytest.mark.parametrize("argv, message", [
    (["jobs/irgl.py", "--config", str(TINY), "--set", "deepspeed.zero_stage=4"], "deepspeed.zero_stage must be"),
    (["jobs/train.py", "--stage", "1", "--config", str(TINY), "--name", "../elsewhere"], "--name '../elsewhere'"),
])
def test_a_job_with_a_bad_setting_exits_2_with_one_line_before_importing_ray(argv, message, tmp_path):
    poisoned = tmp_path / "ray"  # any import of Ray fails the job with a traceback
    poisoned.mkdir()
    (poisoned / "__init__.py").write_text("raise ImportError('the job imported Ray before checking its config')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "IRG_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr[-2000:]


@pytest.fixture(scope="module")
def stage2_rows(tmp_path_factory):
    """Four rows in each of stage 2's modes, on the local disk."""
    from irg.data.format import FULL_MODES
    from irg.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("irgl")
    write_synthetic(str(root), rows=4, modes=FULL_MODES, progress=False)
    return root


@pytest.mark.parametrize("override, message", [
    ("tracking.sample_size=4096", "tracking.sample_size: does not fit the model .*height: 4096 exceeds"),
    ("data.preprocess.vae_transform=[64, 32, 8]", "data.preprocess.vae_transform: does not fit the model"),
    ("data.epoch_rows=9", "data.epoch_rows 9 exceeds the 8 rows an epoch can draw"),
    ("scaling.num_workers=9", "scaling.num_workers 9 exceeds the 8 rows of an epoch"),
])
def test_preflight_holds_the_settings_to_the_checkpoint_and_the_data(stage2_rows, override, message):
    from irg.train.trainer import preflight  # imports Ray, starts nothing

    good = load_config(TINY, 2, [f"data.root={stage2_rows}"])
    assert sum(preflight(good, None)["rows_per_epoch"].values()) == 8
    with pytest.raises(ConfigError, match=message):
        preflight(load_config(TINY, 2, [f"data.root={stage2_rows}", override]), None)


def test_a_bad_stage2_setting_stops_the_job_before_stage1_starts(tmp_path, monkeypatch):
    """run_irgl holds both stages to the data before the first trains: a stage-2 mistake would
    otherwise surface after stage 1's hours. Nothing is tracked and no run is opened."""
    from irg.data.synth import write_synthetic
    from irg.train import trainer

    write_synthetic(str(tmp_path / "irgl"), rows=4, progress=False)
    common = [f"data.root={tmp_path / 'irgl'}", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    configs = {1: load_config(TINY, 1, common), 2: load_config(TINY, 2, [*common, "scaling.num_workers=9"])}
    monkeypatch.setattr(trainer, "run_stage", lambda *a, **k: pytest.fail("a stage started"))
    with pytest.raises(ConfigError, match="scaling.num_workers 9 exceeds the 8 rows of an epoch"):
        trainer.run_irgl(configs, job_name="bad-stage2")
    assert not (tmp_path / "mlflow.db").exists()
