"""The command line, generated from :class:`Options`: each field's flag, default and help are its own.

So the parser, the API's keyword arguments and the provenance record cannot drift apart: adding an
option means adding one field. A bad flag is a :class:`UsageError` (the command line prints it as one
``[ERR]`` line and exits 2), never argparse's own usage dump and exit.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, NoReturn

from ..errors import SizeError, UsageError
from .options import Options, default
from .sizes import parse_size

PROG = "synthseg-native"
DESCRIPTION = "SynthSeg brain MRI segmentation, native tf.keras engine (same flags as SynthSeg_predict.py)."


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag raises :class:`UsageError` like every other usage error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (--help lists the flags)")


def _size(text: str) -> str:
    """argparse type of --max-memory: checked here (a usage error), kept as text (provenance records it)."""
    try:
        parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser(prog: str = PROG, description: str = DESCRIPTION,
                 defaults: dict[str, tuple[Any, str]] | None = None) -> Parser:
    """The parser of :class:`Options`; ``defaults`` ({field: (default, help)}) changes a flag's default and help
    (``mri_synthseg``: FreeSurfer's one thread, its conventions)."""
    p = Parser(prog=prog, description=description)
    defaults = defaults or {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(Options):
        meta = f.metadata
        target = p if meta["group"] is None else groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        kwargs = dict(meta["argparse"])
        if f.name == "max_memory":
            kwargs["type"] = _size
        if kwargs.get("action") != "store_true":
            kwargs["default"] = default(f.name)
        text = meta["help"]
        if f.name in defaults:
            kwargs["default"], text = defaults[f.name]
        target.add_argument(meta["flag"] or f"--{f.name}", dest=f.name, help=text, **kwargs)
    return p


def parse(argv: list[str], prog: str = PROG, parser: Parser | None = None) -> Options:
    """Options of a command line as given (not yet normalised or checked: :meth:`Options.normalised`,
    :meth:`Options.check`)."""
    return Options(**vars((parser or build_parser(prog)).parse_args(argv)))
