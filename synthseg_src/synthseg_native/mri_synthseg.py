"""``mri_synthseg``: FreeSurfer 8's command of that name, on this toolkit's engine.

Most SynthSeg runs in studies go through FreeSurfer's ``mri_synthseg`` (``recon-all``, qsiprep, containers), not
upstream's script. This command takes its flags, looks for its weights and colour table under
``$FREESURFER_HOME`` first, and writes its files — the same voxels, geometry, CSVs and colour tables as FreeSurfer
8's script with the same weights (docs/freesurfer.md, docs/equivalence.md) — in a fraction of its memory. It is
``synthseg-native --conventions freesurfer --threads 1``: where FreeSurfer and upstream differ (BatchNorm built
unfused, the mean of a multi-channel image, ``--keepgeom``/``--addctab`` written as FreeSurfer's surfa writes them,
Photo-SynthSeg), the engine follows FreeSurfer; this module only translates its command line and its exit codes:

- no arguments: the help, exit 1; a flag argparse rejects: exit 2; an inconsistent request that FreeSurfer refuses
  with ``Error: ...`` (``--autocrop`` with ``--crop``, ``--photo`` with ``--qc``, ...): exit 1 after one ``[ERR]``;
- an image that failed: exit 1 after the others were done (FreeSurfer's ``ERROR: some problems occured``);
- success: exit 0 after the ``#@# mri_synthseg vmpeak  <kB>`` line recon-all's log keeps (VmPeak of this process,
  read from ``/proc/self/status`` as FreeSurfer does; ``None`` where there is no such file).

Our own flags (``--models``, ``--backend``, ``--device``, ``--max-memory``, ...) work here too.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict

from .api import segment
from .cli import guarded
from .config import Options
from .config.parser import build_parser, parse
from .errors import SynthSegError, UsageError

logger = logging.getLogger(__name__)
PROG = "mri_synthseg"
DESCRIPTION = ("SynthSeg, as FreeSurfer 8's mri_synthseg (same flags and files), on synthseg-native's engine. "
               "Weights, label lists and FreeSurferColorLUT.txt are read from $FREESURFER_HOME first.")
DEFAULTS = {
    "threads": (1, "(optional) Number of cores to be used. Default is 1 (as FreeSurfer's)."),
    "conventions": ("freesurfer", "Whose behaviour to reproduce where upstream SynthSeg and FreeSurfer differ "
                                  "(default here: freesurfer)."),
}
CITATION = """
If you use this tool in a publication, please cite SynthSeg:
  B. Billot et al., "SynthSeg: Segmentation of brain MRI scans of any contrast and resolution without
  retraining", Medical Image Analysis (2023)."""
CITATION_ROBUST = """  and SynthSeg-robust: B. Billot et al., "Robust machine learning segmentation for large-scale
  analysis of heterogeneous clinical brain MRI datasets", PNAS (2023)."""
CITATION_PHOTO = """  and Photo-SynthSeg: H. Gazula et al., "Machine learning of dissection photographs and surface
  scanning for quantitative 3D neuropathology", eLife (2024)."""


def vmpeak_kb() -> int | None:
    """The process's peak virtual memory in kB (``VmPeak`` of ``/proc/self/status``), the figure FreeSurfer's
    ``mri_synthseg`` prints for recon-all's log; None where the file does not exist (macOS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmPeak:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _run(argv: list[str]) -> int:
    parser = build_parser(PROG, DESCRIPTION, DEFAULTS)
    if not argv:
        parser.print_help()
        return 1
    try:
        opts = parse(argv, parser=parser)
    except UsageError as exc:  # what argparse refuses: its exit status, 2
        logger.error(str(exc))
        return 2
    if not os.environ.get("FREESURFER_HOME"):
        logger.info("FREESURFER_HOME is not set: weights are searched along synthseg-native's order "
                    "($SYNTHSEG_MODELS, ./models, ...) and --addctab embeds this toolkit's table of the labels")
    options = {k: v for k, v in asdict(opts).items() if k not in ("i", "o")}
    try:
        result = segment(opts.i or "", opts.o, **options)
    except (UsageError, SynthSegError, OSError) as exc:  # FreeSurfer's "Error: ..." and exit 1
        logger.error(str(exc))
        return 1
    if result.exit_code == 0:
        print(f"\n#@# mri_synthseg vmpeak  {vmpeak_kb()}", flush=True)
        print(citation(opts), flush=True)
    return result.exit_code


def citation(opts: Options) -> str:
    """The papers to cite for this run's models."""
    return CITATION + ("\n" + CITATION_ROBUST if opts.robust else "") + ("\n" + CITATION_PHOTO if opts.photo else "")


def main(argv: list[str] | None = None) -> int:
    """``mri_synthseg [FLAGS]``: FreeSurfer 8's command line; returns its exit status."""
    return guarded(_run, sys.argv[1:] if argv is None else argv)


def entry() -> None:
    """The ``mri_synthseg`` console script. Every output is written and closed when :func:`main` returns, so the
    process ends there: TensorFlow's interpreter teardown (about a second, once per subject in recon-all) is
    skipped."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
