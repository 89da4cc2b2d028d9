"""IRGL end to end on a real local stack: SeaweedFS -> Ray Data -> Ray Train + DeepSpeed (2 CPU workers)
-> MLflow (sqlite, artifacts on the object store) -> export -> model registry.

One job runs both stages (stage 1 with ZeRO-2 and a worker killed mid-run, stage 2 with ZeRO-3 from
stage 1's EMA and its tracking server unreachable for one step); the tests below check what it left behind.
"""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
from conftest import FIXTURE_DIR, REPO
from mlflow import MlflowClient

from irg import registry, storage
from irg.data.format import FULL_MODES
from irg.data.synth import write_synthetic
from irg.pipeline import IRGPipeline
from irg.tracking import RUN_KEY_TAG
from irg.train import load_config
from irg.train.trainer import run_irgl

pytestmark = pytest.mark.integration  # a local Ray cluster, SeaweedFS, DeepSpeed workers and MLflow

JOB = "irgl-test"
TINY_CONFIG = str(REPO / "jobs" / "configs" / "tiny.yaml")
STAGE1_STEPS, STAGE2_STEPS, KILL_AT, OUTAGE_AT = 30, 6, 15, 3


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    """The AWS environment for the store, a sqlite MLflow, synthetic data and a 2-CPU Ray cluster."""
    home = tmp_path_factory.mktemp("irg_home")
    tracking = f"sqlite:///{home}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.config.env().items():
            mp.setenv(key, value)
        mp.setenv("IRG_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", tracking)
        data = s3_server.config.uri("train-synth")
        write_synthetic(data, rows=16, seed=5, image_size=64, rows_per_file=8, progress=False)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        mlflow.set_tracking_uri(tracking)
        yield {"data": data, "runs": s3_server.config.uri("train-runs"), "tracking": tracking, "home": home,
               "env": dict(s3_server.config.env()) | {"IRG_HOME": str(home), "MLFLOW_TRACKING_URI": tracking}}
        ray.shutdown()


def configs(stack, name=JOB):
    common = [f"data.root={stack['data']}", f"run.storage={stack['runs']}", f"model.checkpoint={FIXTURE_DIR}",
              f"run.name={name}", "tracking.registered_model=irg-test"]
    return {
        1: load_config(TINY_CONFIG, 1, common + [
            f"run.max_steps={STAGE1_STEPS}", "run.checkpoint_every=10", f"run.fault_drill_step={KILL_AT}"]),
        2: load_config(TINY_CONFIG, 2, common + [
            f"run.max_steps={STAGE2_STEPS}", "run.checkpoint_every=3", "deepspeed.zero_stage=3",
            f"tracking.outage_drill_step={OUTAGE_AT}"]),
    }


@pytest.fixture(scope="module")
def job(stack):
    results, version = run_irgl(configs(stack), job_name=JOB)
    return {"results": results, "version": version, "client": MlflowClient(stack["tracking"])}


def history(client, run_id, metric):
    """step -> value, the latest logged value of each step."""
    points = {}
    for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.timestamp):
        points[m.step] = m.value
    return points


