"""Post-processing's memory-saving forms against the plain whole-volume algorithm they replace.

Upstream cleans the posteriors with whole-volume masks: everything outside the largest brain blob is
background, then each topology class keeps only its largest blob of confident (> 0.25) voxels. Ours
works in blocks of rows, labels blobs inside bounding boxes and keeps the class masks as bits and
boxes; these tests hold it to the plain form, bit for bit, on posteriors with many blobs per class.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.ndimage import label as connected_components

from synthseg_native.engine import geometry
from synthseg_native.engine import labels as L
from synthseg_native.engine import postprocess as pp


def plain_largest(mask: np.ndarray) -> np.ndarray:
    components, n = connected_components(mask)
    if n == 0:
        return mask.copy()
    return components == np.argmax(np.bincount(components.flat)[1:]) + 1


def plain_clean(post: np.ndarray, pad_idx: np.ndarray, topology: np.ndarray) -> np.ndarray:
    """Upstream's order of operations, whole volume at a time (not --fast)."""
    brain = plain_largest(np.sum(post[..., 1:], axis=-1) > 0.25)
    post[..., 1:][np.logical_not(brain)] = 0
    confident = post > 0.25
    for cls in np.unique(topology)[1:]:
        members = np.where(topology == cls)[0]
        keep = plain_largest(np.any(confident[..., members], axis=-1))
        for idx in members:
            post[..., idx] *= keep
    post = geometry.crop_with_idx(post, pad_idx)
    post /= np.sum(post, axis=-1)[..., np.newaxis]
    return post


def blobby_posteriors(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Smooth random posteriors: classes with several blobs above 0.25, and background in patches that cut
    the brain mask into several blobs."""
    rng = np.random.default_rng(seed)
    logits = gaussian_filter(rng.normal(size=shape + (33,)), (2, 2, 2, 0)) * 40
    field = gaussian_filter(rng.normal(size=shape), 3)
    logits[..., 0] += 200 * (field > np.quantile(field, 0.6))
    x = np.exp(logits - logits.max(-1, keepdims=True))
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seed,shape", [(0, (40, 48, 36)), (1, (53, 32, 41)), (4, (32, 40, 28))])
def test_cleaning_is_bit_identical_to_the_whole_volume_algorithm(seed, shape, threads):
    topology = L.LabelSet.build().topology
    post = blobby_posteriors(shape, seed)
    confident = post > 0.25
    blobs = [connected_components(np.any(confident[..., topology == c], axis=-1))[1] for c in np.unique(topology)[1:]]
    # the cuts really remove blobs, so the test can tell a wrong mask from a right one
    assert max(blobs) > 1 and connected_components(np.sum(post[..., 1:], axis=-1) > 0.25)[1] > 1
    pad = np.array([2, 3, 1, shape[0] - 3, shape[1] - 2, shape[2] - 4])
    expected = plain_clean(post.copy(), pad, topology)
    got = pp._clean_segmentation(post.copy(), pad, False, topology, threads)
    assert got.shape == expected.shape and got.tobytes() == expected.tobytes()


def test_largest_component_in_box_stands_for_the_whole_mask():
    rng = np.random.default_rng(3)
    mask = gaussian_filter(rng.random((30, 40, 20)), 1.5) > 0.55
    box, blob = pp.largest_component_in_box(mask)
    whole = np.zeros_like(mask)
    whole[box] = blob
    np.testing.assert_array_equal(whole, plain_largest(mask))
    np.testing.assert_array_equal(pp.largest_component(mask), plain_largest(mask))
    for start, stop in [(0, 4), (7, 11), (28, 30), (12, 30)]:  # rows in, across and outside the box
        np.testing.assert_array_equal(pp._rows_of((box, blob), slice(start, stop), whole[start:stop].shape),
                                      whole[start:stop])
    assert pp.largest_component_in_box(np.zeros((4, 4, 4), bool)) is None
    assert not pp._rows_of(None, slice(0, 2), (2, 4, 4)).any()
