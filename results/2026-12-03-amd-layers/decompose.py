"""Decompose the TF network stage's non-conv time (a one-off experiment of 2026-12-03, not part of the toolkit:
it calls the predictor's internals). Usage: PYTHONPATH=synthseg_src python decompose.py mni152_t1.nii.gz WEIGHTS"""
import sys, time
import numpy as np
from synthseg_native.engine.backends.tf.devices import prepare_tensorflow
prepare_tensorflow()
from synthseg_native.api import Segmenter
from synthseg_native.engine.preprocess import preprocess
from synthseg_native.io.images import load_image
from synthseg_native.engine.backends.tf import network
from synthseg_native.engine.backends.tf.blur import blurred_slabs, blur_average_flipped

path = sys.argv[1]
with Segmenter(models=sys.argv[2], threads=2) as seg:
    p = seg.predictor
    image = preprocess(load_image(path), path).image
    p._segment(image)  # warm-up
    for rep in range(2):
        for piece in p.run_seg.pieces:
            piece.timing, piece.calls, piece.seconds, piece.voxels = True, 0, 0.0, 0
        T = {}
        t0 = time.perf_counter()
        slabs = [(a, b, np.asarray(s)) for a, b, s in p.run_seg.predict_slabs(image)]
        T["pass1 unet"] = time.perf_counter() - t0
        pieces1 = sum(pc.seconds for pc in p.run_seg.pieces)
        T["pass1 pieces"] = pieces1
        t0 = time.perf_counter()
        blurred = network.assemble(blurred_slabs(iter(slabs), p.blur), image.shape[1])
        T["pass1 blur+assemble"] = time.perf_counter() - t0
        del slabs
        t0 = time.perf_counter()
        fimg = np.ascontiguousarray(image[:, ::-1])
        T["flip copy"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        slabs = [(a, b, np.asarray(s)) for a, b, s in p.run_seg.predict_slabs(fimg)]
        T["pass2 unet"] = time.perf_counter() - t0
        T["pass2 pieces"] = sum(pc.seconds for pc in p.run_seg.pieces) - pieces1
        t0 = time.perf_counter()
        blur_average_flipped(blurred, iter(slabs), p.blur, p.flip)
        T["pass2 blur+average"] = time.perf_counter() - t0
        del slabs
        t0 = time.perf_counter()
        p._segment(image)
        T["streamed _segment total"] = time.perf_counter() - t0
        print(rep, {k: round(v, 2) for k, v in T.items()}, flush=True)
