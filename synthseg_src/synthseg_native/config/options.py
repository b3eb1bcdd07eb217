"""One record of everything a run can be asked to do: upstream's flags, FreeSurfer 8's, ours.

The command line, the Python API, the cohort workflow and the provenance cache all speak
:class:`Options`. Each field carries its command-line spelling and help in its metadata, so the
parser is generated from this class (``config.parser``) and a flag cannot exist in one form and not
in the other. :meth:`Options.normalised` applies upstream's own rules once ("robust implies fast",
one ``--crop`` size meaning three), :meth:`Options.check` refuses inconsistent combinations before
any work, and the facts several layers need (which segmentation model, the grid step) live here.
"""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

import numpy as np

from ..errors import UsageError
from .sizes import parse_size

N_LEVELS = 5                 # the U-Net halves the grid 5 times...
GRID_STEP = 2 ** N_LEVELS    # ...so every network grid (and --crop) is a multiple of 32
BN_FORMS = ("auto", "fused", "unfused")
PRECISIONS = ("fp32", "bf16", "fp16", "tf32")
BACKENDS = ("tf", "torch", "auto")
DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_CHECKS = ("error", "cpu", "off")
ENGINES = ("native", "upstream")
CONVENTIONS = ("upstream", "freesurfer")
PHOTO_SIDES = ("left", "right", "both")
DEFAULT_BIDS_SUFFIXES = ("T1w",)

MODEL, IO, RUN = "model", "io", "run"  # what a field decides: the networks, the files, or how the run behaves
NATIVE_ONLY = "--resume, --shard, --snapshot and BIDS datasets need the native engine"


