"""API keys of the Serve application: where they come from, when they are required, how a request's
``Authorization: Bearer <key>`` is checked. No Ray here.

Keys come from an environment variable (``IRG_API_KEYS`` by default: keys separated by commas or
newlines) and from a file named by the same variable with ``_FILE`` appended (``IRG_API_KEYS_FILE``,
e.g. a mounted Kubernetes Secret: one key a line, ``#`` comments and blank lines skipped). Each
entry is ``key`` or ``name:key`` (a key with a colon needs a name); the name (else ``key-N``, N
counting from 1) is what logs and the per-key limits call the key, never the key itself. Keys are
compared in constant time.

Whether keys are required (:func:`keys_required`): ``True`` or ``False`` as configured; ``None``
(the default) requires them unless the application binds only loopback (``127.0.0.1``, ``::1``,
``localhost``). A required key with none configured refuses to build, naming the variables.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

from irg.serve.openai_api import OpenAIError

DEFAULT_KEYS_ENV = "IRG_API_KEYS"
ANONYMOUS = "anonymous"  # the caller's name when keys are not required


class MissingKeysError(RuntimeError):
    """Keys are required and none are configured."""


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an HTTP bind address) only takes connections from this machine."""
    if host is None:
        return False
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def keys_required(require: bool | None, host: str | None) -> bool:
    """``require`` if set, else whether ``host`` is anything but loopback (unknown: required)."""
    return require if require is not None else not is_loopback(host)


def parse_keys(text: str, source: str) -> dict[str, str]:
    """``{key: name}`` from ``text`` (entries separated by commas or newlines, ``name:key`` or ``key``)."""
    keys: dict[str, str] = {}
    entries = [e.strip() for line in text.splitlines() if not line.lstrip().startswith("#")
               for e in line.split(",")]
    for entry in filter(None, entries):
        name, sep, key = entry.partition(":")
        name, key = (name.strip(), key.strip()) if sep else ("", entry)
        if not key:
            raise ValueError(f"{source}: an entry has an empty key")
        keys[key] = name or f"key-{len(keys) + 1}"
    return keys


def load_keys(env_var: str = DEFAULT_KEYS_ENV, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{key: name}`` from ``$env_var`` and the file ``$env_var_FILE`` names (either may be unset)."""
    environ = os.environ if environ is None else environ
    keys = parse_keys(environ.get(env_var, ""), env_var)
    file_var = f"{env_var}_FILE"
    if environ.get(file_var):
        path = Path(environ[file_var])
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"{file_var}: cannot read {path}: {e}") from None
        keys.update({k: v for k, v in parse_keys(text, f"{file_var} ({path})").items() if k not in keys})
    return keys


class KeyRing:
    """The keys a server accepts (``required`` False: every request is let in, as ``anonymous``)."""

    def __init__(self, keys: Mapping[str, str], required: bool, env_var: str = DEFAULT_KEYS_ENV):
        if required and not keys:
            raise MissingKeysError(f"API keys are required (require_api_key, or an HTTP host that is not loopback) "
                                   f"and none are configured: set {env_var} (comma-separated keys) or "
                                   f"{env_var}_FILE (a file of keys, one a line)")
        self.keys = {k.encode(): name for k, name in keys.items()}
        self.required = required

    @classmethod
    def from_env(cls, required: bool, env_var: str = DEFAULT_KEYS_ENV,
                 environ: Mapping[str, str] | None = None) -> KeyRing:
        return cls(load_keys(env_var, environ), required, env_var)

    def check(self, authorization: str | None) -> str:
        """The name of the key in an ``Authorization`` header, or a 401 :class:`OpenAIError`."""
        if not self.required:
            return ANONYMOUS
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
        given = token.strip().encode()
        name = None
        for key, key_name in self.keys.items():  # every key compared, in constant time each
            if hmac.compare_digest(given, key):
                name = key_name
        if name is None:
            raise unauthorized("incorrect API key provided")
        return name


def unauthorized(message: str) -> OpenAIError:
    return OpenAIError(message, code="invalid_api_key", status=401, headers={"WWW-Authenticate": "Bearer"})
