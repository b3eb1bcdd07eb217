"""A tiny stand-in for an upstream SynthSeg checkout, shared by the tests of the upstream engine and
of the pipeline stage that drives it.

Its ``predict()`` only records the arguments it receives (plus whether the BatchNorm patch and the
NumPy alias shim were active, the TensorFlow thread settings and CUDA_VISIBLE_DEVICES) as JSON in
``$FAKE_RECORD``; with ``$FAKE_WRITE`` set it also writes small segmentation, posterior and volume files so
that a stage can finish and cache its run; ``$FAKE_EXIT`` makes it exit with that status.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

LABEL_FILES = [f"synthseg_{stem}{suffix}.npy" for stem in ("segmentation_labels", "segmentation_names",
                                                           "qc_labels", "qc_names", "topological_classes")
               for suffix in ("", "_2.0")]
LABEL_FILES += ["synthseg_denoiser_labels_2.0.npy", "synthseg_parcellation_labels.npy",
                "synthseg_parcellation_names.npy"]

FAKE_PREDICT = textwrap.dedent('''
    import json, os, sys
    import numpy as np

    def predict(**kwargs):
        np.zeros(1, dtype=np.int)  # AttributeError on NumPy >= 1.24 unless the alias shim is active
        import tensorflow as tf
        from synthseg_native.engine.backends.tf import patches
        record = dict(kwargs, _bn_patch=patches.bn_patch_active(), _module=__file__,
                      _threads=[tf.config.threading.get_inter_op_parallelism_threads(),
                                tf.config.threading.get_intra_op_parallelism_threads()],
                      _cuda=os.environ.get("CUDA_VISIBLE_DEVICES"))
        with open(os.environ["FAKE_RECORD"], "w") as f:
            json.dump(record, f)
        if os.environ.get("FAKE_WRITE"):
            import nibabel as nib
            for key in ("path_segmentations", "path_posteriors", "path_volumes"):
                if kwargs[key]:
                    os.makedirs(os.path.dirname(kwargs[key]), exist_ok=True)  # as upstream does
            for key in ("path_segmentations", "path_posteriors"):
                if kwargs[key]:
                    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.int32), np.eye(4)), kwargs[key])
            if kwargs["path_volumes"]:
                with open(kwargs["path_volumes"], "w") as f:
                    f.write("subject,total intracranial\\nfake,1.0\\n")
        if os.environ.get("FAKE_EXIT"):
            sys.exit(int(os.environ["FAKE_EXIT"]))
''')


def make_checkout(home: Path) -> Path:
    """Lay out ``home`` like upstream's repository, as far as the upstream engine looks."""
    (home / "SynthSeg").mkdir(parents=True)
    (home / "SynthSeg" / "__init__.py").write_text("")
    (home / "SynthSeg" / "predict_synthseg.py").write_text(FAKE_PREDICT)
    labels = home / "data" / "labels_classes_priors"
    labels.mkdir(parents=True)
    for name in LABEL_FILES:
        (labels / name).write_bytes(b"")
    return home
