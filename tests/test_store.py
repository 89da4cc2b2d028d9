"""The embedded object store (real ``weed mini`` daemons on loopback) and the one store configuration."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from irg import embedded_store, storage
from irg.storage import StoreConfig

try:
    embedded_store.find_weed()
except FileNotFoundError as e:  # pragma: no cover
    pytest.skip(str(e), allow_module_level=True)

STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "IRG_BUCKET",
             "IRG_STORE_CONFIG", "IRG_HOME", "MLFLOW_S3_ENDPOINT_URL")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No store settings from the machine: no AWS/IRG variables, and a home without a config file."""
    for name in STORE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def free_s3_port() -> int:
    return embedded_store.free_port_pairs(1)[0][0]


@pytest.fixture(scope="module")
def no_leaks():
    """Whatever a test in this module started is stopped at the end, even when it failed half-way."""
    before = set(embedded_store._children)
    yield
    for pid in set(embedded_store._children) - before:
        embedded_store._stop_pid(pid, 5.0)


@pytest.fixture(scope="module")
def running(tmp_path_factory, no_leaks):
    """One store for the read/write tests."""
    data_dir = tmp_path_factory.mktemp("store")
    port = free_s3_port()
    try:
        st = embedded_store.up(data_dir, embedded_store.local_config(port, bucket="irg"), s3_port=port)
        yield st
    finally:
        embedded_store.down(data_dir)


@pytest.fixture
def data_dir(tmp_path, no_leaks):
    """A data dir whose store, if a test starts one, is stopped afterwards."""
    path = tmp_path / "store"
    yield path
    embedded_store.down(path)


@pytest.mark.integration
def test_up_is_healthy_detached_and_recorded(running):
    assert running.running and running.healthy, running
    assert running.endpoint_url == f"http://127.0.0.1:{running.ports['s3']}"
    assert os.getsid(running.pid) == running.pid  # its own session: outlives the caller's terminal
    state = json.loads((running.data_dir / "store.json").read_text())
    assert state["pid"] == running.pid and state["endpoint_url"] == running.endpoint_url
    assert state["ports"]["s3"] == running.ports["s3"] and state["bucket"] == "irg"
    assert (running.data_dir / "weed.log").stat().st_size > 0
    assert running.config == embedded_store.local_config(running.ports["s3"])
    st = embedded_store.status(running.data_dir)
    assert st.running and st.healthy and st.pid == running.pid, st


@pytest.mark.integration
def test_fsspec_write_read(running, monkeypatch):
    fs = running.config.fsspec_filesystem()
    uri = running.config.uri("t", "hello.txt")
    assert uri == "s3://irg/t/hello.txt"
    with fs.open(uri, "wb") as f:
        f.write(b"hello store")
    assert fs.cat(uri) == b"hello store"
    # The module functions read the same configuration through the environment it exports.
    for name, value in running.config.env().items():
        monkeypatch.setenv(name, value)
    assert StoreConfig.load() == running.config
    with storage.open_file(uri) as f:
        assert f.read() == b"hello store"


@pytest.mark.integration
def test_pyarrow_parquet_write_read(running):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    fs = running.config.pyarrow_filesystem()
    table = pa.table({"mode": ["t2i", "irg"], "n": [1, 2], "img": [b"\x89PNG", b""]})
    path = running.config.uri("pq", "part-0.parquet").removeprefix("s3://")
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    # and s3fs sees what pyarrow wrote
    assert running.config.fsspec_filesystem().size(path) == fs.get_file_info(path).size


@pytest.mark.integration
def test_up_again_is_a_no_op(running):
    again = embedded_store.up(running.data_dir, s3_port=running.ports["s3"])
    assert again.pid == running.pid and again.healthy and "already running" in again.detail
    # asked for another port: still the running store, and it says so
    other = embedded_store.up(running.data_dir, s3_port=free_s3_port())
    assert other.pid == running.pid and other.endpoint_url == running.endpoint_url
    assert f"on port {running.ports['s3']}" in other.detail


@pytest.mark.integration
def test_down_up_keeps_data_and_down_is_idempotent(data_dir):
    # Started by another process that then exits (as `irg store up` does): the store outlives it.
    port = free_s3_port()
    code = f"from irg import embedded_store; embedded_store.up({str(data_dir)!r}, s3_port={port})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    first = embedded_store.status(data_dir)
    assert first.running and first.healthy and first.ports["s3"] == port, first
    assert first.pid not in embedded_store._children
    fs = first.config.fsspec_filesystem()
    fs.pipe(first.config.uri("keep", "me.bin"), b"persistent")

    stopped = embedded_store.down(data_dir)
    assert not stopped.running and "stopped" in stopped.detail
    assert not embedded_store._pid_alive(first.pid)
    assert not (data_dir / "store.json").exists()
    assert not embedded_store.status(data_dir).running
    again = embedded_store.down(data_dir)
    assert not again.running and "not running" in again.detail

    # a stale state file (its process long gone) is cleaned up by the next up
    (data_dir / "store.json").write_text(json.dumps({"pid": first.pid, "endpoint_url": "http://127.0.0.1:1"}))
    assert "stale" in embedded_store.status(data_dir).detail

    second = embedded_store.up(data_dir, s3_port=free_s3_port())
    assert second.healthy and second.pid != first.pid
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    assert second.config.fsspec_filesystem().cat(second.config.uri("keep", "me.bin")) == b"persistent"


