"""MLflow for IRGL runs: where to track, which run a (re)started job logs to, and what it logs.

One parent run per IRGL job and one child run per stage. Runs are found by a key tag
(``irg.run_key``: the Ray Train run name), so a resubmitted job, like a restarted worker, continues
the run it had instead of opening a new one. Only rank 0 of the workers logs.
"""

from __future__ import annotations

import io
import os
import tempfile
import time

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, RunStatus
from PIL import Image

from irg import storage
from irg.train.config import TrackingSettings

RUN_KEY_TAG = "irg.run_key"
PARENT_TAG = "mlflow.parentRunId"


def tracking_uri(settings: TrackingSettings) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else a sqlite file under ``$IRG_HOME/mlflow``."""
    uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = storage.irg_home() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def configure(settings: TrackingSettings, store: storage.StoreConfig | None) -> str:
    """Point this process's MLflow at the tracking server and its artifact client at the object store."""
    if store is not None:
        for key, value in store.env().items():
            os.environ.setdefault(key, value)
    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    return uri


def artifact_location(settings: TrackingSettings, store: storage.StoreConfig | None) -> str | None:
    """Where new experiments keep artifacts: configured, else the object store's ``mlflow/`` prefix."""
    if settings.artifact_location:
        return settings.artifact_location
    if store is not None and store.endpoint_url:
        return store.uri("mlflow")
    return None


def experiment_id(client: MlflowClient, settings: TrackingSettings, store: storage.StoreConfig | None) -> str:
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(settings.experiment, artifact_location=artifact_location(settings, store))


def find_or_create_run(client: MlflowClient, experiment: str, key: str, parent_run_id: str | None = None,
                       tags: dict | None = None) -> str:
    """The run tagged ``irg.run_key=key`` (reopened), or a new one."""
    found = client.search_runs([experiment], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id
    run_tags = {RUN_KEY_TAG: key, **(tags or {})}
    if parent_run_id:
        run_tags[PARENT_TAG] = parent_run_id
    return client.create_run(experiment, run_name=key, tags=run_tags).info.run_id


class RunLogger:
    """Rank 0's handle on the stage run: metrics, params, images, the loss curve."""

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_params(self, params: dict[str, str]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        new = [mlflow.entities.Param(k, v[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i: i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), timestamp, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(artifact_file))
            image.save(path)
            self.client.log_artifact(self.run_id, path, os.path.dirname(artifact_file) or None)

    def log_loss_curve(self, metrics: tuple[str, ...] = ("loss_ce", "loss_mse")) -> Image.Image | None:
        """A PNG of the run's loss history (the latest value per step, so a resumed run draws one line)."""
        history = {}
        for name in metrics:
            points = {}
            for m in sorted(self.client.get_metric_history(self.run_id, name), key=lambda m: m.timestamp):
                points[m.step] = m.value
            if points:
                history[name] = sorted(points.items())
        if not history:
            return None
        image = loss_curve(history)
        self.log_image(image, "loss_curve.png")
        return image

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def loss_curve(history: dict[str, list[tuple[int, float]]]) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(history), figsize=(5 * len(history), 3.5), squeeze=False)
    for ax, (name, points) in zip(axes[0], history.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def image_strip(images: list[Image.Image]) -> Image.Image:
    """Rounds side by side, so one PNG shows the draft and its correction."""
    width = sum(i.width for i in images)
    strip = Image.new("RGB", (width, max(i.height for i in images)), "white")
    x = 0
    for image in images:
        strip.paste(image, (x, 0))
        x += image.width
    return strip
