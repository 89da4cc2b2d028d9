"""Nothing half-written is published: a write that fails halfway leaves no object at its final name
(and a file already there intact), on a local folder and on the embedded S3 store."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from conftest import FIXTURE_DIR

from irg import embedded_store, storage
from irg.data import manifest
from irg.eval import run
from irg.model import checkpoint, load_pretrained, save_pretrained


class Boom(RuntimeError):
    """The failure each test injects halfway through a write."""


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    """A folder to write into: a local one, or a fresh prefix in the embedded store's bucket."""
    if request.param == "local":
        return str(tmp_path)
    s3_env = request.getfixturevalue("s3_env")
    return f"s3://{s3_env.bucket}/atomic/{request.node.name.replace('[', '-').rstrip(']')}-{os.urandom(4).hex()}"


def listing(base: str) -> list[str]:
    """Every file under ``base``, relative to it (hidden staging files included)."""
    fs, path = storage.filesystem(base)
    fs.invalidate_cache()
    found = fs.find(path, detail=True)  # SeaweedFS keeps emptied folders: count files only
    return sorted(name[len(path):].lstrip("/") for name, info in found.items() if info["type"] == "file")


def read(uri: str) -> bytes:
    with storage.open_file(uri) as f:
        return f.read()


# --- one file: storage.open_file ----------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "data"), [("wb", b"new bytes"), ("w", "new text")])
def test_a_write_that_fails_halfway_leaves_the_old_file(base, mode, data):
    uri = storage.join(base, "out", "record.json")
    with storage.open_file(uri, "wb") as f:
        f.write(b"old")
    with pytest.raises(Boom), storage.open_file(uri, mode) as f:
        f.write(data)
        raise Boom
    assert read(uri) == b"old"
    assert listing(base) == ["out/record.json"]


def test_a_write_that_fails_halfway_leaves_no_new_file(base):
    uri = storage.join(base, "record.json")
    with pytest.raises(Boom), storage.open_file(uri, "w") as f:
        f.write("{")
        raise Boom
    assert not storage.exists(uri)
    assert listing(base) == []


def test_a_failed_multipart_upload_is_aborted(s3_env):
    uri = f"s3://{s3_env.bucket}/atomic/multipart.bin"
    fs, _ = storage.filesystem(uri)
    before = fs.default_block_size
    fs.default_block_size = 5 * 2**20  # S3's smallest part: the 6 MiB below start a multipart upload
    try:
        with pytest.raises(Boom), storage.open_file(uri, "wb") as f:
            f.write(os.urandom(6 * 2**20))
            assert f.mpu is not None
            raise Boom
    finally:
        fs.default_block_size = before
    assert not storage.exists(uri)
    pending = fs.call_s3("list_multipart_uploads", Bucket=s3_env.bucket, Prefix="atomic/multipart.bin")
    assert not pending.get("Uploads")


def test_a_write_that_succeeds_replaces_the_file_and_leaves_nothing_else(base):
    uri = storage.join(base, "record.json")
    for text in ("first", "second"):
        with storage.open_file(uri, "w") as f:
            f.write(text)
    assert read(uri) == b"second"
    assert listing(base) == ["record.json"]


# --- a whole folder: storage.staged_folder ------------------------------------------------------------


def test_a_staged_folder_that_fails_halfway_leaves_nothing(base):
    uri = storage.join(base, "model")
    with pytest.raises(Boom), storage.staged_folder(uri) as staging:
        with storage.open_file(storage.join(staging, "config.json"), "w") as f:
            f.write("{}")
        raise Boom
    assert not storage.exists(uri)
    assert listing(base) == []


def test_a_staged_folder_appears_whole_and_refuses_to_mix_with_old_content(base):
    uri = storage.join(base, "model")
    with storage.staged_folder(uri) as staging:
        for name in ("a.json", "sub/b.json"):
            with storage.open_file(storage.join(staging, name), "w") as f:
                f.write(name)
        assert not storage.exists(uri)
    assert listing(base) == ["model/a.json", "model/sub/b.json"]
    with pytest.raises(FileExistsError, match=f"{uri} already exists"), storage.staged_folder(uri):
        pass
    with storage.staged_folder(uri, overwrite=True) as staging, \
            storage.open_file(storage.join(staging, "c.json"), "w") as f:
        f.write("c")
    assert listing(base) == ["model/c.json"]


def test_a_move_into_place_that_fails_halfway_takes_its_copies_back(base, monkeypatch):
    """The publishing step itself breaks (S3: the second object's copy; local: the rename): nothing
    is left at the folder's name, and a folder that was there is back as it was."""
    uri = storage.join(base, "model")
    fs, _ = storage.filesystem(uri)
    copies = []

    def copy_once_then_fail(*args, **kwargs):
        if copies:
            raise Boom
        copies.append(args)
        return real_copy(*args, **kwargs)

    real_copy = fs.copy
    if storage.is_remote(uri):
        monkeypatch.setattr(fs, "copy", copy_once_then_fail)
    else:
        real_replace = os.replace

        def fail_to_publish(source, target):  # the staging folder's rename fails; putting old content back works
            if os.path.isdir(source) and ".partial-" in source and not source.endswith(".old"):
                raise Boom
            real_replace(source, target)

        monkeypatch.setattr(os, "replace", fail_to_publish)
    with pytest.raises(Boom), storage.staged_folder(uri) as staging:
        for name in ("a.json", "b.json"):
            with storage.open_file(storage.join(staging, name), "w") as f:
                f.write(name)
    assert listing(base) == []
    if not storage.is_remote(uri):
        os.makedirs(uri)
        open(os.path.join(uri, "old.json"), "w").close()
        with pytest.raises(Boom), storage.staged_folder(uri, overwrite=True) as staging, \
                storage.open_file(storage.join(staging, "a.json"), "w") as f:
            f.write("new")
        assert listing(base) == ["model/old.json"]


