"""MLflow tracking for every part that logs: training, evaluation, the registry and the CLI.

Where to track (:func:`tracking_uri`), pointing a process at it and at the object store
(:func:`configure`), experiments with their artifact location (:func:`experiment_id`), the run a
(re)started job logs to (:func:`find_or_create_run`: runs are found by a key tag, ``irg.run_key``, so a
resubmitted job continues its run instead of opening a new one), a small logger (:class:`RunLogger`)
and the one training uses (:class:`BestEffortLogger`: an MLflow outage must not stop a run). Params
and tags pass :func:`redact` first, so credentials in a config never reach the tracking server. What
only training logs (sample images, loss curves) lives in ``irg.train``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
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
MASK = "***"
# Words that make a config key's value a secret (whole words of the key: max_tokens is no token).
SECRET_WORDS = frozenset({"key", "keys", "secret", "secrets", "token", "password", "passwd", "pwd", "credential",
                          "credentials", "apikey"})
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@/\s]*@")
# MLflow retries a failed HTTP request 7 times with exponential backoff (minutes in all): the
# best-effort logger makes one try per attempt and does its own, short, retrying.
_ONE_HTTP_TRY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

log = logging.getLogger(__name__)


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


def worker_env(config: TrackingConfig | None, store: storage.StoreConfig | None) -> dict[str, str]:
    """The ``runtime_env`` variables a Ray job's workers need to reach the object store and the tracking
    server (the driver is configured too). No secrets: a runtime_env shows in the job's and actors'
    details, so store keys, and a tracking URI with a password, come from the workers' own environment."""
    env = store.env(secrets=False) if store else {}
    uri = configure(config, store)
    if hide_passwords(uri) == uri:
        env[TRACKING_URI_ENV] = uri
    return env


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


def hide_passwords(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it masked."""
    return _URI_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) config key names a credential: one of its words is in :data:`SECRET_WORDS`."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower())
    return not SECRET_WORDS.isdisjoint(words)


def redact(values: dict) -> dict:
    """What may be logged of a config dict (flat or nested): secret-looking keys' values masked,
    passwords in URIs hidden."""
    out = {}
    for key, value in values.items():
        if is_secret_key(key) and value not in (None, "", "None"):
            out[key] = MASK
        elif isinstance(value, dict):
            out[key] = redact(value)
        else:
            out[key] = hide_passwords(value) if isinstance(value, str) else value
    return out


def find_or_create_run(client: MlflowClient, experiment: str, key: str, parent_run_id: str | None = None,
                       tags: dict | None = None) -> str:
    """The run tagged ``irg.run_key=key`` (reopened), or a new one."""
    found = find_run(client, experiment, key)
    if found is not None:
        client.update_run(found.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return found.info.run_id
    run_tags = {RUN_KEY_TAG: key, **redact(tags or {})}
    if parent_run_id:
        run_tags[PARENT_TAG] = parent_run_id
    return client.create_run(experiment, run_name=key, tags=run_tags).info.run_id


class RunLogger:
    """A handle on one run: params (each logged once, so a resumed run keeps its first values), metrics,
    tags, dicts and images."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_params(self, params: dict[str, str]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in redact(params).items() if k not in existing]
        for i in range(0, len(new), BATCH):
            self.client.log_batch(self.run_id, params=new[i: i + BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), timestamp, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in redact(tags).items():
            self.client.set_tag(self.run_id, k, v)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def metric_history(self, name: str) -> list[Metric]:
        return self.client.get_metric_history(self.run_id, name)

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(artifact_file))
            image.save(path)
            self.client.log_artifact(self.run_id, path, os.path.dirname(artifact_file) or None)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def log_measurement(experiment: str, key: str, tags: dict[str, str], params: dict[str, str],
                    metrics: dict[str, float], files: dict[str, dict], images: dict[str, Image.Image],
                    tracking_uri: str | None = None) -> str:
    """One finished measurement (a benchmark's report) as a new run ``key`` of ``experiment``: params,
    metrics at step 0, JSON files and PNGs; the run is FAILED if logging fails. Returns its id."""
    store = storage.configured_store()
    config = TrackingConfig(tracking_uri=tracking_uri, experiment=experiment)
    uri = configure(config, store=store)
    client = MlflowClient(uri)
    logger = RunLogger(uri, find_or_create_run(client, experiment_id(client, config, store), key, tags=tags))
    try:
        logger.log_params(params)
        logger.log_metrics(metrics, step=0)
        for name, data in files.items():
            logger.log_dict(data, name)
        for name, image in images.items():
            logger.log_image(image, name)
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.finish("FINISHED")
    return logger.run_id


class BestEffortLogger(RunLogger):
    """The logger training uses: an MLflow outage (a restart, a network blip) must not raise inside a
    worker, where Ray Train would restart the whole group and use up ``max_failures``.

    A failed call is retried ``attempts`` times with a short backoff, then skipped (returning None) with
    one warning line; while the server stays away, later calls are tried once each and skipped quietly,
    so training runs at full speed. The next call that gets through ends the outage with one more line.
    Metrics of the skipped steps are missing from the run; the run goes on.
    """

    def __init__(self, uri: str, run_id: str, attempts: int = 3, backoff_s: float = 0.5):
        super().__init__(uri, run_id)
        self.attempts, self.backoff_s = attempts, backoff_s
        self.skipped = 0  # calls skipped since the server last answered

    def _try(self, call, *args):
        attempts = 1 if self.skipped else self.attempts
        for attempt in range(attempts):
            try:
                with _one_http_try():
                    result = call(*args)
            except Exception as e:  # noqa: BLE001 (any failure of tracking is skipped: training matters more)
                if attempt + 1 < attempts:
                    time.sleep(self.backoff_s * 2 ** attempt)
                    continue
                if not self.skipped:
                    reason = (str(e).strip().splitlines() or [""])[0][:200]
                    log.warning("MLflow at %s failed %s (%s: %s); logging is skipped until it answers, training "
                                "goes on", hide_passwords(self.uri), call.__name__, type(e).__name__, reason)
                self.skipped += 1
                return None
            if self.skipped:
                log.warning("MLflow at %s answers again; %d logging call(s) were skipped", hide_passwords(self.uri),
                            self.skipped)
                self.skipped = 0
            return result

    def log_params(self, params: dict[str, str]) -> None:
        self._try(super().log_params, params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._try(super().log_metrics, metrics, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._try(super().set_tags, tags)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._try(super().log_dict, data, artifact_file)

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        self._try(super().log_image, image, artifact_file)

    def metric_history(self, name: str) -> list[Metric]:
        return self._try(super().metric_history, name) or []


@contextmanager
def _one_http_try():
    """MLflow's HTTP client set to one try per request (it reads these variables at each request)."""
    saved = {name: os.environ.get(name) for name in _ONE_HTTP_TRY}
    os.environ.update(_ONE_HTTP_TRY)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
