"""The toolkit's log lines, ``[INFO]``, ``[RUN ]``, ``[SKIP]``, ``[DONE]``, ``[WARN]``, ``[ERR]``, on stdlib logging.

Every module logs through ``logging.getLogger(__name__)``; the records meet in the package logger
``synthseg_native``, whose one handler prints them as the lines pipelines grep for: warnings and
errors on stderr, the rest on stdout, one line each (control characters in file names escaped).
The handler is installed when this module is first imported, so the command line, the stage script
and a notebook calling the API all show the same lines. A program that routes logs itself calls
:func:`use_logging_config`, after which the records propagate to its own handlers instead.

``RUN``, ``SKIP`` and ``DONE`` are levels between INFO and WARNING: ``logger.log(RUN, "...")``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import IO

PACKAGE = "synthseg_native"
RUN, SKIP, DONE = logging.INFO + 1, logging.INFO + 2, logging.INFO + 3
TAGS = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", RUN: "RUN ", SKIP: "SKIP", DONE: "DONE",
        logging.WARNING: "WARN", logging.ERROR: "ERR", logging.CRITICAL: "ERR"}
for _level, _tag in ((RUN, "RUN"), (SKIP, "SKIP"), (DONE, "DONE")):
    logging.addLevelName(_level, _tag)

# Set while a progress bar is on screen (batch.progress): a context that clears the bar around a line.
_pause: list[Callable[[IO[str]], AbstractContextManager[None]]] = []


def printable(text: str) -> str:
    """``text`` on one line: control characters (a newline in a file name) and undecodable bytes escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def tagged(levelno: int, message: str) -> str:
    """The line a record of ``levelno`` becomes: ``[WARN] message``."""
    tag = TAGS.get(levelno)
    if tag is None:  # a level of someone else's: the tag of the next standard level below it
        tag = TAGS[max((k for k in TAGS if k <= levelno), default=logging.DEBUG)]
    return f"[{tag}] {printable(message)}"


class TagHandler(logging.Handler):
    """Prints records as ``[TAG] message`` lines on the streams current at the time of each record."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = tagged(record.levelno, record.getMessage())
        except Exception:
            self.handleError(record)
            return
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        with _pause[-1](stream) if _pause else contextlib.nullcontext():
            try:
                print(line, file=stream, flush=True)
            except UnicodeEncodeError:  # a non-UTF-8 terminal and a non-ASCII file name
                enc = stream.encoding or "ascii"
                print(line.encode(enc, "backslashreplace").decode(enc), file=stream, flush=True)


def install() -> None:
    """Give the package logger its line handler (once), at INFO, not propagating to the root logger."""
    logger = logging.getLogger(PACKAGE)
    if not any(isinstance(h, TagHandler) for h in logger.handlers):
        logger.addHandler(TagHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def use_logging_config() -> None:
    """Hand the records to the application's own logging set-up (root handlers) instead of printing them."""
    logger = logging.getLogger(PACKAGE)
    for handler in [h for h in logger.handlers if isinstance(h, TagHandler)]:
        logger.removeHandler(handler)
    logger.propagate = True


def pause_with(around: Callable[[IO[str]], AbstractContextManager[None]]) -> None:
    """From now on print every line inside ``around(stream)`` (a progress bar steps aside), until
    :func:`stop_pausing`."""
    _pause.append(around)


def stop_pausing(around: Callable[[IO[str]], AbstractContextManager[None]]) -> None:
    if around in _pause:
        _pause.remove(around)


install()