def test_taken_port_is_a_clear_error(data_dir):
    port = free_s3_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        with pytest.raises(embedded_store.PortInUseError, match=rf"port {port} .*already in use.*--port") as info:
            embedded_store.up(data_dir, s3_port=port)
        assert info.value.port == port
    assert not (data_dir / "store.json").exists()
    assert not embedded_store.status(data_dir).running

    # the gRPC twin (port + 10000) is named too
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port + embedded_store.GRPC_OFFSET))
        blocker.listen()
        grpc = port + embedded_store.GRPC_OFFSET
        with pytest.raises(embedded_store.PortInUseError, match=rf"port {grpc} .*gRPC.*--port"):
            embedded_store.up(data_dir, s3_port=port)


def test_default_data_dir(monkeypatch, tmp_path):
    assert embedded_store.default_data_dir() == tmp_path / "home" / ".irg" / "store"
    monkeypatch.setenv("IRG_HOME", str(tmp_path / "irg"))
    assert embedded_store.default_data_dir() == tmp_path / "irg" / "store"


# --- StoreConfig -------------------------------------------------------------------------------------


def write_config(path, **values):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    return path


def test_load_defaults_without_file_or_env():
    config = StoreConfig.load()
    assert config == StoreConfig(endpoint_url=None, access_key=None, secret_key=None, region="us-east-1", bucket="irg")
    assert config.source is None


def test_load_precedence_file_then_env(tmp_path, monkeypatch):
    path = write_config(tmp_path / "cfg.json", endpoint_url="http://127.0.0.1:9000", access_key="file-key",
                        secret_key="file-secret", region="eu-west-1", bucket="file-bucket")
    from_file = StoreConfig.load(path)
    assert from_file == StoreConfig("http://127.0.0.1:9000", "file-key", "file-secret", "eu-west-1", "file-bucket")
    assert from_file.source == str(path)

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9100")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("IRG_BUCKET", "env-bucket")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "")  # empty counts as unset
    merged = StoreConfig.load(path)
    assert merged == StoreConfig("http://127.0.0.1:9100", "file-key", "env-secret", "eu-west-1", "env-bucket")

    # $IRG_STORE_CONFIG names the file when no path is given ...
    monkeypatch.setenv("IRG_STORE_CONFIG", str(path))
    assert StoreConfig.load() == merged
    # ... else the default file is read if it exists
    monkeypatch.delenv("IRG_STORE_CONFIG")
    assert StoreConfig.load().region == "us-east-1"
    write_config(tmp_path / "home" / ".config" / "irg" / "store.json", region="ap-south-1")
    assert StoreConfig.load().region == "ap-south-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert StoreConfig.load().region == "us-west-2"


def test_load_errors_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        StoreConfig.load(tmp_path / "missing.json")
    monkeypatch.setenv("IRG_STORE_CONFIG", str(tmp_path / "gone.json"))
    with pytest.raises(FileNotFoundError, match=r"gone\.json.*IRG_STORE_CONFIG"):
        StoreConfig.load()
    with pytest.raises(ValueError, match=r"bad\.json.*unknown key.*'endpoint'"):
        StoreConfig.load(write_config(tmp_path / "bad.json", endpoint="http://x"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        StoreConfig.load(tmp_path / "broken.json")


def test_env_contents_round_trip():
    config = StoreConfig("http://127.0.0.1:8333", "k", "s", "eu-central-1", "data")
    assert config.env() == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:8333",
        "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "eu-central-1", "AWS_REGION": "eu-central-1", "IRG_BUCKET": "data",
    }
    assert StoreConfig.load(environ=config.env()) == config
    aws = StoreConfig()
    assert "AWS_ENDPOINT_URL" not in aws.env() and "AWS_ACCESS_KEY_ID" not in aws.env()
    assert StoreConfig(bucket="b").uri() == "s3://b" and StoreConfig(bucket="b").uri("/x/", "y") == "s3://b/x/y"


def test_pyarrow_filesystem_takes_the_endpoint_explicitly():
    pytest.importorskip("pyarrow")
    fs = StoreConfig("https://minio.local:9000", "k", "s", "eu-west-1").pyarrow_filesystem()
    options = fs.__reduce__()[1][0]  # the constructor's arguments
    assert (options["endpoint_override"], options["scheme"]) == ("minio.local:9000", "https")
    assert (options["access_key"], options["secret_key"], options["region"]) == ("k", "s", "eu-west-1")
    with pytest.raises(ValueError, match="path prefix"):
        StoreConfig("http://127.0.0.1:9000/prefix").pyarrow_filesystem()


@pytest.mark.integration
def test_module_functions_follow_the_config_file(running, tmp_path, monkeypatch):
    """With only a config file (no AWS variables), the module functions reach the store, and a wrong
    secret is reported with the URI, the endpoint, the key and the file to fix."""
    path = write_config(tmp_path / "store.json", **running.config.to_dict())
    monkeypatch.setenv("IRG_STORE_CONFIG", str(path))
    uri = running.config.uri("cfgfile", "x.txt")
    with storage.open_file(uri, "wb") as f:
        f.write(b"via config file")
    assert storage.exists(uri)

    write_config(path, **(running.config.to_dict() | {"secret_key": "wrong"}))
    with pytest.raises(PermissionError) as info:
        storage.exists(uri)
    message = str(info.value)
    assert uri in message and running.endpoint_url in message and embedded_store.DEV_ACCESS_KEY in message
    assert str(path) in message and "Forbidden" in message
