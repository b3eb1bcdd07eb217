"""``synthseg-native`` / ``python -m synthseg_native``: upstream ``SynthSeg_predict.py``'s flags, plus ours.

Only a shell over the API: parse the flags into :class:`~synthseg_native.config.Options`, call
:func:`synthseg_native.api.segment`, and turn what comes back into an exit status. So the command line
and a Python caller cannot drift apart. A first word that is not a flag names a subcommand
(``synthseg-native stage [IN [OUT]]``: the pipeline step, :mod:`.stage`; ``cohort``, ``provenance``,
``snapshots``: the batch bookkeeping's own commands, :mod:`.commands`); upstream's command line has no
positional arguments, so the two cannot be confused.

Exit status: 0 all images done, 1 some failed (or weights/outputs unusable), 2 usage error, 128+N stopped
by signal N (130: Ctrl-C).
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from types import FrameType

from . import commands, stage
from .config.parser import build_parser, parse
from .errors import Interrupted, SynthSegError, UsageError

logger = logging.getLogger(__name__)
SUBCOMMANDS = {"stage": stage.main, **commands.SUBCOMMANDS}


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Run the command line (:func:`guarded`)."""
    return guarded(_main, sys.argv[1:] if argv is None else argv)


def guarded(body: Callable[[list[str]], int], argv: list[str]) -> int:
    """``body(argv)`` with SIGTERM (batch schedulers, ``kill``) and SIGHUP (a closed terminal) turned into
    exceptions for the duration of the call, so they clean up temporaries and locks like Ctrl-C does; an interrupt
    becomes exit status 128+N after one [ERR] line. Shared by ``synthseg-native`` and ``mri_synthseg``."""
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _raise_interrupted)
        except (ValueError, OSError):  # not the main thread (an embedding application): leave signals alone
            pass
    try:
        return body(list(argv))
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        if not getattr(exc, "reported", False):  # the batch loop reports the interrupts it sees itself
            logger.error(f"interrupted ({signal.Signals(signum).name}); no output of the image in progress was "
                         "written")
        return 128 + signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str]) -> int:
    if not argv:
        build_parser().print_help()
        return 1
    if argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    from .api import segment  # after the subcommands: a cached pipeline step loads no engine code

    try:
        opts = parse(argv)
        options = {k: v for k, v in asdict(opts).items() if k not in ("i", "o")}
        return segment(opts.i or "", opts.o, **options).exit_code
    except UsageError as exc:
        logger.error(str(exc))
        return 2
    except SynthSegError as exc:  # weights, an unwritable or locked shared table, the upstream engine
        logger.error(str(exc))
        return 1
    except OSError as exc:
        logger.error(str(exc))
        return 1
