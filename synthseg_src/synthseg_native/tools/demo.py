"""``make demo``: segment the MNI152 T1 that ships inside nilearn, with official weights if found, and
show the result as a QC snapshot (``results/demo/qc/``), the picture a cohort's page would have.

A fresh machine has no official weights (they are not redistributable here), so the demo then
generates seeded test weights and says loudly that the labels are anatomically meaningless: the
point is to show the whole toolkit working end to end, not to produce a usable segmentation.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import nibabel as nib

from ..cli import main as cli_main
from ..engine.weights import MODEL_FILES, OFFICIAL_SOURCE, find_weights
from ..errors import WeightsError
from ..log import DONE, RUN
from .testweights import generate

logger = logging.getLogger(__spec__.name if __spec__ else __name__)  # under "python -m" too

BANNER = """
==========================================================================================
  DEMO WITH RANDOM TEST WEIGHTS: no official SynthSeg weights were found, so seeded random
  weights were generated in {folder}.
  The pipeline ran end to end, but the labels are ANATOMICALLY MEANINGLESS.
  To get real segmentations: {source}.
==========================================================================================
"""


def mni152_t1(path: Path) -> bool:
    """Write nilearn's MNI152 T1 (1 mm) to ``path`` unless it is there; False (after an [ERR] line) without
    nilearn, which a plain ``pip install`` leaves out (``pip install '.[demo]'`` brings it)."""
    if path.is_file():
        return True
    try:
        from nilearn.datasets import load_mni152_template
    except ImportError:
        logger.error("the MNI152 T1 comes from nilearn, which is not installed: pip install 'synthseg-native[demo]' "
                     "(or pip install nilearn), or give an image of your own")
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(load_mni152_template(resolution=1), str(path))
    logger.info(f"input: MNI152 T1 template from nilearn -> {path}")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Segment nilearn's MNI152 T1 into results/demo/.")
    p.add_argument("--out", default="results/demo", help="Output folder (default: results/demo).")
    p.add_argument("--models", help="Folder with official weights (default: the usual search order).")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--flags", default="", help="Extra SynthSeg flags, e.g. '--fast', '--parc --qc qc.csv', "
                   "'--backend torch'.")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    image = out / "mni152_t1.nii.gz"
    if not mni152_t1(image):
        return 1

    models, test_weights = args.models, False
    try:
        models = str(find_weights(MODEL_FILES["seg2"], args.models).parent)
        logger.info(f"using weights in {models}")
    except WeightsError:
        folder = out / "test-weights"
        missing = [k for k, name in MODEL_FILES.items() if not (folder / name).is_file()]
        if missing:  # all five, so that --flags "--parc --qc ..." and "--robust" work too
            logger.log(RUN, f"no official weights found; writing seeded test weights into {folder}")
            generate(folder, only=missing)
        models, test_weights = str(folder), True

    argv2 = ["--i", str(image), "--o", str(out / "mni152_synthseg.nii.gz"),
             "--vol", str(out / "mni152_volumes.csv"), "--snapshot", str(out / "qc"), "--models", models,
             *shlex.split(args.flags)]
    if args.threads:
        argv2 += ["--threads", str(args.threads)]
    rc = cli_main(argv2)
    if test_weights:
        print(BANNER.format(folder=models, source=OFFICIAL_SOURCE), file=sys.stderr)
    if rc == 0:
        logger.log(DONE, f"demo outputs in {out}/ (mni152_synthseg.nii.gz, mni152_volumes.csv, QC snapshot "
                    "qc/mni152_synthseg.png and page qc/index.html)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
