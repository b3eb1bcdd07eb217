"""FreeSurfer label tables used by SynthSeg 1.0 / 2.0 and its parcellation and QC heads.

The raw lists keep upstream's channel layout (neutral labels first, then left, then right, with
duplicates used as padding) because the left/right channel swap of the flipped prediction and the
order of the CSV columns are both derived from that layout. The values are FreeSurfer's public
label numbers; tests check them against upstream's own ``.npy`` tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PHOTO_NEUTRAL = 5  # neutral entries at the head of Photo-SynthSeg's label lists (FreeSurfer 8's n_neutral_labels)

_BG = 0
# 2.0: 19 neutral entries (background, 3rd/4th ventricle, brain-stem, CSF, padding), 18 left, 18 right.
_SEG_2 = [0, 14, 15, 16, 24] + [0] * 14 + [
    2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 17, 18, 2, 26, 28, 0, 4, 5,
    41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 41, 58, 60, 0, 43, 44]
# 1.0: no CSF label, 18 neutral entries.
_SEG_1 = [0, 14, 15, 16] + [0] * 14 + _SEG_2[19:]

_NAMES = {
    0: "background", 2: "left cerebral white matter", 3: "left cerebral cortex",
    4: "left lateral ventricle", 5: "left inferior lateral ventricle",
    7: "left cerebellum white matter", 8: "left cerebellum cortex", 10: "left thalamus",
    11: "left caudate", 12: "left putamen", 13: "left pallidum", 14: "3rd ventricle",
    15: "4th ventricle", 16: "brain-stem", 17: "left hippocampus", 18: "left amygdala", 24: "csf",
    26: "left accumbens area", 28: "left ventral DC", 41: "right cerebral white matter",
    42: "right cerebral cortex", 43: "right lateral ventricle", 44: "right inferior lateral ventricle",
    46: "right cerebellum white matter", 47: "right cerebellum cortex", 49: "right thalamus",
    50: "right caudate", 51: "right putamen", 52: "right pallidum", 53: "right hippocampus",
    54: "right amygdala", 58: "right accumbens area", 60: "right ventral DC",
}

# Topology classes: structures that must form one connected piece together (class 0 is never masked).
_TOPO = {0: 0, 14: 1, 15: 2, 16: 3, 24: 0, 2: 4, 3: 4, 4: 4, 5: 4, 7: 5, 8: 5, 10: 6, 11: 7, 12: 8,
         13: 9, 17: 10, 18: 11, 26: 12, 28: 13, 41: 14, 42: 14, 43: 14, 44: 14, 46: 15, 47: 15,
         49: 16, 50: 17, 51: 18, 52: 19, 53: 20, 54: 21, 58: 22, 60: 23}

# Groups of the robust model's first stage (background, white matter-like, grey matter, CSF, cerebellum).
_DENOISER = {0: 0, 14: 3, 15: 3, 16: 1, 24: 0, 2: 1, 3: 2, 4: 3, 5: 3, 7: 4, 8: 4, 10: 1, 11: 1,
             12: 1, 13: 1, 17: 2, 18: 2, 26: 1, 28: 1}
# Groups of the QC network.
_QC = {0: 0, 14: 3, 15: 3, 16: 5, 24: 0, 2: 1, 3: 2, 4: 3, 5: 3, 7: 4, 8: 4, 10: 6, 11: 1, 12: 7,
       13: 7, 17: 8, 18: 8, 26: 1, 28: 1}
_QC_NAMES = {0: "background", 1: "general white matter", 2: "general grey matter", 3: "general csf",
             4: "cerebellum", 5: "brainstem", 6: "thalamus", 7: "putamen+pallidum",
             8: "hippocampus+amygdala"}

_DK = ["bankssts", "caudalanteriorcingulate", "caudalmiddlefrontal", "cuneus", "entorhinal", "fusiform",
       "inferiorparietal", "inferiortemporal", "isthmuscingulate", "lateraloccipital",
       "lateralorbitofrontal", "lingual", "medialorbitofrontal", "middletemporal", "parahippocampal",
       "paracentral", "parsopercularis", "parsorbitalis", "parstriangularis", "pericalcarine",
       "postcentral", "posteriorcingulate", "precentral", "precuneus", "rostralanteriorcingulate",
       "rostralmiddlefrontal", "superiorfrontal", "superiorparietal", "superiortemporal",
       "supramarginal", "frontalpole", "temporalpole", "transversetemporal", "insula"]
# FreeSurfer's DK numbering skips 1004 / 2004 (corpus callosum), which SynthSeg does not segment.
_DK_CODES = [1, 2, 3] + list(range(5, 36))


def _mirror(label: int) -> int:
    """Left/right groups share their value: map a right label to its left twin for table look-ups."""
    return {41: 2, 42: 3, 43: 4, 44: 5, 46: 7, 47: 8, 49: 10, 50: 11, 51: 12, 52: 13, 53: 17,
            54: 18, 58: 26, 60: 28}.get(label, label)


def raw_segmentation_labels(v1: bool = False) -> np.ndarray:
    """Upstream's label list before de-duplication (the layout the flip swap is derived from)."""
    return np.array(_SEG_1 if v1 else _SEG_2, dtype=np.int32)


