"""Volume and QC tables in upstream's CSV layout.

Column names, their order (2.0 puts "total intracranial" first), the ``subject`` header of shared
files versus the blank first header cell of per-subject files, number formatting and csv.writer's
line endings all follow upstream so that existing analysis scripts read our files unchanged.
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from ..engine import labels as L
from ..io.atomic import StagedOutputs, write_text


def volume_columns(label_set: L.LabelSet, parc: bool) -> list[str]:
    """Header cells of the volume CSV (without the subject column)."""
    labels, names = label_set.labels, label_set.names
    if parc:
        parc_labels, idx = np.unique(L.parcellation_labels(), return_index=True)
        labels = np.concatenate([labels, parc_labels[1:]])
        names = np.concatenate([names, L.parcellation_names()[idx][1:]])
    if label_set.intracranial:
        labels = np.concatenate([labels, np.array([np.max(labels + 1)])])
        names = np.concatenate([names, np.array(["total intracranial"])])
    return _header(labels, names, last_first=label_set.intracranial)


def qc_columns(label_set: L.LabelSet) -> list[str]:
    return _header(label_set.qc_groups, label_set.qc_names, last_first=False)


def _header(labels: np.ndarray, names: np.ndarray, last_first: bool) -> list[str]:
    _, idx = np.unique(labels, return_index=True)
    header = names[idx].tolist()[1:]
    if last_first:
        header = [header[-1]] + header[:-1]
    return header


def subject_name(path: str) -> str:
    """Upstream strips only '.nii.gz' from the basename (a '.mgz' or '.nii' suffix stays)."""
    return os.path.basename(path).replace(".nii.gz", "")


def volume_row(path: str, volumes: np.ndarray) -> list[str]:
    return [subject_name(path)] + [str(v) for v in volumes]


def qc_row(path: str, scores: np.ndarray) -> list[str]:
    scores = np.around(np.clip(np.squeeze(scores)[1:], 0, 1), 4)
    return [subject_name(path)] + [f"{q:.4f}" for q in scores]


def as_dict(header: list[str], row: list[str]) -> dict[str, float]:
    """A CSV row as {column: value}, the values as the CSV writes them (3 decimals for volumes, 4 for QC)."""
    return dict(zip(header, map(float, row[1:])))


def render(header: list[str], rows: list[list[str]], shared: bool) -> str:
    """CSV text: a shared file has a 'subject' header and one row per subject; a per-subject file
    has a blank first header cell and one row."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow((["subject"] if shared else [""]) + header)
    writer.writerows(rows)
    return buf.getvalue()


class CsvTable:
    """A CSV that is rewritten atomically after every subject, so it is never half-written.

    A row is first staged with the other outputs of its image (:meth:`stage`) and becomes part of the
    table (:meth:`committed`) only once they were all renamed into place: a failed image leaves no row.
    """

    def __init__(self, path: str, header: list[str], shared: bool):
        self.path, self.header, self.shared = path, header, shared
        self.rows: list[list[str]] = []

    def add(self, row: list[str]) -> None:
        self.rows.append(row)
        self.flush()

    def stage(self, row: list[str], stage: StagedOutputs) -> None:
        write_text(self.path, render(self.header, self.rows + [row], self.shared), stage=stage)

    def committed(self, row: list[str]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        write_text(self.path, render(self.header, self.rows, self.shared))
