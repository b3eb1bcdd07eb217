"""FreeSurfer colours and names for the labels SynthSeg writes (``--addctab``, snapshots, BIDS ``dseg.tsv``).

Viewers show a segmentation in the familiar FreeSurfer colours only if they know the lookup table. FreeSurfer 8's
``mri_synthseg --addctab`` embeds its whole FreeSurferColorLUT.txt in the file, in ``.mgz`` and in NIfTI's
FreeSurfer header extension (``io.freesurfer`` writes both, as surfa does); freeview and surfa read it. This module
holds the table this toolkit knows without FreeSurfer (the labels SynthSeg writes) and picks what is embedded; for
NIfTI outputs of ``synthseg-native`` a sidecar ``<name>_ctab.txt`` is written too, for other viewers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .atomic import StagedOutputs, atomic_write, image_extension
from .fsheader import LabelEntry, LookupTable, read_lut

FREESURFER_LUT = "FreeSurferColorLUT.txt"

# index: (FreeSurferColorLUT name, R, G, B)
SEGMENTATION_LUT: dict[int, tuple[str, int, int, int]] = {
    0: ("Unknown", 0, 0, 0),
    2: ("Left-Cerebral-White-Matter", 245, 245, 245), 3: ("Left-Cerebral-Cortex", 205, 62, 78),
    4: ("Left-Lateral-Ventricle", 120, 18, 134), 5: ("Left-Inf-Lat-Vent", 196, 58, 250),
    7: ("Left-Cerebellum-White-Matter", 220, 248, 164), 8: ("Left-Cerebellum-Cortex", 230, 148, 34),
    10: ("Left-Thalamus", 0, 118, 14), 11: ("Left-Caudate", 122, 186, 220), 12: ("Left-Putamen", 236, 13, 176),
    13: ("Left-Pallidum", 12, 48, 255), 14: ("3rd-Ventricle", 204, 182, 142), 15: ("4th-Ventricle", 42, 204, 164),
    16: ("Brain-Stem", 119, 159, 176), 17: ("Left-Hippocampus", 220, 216, 20), 18: ("Left-Amygdala", 103, 255, 255),
    24: ("CSF", 60, 60, 60), 26: ("Left-Accumbens-area", 255, 165, 0), 28: ("Left-VentralDC", 165, 42, 42),
    41: ("Right-Cerebral-White-Matter", 245, 245, 245), 42: ("Right-Cerebral-Cortex", 205, 62, 78),
    43: ("Right-Lateral-Ventricle", 120, 18, 134), 44: ("Right-Inf-Lat-Vent", 196, 58, 250),
    46: ("Right-Cerebellum-White-Matter", 220, 248, 164), 47: ("Right-Cerebellum-Cortex", 230, 148, 34),
    49: ("Right-Thalamus", 0, 118, 14), 50: ("Right-Caudate", 122, 186, 220), 51: ("Right-Putamen", 236, 13, 176),
    52: ("Right-Pallidum", 13, 48, 255), 53: ("Right-Hippocampus", 220, 216, 20),
    54: ("Right-Amygdala", 103, 255, 255), 58: ("Right-Accumbens-area", 255, 165, 0),
    60: ("Right-VentralDC", 165, 42, 42),
}

_DK_COLOURS = {
    1: ("bankssts", 25, 100, 40), 2: ("caudalanteriorcingulate", 125, 100, 160),
    3: ("caudalmiddlefrontal", 100, 25, 0), 5: ("cuneus", 220, 20, 100), 6: ("entorhinal", 220, 20, 10),
    7: ("fusiform", 180, 220, 140), 8: ("inferiorparietal", 220, 60, 220), 9: ("inferiortemporal", 180, 40, 120),
    10: ("isthmuscingulate", 140, 20, 140), 11: ("lateraloccipital", 20, 30, 140),
    12: ("lateralorbitofrontal", 35, 75, 50), 13: ("lingual", 225, 140, 140),
    14: ("medialorbitofrontal", 200, 35, 75), 15: ("middletemporal", 160, 100, 50),
    16: ("parahippocampal", 20, 220, 60), 17: ("paracentral", 60, 220, 60), 18: ("parsopercularis", 220, 180, 140),
    19: ("parsorbitalis", 20, 100, 50), 20: ("parstriangularis", 220, 60, 20), 21: ("pericalcarine", 120, 100, 60),
    22: ("postcentral", 220, 20, 20), 23: ("posteriorcingulate", 220, 180, 220), 24: ("precentral", 60, 20, 220),
    25: ("precuneus", 160, 140, 180), 26: ("rostralanteriorcingulate", 80, 20, 140),
    27: ("rostralmiddlefrontal", 75, 50, 125), 28: ("superiorfrontal", 20, 220, 160),
    29: ("superiorparietal", 20, 180, 140), 30: ("superiortemporal", 140, 220, 220),
    31: ("supramarginal", 80, 160, 20), 32: ("frontalpole", 100, 0, 100), 33: ("temporalpole", 70, 20, 170),
    34: ("transversetemporal", 150, 150, 200), 35: ("insula", 255, 192, 32),
}
PARCELLATION_LUT: dict[int, tuple[str, int, int, int]] = {
    base + code: (f"ctx-{hemi}-{name}", r, g, b)
    for hemi, base in (("lh", 1000), ("rh", 2000)) for code, (name, r, g, b) in _DK_COLOURS.items()
}


def lookup_table(parc: bool) -> dict[int, tuple[str, int, int, int]]:
    """Entries for every label the run can write (cortex labels stay listed: they remain outside parcels)."""
    table = dict(SEGMENTATION_LUT)
    if parc:
        table.update(PARCELLATION_LUT)
    return dict(sorted(table.items()))


def lut_text(table: dict[int, tuple[str, int, int, int]]) -> str:
    lines = ["#No. Label Name:                            R   G   B   A"]
    lines += [f"{idx:<5d}{name:<40s}{r:>4d}{g:>4d}{b:>4d}   0" for idx, (name, r, g, b) in table.items()]
    return "\n".join(lines) + "\n"


def wants_sidecar(seg_path: str | os.PathLike, addctab: bool, conventions: str) -> bool:
    """Whether synthseg-native's ``_ctab.txt`` goes beside ``seg_path``: ``--addctab`` on a NIfTI output under
    upstream's conventions (FreeSurfer's embed the table in the file; .mgz holds one either way)."""
    return addctab and conventions == "upstream" and image_extension(seg_path) != ".mgz"


def sidecar_path(seg_path: str | os.PathLike) -> Path:
    p = Path(seg_path)
    ext = image_extension(p) or p.suffix
    return p.with_name(p.name[: -len(ext)] + "_ctab.txt")


def embedded_table(parc: bool) -> tuple[LookupTable, str, bool]:
    """The table ``--addctab`` embeds, what it is (for the log) and whether it is FreeSurfer's: FreeSurfer's whole
    ``$FREESURFER_HOME/FreeSurferColorLUT.txt`` when there is one, as ``mri_synthseg`` embeds it; else this toolkit's
    entries for the labels the run can write (FreeSurfer's numbers, names and colours)."""
    home = os.environ.get("FREESURFER_HOME")
    if home and (Path(home) / FREESURFER_LUT).is_file():
        path = Path(home) / FREESURFER_LUT
        table = read_lut(path)
        return table, f"{path} ({len(table)} entries)", True
    table = {idx: LabelEntry(name, (r, g, b), 1.0) for idx, (name, r, g, b) in lookup_table(parc).items()}
    return table, f"this toolkit's {len(table)} entries ($FREESURFER_HOME/{FREESURFER_LUT} not found)", False


def write_sidecar(seg_path: str | os.PathLike, seg: np.ndarray, parc: bool, stage: StagedOutputs | None = None
                  ) -> Path:
    """``<name>_ctab.txt`` beside a NIfTI segmentation, in FreeSurferColorLUT format, for viewers that do not read
    FreeSurfer's header extension (3D Slicer, FSLeyes after conversion): synthseg-native's own addition."""
    table = lookup_table(parc)
    unknown = sorted(set(np.unique(seg).tolist()) - set(table))
    if unknown:
        raise ValueError(f"{seg_path}: labels without a colour: {unknown}")
    side = sidecar_path(seg_path)
    write = stage.write if stage is not None else atomic_write
    write(side, lambda tmp: Path(tmp).write_text(lut_text(table)))
    return side
