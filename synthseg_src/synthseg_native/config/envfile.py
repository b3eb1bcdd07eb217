"""A pipeline's ``.env`` file, read the way its shell scripts mean it, without executing a line of it.

Numbered pipelines keep their settings in ``KEY=VALUE`` files that their own scripts ``source``. The
stage that replaces one of their steps must read the same file, but sourcing it would run whatever it
holds (and a file written on Windows ends its lines in CR). So only assignment lines are taken, with
an optional ``export``, single or double quotes, and ``# comments`` after unquoted values; ``$VARS``
inside values are not expanded; anything else (commands, blank lines, comments) is skipped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_QUOTED = re.compile(r"""^\s*(["'])(.*?)\1\s*(?:#.*)?$""")
_COMMENT = re.compile(r"\s+#.*$")


def parse_line(line: str) -> tuple[str, str] | None:
    """``(key, value)`` of one assignment line, or None for anything else."""
    m = _ASSIGNMENT.match(line.rstrip("\r\n"))
    if m is None:
        return None
    key, value = m.group(1), m.group(2)
    quoted = _QUOTED.match(value)
    if quoted is not None:
        return key, quoted.group(2)
    return key, _COMMENT.sub("", value).strip()


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Every assignment of ``path`` (later lines win, as in a shell); a missing file is empty."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            text = fh.read()
    except FileNotFoundError:
        return {}
    values: dict[str, str] = {}
    for line in text.splitlines():
        parsed = parse_line(line)
        if parsed is not None:
            values[parsed[0]] = parsed[1]
    return values


def settings(keys: Iterable[str], file_values: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """``keys`` from the environment, else from the file: a non-empty environment variable wins (a pipeline's
    runner exports its ``.env``, a user overrides one knob on the command line), an empty one counts as unset (so
    ``make`` can pass an empty knob without hiding the file's value). Keys set nowhere are left out."""
    out = {}
    for key in keys:
        value = environ.get(key) or file_values.get(key)
        if value:
            out[key] = value
    return out
