"""BIDS datasets in, BIDS-Derivatives out.

When ``--i`` is a BIDS dataset root (it holds ``dataset_description.json``), the scans are its
``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]`` files (``--bids-suffix``, default T1w) and ``--o`` is the
derivative dataset's folder. Each output keeps the source's entities and folder, so BIDS tools
(pybids, fMRIPrep-style pipelines, the validator) find them without a mapping table::

    sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz
    → OUT/sub-01/ses-1/anat/sub-01_ses-1_run-1_desc-synthseg_dseg.nii.gz
      (--post: …_desc-synthseg_probseg.nii.gz, --resample: …_desc-resampled_T1w.nii.gz)

The derivative root also gets ``dseg.tsv`` (index, name, FreeSurfer colour of every label a
segmentation can hold; by BIDS inheritance it describes every ``*_dseg.nii.gz`` below) and a
``dataset_description.json`` naming this toolkit in ``GeneratedBy``.
"""

from __future__ import annotations

import glob
import json
import os

from ..config.options import DEFAULT_BIDS_SUFFIXES
from ..engine import labels as L
from ..errors import UsageError
from ..io import colours
from ..io.atomic import write_text
from ..version import __version__
from .plan import Plan, csv_outputs, has_image_ext

DESCRIPTION = "dataset_description.json"
BIDS_VERSION = "1.9.0"
DESC = "synthseg"


def is_dataset(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path) and os.path.isfile(os.path.join(path, DESCRIPTION))


def find_scans(root: str, suffixes: tuple[str, ...] | list[str] = DEFAULT_BIDS_SUFFIXES) -> list[str]:
    """Anatomical scans with one of ``suffixes``, sorted (subjects, then sessions, then runs)."""
    found: set[str] = set()
    base = glob.escape(root)
    for pattern in ("sub-*/anat/*", "sub-*/ses-*/anat/*"):
        for path in glob.glob(os.path.join(base, pattern)):
            name = os.path.basename(path)
            if any(name.endswith(f"_{s}{ext}") for s in suffixes for ext in (".nii.gz", ".nii")) \
                    and os.path.isfile(path):
                found.add(os.path.abspath(path))
    return sorted(found)


def split_name(path: str) -> tuple[str, str]:
    """``sub-01_ses-1_run-1_T1w.nii.gz`` → (``sub-01_ses-1_run-1``, ``T1w``)."""
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    entities, _, suffix = name.rpartition("_")
    return entities, suffix


def derivative_path(scan: str, root: str, out: str, desc: str, suffix: str) -> str:
    """Where the derivative of ``scan`` goes: same sub/ses/anat folder below ``out``, same entities."""
    entities, _ = split_name(scan)
    folder = os.path.relpath(os.path.dirname(scan), root)
    return os.path.join(out, folder, f"{entities}_desc-{desc}_{suffix}.nii.gz")


def plan_bids(root: str, o: str, post: str | None = None, resample: str | None = None, vol: str | None = None,
              qc: str | None = None, suffixes: tuple[str, ...] | list[str] = DEFAULT_BIDS_SUFFIXES) -> Plan:
    root = os.path.abspath(root)
    if not o:
        raise UsageError("please specify the derivative dataset folder (--o)")
    folders = {"--o": o, "--post": post, "--resample": resample}
    for flag, path in folders.items():
        if path and (has_image_ext(path) or path.endswith(".txt")):
            raise UsageError(f"{flag} must be a folder when --i is a BIDS dataset (got {path})")
    o = os.path.abspath(o)
    if o == root:
        raise UsageError(f"--o must not be the raw BIDS dataset itself; use e.g. {root}/derivatives/synthseg")
    scans = find_scans(root, suffixes)
    if not scans:
        raise UsageError(f"{root}: BIDS dataset without sub-*/[ses-*/]anat/*_{'|'.join(suffixes)}.nii[.gz] scans")
    notes: list[str] = [f"BIDS dataset {root}: {len(scans)} scan(s) ({', '.join(suffixes)}), "
                        f"BIDS-Derivatives outputs in {o}"]
    seg = [derivative_path(s, root, o, DESC, "dseg") for s in scans]
    dupes = sorted({p for p in seg if seg.count(p) > 1})
    if dupes:
        raise UsageError(f"two scans would write {dupes[0]}; select one contrast with --bids-suffix")

    def tree(path: str | None, desc: str, suffix: str | None) -> list[str | None]:
        if not path:
            return [None] * len(scans)
        return [derivative_path(s, root, os.path.abspath(path), desc, suffix or split_name(s)[1]) for s in scans]

    return Plan(scans, seg, tree(post, DESC, "probseg"), tree(resample, "resampled", None),
                csv_outputs(vol and os.path.abspath(vol), len(scans), notes, "--vol"),
                csv_outputs(qc and os.path.abspath(qc), len(scans), notes, "--qc"), shared_csv=True, notes=notes,
                names=[f"{split_name(s)[0]}_{split_name(s)[1]}" for s in scans], bids_root=root)


def label_table(v1: bool = False, parc: bool = False) -> list[tuple[int, str, str]]:
    """(index, FreeSurfer name, ``#rrggbb``) for every label a segmentation of these flags can hold."""
    wanted = set(L.LabelSet.build(v1).labels.tolist())
    if parc:
        wanted |= set(L.parcellation_labels().tolist())
    table = colours.lookup_table(parc)
    return [(idx, name, f"#{r:02x}{g:02x}{b:02x}") for idx, (name, r, g, b) in table.items() if idx in wanted]


def dseg_tsv(v1: bool = False, parc: bool = False) -> str:
    rows = ["index\tname\tcolor"] + [f"{i}\t{n}\t{c}" for i, n, c in label_table(v1, parc)]
    return "\n".join(rows) + "\n"


def dataset_description(root: str, description: str) -> dict:
    source = {}
    try:
        with open(os.path.join(root, DESCRIPTION)) as fh:
            source = json.load(fh)
    except (OSError, ValueError):
        pass
    name = source.get("Name") if isinstance(source, dict) else None
    return {
        "Name": f"SynthSeg segmentations of {name}" if name else "SynthSeg segmentations",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "synthseg-native", "Version": __version__, "Description": description}],
    }


def write_dataset_files(plan: Plan, out: str, v1: bool, parc: bool, description: str) -> None:
    """``dseg.tsv`` and ``dataset_description.json`` at the derivative root (atomic; shards may race)."""
    assert plan.bids_root is not None
    out = os.path.abspath(out)
    write_text(os.path.join(out, "dseg.tsv"), dseg_tsv(v1, parc))
    text = json.dumps(dataset_description(plan.bids_root, description), indent=2) + "\n"
    write_text(os.path.join(out, DESCRIPTION), text)