def test_stage1_learns_and_survives_a_killed_worker(stack, job):
    client, run_id = job["client"], job["results"][1].run_id
    loss = history(client, run_id, "loss")
    assert sorted(loss) == list(range(1, STAGE1_STEPS + 1))  # one continuous step count across the restart
    first, last = np.mean([loss[s] for s in range(1, 6)]), np.mean([loss[s] for s in range(26, 31)])
    assert last < first - 0.5, f"loss went from {first:.3f} to {last:.3f}"
    # The drill really killed a worker: its marker is there and the run resumed once from step 10.
    marker = storage.join(stack["runs"], f"{JOB}-stage1", "fault_drill_done")
    assert storage.exists(marker)
    run = client.get_run(run_id)
    assert run.data.tags["irg.resumes"] == "1"
    assert job["results"][1].metrics["step"] == STAGE1_STEPS
    steps_logged = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert len(steps_logged) > STAGE1_STEPS  # steps 11..15 ran twice: before the kill and after the resume
    for metric in ("lr", "grad_norm", "tokens_per_s", "mfu"):
        assert len(history(client, run_id, metric)) == STAGE1_STEPS, metric
    for metric in ("loss_ce", "loss_mse"):  # absent only for a step where no worker had such a token
        values = history(client, run_id, metric)
        assert len(values) >= STAGE1_STEPS - 3 and min(values.values()) > 0, (metric, values)
    assert 0 < run.data.metrics["mfu"] < 1.5 and run.data.metrics["tokens_per_s"] > 0
    assert history(client, run_id, "lr")[1] == pytest.approx(1e-3 / 5)  # warm-up
    assert history(client, run_id, "lr")[10] == pytest.approx(1e-3)


def test_one_parent_run_with_a_child_run_per_stage(stack, job):
    client = job["client"]
    experiment = client.get_experiment_by_name("irgl-tiny")
    runs = client.search_runs([experiment.experiment_id])
    by_key = {}
    for run in runs:
        by_key.setdefault(run.data.tags[RUN_KEY_TAG], []).append(run)
    assert {k: len(v) for k, v in by_key.items()} == {JOB: 1, f"{JOB}-stage1": 1, f"{JOB}-stage2": 1}
    parent = by_key[JOB][0]
    for stage in (1, 2):
        child = by_key[f"{JOB}-stage{stage}"][0]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.params["deepspeed.zero_stage"] == {1: "2", 2: "3"}[stage]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "loss_curve.png" in artifacts
        samples = {a.path for a in client.list_artifacts(child.info.run_id, "samples")}
        last = STAGE1_STEPS if stage == 1 else STAGE2_STEPS
        assert f"samples/step_{last:07d}.png" in samples
    assert child.info.artifact_uri.startswith("s3://")  # artifacts live on the object store
    assert parent.data.tags["irg.model_uri"] == job["results"][2].model_uri


def test_stage2_runs_zero3_on_the_full_modes_from_the_stage1_ema(job):
    client = job["client"]
    stage1, stage2 = job["results"][1], job["results"][2]
    run = client.get_run(stage2.run_id)
    assert run.data.params["deepspeed.zero_stage"] == "3"
    assert run.data.tags["irg.base_model"] == stage1.model_uri
    weights = {k.removeprefix("data.weights."): float(v) for k, v in run.data.params.items()
               if k.startswith("data.weights.")}
    assert weights == {m: 1.0 for m in FULL_MODES}


def test_stage2_trains_through_a_tracking_outage(stack, job):
    """MLflow unreachable from the workers at step 3 (metrics, loss curve and sample of that checkpoint):
    the logging is skipped, training goes on in the same run, and Ray Train never restarted the workers."""
    client, stage2 = job["client"], job["results"][2]
    assert stage2.metrics["step"] == STAGE2_STEPS
    steps = set(range(1, STAGE2_STEPS + 1)) - {OUTAGE_AT}
    assert sorted(history(client, stage2.run_id, "loss")) == sorted(steps)
    assert sorted(history(client, stage2.run_id, "data_rows_read")) == [STAGE2_STEPS]
    samples = {a.path for a in client.list_artifacts(stage2.run_id, "samples")}
    assert samples == {f"samples/step_{STAGE2_STEPS:07d}.png"}
    run = client.get_run(stage2.run_id)
    assert run.info.status == "FINISHED" and "irg.resumes" not in run.data.tags  # no worker group restart
    experiment = client.get_experiment_by_name("irgl-tiny").experiment_id
    assert len(client.search_runs([experiment], f"tags.`{RUN_KEY_TAG}` = '{JOB}-stage2'")) == 1


