"""One way to open files whether they live on local disk or in S3-compatible object storage.

``s3://bucket/key`` URIs go through s3fs; the endpoint and credentials come from the standard AWS
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``). Everything else
is a local path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import IO

import fsspec


def is_remote(uri: str | os.PathLike) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def filesystem(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that holds ``uri`` and the path inside it."""
    uri = str(uri)
    if not is_remote(uri):
        return fsspec.filesystem("file"), os.path.abspath(uri.removeprefix("file://"))
    protocol = uri.split("://", 1)[0]
    options = _s3_options() if protocol == "s3" else {}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def _s3_options() -> dict:
    """s3fs options from the standard AWS environment.

    The credentials are passed explicitly, not left for botocore to find, because fsspec caches
    filesystem instances by their options: with the environment alone in the key, a process whose
    credentials change would keep using the instance (and client) built with the old ones.
    """
    env = os.environ
    options = {}
    if env.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = env["AWS_ENDPOINT_URL"]
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options["key"], options["secret"] = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            options["token"] = env["AWS_SESSION_TOKEN"]
    return options


@contextmanager
def _explain_denied(uri: str | os.PathLike):
    """Name the object and the credentials when S3 refuses a request.

    s3fs reports a refused HEAD request (how ``exists`` and opening for reading start) only as
    ``PermissionError("Forbidden")``: a HEAD response has no body to say more.
    """
    try:
        yield
    except PermissionError as e:
        if not is_remote(uri):
            raise
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"
        key_id = os.environ.get("AWS_ACCESS_KEY_ID")
        who = f"access key {key_id!r}" if key_id else "the default AWS credentials"
        raise PermissionError(
            f"access to {uri} denied by {endpoint} for {who} ({e}): check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (a wrong key or secret shows up as 403 Forbidden) and the bucket's permissions"
        ) from e


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    return "/".join([base.rstrip("/"), *parts]) if is_remote(base) else os.path.join(base, *parts)


def exists(uri: str | os.PathLike) -> bool:
    fs, path = filesystem(uri)
    with _explain_denied(uri):
        return fs.exists(path)


def open_file(uri: str | os.PathLike, mode: str = "rb") -> IO:
    fs, path = filesystem(uri)
    if "w" in mode and not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with _explain_denied(uri):
        return fs.open(path, mode)