def round_up(n: int, m: int = GRID_STEP) -> int:
    """Smallest multiple of ``m`` that is >= ``n``, with upstream's arithmetic (``int(n / m) + 1``)."""
    if n % m == 0:
        return n
    return (int(n / m) + 1) * m


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` → (2, 4); i runs from 1 to N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise UsageError(f"--shard takes i/N, e.g. 1/4 (got {text!r})")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise UsageError(f"--shard {text}: need 1 <= i <= N")
    return i, n


def _opt(default: Any, help: str, kind: str, flag: str | None = None, group: str | None = None,
         **argparse: Any) -> Any:
    """A field with its command-line form: ``flag`` (default ``--<name>``), help, argparse keywords."""
    meta = {"help": help, "kind": kind, "flag": flag, "group": group, "argparse": argparse}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


BATCH = "batches and cohorts (docs/cohorts.md)"


@dataclass
class Options:
    """Every option of a run, with the command line's names and defaults; ``threads`` None means all cores."""

    # upstream SynthSeg_predict.py
    i: str | None = _opt(None, "Image to segment (.nii/.nii.gz/.mgz), a folder of images, a .txt list, or a BIDS "
                         "dataset (a folder with dataset_description.json).", IO)
    o: str | None = _opt(None, "Segmentation output: file or folder (folder if --i is a folder; .txt if a list; "
                         "the derivative dataset's folder for BIDS).", IO)
    parc: bool = _opt(False, "Cortical parcellation (DK atlas).", MODEL, action="store_true")
    robust: bool = _opt(False, "SynthSeg-robust (implies --fast; not with --v1).", MODEL, action="store_true")
    fast: bool = _opt(False, "Skip the flipped prediction and topology cleaning.", MODEL, action="store_true")
    ct: bool = _opt(False, "Clip intensities to [0, 80] for CT scans.", MODEL, action="store_true")
    vol: str | None = _opt(None, "CSV file with volumes (mm3) of all structures.", IO)
    qc: str | bool | None = _opt(None, "CSV file with automated QC scores.", IO)
    post: str | None = _opt(None, "Posteriors output(s), same kind as --o.", IO)
    resample: str | None = _opt(None, "Resampled input image(s) at 1 mm, same kind as --o.", IO)
    crop: list[int] | int | None = _opt(None, "Analyse a centred patch of this size (1 or 3 values).", MODEL,
                                  nargs="+", type=int)
    threads: int | None = _opt(None, "CPU threads for TensorFlow (default: all cores; upstream defaults to 1).",
                               MODEL, type=int)
    cpu: bool = _opt(False, "Run on the CPU even if a GPU is available.", MODEL, action="store_true")
    v1: bool = _opt(False, "Use SynthSeg 1.0 instead of 2.0.", MODEL, action="store_true")
    # FreeSurfer 8's mri_synthseg
    autocrop: bool = _opt(False, "FreeSurfer 8: analyse only the box around the voxels above the background "
                          "(after the 1 mm resampling and the rescale; +2 voxels, rounded up to a multiple of 32): "
                          "less memory and time for large fields of view. Not with --crop.", MODEL,
                          action="store_true")
    keepgeom: bool = _opt(False, "FreeSurfer 8: write the segmentation on the input's voxel grid (nearest "
                          "neighbour, as FreeSurfer's surfa resamples it); posteriors stay on the 1 mm grid and "
                          "volumes come from the 1 mm posteriors.", MODEL, action="store_true")
    addctab: bool = _opt(False, "FreeSurfer 8: embed a colour table in the segmentation (.mgz, and NIfTI's "
                         "FreeSurfer header extension): $FREESURFER_HOME/FreeSurferColorLUT.txt when FREESURFER_HOME "
                         "is set, else the labels this run can write.", MODEL, action="store_true")
    photo: str | None = _opt(None, "FreeSurfer 8: Photo-SynthSeg, for a 3D stack of coronal dissection photos of "
                             "the cerebrum: left, right or both hemispheres (its weights and label lists "
                             "synthseg_*photo* from the weights folder). Not with --robust, --v1, --ct or --qc.",
                             MODEL, metavar="{left,right,both}")
    model: str | None = _opt(None, "FreeSurfer 8: another segmentation model file (.h5) with SynthSeg's "
                             "architecture, used instead of synthseg_2.0.h5 (or _1.0 with --v1).", MODEL,
                             metavar="FILE")
    conventions: str = _opt("upstream", "Whose behaviour to reproduce where upstream SynthSeg and FreeSurfer 8's "
                            "mri_synthseg differ: upstream, or freesurfer (the mri_synthseg command: unfused "
                            "BatchNorm by default, the mean of a multi-channel input, FreeSurfer's label lists and "
                            "colour table from $FREESURFER_HOME; docs/freesurfer.md).", MODEL,
                            choices=list(CONVENTIONS))
    # this toolkit
    models: str | None = _opt(None, "Folder with the weight files; when given, the only place searched (default: "
                              "$SYNTHSEG_MODELS, ./models, $FREESURFER_HOME/models, $SYNTHSEG_HOME/models).", MODEL)
    backend: str = _opt("auto", "Network backend: tf (TensorFlow, byte-identical to upstream on the CPU), torch "
                        "(PyTorch: CUDA and Apple GPUs, no TensorFlow needed; agrees with upstream to float32 "
                        "rounding, docs/equivalence.md) or auto (default: tf where TensorFlow is installed, else "
                        "torch; the first [INFO] line says which).", MODEL, choices=list(BACKENDS))
    device: str = _opt("auto", "Where the networks run: auto (CUDA, then MPS, then CPU), cpu, cuda or mps (mps: torch "
                       "backend only). --cpu is --device cpu.", MODEL, choices=list(DEVICES))
    device_check: str = _opt("error", "Before a GPU is trusted, a small streamed U-Net runs on it and on the CPU "
                             "(once per device, OS and framework version; cached): error (default) stops with one "
                             "[ERR] when they disagree, cpu warns and runs on the CPU instead, off skips the check.",
                             MODEL, flag="--device-check", choices=list(DEVICE_CHECKS))
    bn: str = _opt("auto", "BatchNorm form: fused (exact, CPU/CUDA), unfused (Metal); auto picks per device.",
                   MODEL, choices=list(BN_FORMS))
    precision: str = _opt("fp32", "Network arithmetic: fp32 (default, identical to upstream); bf16 (CPUs with "
                          "AVX512-BF16/AMX, CUDA >= 8.0) or fp16 (CUDA, MPS) are faster but NOT identical; tf32 "
                          "(torch on CUDA >= 8.0) allows TensorFloat-32, which fp32 switches off (docs/precision.md). "
                          "Falls back to fp32 with a warning where the hardware lacks support.",
                          MODEL, choices=list(PRECISIONS))
    max_memory: str = _opt("auto", "Memory budget per image, e.g. 8G, 8GB, 8000M, 12.5G (decimal; 8GiB binary). An "
                           "image whose estimated need exceeds it is segmented in overlapping tiles (fewest that "
                           "fit; results can differ from upstream near tile seams, docs/performance.md); refused "
                           "only if even the smallest tiles do not fit. Default auto: the memory available to the "
                           "process (cgroup limits included).", MODEL, flag="--max-memory", metavar="SIZE")
    engine: str = _opt("native", "native (default) or upstream: run $SYNTHSEG_HOME's SynthSeg for comparison.",
                       MODEL, choices=list(ENGINES))
    synthseg_home: str | None = _opt(None, "Upstream SynthSeg checkout for --engine upstream "
                                     "(default: $SYNTHSEG_HOME).", MODEL, flag="--synthseg-home")
    # batches
    resume: bool = _opt(False, "Record each finished scan (<seg>.provenance.json) and skip scans whose record "
                        "proves their outputs current; a batch with nothing to do loads no model.", IO, group=BATCH,
                        action="store_true")
    shard: str | None = _opt(None, "Segment only part i of N (1 <= i <= N) of the sorted scan list; N workers with "
                             "the same arguments split it exactly. Shared CSVs become <name>.shard-i-of-N.csv "
                             "(synthseg-native cohort finish merges them).", IO, group=BATCH,
                             metavar="i/N")
    snapshot: str | None = _opt(None, "QC snapshot per scan (DIR/<name>.png: three slices, labels in FreeSurfer "
                                "colours) and a cohort page DIR/index.html (thumbnail, key volumes, QC scores, run "
                                "time).", IO, group=BATCH, metavar="DIR")
    bids_suffix: list[str] = _opt(list(DEFAULT_BIDS_SUFFIXES), "With a BIDS dataset as --i: the anat suffixes to "
                                  "segment (default: T1w).", IO, flag="--bids-suffix", group=BATCH, nargs="+",
                                  metavar="SUFFIX")
    no_overlap: bool = _opt(False, "Segment a batch's scans strictly one after another. By default the next scan "
                            "is read and the previous one post-processed and written while the network runs (same "
                            "outputs, byte for byte; a scan whose network would not fit in memory beside the "
                            "previous scan's finishing waits for it).", RUN, flag="--no-overlap", group=BATCH,
                            action="store_true")
    profile: bool = _opt(False, "Print the time spent in each stage.", RUN, action="store_true")
    debug: bool = _opt(False, "Show Python tracebacks and TensorFlow logs.", RUN, action="store_true")

    # -- derived facts ------------------------------------------------------------------------------
    @property
    def segmentation_model(self) -> str:
        """Key of the segmentation network's weights (``engine.weights.MODEL_FILES``); FreeSurfer's precedence:
        --photo, then --robust, then --v1 (``--model FILE`` replaces the file, not the key)."""
        if self.photo:
            return "photo_both" if self.photo == "both" else "photo_single"
        return "robust" if self.robust else ("seg1" if self.v1 else "seg2")

    @property
    def model_keys(self) -> list[str]:
        """Every network this run loads: the segmentation model, then parcellation and QC heads."""
        return [self.segmentation_model] + [k for k, on in (("parc", self.parc), ("qc", self.qc)) if on]

    @property
    def max_memory_bytes(self) -> float | None:
        """``max_memory`` in bytes; None: the memory available to the process."""
        return parse_size(self.max_memory)

    @property
    def version(self) -> str:
        """The model's name as the log lines say it: ``SynthSeg 2.0 (fast)``."""
        if self.photo:
            return "Photo-SynthSeg 1.0"
        if self.robust:
            return "SynthSeg-robust 2.0"
        if self.model:
            return self.model
        return ("SynthSeg 1.0" if self.v1 else "SynthSeg 2.0") + (" (fast)" if self.fast else "")

    # -- upstream's rules and ours -----------------------------------------------------------------
    def normalised(self) -> Options:
        """The same request in its one canonical form: "--robust" and "--robust --fast" are the same run, and so
        are "--crop 160" and "--crop 160 160 160", "--cpu" and "--device cpu"; paths that outlive the working
        directory become absolute."""
        crop = None if self.crop is None else [int(c) for c in crop_sizes(self.crop)]
        if crop is not None and len(crop) == 1:
            crop = crop * 3
        cpu = self.cpu or self.device == "cpu"
        bn = "unfused" if self.conventions == "freesurfer" and self.bn == "auto" else self.bn  # as FreeSurfer builds
        return replace(self, fast=self.fast or self.robust, crop=crop, cpu=cpu, device="cpu" if cpu else self.device,
                       bn=bn, model=os.path.abspath(self.model) if self.model else None,
                       snapshot=os.path.abspath(self.snapshot) if self.snapshot else None,
                       bids_suffix=list(self.bids_suffix), max_memory=str(self.max_memory))

    def check(self) -> None:
        """Refuse combinations that cannot work, before anything is loaded (:class:`UsageError`)."""
        if self.photo is not None:
            if self.photo not in PHOTO_SIDES:
                raise UsageError(f"--photo must be left, right or both, not {self.photo!r}")
            for flag, given in (("--robust", self.robust), ("--v1", self.v1), ("--ct", self.ct), ("--qc", self.qc)):
                if given:
                    raise UsageError(f"--photo cannot be used with {flag} (Photo-SynthSeg has no such variant)")
        if self.robust and self.v1:
            raise UsageError("--robust cannot be used with --v1 (SynthSeg-robust only exists for 2.0)")
        if self.model and (self.photo or self.robust):
            raise UsageError(f"--model cannot be used with {'--photo' if self.photo else '--robust'}, which has its "
                             "own model (FreeSurfer's mri_synthseg would ignore --model)")
        if self.autocrop and self.crop is not None:
            raise UsageError("--autocrop cannot be used with --crop")
        if self.crop is not None:
            crop = crop_sizes(self.crop)
            if len(crop) not in (1, 3):
                raise UsageError(f"--crop takes 1 or 3 sizes, got {len(crop)}")
            if any(not isinstance(c, (int, np.integer)) or c <= 0 for c in crop):
                raise UsageError(f"--crop sizes must be positive integers, got {self.crop}")
        for name, allowed in (("bn", BN_FORMS), ("precision", PRECISIONS), ("engine", ENGINES),
                              ("backend", BACKENDS), ("device", DEVICES), ("device_check", DEVICE_CHECKS),
                              ("conventions", CONVENTIONS)):
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        parse_size(self.max_memory)
        if self.engine == "upstream" and (self.keepgeom or self.addctab or self.autocrop or self.photo or self.model
                                          or self.conventions != "upstream"):
            raise UsageError("--keepgeom, --addctab, --autocrop, --photo, --model and --conventions freesurfer are "
                             "FreeSurfer 8's; the upstream engine runs upstream SynthSeg, which has none of them")
        if self.engine == "upstream" and self.precision != "fp32":
            raise UsageError("--precision is a native-engine option; upstream SynthSeg runs in fp32 only")
        if self.engine == "upstream" and (self.backend == "torch" or self.device not in ("auto", "cpu")):
            raise UsageError("--backend and --device are native-engine options; upstream SynthSeg runs TensorFlow "
                             "(use --cpu to keep it off the GPU)")
        if self.cpu and self.device not in ("auto", "cpu"):
            raise UsageError(f"--cpu contradicts --device {self.device}")
        if self.backend == "tf" and self.device == "mps":
            raise UsageError("--device mps needs --backend torch (the TF engine reaches Apple GPUs through "
                             "tensorflow-metal, as --device auto)")
        if self.backend == "tf" and self.precision == "tf32":
            raise UsageError("--precision tf32 is a torch-backend option (TensorFlow 2.15 on the CPU has no TF32)")
        if self.engine == "upstream" and str(self.max_memory) != "auto":
            raise UsageError("--max-memory is a native-engine option; upstream SynthSeg has no tiling")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        if self.engine == "upstream" and (self.resume or self.shard or self.snapshot):
            raise UsageError(NATIVE_ONLY)
        if self.shard:
            parse_shard(self.shard)

    @classmethod
    def names(cls, kind: str | None = None) -> list[str]:
        """The fields (of one kind: ``MODEL``, ``IO``, ``RUN``), in command-line order."""
        return [f.name for f in fields(cls) if kind is None or f.metadata["kind"] == kind]

    @classmethod
    def from_keywords(cls, where: str, **keywords: Any) -> Options:
        """Options from keyword arguments (the API), refusing unknown names and values of the wrong type as usage
        errors naming the keyword, as the command line's parser refuses them (a switch given ``"no"`` would
        otherwise count as on). Paths may be ``os.PathLike``."""
        known = set(cls.names())
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise UsageError(f"{where}: unknown option(s) {', '.join(unknown)}; the options are the command "
                             f"line's flags: {', '.join(sorted(known - {'i', 'o'}))}")
        by_name = {f.name: f for f in fields(cls)}
        return cls(**{k: _typed(where, k, v, by_name[k].metadata) for k, v in keywords.items()})


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _typed(where: str, name: str, value: Any, meta: Any) -> Any:
    """``value`` of keyword ``name`` checked against what its flag takes (paths as str); :class:`UsageError` if not."""
    argparse = meta["argparse"]

    def wrong(expected: str) -> UsageError:
        return UsageError(f"{where}: {name} must be {expected}, not {value!r}")

    if value is None:
        return None
    if argparse.get("action") == "store_true":
        if not isinstance(value, (bool, np.bool_)):
            raise wrong("True or False")
        return bool(value)
    if name == "qc" and isinstance(value, (bool, np.bool_)):  # Segmenter(qc=True): the QC network
        return bool(value)
    if argparse.get("type") is int:
        if argparse.get("nargs") == "+" and isinstance(value, (list, tuple)):
            if not value or not all(_is_int(v) for v in value):
                raise wrong("an integer or a list of integers")
            return [int(v) for v in value]
        if not _is_int(value):
            raise wrong("an integer or a list of integers" if argparse.get("nargs") == "+" else "an integer")
        return int(value)
    if argparse.get("nargs") == "+":  # a list of words (--bids-suffix)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise wrong("a string or a list of strings")
        return list(items)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise wrong("a size with a unit such as '8G', or 'auto'" if name == "max_memory" else
                    f"one of {', '.join(argparse['choices'])}" if "choices" in argparse else "a string or a path")
    return value


def crop_sizes(crop: Any) -> list[Any]:
    """``crop`` as a list: the API also takes one number (``crop=160``), as the flag does."""
    return [crop] if isinstance(crop, (int, np.integer)) else list(crop)


def default(name: str) -> Any:
    """The default of field ``name`` (for the parser)."""
    f = next(f for f in fields(Options) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
