"""FreeSurfer's colour tables and the metadata it stores beside an image, byte for byte as surfa 0.6.3 writes them.

FreeSurfer 8's ``mri_synthseg --addctab`` embeds the whole FreeSurferColorLUT.txt in the segmentation through
surfa, FreeSurfer's I/O library; this module reproduces those bytes without surfa (an sdist that needs a C compiler
and breaks under numpy 2). Three encodings are involved, all big-endian:

* the binary colour table, version -2: ``-2, max(index)+1, 0`` (no file name), the entry count, then per entry
  ``index, len(name)+1, name + NUL, R, G, B, 255*(1-alpha)`` as int32;
* ``.mgz`` tags after the image footer: ``int32 tag`` then, except for the "lengthless" tags (the colour table is
  one), an ``int64`` byte count, then the data;
* the NIfTI header extension with code 14: ``'>'``, the intent (uint16), version 1, then tags that all carry an
  int64 length, ending with tag -1 and one ``'*'`` (nibabel strips trailing NULs from extension content, so a
  marker must end it).

surfa keeps an alpha of ``(255 - A) / 255`` in memory and writes ``int(255 * (1 - alpha))`` back: that round trip
truncates (A = 1 is written as 0, A = 2 as 1), and the same float arithmetic is done here so that the bytes agree.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass, field

import nibabel as nib

from .atomic import image_extension

FS_EXTENSION_CODE = 14  # NIfTI header extension code FreeSurfer registered ("freesurfer")

TAG_OLD_COLORTABLE = 1
TAG_HISTORY = 3
TAG_DOF = 7
TAG_PEDIR = 41
TAG_FIELDSTRENGTH = 43
TAG_SCAN_PARAMETERS = 45
TAG_END = -1  # last tag of the NIfTI extension: one '*' so that nibabel does not strip trailing NULs
TAG_OLD_XFORM = 30  # .mgz: a 32-bit length instead of a 64-bit one
LENGTHLESS_TAGS = (20, 2, TAG_OLD_COLORTABLE, 10, 11, 12)  # .mgz tags whose length is implied by their content

MGH_HEADER_BYTES = 284
MGH_ITEMSIZE = {0: 1, 1: 4, 2: 8, 3: 4, 4: 2, 6: 4, 7: 8, 10: 2}  # FreeSurfer type id -> bytes per voxel
MGH_FOOTER_BYTES = 20  # tr, flip angle, te, ti, fov: float32 each


@dataclass(frozen=True)
class LabelEntry:
    """One label as surfa holds it: a name, RGB clipped to 0-255, and surfa's alpha ``(255 - A) / 255``."""

    name: str
    rgb: tuple[int, int, int]
    alpha: float

    @property
    def written_alpha(self) -> int:
        """The fourth int32 surfa writes: ``int(255 * (1 - alpha))`` in float64, truncated toward zero."""
        return math.trunc(255 * (1 - self.alpha))


LookupTable = dict[int, LabelEntry]
"""index -> entry, in the table's order (a repeated index keeps its first position and its last value)."""


def _clip(value: int) -> int:
    return min(max(value, 0), 255)


def read_lut(path: str | os.PathLike) -> LookupTable:
    """A FreeSurferColorLUT.txt-style table parsed as surfa's ``load_label_lookup`` parses it.

    Every line whose first word does not start with ``#`` is ``index name R G B A [...]``; surfa fails on a line
    with fewer than six words, and so does this (with the line number). R, G, B are clipped to 0-255.
    """
    table: LookupTable = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh.readlines(), 1):
            words = line.lstrip().split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) < 6:
                raise ValueError(f"{path}:{number}: expected 'index name R G B A', got {line.strip()!r}")
            try:
                index, r, g, b, a = int(words[0]), *(int(w) for w in words[2:6])
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not an integer in {line.strip()!r}") from exc
            table[index] = LabelEntry(words[1], (_clip(r), _clip(g), _clip(b)), (255 - a) / 255)
    return table