def test_a_relative_store_config_file_reaches_workers_as_an_absolute_path(tmp_path, monkeypatch):
    """A runtime_env names the config file instead of carrying its keys; Ray Train workers run in
    another directory, so the name must be absolute."""
    (tmp_path / "store.json").write_text(json.dumps({"endpoint_url": "http://127.0.0.1:1", "access_key": "a",
                                                      "secret_key": "planted-secret"}))
    monkeypatch.chdir(tmp_path)
    env = storage.StoreConfig.load(environ={storage.CONFIG_ENV: "store.json"}).env(secrets=False)
    assert env[storage.CONFIG_ENV] == str(tmp_path / "store.json")
    assert "planted-secret" not in json.dumps(env) and storage.SECRET_KEY_ENV not in env


# --- a checkpoint: save_pretrained --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_pretrained(FIXTURE_DIR)


def test_save_pretrained_that_fails_halfway_leaves_no_model(base, tiny, monkeypatch):
    def write_some_then_fail(f, state_dict, dtype=None):
        f.write(b"\0" * 1024)
        raise Boom

    monkeypatch.setattr(checkpoint, "write_safetensors", write_some_then_fail)
    uri = storage.join(base, "model")
    with pytest.raises(Boom):
        save_pretrained(uri, tiny.model, tiny.autoencoder, tiny.tokenizer)
    assert not storage.exists(uri)
    assert listing(base) == []


def test_save_pretrained_over_a_model_needs_overwrite(tmp_path, tiny):
    uri = str(tmp_path / "model")
    save_pretrained(uri, tiny.model, tiny.autoencoder, tiny.tokenizer)
    with pytest.raises(FileExistsError, match="model already exists"):
        save_pretrained(uri, tiny.model, tiny.autoencoder, tiny.tokenizer)
    save_pretrained(uri, tiny.model, tiny.autoencoder, tiny.tokenizer, generation_config={"steps": 3},
                    overwrite=True)
    assert json.loads((tmp_path / "model" / "generation_config.json").read_text()) == {"steps": 3}
    assert sorted(os.listdir(tmp_path)) == ["model"]


# --- records that mark work done: the import manifest, the evaluation's files ------------------------


class FailingSecondWrite:
    """A file whose first write goes through and whose second one fails (a full disk, a dropped link)."""

    def __init__(self, file):
        self.file, self.writes = file, 0

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def write(self, data):
        self.writes += 1
        if self.writes > 1:
            raise Boom
        return self.file.write(data)


@pytest.fixture
def failing_writes(monkeypatch):
    """Every ``storage.open_file`` for writing fails on its second write."""
    real = storage.open_file

    def open_file(uri, mode="rb", config=None):
        file = real(uri, mode, config)
        return FailingSecondWrite(file) if "w" in mode else file

    monkeypatch.setattr(storage, "open_file", open_file)


def test_a_manifest_write_that_fails_halfway_leaves_no_manifest(tmp_path, failing_writes):
    import pyarrow as pa
    import pyarrow.parquet as pq

    mode = tmp_path / "src" / manifest.MODES[0]
    mode.mkdir(parents=True)
    pq.write_table(pa.table({"conversation": pa.array([], pa.string())}), mode / "part-00000.parquet")
    with pytest.raises(Boom):
        manifest.import_dataset(str(tmp_path / "src"), str(tmp_path / "dst"), progress=False)
    assert not (tmp_path / "dst").exists() or os.listdir(tmp_path / "dst") == []


def test_evaluation_records_that_fail_halfway_are_not_left(tmp_path, failing_writes):
    cfg = run.EvalConfig(model="irg:tiny", name="atomic", output=str(tmp_path))
    with pytest.raises(Boom):
        run._claim_output(cfg, [], checkpoint="sha256:0")
    report = SimpleNamespace(to_dict=lambda: {"overall": 0.5})
    with pytest.raises(Boom):
        run._write_outputs(cfg, report, [{"id": 1}])
    assert os.listdir(tmp_path) == []


# --- the embedded store's own settings ----------------------------------------------------------------


@pytest.mark.parametrize("port", [0, -1, 65535, 70000])
def test_store_port_out_of_range_is_refused(tmp_path, port):
    with pytest.raises(ValueError, match=rf"S3 port {port} out of range: must be 1-55535"):
        embedded_store.up(tmp_path, s3_port=port)
    with pytest.raises(ValueError, match=rf"S3 port {port} out of range"):
        embedded_store.SeaweedS3(tmp_path, "key", "secret", "irg", s3_port=port).start()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bucket", ["Bad_Name", "ab", "a" * 64, "-irg", "irg.", "UPPER"])
def test_store_bucket_name_breaking_s3_rules_is_refused(tmp_path, bucket):
    config = embedded_store.local_config(bucket=bucket)
    with pytest.raises(ValueError, match=rf"invalid bucket name '{bucket}': S3 bucket names are 3-63 .* "
                                         "starting and ending with a letter or digit"):
        embedded_store.up(tmp_path, config)
    assert os.listdir(tmp_path) == []
