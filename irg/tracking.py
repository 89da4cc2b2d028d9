"""MLflow tracking for every part that logs: training, evaluation, the registry and the CLI.

Where to track (:func:`tracking_uri`), pointing a process at it and at the object store
(:func:`configure`), experiments with their artifact location (:func:`experiment_id`), the run a
(re)started job logs to (:func:`find_or_create_run`: runs are found by a key tag, ``irg.run_key``, so a
resubmitted job continues its run instead of opening a new one) and a small logger
(:class:`RunLogger`). What only training logs (sample images, loss curves) lives in ``irg.train``.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from PIL import Image

from irg import storage
from irg.names import check_name

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
RUN_KEY_TAG = "irg.run_key"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH = 100  # params per log_batch call (MLflow accepts at most 100)


@dataclass
class TrackingConfig:
    """Where a job tracks and under which experiment."""

    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite under $IRG_HOME/mlflow
    experiment: str = "irgl"
    artifact_location: str | None = None  # default: s3://<bucket>/mlflow on the store, when there is one


def tracking_uri(config: TrackingConfig | None = None) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else a sqlite file under ``$IRG_HOME/mlflow``."""
    uri = (config.tracking_uri if config else None) or os.environ.get(TRACKING_URI_ENV)
    if uri:
        return uri
    folder = storage.irg_home() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def configure(config: TrackingConfig | None = None, store: storage.StoreConfig | None = None) -> str:
    """Point this process's MLflow at the tracking server and its artifact client at the object store
    (``store``, by default the configured one); returns the tracking URI."""
    store = store if store is not None else storage.configured_store()
    if store is not None:
        for key, value in store.env().items():
            os.environ.setdefault(key, value)
    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    return uri


def artifact_location(config: TrackingConfig, store: storage.StoreConfig | None) -> str | None:
    """Where new experiments keep artifacts: configured, else the object store's ``mlflow/`` prefix."""
    if config.artifact_location:
        return config.artifact_location
    if store is not None and store.endpoint_url:
        return store.uri("mlflow")
    return None


def experiment_id(client: MlflowClient, config: TrackingConfig, store: storage.StoreConfig | None) -> str:
    """The id of ``config.experiment``, created (with its artifact location) when it does not exist."""
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(config.experiment, artifact_location=artifact_location(config, store))


def find_run(client: MlflowClient, experiment: str, key: str):
    """The run of ``experiment`` (an id) tagged ``irg.run_key=key``, or None."""
    check_name(key, "run key")  # a quote would break the filter string
    found = client.search_runs([experiment], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
    return found[0] if found else None


def find_or_create_run(client: MlflowClient, experiment: str, key: str, parent_run_id: str | None = None,
                       tags: dict | None = None) -> str:
    """The run tagged ``irg.run_key=key`` (reopened), or a new one."""
    found = find_run(client, experiment, key)
    if found is not None:
        client.update_run(found.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return found.info.run_id
    run_tags = {RUN_KEY_TAG: key, **(tags or {})}
    if parent_run_id:
        run_tags[PARENT_TAG] = parent_run_id
    return client.create_run(experiment, run_name=key, tags=run_tags).info.run_id


class RunLogger:
    """A handle on one run: params (each logged once, so a resumed run keeps its first values), metrics,
    tags, dicts and images."""

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_params(self, params: dict[str, str]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), BATCH):
            self.client.log_batch(self.run_id, params=new[i: i + BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), timestamp, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(artifact_file))
            image.save(path)
            self.client.log_artifact(self.run_id, path, os.path.dirname(artifact_file) or None)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
