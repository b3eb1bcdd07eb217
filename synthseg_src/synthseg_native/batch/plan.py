"""Which files a run reads and writes, following upstream's rules for --i and the output flags.

``--i`` may be one image, a folder of images, or a ``.txt`` list; every output flag must then be of
the matching kind (a file or folder, a folder, a ``.txt`` list). Volume and QC tables are one shared
CSV for a file or folder input and one CSV per subject for a ``.txt`` list.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from ..errors import UsageError
from ..io.atomic import IMAGE_EXTENSIONS, image_extension


@dataclass
class Plan:
    images: list[str]
    seg: list[str]
    post: list[str | None]
    resample: list[str | None]
    vol: list[str | None]
    qc: list[str | None]
    shared_csv: bool
    notes: list[str] = field(default_factory=list)
    #: One short unique name per scan (QC snapshots, cohort page); empty means "derive from ``seg``".
    names: list[str] = field(default_factory=list)
    #: The BIDS dataset root when --i is one (outputs then follow BIDS-Derivatives naming).
    bids_root: str | None = None
    #: (i, N) when this plan is shard i of N of a larger one (``--shard``).
    shard: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.names:
            self.names = scan_names(self.seg)

    def image_outputs(self, k: int) -> list[str]:
        """The files image ``k`` alone writes (its per-subject CSVs included, a shared CSV not)."""
        paths = [self.seg[k], self.post[k], self.resample[k]]
        if not self.shared_csv:
            paths += [self.vol[k], self.qc[k]]
        return [p for p in paths if p is not None]

    def shared_outputs(self) -> list[str]:
        """The CSV tables every image adds a row to (one file for a file or folder input)."""
        if not self.shared_csv or not self.images:
            return []
        return [p for p in (self.vol[0], self.qc[0]) if p is not None]


def scan_names(segs: list[str]) -> list[str]:
    """Unique file-name-safe names for the scans of a plan, from their segmentation paths.

    Computed once for the whole (unsharded) plan so every shard names a scan the same way: the path
    below the segmentations' common folder, without extension, '/' replaced by '_' (a folder batch
    gives the segmentation's stem; a .txt list with ``sub-1/seg.nii.gz``, ``sub-2/seg.nii.gz`` gives
    ``sub-1_seg`` and ``sub-2_seg``).
    """
    if not segs:
        return []
    common = os.path.dirname(segs[0]) if len(segs) == 1 else os.path.commonpath(segs)
    names = []
    for path in segs:
        rel = os.path.relpath(path, common) if len(segs) > 1 else os.path.basename(path)
        ext = image_extension(rel) or ""
        names.append(rel[: len(rel) - len(ext)].replace(os.sep, "_").replace("/", "_"))
    seen: dict[str, int] = {}
    for k, name in enumerate(names):  # a.nii and a.nii.gz in one folder: a, a-2
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[k] = f"{name}-{seen[name]}"
    return names


def stem(path: str) -> str:
    """The file name of ``path`` without its folder and its image extension (``.nii.gz``, ``.nii``, ``.mgz``)."""
    name = os.path.basename(path)
    ext = image_extension(name)
    return name[: len(name) - len(ext)] if ext else name


@dataclass(frozen=True)
class StageFiles:
    """The files of the numbered pipeline's step 40 (``synthseg-native stage``, docs/pipeline.md)."""

    image: str
    seg: str
    vol: str
    post: str | None


def pipeline_files(data_root: str, sid: str, posteriors: bool = False) -> StageFiles:
    """Step 40's files in a numbered pipeline's data folder: step 30's SynthSR output in, and
    ``derivatives/<SID>/synthseg/<SID>_synthseg.nii.gz`` (+ ``_vols.csv``) out, where the pipeline's next steps and
    its status page look."""
    subject = os.path.join(data_root, "derivatives", sid)
    return stage_files(os.path.join(subject, "synthsr", f"{sid}_synthsr.nii.gz"),
                       os.path.join(subject, "synthseg", f"{sid}_synthseg.nii.gz"), posteriors)


def stage_files(image: str, out: str | None = None, posteriors: bool = False) -> StageFiles:
    """Step 40's outputs for ``IN [OUT]``: ``OUT`` with an image extension is the segmentation; any other ``OUT`` (or,
    without one, the input's folder) receives ``<name>_synthseg.nii.gz``. The volume table and the posteriors sit
    beside the segmentation: ``<segmentation's name>_vols.csv``, ``<segmentation's name>_posteriors.nii.gz``.
    Paths stay as given (relative ones too), so the log lines show what the user typed."""
    if out is not None and image_extension(out) is not None:
        seg = out
    else:
        seg = os.path.join(os.path.dirname(image) if out is None else out, f"{stem(image)}_synthseg.nii.gz")
    base = os.path.join(os.path.dirname(seg), stem(seg))
    return StageFiles(image, seg, f"{base}_vols.csv", f"{base}_posteriors.nii.gz" if posteriors else None)


def has_image_ext(path: str) -> bool:
    return any(ext in os.path.basename(path) for ext in IMAGE_EXTENSIONS)


