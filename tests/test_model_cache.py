"""A registered checkpoint is downloaded once per version into ``$IRG_HOME/cache/models`` (and only the
checkpoint: loading a model never unpickles code from the registry)."""

import ast
from pathlib import Path

import mlflow
import pytest
from conftest import FIXTURE_DIR
from mlflow import MlflowClient

from irg import registry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """Two versions of ``irg-cache`` in a fresh sqlite MLflow (the process default for the test only),
    ``IRG_HOME`` under tmp_path, and a counter of checkpoint downloads."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("IRG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
    artifacts = (tmp_path / "artifacts").as_uri()  # not sqlite's default ./mlruns, in the checkout
    mlflow.set_experiment(experiment_id=MlflowClient(uri).create_experiment("cache", artifact_location=artifacts))
    first, second = (registry.log_model(str(FIXTURE_DIR), "irg-cache") for _ in range(2))
    registry.promote("irg-cache", first.version)
    downloads = []
    real = mlflow.artifacts.download_artifacts

    def counted(**kwargs):
        downloads.append(kwargs["artifact_uri"])
        return real(**kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counted)
    return first, second, downloads, tmp_path / "home" / "cache" / "models" / "irg-cache"


def cached(version) -> Path:
    return registry.model_cache_dir(version.name, version.version, version.source)


def test_a_version_is_downloaded_once_and_a_new_version_gets_its_own_folder(registered):
    first, second, downloads, cache = registered
    path = registry.checkpoint_path("models:/irg-cache@champion")
    assert registry.checkpoint_path(f"models:/irg-cache/{first.version}") == path  # the alias names it too
    assert len(downloads) == 1 and Path(path) == cached(first) and cached(first).parent == cache
    assert (Path(path) / "llm_config.json").is_file()
    assert not list(Path(path).rglob("*.pkl"))  # the checkpoint only, not the pickled pyfunc

    other = registry.checkpoint_path(f"models:/irg-cache/{second.version}")
    assert Path(other) == cached(second) != Path(path) and len(downloads) == 2
    # No staging folder is left behind.
    assert sorted(cache.iterdir()) == sorted([cached(first), cached(second)])


def test_a_stale_staging_folder_is_not_used(registered):
    first, _, downloads, cache = registered
    stale = cache / f".{cached(first).name}.staging-crashed"
    stale.mkdir(parents=True)
    (stale / "llm_config.json").write_text("{half a file")
    path = registry.checkpoint_path("models:/irg-cache@champion")
    assert len(downloads) == 1 and Path(path) == cached(first)
    assert (Path(path) / "llm_config.json").read_bytes() == (FIXTURE_DIR / "llm_config.json").read_bytes()


def test_the_loser_of_a_race_keeps_the_winners_copy(registered, monkeypatch):
    first, _, downloads, cache = registered
    counted = mlflow.artifacts.download_artifacts

    def racing(**kwargs):  # another replica finishes its copy while ours downloads
        local = counted(**kwargs)
        cached(first).mkdir()
        (cached(first) / "winner").write_text("theirs")
        return local

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", racing)
    path = registry.checkpoint_path("models:/irg-cache@champion")
    assert (Path(path) / "winner").read_text() == "theirs"
    assert list(cache.iterdir()) == [cached(first)]  # our staging copy was deleted


def test_another_registrys_version_1_is_not_taken_from_the_cache(registered, tmp_path, monkeypatch):
    """The same name and version in a recreated registry is another model: it gets its own folder."""
    first, _, downloads, cache = registered
    registry.checkpoint_path(f"models:/irg-cache/{first.version}")
    uri = f"sqlite:///{tmp_path}/recreated.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
    artifacts = (tmp_path / "artifacts").as_uri()  # not sqlite's default ./mlruns, in the checkout
    mlflow.set_experiment(experiment_id=MlflowClient(uri).create_experiment("cache", artifact_location=artifacts))
    again = registry.log_model(str(FIXTURE_DIR), "irg-cache")
    assert again.version == first.version
    assert registry.checkpoint_path(f"models:/irg-cache/{again.version}") == str(cached(again)) != str(cached(first))
    assert len(downloads) == 2


def test_nothing_loads_a_registered_model_through_pyfunc():
    """``mlflow.pyfunc.load_model`` unpickles the logged python_model: Serve, evaluation and the jobs
    load the checkpoint files (checkpoint_path / checkpoint_uri) instead."""
    calls = []
    for folder in ("irg", "serve_apps", "jobs", "benchmarks"):
        for source in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text(), str(source))):
                if isinstance(node, ast.Attribute) and node.attr == "load_model":
                    calls.append(f"{source.relative_to(ROOT)}:{node.lineno}")
                if isinstance(node, ast.ImportFrom) and any(a.name == "load_model" for a in node.names):
                    calls.append(f"{source.relative_to(ROOT)}:{node.lineno}")
    assert calls == []


def test_a_name_mlflow_allows_but_a_folder_should_not_carry_is_cached_under_a_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("IRG_HOME", str(tmp_path))
    folder = registry.model_cache_dir("IRG ../Bagel", "3", "models:/m-123")
    assert folder.parent == tmp_path / "cache" / "models" / "_" and folder.name.startswith("3-")
    assert folder != registry.model_cache_dir("IRG Bagel", "3", "models:/m-123")


def test_irg_registers_only_names_it_can_filter_on():
    from irg.names import InvalidName

    with pytest.raises(InvalidName, match="registered model name \"it's\""):
        registry.log_model(str(FIXTURE_DIR), "it's")
