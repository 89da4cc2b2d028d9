"""IRG models in the MLflow model registry: log a BAGEL-layout checkpoint as a pyfunc, register, promote.

The logged model carries the checkpoint files and the ``irg`` code, so ``mlflow.pyfunc.load_model(
"models:/NAME@champion")`` runs the generator wherever the pinned requirements are installed. Aliases
(``champion``, ``challenger``) replace the deprecated stages.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from irg import storage, tracking
from irg.names import check_name, is_valid_name

CHECKPOINT_ARTIFACT = "checkpoint"
DEFAULT_SEED = 0  # a prediction without a seed is repeatable


def generation_params(defaults) -> dict:
    """The generation settings a caller may pass as MLflow params, with the model's defaults (an
    :class:`irg.pipeline.GenerationDefaults`): the logged signature needs a value of each type, and
    MLflow fills in those a caller leaves out."""
    return {"height": defaults.height, "width": defaults.width, "num_steps": defaults.num_steps,
            "rounds": defaults.rounds, "seed": DEFAULT_SEED, "max_think_tokens": defaults.max_think_tokens,
            "think_temperature": float(defaults.think_temperature)}  # a file may say 0: the param is a float


class IRGModel(mlflow.pyfunc.PythonModel):
    """pyfunc: a DataFrame with a ``prompt`` column -> think texts and base64 PNGs of every round."""

    def load_context(self, context):
        from irg.pipeline import IRGPipeline

        self.pipe = IRGPipeline.from_pretrained(context.artifacts[CHECKPOINT_ARTIFACT], device="auto", dtype="auto")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        # (The DataFrame hint tells MLflow to validate against the logged signature, not the hints.)
        if isinstance(model_input, pd.DataFrame):
            prompts = [str(p) for p in model_input["prompt"]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(p) for p in model_input]
        # What the params leave out is the loaded model's default (MLflow passes the signature's, which
        # log_model took from the same checkpoint).
        outputs = self.pipe(prompts, **{"seed": DEFAULT_SEED, **(params or {})})
        return pd.DataFrame({
            "prompt": prompts,
            "texts": [list(o.texts) for o in outputs],
            "images": [[_png_base64(image) for image in o.images] for o in outputs],
        })


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode_image(data: str):
    """A base64 PNG from :meth:`IRGModel.predict` -> RGB PIL image. The bytes may come from any server,
    so they get the IRGL rows' guard: PNG, JPEG or WebP only, and a pixel cap."""
    from irg.data.format import decode_image as decode_row_image

    return decode_row_image(data, "image")


def requirements() -> list[str]:
    """The irg package's own pinned requirements (not its cluster/dev extras)."""
    return [r for r in metadata.requires("irg") or [] if "extra ==" not in r]


def log_model(model_uri: str, registered_model_name: str, run_id: str | None = None):
    """Log the BAGEL checkpoint at ``model_uri`` (folder, s3:// or irg:NAME) as a pyfunc in ``run_id``
    (or a new run) and register it; returns the new ``ModelVersion``, or the version ``run_id`` already
    registered under that name (a resubmitted job adds no version)."""
    from mlflow.models import infer_signature

    from irg.model.checkpoint import resolve_model
    from irg.pipeline import model_defaults

    check_name(registered_model_name, "registered model name")  # an MLflow filter value (list_models)
    if run_id is not None:
        existing = registered_version(registered_model_name, run_id)
        if existing is not None:
            return existing
    model_uri = resolve_model(model_uri)
    params = generation_params(model_defaults(model_uri))
    signature = infer_signature(pd.DataFrame({"prompt": ["a red cube"]}), params=params)
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_copy(model_uri, os.path.join(tmp, CHECKPOINT_ARTIFACT))
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pyfunc.log_model(
                name="irg", python_model=IRGModel(), artifacts={CHECKPOINT_ARTIFACT: local},
                code_paths=[str(Path(__file__).parent)], pip_requirements=requirements(), signature=signature,
                registered_model_name=registered_model_name,
            )
            mlflow.set_tag("irg.registered_model", f"{registered_model_name}/{info.registered_model_version}")
    client = MlflowClient()
    return client.get_model_version(registered_model_name, str(info.registered_model_version))


