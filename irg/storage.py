"""One way to open files whether they live on local disk or in S3-compatible object storage.

Where the object store is, and how to sign in to it, is one :class:`StoreConfig`: every part (the
module functions here, Ray Data, Ray Train checkpoints, MLflow artifacts, model loading) gets its
filesystem or its environment from it, so they cannot disagree. :meth:`StoreConfig.load` reads, in
order, each later source overriding the earlier:

1. a JSON config file: the ``path`` given, else ``$IRG_STORE_CONFIG``, else
   ``~/.config/irg/store.json`` (``$XDG_CONFIG_HOME/irg/store.json``) if it exists, else the client
   file of the running embedded store (``$IRG_HOME/store/client.json``, written by ``irg store up``), e.g.
   ``{"endpoint_url": "http://127.0.0.1:8333", "access_key": "...", "secret_key": "...",
   "region": "us-east-1", "bucket": "irg"}``;
2. the environment: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
   ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``IRG_BUCKET`` (an empty variable counts as unset).

``s3://bucket/key`` URIs go through s3fs with that configuration; everything else is a local path
(``file://`` included), so plain local paths work wherever an ``s3://`` URI does.

Nothing half-written is published: :func:`open_file` writes a file atomically, and
:func:`staged_folder` a whole folder (a checkpoint, an export).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import secrets
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import fsspec
from fsspec.spec import AbstractBufferedFile

# The names and defaults every part uses (the embedded store, jobs, Ray runtime environments).
CONFIG_ENV = "IRG_STORE_CONFIG"
BUCKET_ENV = "IRG_BUCKET"
HOME_ENV = "IRG_HOME"
ENDPOINT_ENV = "AWS_ENDPOINT_URL"
ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
SESSION_TOKEN_ENV = "AWS_SESSION_TOKEN"
REGION_ENV = "AWS_DEFAULT_REGION"
MLFLOW_ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"  # MLflow's artifact client ignores AWS_ENDPOINT_URL
DEFAULT_REGION = "us-east-1"
DEFAULT_BUCKET = "irg"

# Environment variable -> StoreConfig field; the environment overrides the config file.
_ENV_FIELDS = {
    ENDPOINT_ENV: "endpoint_url",
    ACCESS_KEY_ENV: "access_key",
    SECRET_KEY_ENV: "secret_key",
    SESSION_TOKEN_ENV: "session_token",
    REGION_ENV: "region",
    BUCKET_ENV: "bucket",
}


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "irg" / "store.json"


def irg_home() -> Path:
    """Where IRG keeps local state (the embedded store, the local MLflow database): ``$IRG_HOME`` or ~/.irg."""
    return Path(os.environ.get(HOME_ENV) or os.path.join(os.path.expanduser("~"), ".irg"))


def embedded_client_path() -> Path:
    """Client config of the embedded store (``irg store up`` writes it, ``irg store down`` removes it)."""
    return irg_home() / "store" / "client.json"


@dataclass(frozen=True, repr=False)
class StoreConfig:
    """Where the object store is and how to sign in to it.

    ``endpoint_url`` None means the default AWS endpoint; ``access_key``/``secret_key`` None means
    botocore's (or pyarrow's) own credential chain.
    """

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str = DEFAULT_REGION
    bucket: str = DEFAULT_BUCKET
    session_token: str | None = None
    # Where the values came from (the config file, if any), for error messages; not part of equality.
    source: str | None = dataclasses.field(default=None, compare=False, repr=False)

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> StoreConfig:
        """The configuration from the config file (see the module docstring), overridden by the environment.

        A ``path`` given or named by ``$IRG_STORE_CONFIG`` must exist; the default one is optional.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        source = None
        file = Path(path) if path is not None else Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None
        for fallback in (default_config_path(), embedded_client_path()):
            if file is None and fallback.is_file():
                file = fallback
        if file is not None:
            values = cls._read_file(file, named_by="path" if path is not None else CONFIG_ENV)
            source = str(file.expanduser().resolve())  # absolute: workers run in another directory
        for name, field in _ENV_FIELDS.items():
            if env.get(name):
                values[field] = env[name]
        return cls(**values, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> StoreConfig:
        """The configuration in one JSON file alone, without the environment."""
        return cls(**cls._read_file(Path(path), named_by="path"), source=str(Path(path).expanduser().resolve()))

    @classmethod
    def _read_file(cls, file: Path, named_by: str) -> dict[str, Any]:
        fields = {f.name for f in dataclasses.fields(cls)} - {"source"}
        try:
            text = file.read_text()
        except FileNotFoundError:
            how = f"named by ${CONFIG_ENV}" if named_by == CONFIG_ENV else "given"
            raise FileNotFoundError(f"store config file {str(file)!r} ({how}) does not exist") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"store config file {str(file)!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise ValueError(f"store config file {str(file)!r} must hold a JSON object, not {kind}")  # noqa: TRY004
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"store config file {str(file)!r}: unknown key(s) {unknown}; known: {sorted(fields)}")
        bad = {k: v for k, v in data.items() if v is not None and not isinstance(v, str)}
        if bad:
            raise ValueError(f"store config file {str(file)!r}: values must be strings or null, got {bad}")
        return {k: v for k, v in data.items() if v is not None}

    def __repr__(self) -> str:  # the dataclass repr would print the secret key into logs and tracebacks
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict(secrets=False).items())
        return f"StoreConfig({fields})"

    def replace(self, **changes) -> StoreConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self, secrets: bool = True) -> dict[str, str | None]:
        """The fields as JSON-ready values (the form the config file takes); ``secrets=False`` masks them."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        if not secrets:
            out = {k: ("***" if v and k in ("secret_key", "session_token") else v) for k, v in out.items()}
        return out

    # --- what other parts get ------------------------------------------------------------------

    @property
    def has_keys(self) -> bool:
        return bool(self.access_key and self.secret_key)

    def env(self, secrets: bool = True) -> dict[str, str]:
        """Environment variables that carry this configuration to a subprocess or a Ray ``runtime_env``.

        The standard AWS variables (read by botocore, s3fs and :meth:`load`), ``MLFLOW_S3_ENDPOINT_URL``
        (MLflow's artifact client ignores ``AWS_ENDPOINT_URL``) and ``IRG_BUCKET``. Unset fields are
        left out, so the receiver falls back to its own defaults for them. ``secrets=False`` is for a
        Ray ``runtime_env``, which job and actor details show: the keys are left out (workers read them
        from their own environment, e.g. a Kubernetes ``secretKeyRef``), and a config read from a file
        is named by ``$IRG_STORE_CONFIG`` instead, so workers that can see the file read the keys there.
        """
        out: dict[str, str] = {}
        if self.endpoint_url:
            out[ENDPOINT_ENV] = self.endpoint_url
            out[MLFLOW_ENDPOINT_ENV] = self.endpoint_url
        if self.has_keys and secrets:
            out[ACCESS_KEY_ENV] = self.access_key
            out[SECRET_KEY_ENV] = self.secret_key
            if self.session_token:
                out[SESSION_TOKEN_ENV] = self.session_token
        if not secrets and self.source:
            out[CONFIG_ENV] = self.source
        out[REGION_ENV] = self.region
        out["AWS_REGION"] = self.region
        out[BUCKET_ENV] = self.bucket
        return out

    def s3fs_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / ``fsspec.filesystem("s3", ...)``.

        The credentials are passed explicitly, not left for botocore to find, because fsspec caches
        filesystem instances by their options: with the environment alone in the key, a process whose
        credentials change would keep using the instance (and client) built with the old ones.
        """
        options: dict[str, Any] = {"client_kwargs": {"region_name": self.region}}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.has_keys:
            options["key"], options["secret"] = self.access_key, self.secret_key
            if self.session_token:
                options["token"] = self.session_token
        return options

    def fsspec_filesystem(self) -> fsspec.AbstractFileSystem:
        """An s3fs filesystem for this store (paths are ``bucket/key``, with or without ``s3://``)."""
        return fsspec.filesystem("s3", **self.s3fs_options())

    def pyarrow_filesystem(self):
        """A ``pyarrow.fs.S3FileSystem`` for this store, for Ray Data ``read_parquet(filesystem=...)`` and
        Ray Train ``RunConfig(storage_filesystem=...)``: pyarrow ignores ``AWS_ENDPOINT_URL``, so the
        endpoint is passed explicitly. Paths are ``bucket/key`` (no ``s3://``).
        """
        from pyarrow import fs as pafs

        kwargs: dict[str, Any] = {"region": self.region}
        if self.endpoint_url:
            parts = urlsplit(self.endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"endpoint_url {self.endpoint_url!r} must look like http(s)://host[:port]")
            if parts.path.strip("/"):
                raise ValueError(f"endpoint_url {self.endpoint_url!r}: pyarrow's S3 client cannot use a path prefix")
            kwargs["endpoint_override"] = parts.netloc
            kwargs["scheme"] = parts.scheme
        if self.has_keys:
            kwargs["access_key"], kwargs["secret_key"] = self.access_key, self.secret_key
            if self.session_token:
                kwargs["session_token"] = self.session_token
        return pafs.S3FileSystem(**kwargs)

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts joined by />``."""
        tail = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
        return f"s3://{self.bucket}/{tail}" if tail else f"s3://{self.bucket}"

    def describe(self) -> str:
        """Endpoint and key id, for messages (never the secret)."""
        endpoint = self.endpoint_url or "the default AWS endpoint"
        who = f"access key {self.access_key!r}" if self.access_key else "the default AWS credentials"
        return f"{endpoint} with {who}"


# --- module functions: local paths and s3:// URIs alike --------------------------------------------


def is_remote(uri: str | os.PathLike) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def filesystem(uri: str | os.PathLike, config: StoreConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that holds ``uri`` and the path inside it (``config`` defaults to :meth:`StoreConfig.load`)."""
    uri = str(uri)
    if not is_remote(uri):
        return fsspec.filesystem("file"), os.path.abspath(uri.removeprefix("file://"))
    protocol = uri.split("://", 1)[0]
    options = _s3_options(config) if protocol in ("s3", "s3a") else {}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def _s3_options(config: StoreConfig | None = None) -> dict:
    """s3fs options from ``config``, by default the loaded one (config file and AWS environment)."""
    return (config or StoreConfig.load()).s3fs_options()


@contextmanager
def _explain_denied(uri: str | os.PathLike, config: StoreConfig | None = None):
    """Name the object, the endpoint and the credentials when S3 refuses a request.

    s3fs reports a refused HEAD request (how ``exists`` and opening for reading start) only as
    ``PermissionError("Forbidden")``: a HEAD response has no body to say more.
    """
    try:
        yield
    except PermissionError as e:
        if not is_remote(uri):
            raise
        try:
            config = config or StoreConfig.load()
            where = config.describe()
            source = f" or in {config.source}" if config.source else ""
        except Exception:  # noqa: BLE001 (a broken config failed earlier; never hide the original error)
            where, source = "the configured endpoint", ""
        raise PermissionError(
            f"access to {uri} denied by {where} ({e}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            f"{source} (a wrong key or secret shows up as 403 Forbidden) and the bucket's permissions"
        ) from e


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    return "/".join([base.rstrip("/"), *parts]) if is_remote(base) else os.path.join(base, *parts)


def exists(uri: str | os.PathLike, config: StoreConfig | None = None) -> bool:
    fs, path = filesystem(uri, config)
    with _explain_denied(uri, config):
        return fs.exists(path)


def open_file(uri: str | os.PathLike, mode: str = "rb", config: StoreConfig | None = None) -> IO:
    """``uri`` opened in ``mode``; a write (``"w"``, ``"wb"``) is atomic, see :class:`AtomicWriter`."""
    fs, path = filesystem(uri, config)
    if "w" not in mode:
        with _explain_denied(uri, config):
            return fs.open(path, mode)
    if not is_remote(uri):
        return _local_writer(path, mode)
    with _explain_denied(uri, config):
        file = fs.open(path, mode)
    return AtomicWriter(file, discard=lambda: _discard_upload(fs, path, file))


class AtomicWriter:
    """A file open for writing whose content appears at its name only when it is closed without an error.

    fsspec completes an upload even when the ``with`` block raised, and a local write overwrites in
    place, so a failed write would otherwise leave a truncated file that later counts as done. Local
    files are written to a hidden sibling and moved into place; S3 uploads are aborted on an error.
    Everything else (``write``, ``tell``, ...) is the underlying file's.
    """

    def __init__(self, file: IO, discard: Callable[[], None], publish: Callable[[], None] = lambda: None):
        self._file, self._discard, self._publish = file, discard, publish

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> None:
        """Finish the write and publish the file."""
        if not self._file.closed:
            self._file.close()
            self._publish()

    def abort(self) -> None:
        """Throw the write away; whatever was at the name before stays as it was."""
        if not self._file.closed:
            self._discard()


def _local_writer(path: str, mode: str) -> AtomicWriter:
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    staging = os.path.join(folder, _partial_name(name))
    file = open(staging, mode.replace("w", "x"))  # noqa: SIM115 (AtomicWriter closes it)

    def discard() -> None:
        file.close()
        os.remove(staging)

    return AtomicWriter(file, discard, publish=lambda: os.replace(staging, path))


def _discard_upload(fs: fsspec.AbstractFileSystem, path: str, file: IO) -> None:
    """Drop what an fsspec file has buffered and abort its multipart upload (s3fs), so no object appears.

    Closing would complete the upload, so the file is marked closed instead (a text wrapper follows
    the binary file it wraps).
    """
    raw = file.buffer if isinstance(file, io.TextIOWrapper) else file
    if isinstance(raw, AbstractBufferedFile):
        raw.discard()
        raw.closed = True
    else:  # e.g. memory://, which publishes at open: take the partial object away again
        file.close()
        fs.rm(path)


def _partial_name(name: str) -> str:
    """A sibling name for ``name`` while it is being written: hidden, unique, never taken for the real one."""
    return f".{name}.partial-{secrets.token_hex(4)}"


@contextmanager
def staged_folder(uri: str | os.PathLike, overwrite: bool = False, config: StoreConfig | None = None):
    """Write a whole folder (a checkpoint, an export) so that nothing appears at ``uri`` until all of it is written.

    Yields a staging location, a hidden sibling of ``uri`` on the same filesystem, to write into; on a
    normal exit it is moved to ``uri`` (local: one rename; S3: each object copied to its final key,
    then the staging objects deleted), on an error it is removed. A ``uri`` that already has content
    is refused unless ``overwrite``, which replaces that content.
    """
    uri = str(uri).rstrip("/")
    fs, path = filesystem(uri, config)
    if "/" not in path.strip("/"):
        raise ValueError(f"{uri} names no folder inside a bucket or folder to write into")
    _refuse_content(fs, path, uri, overwrite)
    parent, _, name = path.rpartition("/")
    staging = f"{parent}/{_partial_name(name)}"
    if not is_remote(uri):
        os.makedirs(staging)
    try:
        yield f"{uri.split('://', 1)[0]}://{staging}" if is_remote(uri) else staging
        _refuse_content(fs, path, uri, overwrite)
        with _explain_denied(uri, config):
            (_move_remote_folder if is_remote(uri) else _move_local_folder)(fs, staging, path)
    finally:
        fs.invalidate_cache(staging)
        if fs.exists(staging):
            fs.rm(staging, recursive=True)


def _files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The files at or under ``path``; not directories, which some S3 servers (SeaweedFS) keep once emptied."""
    fs.invalidate_cache(path)
    return [name for name, info in fs.find(path, detail=True).items() if info["type"] == "file"]


def _refuse_content(fs: fsspec.AbstractFileSystem, path: str, uri: str, overwrite: bool) -> None:
    if not overwrite and _files(fs, path):
        raise FileExistsError(f"{uri} already exists with content: write elsewhere, or pass overwrite=True")


def _move_local_folder(fs: fsspec.AbstractFileSystem, staging: str, path: str) -> None:
    """One rename; old content is renamed aside first (a folder only replaces an empty one) and put back
    if the rename fails."""
    old = None
    if os.path.lexists(path) and (not os.path.isdir(path) or os.listdir(path)):
        old = os.path.join(os.path.dirname(path), _partial_name(os.path.basename(path)) + ".old")
        os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        fs.rm(old, recursive=True)


def _move_remote_folder(fs: fsspec.AbstractFileSystem, staging: str, path: str) -> None:
    """S3 has no rename: copy each object to its final key, then delete what the new folder does not have.
    A copy that fails takes back the copies made so far when ``path`` was empty, so a first publication
    (an export about to be registered) is all or nothing; over old content (``overwrite``) the old files
    not yet replaced stay, and a rerun completes the folder."""
    old = set(_files(fs, path))
    new = []
    try:
        for source in _files(fs, staging):
            target = path + source[len(staging):]
            fs.copy(source, target)
            new.append(target)
    except BaseException:
        if new and not old:
            fs.rm(new)
        raise
    if old - set(new):
        fs.rm(sorted(old - set(new)))


def configured_store() -> StoreConfig | None:
    """The object store settings if any are configured (file or environment), else None."""
    config = StoreConfig.load()  # a file named by $IRG_STORE_CONFIG must exist: never fall back to local disk
    return config if config.endpoint_url or config.access_key else None


def arrow_filesystem(uri: str | os.PathLike, config: StoreConfig | None = None):
    """The ``pyarrow.fs`` filesystem that holds ``uri`` and the path inside it, for pyarrow and Ray Data."""
    from pyarrow import fs as pafs

    uri = str(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    protocol, path = uri.split("://", 1)
    if protocol not in ("s3", "s3a"):
        raise ValueError(f"{uri}: only local paths and s3:// URIs are supported")
    return (config or StoreConfig.load()).pyarrow_filesystem(), path.rstrip("/")
