"""The evaluation job as users run it: `ray job submit ... jobs/evaluate.py` on a local `ray start
--head`, a registered model on the object store, stopped part way (`ray job stop`) and submitted
again: it keeps what was finished, generates the rest and reports to the same MLflow run."""

import json
import subprocess
import time

import mlflow
import pytest
from conftest import FIXTURE_DIR, RAY, REPO
from mlflow import MlflowClient

from irg import registry, storage, tracking
from irg.cli import main as irg_main

pytestmark = pytest.mark.integration  # `ray start --head`, SeaweedFS and submitted jobs

PROMPTS = 12


def submit(address, env, job_env, submission_id, *args, wait=True):
    command = [RAY, "job", "submit", "--address", address, "--submission-id", submission_id,
               "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"env_vars": job_env})]
    command += ([] if wait else ["--no-wait"]) + ["--", "python", "jobs/evaluate.py", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def finished(output: str) -> dict[str, str]:
    """record.json of each finished sample -> its last-modified time."""
    fs, path = storage.filesystem(output)
    fs.invalidate_cache()
    return {p: str(fs.info(p)["LastModified"]) for p in fs.glob(f"{path}/samples/*/*/record.json")}


def test_evaluation_job_resumes_after_a_stop_and_reports_to_mlflow(s3_server, tmp_path, ray_env, ray_head,
                                                                   monkeypatch, capsys):
    store_env = dict(s3_server.config.env())
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    for key, value in store_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("IRG_HOME", str(tmp_path / "home"))
    tracking.configure()
    mlflow.set_experiment(experiment_id=MlflowClient().create_experiment(
        "models", artifact_location=s3_server.config.uri("mlflow")))
    version = registry.log_model(str(FIXTURE_DIR), "irg-eval-test")
    registry.promote("irg-eval-test", version.version)
    model = "models:/irg-eval-test@champion"
    assert registry.checkpoint_uri(model).startswith("s3://")  # the actors read it from the store

    output = s3_server.config.uri("eval/e2e")
    job_env = store_env | {"MLFLOW_TRACKING_URI": tracking_uri, "IRG_HOME": str(tmp_path / "home")}
    args = ["--model", model, "--benchmark", "shapes", "--limit", str(PROMPTS), "--size", "64", "--steps", "12",
            "--max-think-tokens", "24", "--batch-size", "1", "--name", "e2e"]
    started = submit(ray_head, ray_env, job_env, "eval-first", *args, wait=False)
    assert started.returncode == 0, started.stderr[-3000:]
    deadline = time.monotonic() + 300
    while len(finished(output)) < 3:
        assert time.monotonic() < deadline, "the first job produced no samples"
        time.sleep(0.2)
    subprocess.run([RAY, "job", "stop", "--address", ray_head, "eval-first"], env=ray_env, capture_output=True,
                   timeout=120, check=True)
    before = finished(output)
    assert 3 <= len(before) < PROMPTS, f"{len(before)} samples done before the stop"

    done = submit(ray_head, ray_env, job_env, "eval-second", *args)
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-4000:]
    after = finished(output)
    assert len(after) == PROMPTS
    assert {p: after[p] for p in before} == before  # finished samples were kept, not generated again
    kept = len(finished(output)) - (PROMPTS - len(before))
    assert f"{kept} of {PROMPTS} samples are already in" in logs or f"{len(before)} of {PROMPTS}" in logs

    with storage.open_file(f"{output}/report.json", "r") as f:
        report = json.load(f)
    assert set(report["rounds"]) == {"round1", "round2"}
    assert report["counts"] == {c: 2 for c in ("single_object", "two_object", "counting", "colors", "position",
                                               "color_attr")}
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("irg-eval").experiment_id])
    assert [r.data.tags["irg.run_key"] for r in runs] == ["e2e"]  # the second job continued the first's run
    run = runs[0]
    assert run.info.status == "FINISHED"
    for r in ("round1", "round2"):
        assert run.data.metrics[f"{r}/overall"] == pytest.approx(report["rounds"][r]["overall"])
    assert run.data.metrics["delta/overall"] == pytest.approx(report["rounds"]["round2"]["overall"]
                                                              - report["rounds"]["round1"]["overall"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "grid.png"} <= artifacts
    with storage.open_file(f"{output}/samples/00000/0/record.json", "r") as f:
        record = json.load(f)
    assert len(record["texts"]) == 2 and record["settings"]["steps"] == 12

    capsys.readouterr()
    assert irg_main(["eval", "compare", "e2e", run.info.run_id]) == 0
    table = capsys.readouterr().out
    assert "A round1" in table and "overall" in table and "+0.000" in table  # the same run on both sides
    assert irg_main(["eval", "show", "nope"]) == 2
