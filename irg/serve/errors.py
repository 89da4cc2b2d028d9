"""What a client may read of an error: the cause's own message, never a Ray traceback, a pid or a path.

An exception raised in a replica reaches the ingress wrapped in Ray's ``RayTaskError``, whose text is
the remote traceback with the actor's name, pid, IP and the files of the server. A client gets the
message of the cause instead: a request the generator refused (a ``ValueError``, "field: why") is
the client's to fix and keeps its message; anything else is the server's fault and gets a short
message naming the error's kind and the request id under which the server's log has the details.
Whatever is shown is scrubbed once more of paths and process details, in case a message quotes them.
No Ray here (it is only duck-typed: ``cause``).
"""

from __future__ import annotations

import dataclasses
import re

# An absolute path (at the start, after a space, a quote or a bracket), Ray's "(pid=1, ip=10.0.0.1)"
# and an address, and the start of a traceback: nothing of these reaches a client.
_PATH = re.compile(r"""(?<![\w.:/])(?:/[\w.@+-]+){2,}/?""")
_PROCESS = re.compile(r"\s*\((?:[\w ]*pid=\d+[^)]*)\)|\bpid=\d+|\bip=[\d.]+")
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|\n\s+File \"")


@dataclasses.dataclass(frozen=True)
class PublicError:
    """An error as a client sees it: ``status`` 400 (the request's fault) or 500 (the server's)."""

    status: int
    message: str

    @property
    def client_fault(self) -> bool:
        return self.status < 500


def cause_of(error: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's wrapper (itself when it is not one)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def scrub(message: str) -> str:
    """``message`` without tracebacks, paths, pids and addresses; only its first line."""
    lines = _TRACEBACK.split(message, maxsplit=1)[0].strip().splitlines()
    message = _PROCESS.sub("", lines[0] if lines else "")
    return _PATH.sub("<path>", message).strip()


def public_error(error: BaseException, request_id: str | None = None) -> PublicError:
    """What the client of a failed request is told (the server logs ``error`` itself under ``request_id``)."""
    cause = cause_of(error)
    if isinstance(cause, ValueError):  # the generator refused the request: the message says why
        message = scrub(str(cause))
        if message:
            return PublicError(400, message)
    where = f"; the server's log has the details under request id {request_id}" if request_id else ""
    return PublicError(500, f"the generation failed ({type(cause).__name__}){where}")
