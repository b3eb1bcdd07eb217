"""``synthseg-native-testweights DIR``: seeded random SynthSeg weights in the official file layout, for the tests and
the demo where the official weights cannot be had. They are anatomically meaningless, and every run on them says so.

Why recipes: the weights are calibrated on a real brain so that post-processing is exercised (see
``devtools/weightauthor.py``, which needs TensorFlow and nilearn), and that calibration is done once, by the
developers. What ships is each file's recipe (``synthseg_native/data/testweights/<file>.recipe.npz``, 90-260 kB:
the random generator's state before each kernel's draw plus the small fitted arrays, :mod:`.weightrecipe`), from
which numpy and h5py rebuild the five files bit for bit, checked against a digest, in seconds and in any
environment: TensorFlow-only, PyTorch-only, a GPU machine without either's extras.

Usage: ``synthseg-native-testweights OUT_DIR [--only seg2 seg1 robust parc qc]`` (default: all five).
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

from ..engine.weights import MODEL_FILES, SYNTHSEG_KEYS
from ..errors import WeightsError
from ..log import DONE
from . import weightrecipe

logger = logging.getLogger(__spec__.name if __spec__ else __name__)  # under "python -m" too

SEED = 0  # the recipes' seed (an attribute of every file: engine.weights.is_test_weights)


def recipe(key: str) -> Path:
    """The packaged recipe of model ``key`` (a key of ``MODEL_FILES``)."""
    return Path(str(resources.files("synthseg_native") / "data" / "testweights"
                    / f"{MODEL_FILES[key]}{weightrecipe.RECIPE_SUFFIX}"))


def generate(out_dir: str | Path, only: list[str] | None = None) -> dict[str, Path]:
    """Write the requested model files (keys of ``MODEL_FILES``; default all) into ``out_dir``."""
    keys = list(SYNTHSEG_KEYS) if only is None else list(only)
    unknown = [k for k in keys if k not in SYNTHSEG_KEYS]
    if unknown:
        raise WeightsError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(SYNTHSEG_KEYS)}")
    return {key: weightrecipe.rebuild(recipe(key), out_dir) for key in keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="synthseg-native-testweights",
                                description="Write seeded random SynthSeg weights (anatomically meaningless; tests and "
                                "demo) in the official file layout, rebuilt from the recipes in the package: no "
                                "TensorFlow needed.")
    p.add_argument("out_dir", help="folder for the .h5 files (use it as --models)")
    p.add_argument("--only", nargs="+", choices=list(SYNTHSEG_KEYS), metavar="MODEL",
                   help=f"only these models ({', '.join(SYNTHSEG_KEYS)}; default: all five, "
                   f"{', '.join(MODEL_FILES[k] for k in SYNTHSEG_KEYS)})")
    args = p.parse_args(argv)
    try:
        for key, path in generate(args.out_dir, args.only).items():
            logger.log(DONE, f"{key}: {path}")
    except (WeightsError, OSError) as exc:
        logger.error(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
