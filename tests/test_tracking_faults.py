"""Tracking that survives an MLflow outage, idempotent registration, and no credentials in what a run
logs or in the workers' runtime_env (issue 14). The training-level drill is in tests/test_train.py."""

from __future__ import annotations

import logging
import time

import mlflow
import pytest
from conftest import FIXTURE_DIR
from mlflow import MlflowClient
from PIL import Image

from irg import registry, storage
from irg.embedded_store import free_port
from irg.tracking import BestEffortLogger, RunLogger, redact
from irg.train.config import DeepSpeedSettings, TrackingSettings, TrainConfig


@pytest.fixture
def sqlite_uri(tmp_path, monkeypatch):
    """A fresh sqlite MLflow, also the process default for the test (restored afterwards)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
    return uri


def new_run(uri: str) -> str:
    """A run whose artifacts stay beside the database (sqlite's default is ./mlruns, in the checkout)."""
    client = MlflowClient(uri)
    folder = uri.removeprefix("sqlite:///").rpartition("/")[0]
    return client.create_run(client.create_experiment("faults", f"file://{folder}/artifacts")).info.run_id


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "irg.tracking" and r.levelno == logging.WARNING]


def test_an_unreachable_server_costs_seconds_and_one_warning(caplog):
    logger = BestEffortLogger(f"http://127.0.0.1:{free_port()}", "0" * 32)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="irg.tracking"):
        logger.log_params({"a": "1"})
        for step in range(1, 6):
            logger.log_metrics({"loss": 1.0}, step)
        logger.set_tags({"irg.resumes": "1"})
        logger.log_image(Image.new("RGB", (4, 4)), "samples/x.png")
        assert logger.metric_history("loss") == []
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"{elapsed:.1f} s"  # MLflow's own retries alone would take minutes
    assert len(warnings_of(caplog)) == 1 and "skipped" in warnings_of(caplog)[0]
    assert logger.skipped == 9


def test_a_failed_call_is_retried_and_an_outage_ends_with_one_line(sqlite_uri, caplog, monkeypatch):
    logger = BestEffortLogger(sqlite_uri, new_run(sqlite_uri), backoff_s=0.01)
    real = logger.client.log_batch
    failures = {"left": 1}

    def flaky(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("tracking server restarting")
        return real(*args, **kwargs)

    monkeypatch.setattr(logger.client, "log_batch", flaky)
    with caplog.at_level(logging.WARNING, logger="irg.tracking"):
        logger.log_metrics({"loss": 1.0}, 1)  # fails once, the retry gets through
        assert warnings_of(caplog) == []
        failures["left"] = 10  # an outage longer than the retries
        logger.log_metrics({"loss": 2.0}, 2)
        logger.log_metrics({"loss": 3.0}, 3)
        failures["left"] = 0
        logger.log_metrics({"loss": 4.0}, 4)
    steps = sorted(m.step for m in MlflowClient(sqlite_uri).get_metric_history(logger.run_id, "loss"))
    assert steps == [1, 4]
    messages = warnings_of(caplog)
    assert len(messages) == 2 and "ConnectionError" in messages[0] and "2 logging call(s)" in messages[1]


def test_logged_params_and_tags_carry_no_credentials(sqlite_uri, tmp_path):
    cfg = TrainConfig(tracking=TrackingSettings(tracking_uri="http://alice:pw-PLANTED-1@mlflow.internal:5000"),
                      deepspeed=DeepSpeedSettings(extra={"comms_logger": {"api_token": "tok-PLANTED-2"},
                                                         "wandb": {"apiKey": "key-PLANTED-3"}}))
    logger = RunLogger(sqlite_uri, new_run(sqlite_uri))
    logger.log_params(cfg.flat())
    logger.set_tags({"irg.base_model": "s3://bob:pw-PLANTED-4@store/model"})
    run = MlflowClient(sqlite_uri).get_run(logger.run_id)
    logged = " ".join(list(run.data.params.values()) + list(run.data.tags.values()))
    database = (tmp_path / "mlflow.db").read_bytes()
    for secret in ("pw-PLANTED-1", "tok-PLANTED-2", "key-PLANTED-3", "pw-PLANTED-4"):
        assert secret not in logged and secret.encode() not in database, secret
    assert run.data.params["tracking.tracking_uri"] == "http://alice:***@mlflow.internal:5000"
    assert run.data.params["deepspeed.extra.comms_logger.api_token"] == "***"
    assert run.data.params["deepspeed.extra.wandb.apiKey"] == "***"
    # Nothing else is touched: max_tokens and the like are no tokens.
    assert redact(TrainConfig().flat()) == TrainConfig().flat()


def test_the_workers_runtime_env_carries_no_secret(sqlite_uri, tmp_path, monkeypatch):
    from irg.train.trainer import build_trainer

    store = storage.StoreConfig(endpoint_url="http://127.0.0.1:9", access_key="AKID", secret_key="secret-PLANTED",
                                session_token="token-PLANTED")
    for key in store.env():  # configure() fills in the driver's own environment: restore it afterwards
        monkeypatch.setenv(key, "from-the-environment")
    cfg = TrainConfig(tracking=TrackingSettings(tracking_uri="http://bob:pw-PLANTED@127.0.0.1:5000"))
    cfg.run.storage = str(tmp_path / "runs")
    env = build_trainer(cfg, store).run_config.worker_runtime_env["env_vars"]
    assert env, "the workers still need the endpoint and bucket"
    for value in env.values():
        assert "PLANTED" not in value, env
    assert "MLFLOW_TRACKING_URI" not in env  # it has a password: the workers take it from their environment


def test_registering_a_run_twice_gives_one_version(sqlite_uri):
    run_id = new_run(sqlite_uri)
    first = registry.log_model(str(FIXTURE_DIR), "irg-twice", run_id)
    again = registry.log_model(str(FIXTURE_DIR), "irg-twice", run_id)
    assert again.version == first.version
    assert len(MlflowClient(sqlite_uri).search_model_versions("name = 'irg-twice'")) == 1