def _read_list(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise UsageError(f"{path}: {what} list file does not exist")
    with open(path) as fh:
        return [line.rstrip("\r\n") for line in fh if line.strip()]


def _suffixed(path: str, suffix: str) -> str:
    """Upstream inserts the suffix before '.nii' or '.mgz' (``a.nii.gz`` → ``a_synthseg.nii.gz``)."""
    return path.replace(".nii", f"_{suffix}.nii").replace(".mgz", f"_{suffix}.mgz")


def plan_outputs(i: str, o: str, post: str | None = None, resample: str | None = None,
                 vol: str | None = None, qc: str | None = None) -> Plan:
    plan = _plan(i, o, post, resample, vol, qc)
    _check_collisions(plan)
    return plan


def _check_collisions(plan: Plan) -> None:
    """Refuse, before any work, outputs that would overwrite an input or each other (one file written twice
    in a run keeps only the last image's result)."""
    def key(path: str) -> str:
        return os.path.normcase(os.path.realpath(path))

    inputs = {key(p): p for p in plan.images}
    seen: dict[str, str] = {}
    per_image = [("--o", plan.seg), ("--post", plan.post), ("--resample", plan.resample)]
    if not plan.shared_csv:
        per_image += [("--vol", plan.vol), ("--qc", plan.qc)]
    named = [(f"{flag} of {plan.images[k]}", p) for flag, paths in per_image for k, p in enumerate(paths)]
    if plan.shared_csv and plan.images:
        named += [("--vol table", plan.vol[0]), ("--qc table", plan.qc[0])]
    for what, path in named:
        if path is None:
            continue
        if key(path) in inputs:
            raise UsageError(f"{path}: the {what} would overwrite an input image")
        if key(path) in seen:
            raise UsageError(f"{path} is both the {seen[key(path)]} and the {what}; give each output its own file")
        seen[key(path)] = what


def _plan(i: str, o: str, post: str | None, resample: str | None, vol: str | None, qc: str | None) -> Plan:
    if not i:
        raise UsageError("please specify an input file, folder or .txt list (--i)")
    if not o:
        raise UsageError("please specify an output file or folder (--o)")
    i = os.path.abspath(i)
    outs = {"--o": o, "--post": post, "--resample": resample, "--vol": vol, "--qc": qc}
    outs = {k: (os.path.abspath(v) if v else None) for k, v in outs.items()}
    notes: list[str] = []

    if os.path.basename(i).endswith(".txt"):
        images = _read_list(i, "input")
        if not images:
            raise UsageError(f"{i}: input list is empty")
        lists: dict[str, list[str | None]] = {}
        for flag, path in outs.items():
            if path is None:
                lists[flag] = [None] * len(images)
                continue
            if not path.endswith(".txt"):
                raise UsageError(f"{flag} must be a .txt list when --i is a .txt list (got {path})")
            entries = _read_list(path, flag)
            if len(entries) != len(images):
                raise UsageError(f"{flag} list {path} has {len(entries)} entries, --i has {len(images)}")
            lists[flag] = [os.path.abspath(e) for e in entries]
        images = [os.path.abspath(p) for p in images]
        return Plan(images, lists["--o"], lists["--post"], lists["--resample"], lists["--vol"],  # type: ignore
                    lists["--qc"], shared_csv=False, notes=notes)

    for flag, path in outs.items():
        if path is not None and path.endswith(".txt"):
            raise UsageError(f"{flag} can only be a .txt list when --i is a .txt list (got {path})")

    if not has_image_ext(i):
        if os.path.isfile(i):
            raise UsageError(f"{i}: unsupported extension (use .nii, .nii.gz, .mgz, a folder or a .txt list)")
        if not os.path.isdir(i):
            raise UsageError(f"{i}: input folder does not exist")
        images = sorted(glob.glob(os.path.join(glob.escape(i), "*nii.gz"))
                        + glob.glob(os.path.join(glob.escape(i), "*nii"))
                        + glob.glob(os.path.join(glob.escape(i), "*.mgz")))
        images = [p for p in images if os.path.isfile(p)]
        if not images:
            raise UsageError(f"{i}: no .nii, .nii.gz or .mgz image found in this folder")

        def folder(flag: str, suffix: str) -> list[str | None]:
            path = outs[flag]
            if path is None:
                return [None] * len(images)
            if has_image_ext(path):
                raise UsageError(f"{flag} must be a folder when --i is a folder (got {path})")
            return [_suffixed(os.path.join(path, os.path.basename(p)), suffix) for p in images]

        seg = folder("--o", "synthseg")
        return Plan(images, seg, folder("--post", "posteriors"),  # type: ignore[arg-type]
                    folder("--resample", "resampled"), csv_outputs(outs["--vol"], len(images), notes, "--vol"),
                    csv_outputs(outs["--qc"], len(images), notes, "--qc"), shared_csv=True, notes=notes)

    if not os.path.isfile(i):
        raise UsageError(f"{i}: input file does not exist")
    if image_extension(i) is None:
        raise UsageError(f"{i}: unsupported extension (use .nii, .nii.gz or .mgz)")

    def single(flag: str, suffix: str) -> str | None:
        path = outs[flag]
        if path is None:
            return None
        if not has_image_ext(path):
            return os.path.join(path, _suffixed(os.path.basename(i), suffix))
        return path

    return Plan([i], [single("--o", "synthseg")], [single("--post", "posteriors")],  # type: ignore[list-item]
                [single("--resample", "resampled")], csv_outputs(outs["--vol"], 1, notes, "--vol"),
                csv_outputs(outs["--qc"], 1, notes, "--qc"), shared_csv=True, notes=notes)


def csv_outputs(path: str | None, n: int, notes: list[str], flag: str) -> list[str | None]:
    if path is None:
        return [None] * n
    if not path.endswith(".csv"):
        notes.append(f"{flag} given without .csv extension; writing {path}.csv")
        path += ".csv"
    return [path] * n