def test_the_export_reproduces_the_trained_ema_model(stack, job):
    """The image the workers drew from their all-gathered EMA at the last checkpoint equals the one the
    exported BAGEL checkpoint draws (loaded without DeepSpeed), pixel for pixel."""
    from PIL import Image

    client, stage2 = job["client"], job["results"][2]
    logged = client.download_artifacts(stage2.run_id, f"samples/step_{STAGE2_STEPS:07d}.png",
                                       str(stack["home"] / "dl"))
    cfg = configs(stack)[2]
    pipe = IRGPipeline.from_pretrained(stage2.model_uri)
    t = cfg.tracking
    out = pipe(t.sample_prompt, height=t.sample_size, width=t.sample_size, num_steps=t.sample_steps, seed=0,
               max_think_tokens=t.sample_max_think_tokens, vae_transform=cfg.data.preprocess.vae_transform,
               vit_transform=cfg.data.preprocess.vit_transform)
    ours = np.concatenate([np.asarray(i) for i in out.images], axis=1).astype(int)
    theirs = np.asarray(Image.open(logged).convert("RGB")).astype(int)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1
    # ... and it is not simply the starting checkpoint.
    start = IRGPipeline.from_pretrained(FIXTURE_DIR).model.state_dict()
    trained = pipe.model.state_dict()
    assert any(not np.allclose(start[k].numpy(), trained[k].numpy()) for k in start)


def test_registry_round_trip(stack, job):
    version = job["version"]
    assert version is not None and version.name == "irg-test"
    env = {**os.environ, **stack["env"]}
    promote = subprocess.run([sys.executable, "-m", "irg.cli", "registry", "promote", "irg-test", str(version.version),
                              "--alias", "champion"], capture_output=True, text=True, env=env, timeout=120)
    assert promote.returncode == 0, promote.stderr
    listing = subprocess.run([sys.executable, "-m", "irg.cli", "registry", "list", "irg-test", "--json"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert [(r["version"], r["aliases"]) for r in rows] == [(str(version.version), ["champion"])]
    assert rows[0]["run_id"] == job["results"][2].run_id

    model = mlflow.pyfunc.load_model("models:/irg-test@champion")
    settings = {"height": 64, "width": 64, "num_steps": 4, "rounds": 2, "max_think_tokens": 16, "seed": 3}
    prediction = model.predict(pd.DataFrame({"prompt": ["two green squares"]}), params=settings)
    images = [registry.decode_image(b) for b in prediction["images"][0]]
    assert [i.size for i in images] == [(64, 64), (64, 64)] and len(prediction["texts"][0]) == 2
    direct = IRGPipeline.from_pretrained(job["results"][2].model_uri)("two green squares", **settings)
    assert np.array_equal(np.asarray(images[1]), np.asarray(direct.images[1]))
    # What Serve replicas load for a models:/ URI: the registered checkpoint itself.
    served = IRGPipeline.from_pretrained(registry.checkpoint_path("models:/irg-test@champion"))
    assert np.array_equal(np.asarray(served("two green squares", **settings).images[1]), np.asarray(direct.images[1]))

    missing = subprocess.run([sys.executable, "-m", "irg.cli", "registry", "promote", "irg-test", "99"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "99" in missing.stderr


def test_a_resubmitted_job_continues_its_runs(stack, job):
    """Same name again: both stages are already at their last step, so nothing trains, no run or model
    version is added."""
    client = job["client"]
    before = len(client.search_runs([client.get_experiment_by_name("irgl-tiny").experiment_id]))
    results, version = run_irgl(configs(stack), job_name=JOB)
    assert results[1].run_id == job["results"][1].run_id and results[2].run_id == job["results"][2].run_id
    assert version.version == job["version"].version
    assert len(client.search_model_versions("name = 'irg-test'")) == 1
    assert len(client.search_runs([client.get_experiment_by_name("irgl-tiny").experiment_id])) == before
    assert sorted(history(client, results[1].run_id, "loss")) == list(range(1, STAGE1_STEPS + 1))
