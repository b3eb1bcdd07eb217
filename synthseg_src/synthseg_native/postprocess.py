"""Posteriors → segmentation, posteriors and volumes in the input's orientation.

Mirrors upstream's ``predict_synthseg.postprocess`` operation by operation, including the dtypes it
happens to use (float32 posteriors, float64 once a crop is pasted back) and the array views it sums
over, because numpy's float sums depend on both and volumes are compared to 0.01 mm³.

Only exact operations are reorganised to save memory (which matters for tiled runs, where
post-processing sets the peak): boolean masks are built channel by channel and set slab by slab, and
argmax runs slab by slab, because numpy copies a non-contiguous array (the cropped posteriors) whole
before an argmax along its last axis. Comparisons, logical operations and argmax give the same result
whatever the memory layout, so the output is the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import label as connected_components

from . import geometry


@dataclass
class Result:
    segmentation: np.ndarray   # int32, input orientation
    posteriors: np.ndarray     # float32/float64, input orientation
    volumes: np.ndarray        # CSV order (2.0: total intracranial first)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the biggest 6-connected blob; an empty mask stays empty."""
    components, n = connected_components(mask)
    if n == 0:
        return mask.copy()
    return components == np.argmax(np.bincount(components.flat)[1:]) + 1


SLAB = 16  # rows along the first axis per step of the slab-wise operations


def argmax_last(post: np.ndarray) -> np.ndarray:
    """``post.argmax(-1)`` slab by slab: the same indices (int64) without a contiguous copy of ``post``."""
    out = np.empty(post.shape[:-1], dtype=np.intp)
    for x0 in range(0, post.shape[0], SLAB):
        out[x0:x0 + SLAB] = post[x0:x0 + SLAB].argmax(-1)
    return out


def _clean_segmentation(post: np.ndarray, pad_idx: np.ndarray, fast: bool,
                        topology: np.ndarray | None) -> np.ndarray:
    if fast or topology is None:
        post = geometry.crop_with_idx(post, pad_idx)
    # Everything outside the largest brain blob becomes background.
    foreground = post[..., 1:]
    brain = largest_component(np.sum(foreground, axis=-1) > 0.25)
    for x0 in range(0, post.shape[0], SLAB):
        foreground[x0:x0 + SLAB][np.logical_not(brain[x0:x0 + SLAB])] = 0
    del brain
    if not fast and topology is not None:
        # a channel's "confident" mask (> 0.25) is read before any of its own channels is changed: the classes
        # are disjoint, so building each class's mask when its turn comes equals building all of them first
        for topology_class in np.unique(topology)[1:]:
            members = np.where(topology == topology_class)[0]
            confident = np.zeros(post.shape[:-1], dtype=bool)
            for idx in members:
                confident |= post[..., idx] > 0.25
            keep = largest_component(confident)
            del confident
            for idx in members:
                post[..., idx] *= keep
        post = geometry.crop_with_idx(post, pad_idx)
    else:
        for x0 in range(0, post.shape[0], SLAB):
            part = post[x0:x0 + SLAB, ..., 1:]
            part *= part > 0.2
    post /= np.sum(post, axis=-1)[..., np.newaxis]
    return post


def postprocess(post_seg: np.ndarray, post_parc: np.ndarray | None, shape: list[int], pad_idx: np.ndarray,
                crop_idx: np.ndarray | None, labels: np.ndarray, labels_parc: np.ndarray | None,
                affine: np.ndarray, resolution: np.ndarray, fast: bool, topology: np.ndarray | None,
                v1: bool) -> Result:
    post = _clean_segmentation(np.squeeze(post_seg), pad_idx, fast, topology)
    seg_patch = labels[argmax_last(post).astype("int32")].astype("int32")

    if post_parc is not None:
        post_parc = geometry.crop_with_idx(np.squeeze(post_parc), pad_idx)
        cortex = (seg_patch == 3) | (seg_patch == 42)
        post_parc[..., 0] = np.ones_like(post_parc[..., 0])
        post_parc[..., 0][np.logical_not(cortex < 0.1)] = 0
        post_parc /= np.sum(post_parc, axis=-1)[..., np.newaxis]
        parc_patch = labels_parc[argmax_last(post_parc).astype("int32")].astype("int32")
        seg_patch[cortex] = parc_patch[cortex]

    if crop_idx is not None:
        seg = np.zeros(shape=shape, dtype="int32")
        posteriors = np.zeros(shape=[*shape, labels.shape[0]])
        posteriors[..., 0] = np.ones(shape)
        c = crop_idx
        seg[c[0]:c[3], c[1]:c[4], c[2]:c[5]] = seg_patch
        posteriors[c[0]:c[3], c[1]:c[4], c[2]:c[5], :] = post
    else:
        seg, posteriors = seg_patch, post

    seg = geometry.align_to(seg, np.eye(4), affine)
    posteriors = geometry.align_to(posteriors, np.eye(4), affine)

    volumes = np.sum(posteriors[..., 1:], axis=tuple(range(0, len(posteriors.shape) - 1)))
    if not v1:
        volumes = np.concatenate([np.array([np.sum(volumes)]), volumes])
    if post_parc is not None:
        volumes_parc = np.sum(post_parc[..., 1:], axis=tuple(range(0, len(posteriors.shape) - 1)))
        # Upstream indexes the cortex entries with an offset of -1 into this array; kept as is so
        # that parcel volumes match upstream's (see docs/equivalence.md).
        cortex_idx = np.where((labels == 3) | (labels == 42))[0] - 1
        total_cortex = np.sum(volumes[cortex_idx])
        volumes_parc = volumes_parc / np.sum(volumes_parc) * total_cortex
        volumes = np.concatenate([volumes, volumes_parc])
    volumes = np.around(volumes * np.prod(resolution), 3)
    return Result(seg, posteriors, volumes)