def registered_version(name: str, run_id: str):
    """The first version of ``name`` registered from run ``run_id``, or None."""
    check_name(run_id, "run id")  # a quote would break the filter string
    versions = [v for v in MlflowClient().search_model_versions(f"run_id = '{run_id}'") if v.name == name]
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _local_copy(uri: str, dest: str) -> str:
    """``dest``, holding the checkpoint's files. MLflow names an artifact after the folder it copies and
    readers look for ``checkpoint``, so a local folder is copied too (MLflow refuses links out of it)."""
    if not storage.is_remote(uri):
        shutil.copytree(os.path.abspath(uri.removeprefix("file://")), dest)
        return dest
    os.makedirs(dest)
    filesystem, path = storage.arrow_filesystem(uri)
    from pyarrow import fs as pafs

    for info in filesystem.get_file_info(pafs.FileSelector(path)):
        if info.is_file:
            with filesystem.open_input_stream(info.path) as src, open(os.path.join(dest, info.base_name), "wb") as dst:
                shutil.copyfileobj(src, dst)
    return dest


def promote(name: str, version: str, alias: str = "champion"):
    """Point ``alias`` at ``version`` of ``name`` (the previous holder loses it)."""
    client = MlflowClient()
    client.get_model_version(name, version)  # a clear error when it does not exist
    client.set_registered_model_alias(name, alias, version)
    return client.get_model_version(name, version)


def list_models(name: str | None = None) -> list[dict]:
    """Registered models (or one), each version with its aliases, source run and status."""
    client = MlflowClient()
    models = [client.get_registered_model(name)] if name else client.search_registered_models()
    rows = []
    for model in models:
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in client.search_model_versions(f"name = '{model.name}'"):
            number = str(version.version)
            rows.append({"name": model.name, "version": number, "aliases": sorted(aliases.get(number, [])),
                         "run_id": version.run_id, "status": version.status,
                         "created": pd.Timestamp(version.creation_timestamp, unit="ms").isoformat()})
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def checkpoint_path(model: str) -> str:
    """A checkpoint folder/URI for ``model``: itself (a folder, URI or ``irg:NAME``, which the checkpoint
    readers resolve), or for ``models:/NAME@ALIAS`` (or ``/VERSION``) the registered checkpoint in the
    local cache (:func:`cached_checkpoint`), downloaded on first use."""
    if not model.startswith("models:/"):
        return model
    return cached_checkpoint(model_version(model))


def model_cache_dir(name: str, version: str, source: str) -> Path:
    """``$IRG_HOME/cache/models/NAME/VERSION-DIGEST``: a registered version never changes, so one download
    serves every later start. The digest of the name and the version's source (its logged model or run)
    keeps apart the "version 1" of two registries, e.g. a recreated one. A name MLflow allows but a folder
    should not carry (a space, a slash) is cached under a digest alone."""
    digest = hashlib.sha256(f"{name}\n{source}".encode()).hexdigest()[:12]
    folder = name if is_valid_name(name) else "_"
    return storage.irg_home() / "cache" / "models" / folder / f"{int(version)}-{digest}"


def cached_checkpoint(version) -> str:
    """The local folder holding the checkpoint of ``version`` (a ``ModelVersion``), downloaded once.

    Only the checkpoint artifact is downloaded, never the pickled pyfunc. It goes into a staging
    sibling that is renamed into place when complete, so a crash or a concurrent replica never leaves
    a half copy where the next start looks; if another process renamed its copy first, that one is
    kept and ours deleted."""
    folder = model_cache_dir(version.name, version.version, version.source or version.run_id or "")
    if folder.is_dir():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent)
    try:
        source = f"models:/{version.name}/{version.version}/artifacts/{CHECKPOINT_ARTIFACT}"
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=staging)
        if not os.path.isdir(local) or not os.listdir(local):
            raise FileNotFoundError(f"models:/{version.name}/{version.version} is not an IRG model: "
                                    f"it has no {CHECKPOINT_ARTIFACT} artifact")
        try:
            os.replace(local, folder)
        except OSError:
            if not folder.is_dir():  # not a lost race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def model_version(model: str):
    """The ``ModelVersion`` that ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) names now: an alias
    moves when a version is promoted, so whoever keys work on a model keys it on the version."""
    tracking.configure()
    client = MlflowClient()
    name, _, ref = model.removeprefix("models:/").partition("@")
    if ref:
        return client.get_model_version_by_alias(name, ref)
    name, _, number = model.removeprefix("models:/").partition("/")
    return client.get_model_version(name, number)


def checkpoint_uri(model: str) -> str:
    """Like :func:`checkpoint_path`, but a registered model whose artifacts are in object storage gives
    the checkpoint's ``s3://`` URI there instead of a local download, so Ray workers on any node load
    it directly."""
    if not model.startswith("models:/"):
        return model
    version = model_version(model)  # configures tracking first
    client = MlflowClient()
    location = None
    if version.source.startswith("models:/m-"):
        location = client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
    if location and location.startswith(("s3://", "s3a://")):
        return storage.join(location, "artifacts", CHECKPOINT_ARTIFACT)
    return cached_checkpoint(version)

