"""Native SynthSeg toolkit: runs SynthSeg brain MRI segmentation with tf.keras on CPU, CUDA and Apple GPUs."""

__version__ = "0.1.0"