def raw_segmentation_names(v1: bool = False) -> np.ndarray:
    return np.array([_NAMES[v] for v in raw_segmentation_labels(v1)])


def raw_topology_classes(v1: bool = False) -> np.ndarray:
    return np.array([_TOPO[v] for v in raw_segmentation_labels(v1)], dtype=np.int32)


def raw_denoiser_groups() -> np.ndarray:
    return np.array([_DENOISER[_mirror(v)] for v in raw_segmentation_labels(False)], dtype=np.int32)


def raw_qc_groups(v1: bool = False) -> np.ndarray:
    return np.array([_QC[_mirror(v)] for v in raw_segmentation_labels(v1)], dtype=np.int32)


def raw_qc_names(v1: bool = False) -> np.ndarray:
    return np.array([_QC_NAMES[g] for g in raw_qc_groups(v1)])


def parcellation_labels() -> np.ndarray:
    codes = [0] + [1000 + c for c in _DK_CODES] + [2000 + c for c in _DK_CODES]
    return np.array(codes, dtype=np.int32)


def parcellation_names() -> np.ndarray:
    return np.array(["Background"] + [f"ctx-lh-{n}" for n in _DK] + [f"ctx-rh-{n}" for n in _DK])


def n_neutral(v1: bool = False) -> int:
    return 18 if v1 else 19


def flip_indices(raw_labels: np.ndarray, n_neutral_labels: int) -> np.ndarray:
    """For each unique label channel, the channel holding its left/right twin.

    The flipped prediction sees a mirrored brain, so its left channels describe the right hemisphere;
    this permutation puts them back before averaging with the unflipped prediction.
    """
    unique = np.unique(raw_labels)
    n_sided = (len(raw_labels) - n_neutral_labels) // 2
    neutral = raw_labels[:n_neutral_labels]
    left = raw_labels[n_neutral_labels:n_neutral_labels + n_sided]
    right = raw_labels[n_neutral_labels + n_sided:]
    twin = {int(lab): int(lab) for lab in neutral}
    for lab_l, lab_r in zip(left, right):
        if lab_l == 0 and lab_r == 0:
            continue
        twin[int(lab_l)] = int(lab_r)
        twin[int(lab_r)] = int(lab_l)
    position = {int(lab): i for i, lab in enumerate(unique)}
    return np.array([position[twin[int(lab)]] for lab in unique], dtype=np.int32)


@dataclass(frozen=True)
class LabelSet:
    """Everything the engine needs to know about one model version's outputs, in channel order."""

    labels: np.ndarray          # unique label values = output channel order
    names: np.ndarray           # structure names, same order
    topology: np.ndarray        # topology class per channel
    flip: np.ndarray            # left/right twin channel per channel
    qc_groups: np.ndarray       # QC group per channel
    qc_names: np.ndarray
    v1: bool
    intracranial: bool = True   # volumes end with "total intracranial" (2.0; not 1.0 nor Photo-SynthSeg)

    @classmethod
    def build(cls, v1: bool = False) -> LabelSet:
        raw = raw_segmentation_labels(v1)
        labels, idx = np.unique(raw, return_index=True)
        return cls(labels=labels.astype(np.int32), names=raw_segmentation_names(v1)[idx],
                   topology=raw_topology_classes(v1)[idx],
                   flip=flip_indices(raw, n_neutral(v1)), qc_groups=raw_qc_groups(v1)[idx],
                   qc_names=raw_qc_names(v1)[idx], v1=v1, intracranial=not v1)

    @classmethod
    def photo(cls, folder: Path, both: bool) -> LabelSet:
        """Photo-SynthSeg's labels, from the lists FreeSurfer installs beside its weights
        (``synthseg_segmentation_labels_photo_{both,single}_1.0.npy``, names, topology classes): their content is
        FreeSurfer's and is not part of this toolkit. 5 neutral entries; no QC groups (--photo excludes --qc)."""
        variant = "both" if both else "single"
        lists = []
        for stem in ("synthseg_segmentation_labels", "synthseg_segmentation_names", "synthseg_topological_classes"):
            path = folder / f"{stem}_photo_{variant}_1.0.npy"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: Photo-SynthSeg's label list is missing (FreeSurfer installs it "
                                        "in $FREESURFER_HOME/models beside synthseg_photo_*.h5)")
            lists.append(np.load(path))
        raw, raw_names, raw_topology = lists
        raw = np.asarray(raw).astype(np.int32)
        labels, idx = np.unique(raw, return_index=True)
        return cls(labels=labels.astype(np.int32), names=np.asarray(raw_names)[idx],
                   topology=np.asarray(raw_topology).astype(np.int32)[idx],
                   flip=flip_indices(raw, PHOTO_NEUTRAL), qc_groups=np.zeros(len(labels), np.int32),
                   qc_names=np.array(["background"]), v1=False, intracranial=False)


def denoiser_groups() -> np.ndarray:
    """Unique group values of the robust model's first stage (its output channel order)."""
    return np.unique(raw_denoiser_groups())