def lut_bytes(table: LookupTable) -> bytes:
    """The binary colour table (version -2) surfa writes; the name length counts characters, as surfa's does."""
    out = [struct.pack(">iiii", -2, max(table) + 1, 0, len(table))]
    for index, entry in table.items():
        out.append(struct.pack(">ii", index, len(entry.name) + 1) + (entry.name + "\0").encode("utf-8"))
        out.append(struct.pack(">iiii", *entry.rgb, entry.written_alpha))
    return b"".join(out)


def parse_lut(blob: bytes, pos: int = 0) -> tuple[LookupTable | None, int]:
    """Read a binary colour table at ``pos``: (the table, or None when it has no entries; the offset after it)."""
    version, _max_index, name_len = struct.unpack_from(">iii", blob, pos)
    if version != -2:
        raise ValueError(f"unsupported binary colour table version {version}")
    pos += 12 + name_len
    (count,) = struct.unpack_from(">i", blob, pos)
    pos += 4
    if count < 1:
        return None, pos
    table: LookupTable = {}
    for _ in range(count):
        index, size = struct.unpack_from(">ii", blob, pos)
        name = blob[pos + 8:pos + 8 + size].decode("utf-8").rstrip("\0")
        r, g, b, a = struct.unpack_from(">iiii", blob, pos + 8 + size)
        table[index] = LabelEntry(name, (_clip(r), _clip(g), _clip(b)), (255 - a) / 255)
        pos += 8 + size + 16
    return table, pos


@dataclass
class FSMetadata:
    """What surfa's writers take from an image's metadata besides its geometry (surfa's defaults).

    The NIfTI reader fills the form codes, the time units and ``tr`` (ms) from the header and the rest from a
    code-14 extension; the .mgz reader fills ``intent`` and the footer's tr, flip angle, te, ti.
    """

    sform_code: int = 1
    qform_code: int = 1
    time_units: int = 8                   # NIfTI xyzt_units time code written back (8: seconds)
    tr: float | None = None               # ms; a NIfTI writes pixdim[4] = tr / 1000 whatever the time units say
    intent: int = 0                       # 0: an MRI volume
    te: float = 0.0
    ti: float = 0.0
    flip_angle: float = 0.0
    field_strength: float | None = None  # None: unknown (NaN in a NIfTI extension, 0 in an .mgz)
    pedir: str = "UNKNOWN"
    history: tuple[str, ...] = ()
    labels: LookupTable | None = field(default=None, repr=False)


def _tag(tag: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">iq", tag, len(payload) if length is None else length) + payload


def nifti_extension_bytes(meta: FSMetadata) -> bytes:
    """The content of the code-14 extension surfa writes for an MRI volume: header, colour table (if any),
    history, DOF (1), scan parameters, end marker.

    Lengths are counted in characters, as surfa counts them (the same as bytes for ASCII names).
    """
    out = [b">" + struct.pack(">HB", meta.intent & 0xFFFF, 1)]
    if meta.labels:
        table = lut_bytes(meta.labels)
        length = 16 + sum(8 + len(e.name) + 1 + 16 for e in meta.labels.values())
        out.append(_tag(TAG_OLD_COLORTABLE, table, length))
    out += [_tag(TAG_HISTORY, h.encode("utf-8"), len(h)) for h in meta.history]
    out.append(_tag(TAG_DOF, struct.pack(">i", 1)))
    strength = math.nan if meta.field_strength is None else meta.field_strength
    scan = struct.pack(">ffdf", meta.te, meta.ti, meta.flip_angle, strength) + meta.pedir.encode("utf-8")
    out.append(_tag(TAG_SCAN_PARAMETERS, scan, 20 + len(meta.pedir)))
    out.append(_tag(TAG_END, b"*"))
    return b"".join(out)


