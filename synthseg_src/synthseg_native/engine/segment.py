"""One image, in memory: preprocess → network (whole or in tiles) → post-process → output grid.

This is the only code that knows the order of the engine's steps; the batch runner adds files,
locks and bookkeeping around it, the API hands it nibabel images. Nothing here writes a file.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import format_size
from ..io.images import ImageInfo, LoadedImage
from . import labels as L
from . import memory, tiling
from .postprocess import postprocess
from .predictor import Predictor, Timings
from .preprocess import Prepared, preprocess
from .spec import ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class Segmentation:
    """What one image's run produced, on the 1 mm grid in the input's orientation (``--keepgeom`` puts the labels
    on the input's grid when they are written: ``io.freesurfer``)."""

    labels: np.ndarray               # int32 label values
    posteriors: np.ndarray | None    # float, one channel per label (None unless asked for)
    affine: np.ndarray               # of the output grid
    header: object                   # the input's header, reused for the outputs as upstream does
    volumes: np.ndarray              # mm³ in the volume CSV's column order
    qc_scores: np.ndarray | None     # the QC network's raw output (``batch.tables.qc_row`` rounds it)
    prepared: Prepared               # the network input and the 1 mm image (``prepared.resampled``)


def memory_plan(name: str, info: ImageInfo, spec: ModelSpec, predictor: Predictor | None = None
                ) -> memory.Decision:
    """Whole or tiled, from the header alone (before the voxels are read); :class:`MemoryShortage` if neither fits.

    On a GPU (``predictor.device_memory()``) the budget is the device's free memory."""
    return memory.decide(name, info, spec, None if predictor is None else predictor.device_memory())


@dataclass
class NetworkOutput:
    """The networks' answer for one prepared image, before post-processing (on the padded network grid)."""

    post_seg: np.ndarray             # (1, X, Y, Z, labels) segmentation posteriors
    post_parc: np.ndarray | None     # parcellation posteriors (--parc)
    qc_scores: np.ndarray | None     # the QC network's raw output (--qc)


def segment_image(predictor: Predictor, spec: ModelSpec, img: LoadedImage, name: str, decision: memory.Decision,
                  timings: Timings, posteriors: bool = False,
                  prepared: Callable[[Prepared], None] | None = None) -> Segmentation:
    """Segment ``img`` (called ``name`` in messages) as ``spec`` asks; ``prepared`` sees the network input first
    (the batch writes the resampled image from it while the network runs).

    The three steps are also callable one by one (:func:`prepare`, :func:`run_network`, :func:`finish`): a batch
    runs them for different scans at the same time (``batch.pipeline``)."""
    prep = prepare(spec, img, name, timings)
    if prepared is not None:
        prepared(prep)
    net = run_network(predictor, spec, prep, name, decision, timings)
    return finish(predictor, spec, img, prep, net, timings, posteriors=posteriors)


def prepare(spec: ModelSpec, img: LoadedImage, name: str, timings: Timings) -> Prepared:
    """Step 1: the network input (1 mm, normalised, padded or cropped), as upstream prepares it."""
    t0 = time.perf_counter()
    crop = None if spec.crop is None else list(spec.crop)
    prep = preprocess(img, name, crop=crop, ct=spec.ct, min_pad=crop, autocrop=spec.autocrop,
                      conventions=spec.conventions)
    timings.add("preprocess", time.perf_counter() - t0)
    return prep


def run_network(predictor: Predictor, spec: ModelSpec, prep: Prepared, name: str, decision: memory.Decision,
                timings: Timings) -> NetworkOutput:
    """Step 2: the networks on ``prep`` (whole, or in the tiles ``decision`` chose)."""
    t1 = time.perf_counter()
    tiles = None
    # a right hemisphere, for a network trained on left ones
    image = np.ascontiguousarray(prep.image[:, ::-1]) if spec.mirrored else prep.image
    if spec.autocrop and decision.tiling is not None:  # the header only bounded the grid; the box is known now
        grid_info = ImageInfo(tuple(prep.image.shape[1:4]), (1.0, 1.0, 1.0), np.dtype(np.float32))
        decision = memory.decide(name, grid_info, spec, predictor.device_memory())
    if decision.tiling is not None:
        grid = prep.image.shape[1:4]  # the header's prediction of it is tested to be the same; if not, re-plan
        tiles = decision.tiling if decision.tiling.grid == grid else tiling.layout(grid, decision.tiling.counts)
        if tiles is None:
            raise ValueError(f"{name}: network grid {'x'.join(map(str, grid))} cannot be cut into "
                             f"{'x'.join(map(str, decision.tiling.counts))} tiles")
        logger.warning(tiling_note(name, decision, tiles))
        post_seg, post_parc, qc_scores = predictor.predict_tiled(image, tiles)
    else:
        post_seg, post_parc, qc_scores = predictor.predict(image)
    if spec.mirrored:  # and back (FreeSurfer 8 flips the posteriors along the same axis)
        post_seg = post_seg[:, ::-1]
        post_parc = None if post_parc is None else post_parc[:, ::-1]
    t2 = time.perf_counter()
    timings.add("network", t2 - t1)
    if spec.profile:  # counted after the stage's clock stopped: not network time
        if tiles is None:
            timings.network_flop += predictor.network_flop(prep.image.shape[1:])
        else:
            timings.network_flop += tiles.n_tiles * predictor.network_flop(tiles.tile_shape + prep.image.shape[4:])
        logger.info(f"profile {name}: network input {'x'.join(map(str, prep.image.shape[1:4]))}, {t2 - t1:.3f} s")
    return NetworkOutput(post_seg, post_parc, qc_scores)


def finish(predictor: Predictor, spec: ModelSpec, img: LoadedImage, prep: Prepared, net: NetworkOutput,
           timings: Timings, posteriors: bool = False) -> Segmentation:
    """Step 3: post-processing (upstream's) and volumes."""
    t2 = time.perf_counter()
    label_set = predictor.labels
    labels_parc = L.parcellation_labels() if net.post_parc is not None else None
    seg, post, volumes = postprocess(net.post_seg, net.post_parc, prep.shape, prep.pad_idx, prep.crop_idx,
                                     label_set.labels, labels_parc, prep.affine, prep.resolution, spec.fast,
                                     label_set.topology, label_set.intracranial,
                                     threads=spec.threads or os.cpu_count() or 1)
    timings.add("postprocess", time.perf_counter() - t2)
    return Segmentation(seg, post if posteriors else None, prep.affine, prep.header, volumes, net.qc_scores, prep)


def tiling_note(name: str, decision: memory.Decision, tiles: tiling.Tiling) -> str:
    """The one [WARN] line of a tiled image: why, how, and that it costs exactness (so it is a warning)."""
    est = decision.estimate
    assert decision.tiled_need is not None
    if decision.forced:
        why = f"${memory.ENV_TILES} asks for tiles (untiled estimate {format_size(est.need)})"
    elif decision.tensor_cap is not None:
        why = (f"its posteriors on network grid {'x'.join(map(str, est.grid))} would exceed the GPU's limit of "
               f"{format_size(decision.tensor_cap)} per tensor")
    else:
        assert decision.budget is not None
        why = (f"estimated {format_size(est.need)} for network grid {'x'.join(map(str, est.grid))} exceeds "
               f"the memory budget of {format_size(decision.budget)} ({decision.where})")
    return (f"{name}: {why}: segmenting in {tiles.n_tiles} tiles of {'x'.join(map(str, tiles.tile_shape))} "
            f"({'x'.join(map(str, tiles.counts))}) overlapping by >= {tiles.overlap} voxels, estimated "
            f"{format_size(decision.tiled_need)}; results can differ from upstream near tile seams")
