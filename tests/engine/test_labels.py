"""The project's own label tables equal upstream's .npy tables (../shared/reference/labels)."""

from __future__ import annotations

import numpy as np
import pytest

from engine_fixtures import reference
from synthseg_native.engine import labels as L

TABLES = {
    "synthseg_segmentation_labels_2.0": lambda: L.raw_segmentation_labels(False),
    "synthseg_segmentation_labels": lambda: L.raw_segmentation_labels(True),
    "synthseg_segmentation_names_2.0": lambda: L.raw_segmentation_names(False),
    "synthseg_segmentation_names": lambda: L.raw_segmentation_names(True),
    "synthseg_topological_classes_2.0": lambda: L.raw_topology_classes(False),
    "synthseg_topological_classes": lambda: L.raw_topology_classes(True),
    "synthseg_denoiser_labels_2.0": L.raw_denoiser_groups,
    "synthseg_qc_labels_2.0": lambda: L.raw_qc_groups(False),
    "synthseg_qc_labels": lambda: L.raw_qc_groups(True),
    "synthseg_qc_names_2.0": lambda: L.raw_qc_names(False),
    "synthseg_qc_names": lambda: L.raw_qc_names(True),
    "synthseg_parcellation_labels": L.parcellation_labels,
    "synthseg_parcellation_names": L.parcellation_names,
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_table_matches_upstream(name):
    ref = reference(name)
    ours = TABLES[name]()
    assert ours.shape == ref.shape
    assert ours.tolist() == ref.tolist()


@pytest.mark.parametrize("v1", [False, True])
def test_flip_indices_swap_left_and_right(v1):
    ls = L.LabelSet.build(v1)
    assert len(ls.labels) == (32 if v1 else 33)
    flip = ls.flip
    assert np.array_equal(flip[flip], np.arange(len(flip)))  # an involution
    pairs = {int(ls.labels[i]): int(ls.labels[j]) for i, j in enumerate(flip)}
    assert pairs[2] == 41 and pairs[42] == 3 and pairs[60] == 28 and pairs[16] == 16 and pairs[0] == 0
    if not v1:
        assert pairs[24] == 24
