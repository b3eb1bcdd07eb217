"""Posteriors → segmentation, posteriors and volumes in the input's orientation.

Mirrors upstream's ``predict_synthseg.postprocess`` operation by operation, including the dtypes it
happens to use (float32 posteriors, float64 once a crop is pasted back) and the array views it sums
over, because numpy's float sums depend on both and volumes are compared to 0.01 mm³.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.ndimage import label as connected_components

from . import geometry


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the biggest 6-connected blob; an empty mask stays empty.

    Labelled inside the mask's bounding box only: the blobs, their sizes and their raster-order numbering
    (hence which of two equal blobs wins) are those of the whole volume, at a fraction of the cost for
    the small structures of the topology classes.
    """
    keep = np.zeros_like(mask)
    found = largest_component_in_box(mask)
    if found is not None:
        keep[found[0]] = found[1]
    return keep


def largest_component_in_box(mask: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """:func:`largest_component` as (bounding box, blob inside it), or None for an empty mask.

    The topology classes keep one such result each until the posteriors are cut; held as boxes they
    cost a few bytes per class instead of a whole-grid mask each (23 of them for SynthSeg 2.0).
    """
    box = _bounding_box(mask)
    if box is None:
        return None
    components, _ = connected_components(mask[box])
    return box, components == np.argmax(np.bincount(components.flat)[1:]) + 1


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of a 3-D ``mask``, or None when there is none."""
    columns = np.any(mask, axis=2)  # one pass over the volume; the other projections come from smaller arrays
    if not columns.any():
        return None
    hits = (np.flatnonzero(columns.any(axis=1)), np.flatnonzero(columns.any(axis=0)),
            np.flatnonzero(np.any(mask, axis=(0, 1))))
    return tuple(slice(int(h[0]), int(h[-1]) + 1) for h in hits)


def _bit(bits: np.ndarray, k: int, threads: int) -> np.ndarray:
    """Class ``k``'s mask out of the bit field of :func:`_clean_segmentation`."""
    plane, flag = bits[k // 8], np.uint8(1 << (k % 8))
    mask = np.empty(plane.shape, dtype=bool)

    def block(r: slice) -> None:
        mask[r] = (plane[r] & flag) != 0
    _in_slabs(block, plane.shape[0], threads, rows=16)
    return mask


def _rows_of(kept: tuple[tuple[slice, ...], np.ndarray] | None, r: slice, shape: tuple[int, ...]) -> np.ndarray:
    """Rows ``r`` of the whole-grid mask that a :func:`largest_component_in_box` result stands for."""
    mask = np.zeros(shape, dtype=bool)
    if kept is not None:
        box, blob = kept
        lo, hi = max(r.start, box[0].start), min(r.stop, box[0].stop)
        if lo < hi:
            mask[lo - r.start:hi - r.start, box[1], box[2]] = blob[lo - box[0].start:hi - box[0].start]
    return mask


def _in_slabs(fn: Callable[[slice], None], size: int, threads: int, rows: int = 4) -> None:
    """``fn(rows)`` on consecutive blocks of rows of the first axis, on ``threads`` threads.

    Every step done this way is per voxel (comparisons, masks, products, a sum or an argmax over the
    channels of one voxel), so blocks give the same bits as the whole-volume call; blocks small enough
    to stay in cache turn the strided per-channel passes into cheap ones, and numpy releases the GIL.
    """
    blocks = [slice(r, min(size, r + rows)) for r in range(0, size, rows)]
    if threads <= 1:
        for block in blocks:
            fn(block)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, blocks):
            pass


def _brain_mask(post: np.ndarray, threads: int) -> np.ndarray:
    """Voxels whose foreground posteriors sum to more than 0.25."""
    brain = np.empty(post.shape[:-1], dtype=bool)

    def block(r: slice) -> None:
        brain[r] = np.sum(post[r, ..., 1:], axis=-1) > 0.25
    _in_slabs(block, post.shape[0], threads)
    return brain


def _clear_outside(post: np.ndarray, outside: np.ndarray, threads: int) -> None:
    """Foreground posteriors set to 0 where ``outside``."""
    def block(r: slice) -> None:
        post[r, ..., 1:][outside[r]] = 0
    _in_slabs(block, post.shape[0], threads)


def _clean_segmentation(post: np.ndarray, pad_idx: np.ndarray, fast: bool,
                        topology: np.ndarray | None, threads: int = 1) -> np.ndarray:
    """Upstream's cleaning, in place: background outside the largest brain blob, then (not --fast)
    each topology class cut to its largest blob; then every voxel's posteriors renormalised."""
    if fast or topology is None:
        post = geometry.crop_with_idx(post, pad_idx)
    size = post.shape[0]
    # Everything outside the largest brain blob becomes background (the masks are freed on return).
    _clear_outside(post, np.logical_not(largest_component(_brain_mask(post, threads))), threads)
    if not fast and topology is not None:
        classes = [np.where(topology == c)[0] for c in np.unique(topology)[1:]]
        # each class's "confident" mask as one bit of a per-voxel bit field (8 classes per byte), so that
        # the whole grid holds 3 bytes per voxel for them instead of 23 boolean masks
        bits = np.zeros((-(-len(classes) // 8),) + post.shape[:-1], dtype=np.uint8)

        def confident_masks(r: slice) -> None:
            high = post[r] > 0.25
            for k, members in enumerate(classes):
                np.bitwise_or(bits[k // 8, r], np.uint8(1 << (k % 8)), out=bits[k // 8, r],
                              where=np.any(high[..., members], axis=-1))
        _in_slabs(confident_masks, size, threads)
        keep = [largest_component_in_box(_bit(bits, k, threads)) for k in range(len(classes))]
        del bits

        def cut(r: slice) -> None:
            part = post[r]
            for kept, members in zip(keep, classes):
                mask = _rows_of(kept, r, part.shape[:-1])
                for idx in members:
                    part[..., idx] *= mask
        _in_slabs(cut, size, threads)
        keep.clear()
        post = geometry.crop_with_idx(post, pad_idx)
        size = post.shape[0]
    else:
        def threshold(r: slice) -> None:
            post[r, ..., 1:] *= post[r, ..., 1:] > 0.2
        _in_slabs(threshold, size, threads)

    def normalise(r: slice) -> None:
        post[r] /= np.sum(post[r], axis=-1)[..., np.newaxis]
    _in_slabs(normalise, size, threads)
    return post


def _argmax_labels(post: np.ndarray, labels: np.ndarray, threads: int) -> np.ndarray:
    """``labels[post.argmax(-1)]`` as int32, block by block."""
    seg = np.empty(post.shape[:-1], dtype="int32")

    def block(r: slice) -> None:
        seg[r] = labels[post[r].argmax(-1).astype("int32")]
    _in_slabs(block, post.shape[0], threads)
    return seg


def postprocess(post_seg: np.ndarray, post_parc: np.ndarray | None, shape: list[int], pad_idx: np.ndarray,
                crop_idx: np.ndarray | None, labels: np.ndarray, labels_parc: np.ndarray | None,
                affine: np.ndarray, resolution: np.ndarray, fast: bool, topology: np.ndarray | None,
                intracranial: bool, threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The segmentation (int32), posteriors (float32, float64 once a crop is pasted back) and volumes (the CSV's
    order: 2.0's total intracranial first when ``intracranial``), in the input's orientation. ``threads``: numpy
    threads for the per-voxel steps (the results do not depend on it)."""
    post = _clean_segmentation(np.squeeze(post_seg), pad_idx, fast, topology, threads)
    seg_patch = _argmax_labels(post, labels.astype("int32"), threads)

    if post_parc is not None:
        post_parc = geometry.crop_with_idx(np.squeeze(post_parc), pad_idx)
        cortex = (seg_patch == 3) | (seg_patch == 42)
        post_parc[..., 0] = np.ones_like(post_parc[..., 0])
        post_parc[..., 0][np.logical_not(cortex < 0.1)] = 0
        post_parc /= np.sum(post_parc, axis=-1)[..., np.newaxis]
        parc_patch = labels_parc[post_parc.argmax(-1).astype("int32")].astype("int32")
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
    if intracranial:
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
    return seg, posteriors, volumes
