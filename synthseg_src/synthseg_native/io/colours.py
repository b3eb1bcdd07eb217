"""FreeSurfer colours and names for the labels SynthSeg writes (``--addctab``).

Viewers show a segmentation in the familiar FreeSurfer colours only if they know the lookup table.
In ``.mgz`` files FreeSurfer embeds it as a tag after the image data (tag 1, the binary colour table,
version -2: big-endian int32 fields); freeview and FreeSurfer's Python library ``surfa`` read it.
NIfTI has no such slot, so a sidecar ``<name>_ctab.txt`` in FreeSurferColorLUT.txt format is written
next to the image instead.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic import StagedOutputs, atomic_write, image_extension

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


def binary_ctab(table: dict[int, tuple[str, int, int, int]]) -> bytes:
    """FreeSurfer's binary colour table, version -2 (what ``mri_*`` tools embed in .mgz files)."""
    out = [struct.pack(">iii", -2, max(table) + 1, 0), struct.pack(">i", len(table))]
    for idx, (name, r, g, b) in table.items():
        raw = name.encode("ascii") + b"\x00"
        out.append(struct.pack(">ii", idx, len(raw)) + raw + struct.pack(">iiii", r, g, b, 0))
    return b"".join(out)


def read_binary_ctab(blob: bytes) -> dict[int, tuple[str, int, int, int]]:
    version, _, name_len = struct.unpack_from(">iii", blob, 0)
    if version != -2:
        raise ValueError(f"unsupported colour table version {version}")
    pos = 12 + name_len
    (count,) = struct.unpack_from(">i", blob, pos)
    pos += 4
    table = {}
    for _ in range(count):
        idx, n = struct.unpack_from(">ii", blob, pos)
        name = blob[pos + 8:pos + 8 + n].rstrip(b"\x00").decode("ascii")
        r, g, b, _t = struct.unpack_from(">iiii", blob, pos + 8 + n)
        table[idx] = (name, r, g, b)
        pos += 8 + n + 16
    return table


def sidecar_path(seg_path: str | os.PathLike) -> Path:
    p = Path(seg_path)
    ext = image_extension(p) or p.suffix
    return p.with_name(p.name[: -len(ext)] + "_ctab.txt")


def attach(seg_path: str | os.PathLike, seg: np.ndarray, parc: bool, stage: StagedOutputs | None = None) -> Path:
    """Embed the table in an .mgz segmentation, or write the sidecar for NIfTI; returns where it went.

    With ``stage``, the segmentation is read from its staged temporary and the result is staged too.
    """
    table = lookup_table(parc)
    unknown = sorted(set(np.unique(seg).tolist()) - set(table))
    if unknown:
        raise ValueError(f"{seg_path}: labels without a colour: {unknown}")
    write = stage.write if stage is not None else atomic_write
    if image_extension(seg_path) == ".mgz":
        img = nib.load(str(stage.source(seg_path) if stage is not None else seg_path))
        raw = img.to_bytes() + struct.pack(">i", 1) + binary_ctab(table)

        def _write(tmp: Path) -> None:
            with open(tmp, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
                gz.write(raw)

        write(seg_path, _write)
        return Path(seg_path)
    side = sidecar_path(seg_path)
    write(side, lambda tmp: Path(tmp).write_text(lut_text(table)))
    return side


def read_embedded(seg_path: str | os.PathLike) -> dict[int, tuple[str, int, int, int]] | None:
    """The colour table embedded in an .mgz file, or None (reads the tags after nibabel's footer)."""
    with gzip.open(seg_path, "rb") as fh:
        raw = fh.read()
    img = nib.MGHImage.from_bytes(raw)
    hdr = img.header
    end = hdr.get_data_offset() + int(np.prod(img.shape)) * hdr.get_data_dtype().itemsize + 20
    pos = end
    while pos + 4 <= len(raw):
        (tag,) = struct.unpack_from(">i", raw, pos)
        if tag == 1:
            return read_binary_ctab(raw[pos + 4:])
        if tag == 0:
            return None
        (length,) = struct.unpack_from(">q", raw, pos + 4)
        pos += 12 + length
    return None
