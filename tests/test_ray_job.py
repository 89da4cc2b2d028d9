"""The IRGL job as users submit it: `ray job submit --working-dir . -- python jobs/irgl.py` against a
local `ray start --head`, with the data and checkpoints on the object store and MLflow on sqlite."""

import json
import subprocess

import pytest
from conftest import RAY, REPO
from mlflow import MlflowClient

from irg.data.synth import write_synthetic

pytestmark = pytest.mark.integration  # `ray start --head`, SeaweedFS and a submitted job


def test_the_irgl_job_runs_on_a_submitted_cluster(s3_server, tmp_path, ray_env, ray_head):
    store_env = dict(s3_server.config.env())
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    data = s3_server.config.uri("job-synth")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in store_env.items():
            mp.setenv(key, value)
        write_synthetic(data, rows=8, seed=2, image_size=64, rows_per_file=8, progress=False)

    job_env = store_env | {"MLFLOW_TRACKING_URI": tracking, "IRG_HOME": str(tmp_path / "home")}
    settings = [f"data.root={data}", f"run.storage={s3_server.config.uri('job-runs')}", "run.max_steps=4",
                "run.checkpoint_every=2", "tracking.registered_model=irg-job"]
    command = [RAY, "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps({"env_vars": job_env}), "--",
               "python", "jobs/irgl.py", "--config", "jobs/configs/tiny.yaml", "--name", "submitted"]
    for item in settings:
        command += ["--set", item]
    done = subprocess.run(command, capture_output=True, text=True, env=ray_env, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in done.stdout + done.stderr

    client = MlflowClient(tracking)
    versions = client.search_model_versions("name = 'irg-job'")
    assert len(versions) == 1
    runs = {r.data.tags["irg.run_key"]: r for r in client.search_runs(
        [client.get_experiment_by_name("irgl-tiny").experiment_id])}
    assert set(runs) == {"submitted", "submitted-stage1", "submitted-stage2"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert versions[0].run_id == runs["submitted-stage2"].info.run_id