def parse_nifti_extension(content: bytes) -> FSMetadata:
    """Read a code-14 extension as surfa's NIfTI reader does (colour table, history, scan parameters, intent).

    The phase-encoding direction is kept even when it says ``UNKNOWN``; the DOF tag is read and dropped.
    """
    meta = FSMetadata(intent=int.from_bytes(content[1:3], "big") if len(content) >= 3 else 0)
    pos = 4
    history = []
    while pos + 12 <= len(content):
        tag, length = struct.unpack_from(">iq", content, pos)
        pos += 12
        if tag == 0:
            break
        if tag == TAG_OLD_COLORTABLE:
            meta.labels = parse_lut(content, pos)[0]
        elif tag == TAG_HISTORY:
            history.append(content[pos:pos + length].decode("utf-8").rstrip("\0"))
        elif tag == TAG_SCAN_PARAMETERS:
            te, ti, fa, strength = struct.unpack_from(">ffdf", content, pos)
            meta.te, meta.ti, meta.flip_angle, meta.field_strength = te, ti, fa, strength
            meta.pedir = content[pos + 20:pos + length].decode("utf-8").rstrip("\0")
        pos += length
    meta.history = tuple(history)
    return meta


def mgh_tags(meta: FSMetadata) -> bytes:
    """The tags surfa's .mgz writer appends after the footer: colour table (lengthless), phase-encoding
    direction, field strength (0 when unknown), history."""
    out = []
    if meta.labels is not None:
        out.append(struct.pack(">i", TAG_OLD_COLORTABLE) + lut_bytes(meta.labels))
    out.append(_tag(TAG_PEDIR, meta.pedir.encode("utf-8"), len(meta.pedir)))
    strength = 0.0 if meta.field_strength is None else meta.field_strength
    out.append(_tag(TAG_FIELDSTRENGTH, struct.pack(">f", strength)))
    out += [_tag(TAG_HISTORY, h.encode("utf-8"), len(h)) for h in meta.history]
    return b"".join(out)


def mgh_tag_offset(raw: bytes) -> int:
    """Where the tags start in an uncompressed MGH stream: after the header, the voxels and the footer."""
    dims = struct.unpack_from(">4i", raw, 4)
    (type_id,) = struct.unpack_from(">i", raw, 20)
    if type_id not in MGH_ITEMSIZE:
        raise ValueError(f"unsupported MGH data type {type_id}")
    return MGH_HEADER_BYTES + math.prod(dims) * MGH_ITEMSIZE[type_id] + MGH_FOOTER_BYTES


def fs_metadata(header: nib.Nifti1Header) -> FSMetadata | None:
    """FreeSurfer's metadata from a NIfTI header's code-14 extension, or None where it has none."""
    for extension in header.extensions:
        if extension.get_code() == FS_EXTENSION_CODE:
            return parse_nifti_extension(extension.get_content())
    return None


def read_embedded_lut(path: str | os.PathLike) -> LookupTable | None:
    """The colour table FreeSurfer embedded in an image (.nii/.nii.gz extension 14, .mgz tag 1), or None."""
    ext = image_extension(path)
    if ext in (".nii", ".nii.gz"):
        meta = fs_metadata(nib.load(str(path)).header)
        return None if meta is None else meta.labels
    if ext != ".mgz":
        raise ValueError(f"{path}: not a .nii, .nii.gz or .mgz file")
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    pos = mgh_tag_offset(raw)
    while pos + 4 <= len(raw):
        (tag,) = struct.unpack_from(">i", raw, pos)
        pos += 4
        if tag == 0:
            break
        if tag == TAG_OLD_COLORTABLE:
            return parse_lut(raw, pos)[0]
        if tag in LENGTHLESS_TAGS:  # no length to skip by: the rest cannot be walked
            break
        if tag == TAG_OLD_XFORM:
            (length,) = struct.unpack_from(">i", raw, pos)
            pos += 4
        else:
            (length,) = struct.unpack_from(">q", raw, pos)
            pos += 8
        pos += length
    return None
