"""The batch layer's own command lines, as subcommands of ``synthseg-native`` (one argument parser each).

The cohort workflow and the pipeline stage's users call a few pieces of the batch bookkeeping on their own: the
cohort's scan count and its merge after the shards (the Snakemake workflow), the provenance cache's check and
record, and the QC page. Their logic stays in ``batch/``; this module only parses their arguments and turns the
outcome into an exit status. Engine arguments follow a ``--``, parsed by the engine's own parser::

    synthseg-native cohort count -- ENGINE_ARGS...               # checks the arguments, prints the scan count
    synthseg-native cohort finish --shards N -- ENGINE_ARGS...   # merges the shards' tables, rebuilds the page
    synthseg-native provenance check [--force] -- ENGINE_ARGS... # exit 0: outputs current, 3: a run is needed
    synthseg-native provenance write -- ENGINE_ARGS...           # records a finished run
    synthseg-native snapshots index DIR                          # rebuilds DIR/index.html
    synthseg-native snapshots render IMAGE SEG PNG               # one QC picture
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .batch import cohort, provenance, snapshots
from .batch.shards import make_plan
from .config.parser import Parser, parse
from .errors import ProvenanceError, UsageError, WeightsError

logger = logging.getLogger(__name__)
EXIT_USAGE = 2


def _split(argv: list[str], prog: str) -> tuple[list[str], list[str]]:
    """The subcommand's own arguments and the engine arguments after ``--``."""
    if "--" not in argv:
        raise UsageError(f"{prog}: the engine arguments follow a '--' (synthseg-native {prog} ... -- --i IN --o OUT "
                         "...)")
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def cohort_main(argv: list[str]) -> int:
    """``count`` checks the engine arguments and prints the scan count; ``finish`` merges after the shards."""
    own, engine = _split(argv, "cohort")
    p = Parser(prog="synthseg-native cohort", description="A cohort's bookkeeping around its shards.")
    p.add_argument("command", choices=["count", "finish"])
    p.add_argument("--shards", type=int, default=1, help="how many shards the engine args were run with")
    cmd = p.parse_args(own)
    if cmd.shards < 1:
        raise UsageError("--shards must be >= 1")
    opts = parse(engine).normalised()
    if cmd.command == "count":
        opts.check()
        print(len(make_plan(opts, shard=False).images))
        return 0
    return cohort.finish(opts, cmd.shards)


def provenance_main(argv: list[str]) -> int:
    """Exit 0: outputs current, 3: a run is needed, 1: error, 2: usage."""
    own, engine = _split(argv, "provenance")
    p = Parser(prog="synthseg-native provenance", description="The pipeline stage's cache for one image.")
    p.add_argument("command", choices=["check", "write"])
    p.add_argument("--force", action="store_true", help="treat the outputs as stale (FORCE=1)")
    opts = p.parse_args(own)
    try:
        args = provenance.parse_engine_args(engine)
        if opts.command == "check":
            return provenance.check(args, force=opts.force)
        logger.info(f"provenance written: {provenance.write(args)}")
        return provenance.EXIT_CURRENT
    except (ProvenanceError, WeightsError, OSError) as exc:
        logger.error(str(exc))
        return provenance.EXIT_ERROR


def snapshots_main(argv: list[str]) -> int:
    p = Parser(prog="synthseg-native snapshots", description="QC pictures and the cohort page.")
    sub = p.add_subparsers(dest="command", required=True)
    index = sub.add_parser("index", help="rebuild DIR/index.html from the scan records in DIR")
    index.add_argument("dir")
    render = sub.add_parser("render", help="one three-slice picture of IMAGE with SEG overlaid")
    render.add_argument("image")
    render.add_argument("seg")
    render.add_argument("png")
    args = p.parse_args(argv)
    if args.command == "index":
        print(snapshots.write_index(args.dir))
    else:
        print(snapshots.render(args.image, args.seg, args.png, title=Path(args.seg).name))
    return 0


def run(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """A subcommand with its usage errors as one [ERR] line and exit 2."""
    try:
        return main(argv)
    except UsageError as exc:
        logger.error(str(exc))
        return EXIT_USAGE


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "cohort": lambda argv: run(cohort_main, argv),
    "provenance": lambda argv: run(provenance_main, argv),
    "snapshots": lambda argv: run(snapshots_main, argv),
}
