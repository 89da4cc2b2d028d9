"""Names people choose (runs, evaluations, jobs): one character set, checked before they are used.

A name becomes a folder in run storage (``<storage>/<name>-stage1``), an object key prefix and a value
inside an MLflow filter string (``tags.`irg.run_key` = '<name>'``). A ``/`` or ``..`` would escape the
folder and a quote would break the filter, so every front end checks a name here first: letters,
digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most :data:`MAX_LENGTH` characters.
"""

from __future__ import annotations

import re

MAX_LENGTH = 128
ALLOWED = "letters, digits, '.', '_' and '-', starting with a letter or digit"
_FIRST = re.compile(r"[A-Za-z0-9]")
_REST = re.compile(r"[A-Za-z0-9._-]")


class InvalidName(ValueError):
    """A chosen name has a character (or a length) the character set does not allow."""


def check_name(name: str, what: str = "name") -> str:
    """``name`` itself when it is allowed, else :class:`InvalidName` naming the first wrong character."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{what} must be a non-empty string of {ALLOWED}")
    if len(name) > MAX_LENGTH:
        raise InvalidName(f"{what} {name[:40]!r}... is {len(name)} characters long; at most {MAX_LENGTH}")
    for position, char in enumerate(name):
        pattern = _FIRST if position == 0 else _REST
        if not pattern.fullmatch(char):
            where = "first character" if position == 0 else f"character {position + 1}"
            raise InvalidName(f"{what} {name!r}: {where} {char!r} is not allowed; use {ALLOWED}")
    return name


def is_valid_name(name: str) -> bool:
    """Whether :func:`check_name` accepts ``name``."""
    try:
        check_name(name)
    except InvalidName:
        return False
    return True
