"""The PyTorch backend: SynthSeg's networks in ``torch.nn`` from the official .h5 files, on CPU, CUDA or MPS.

Importing this package sets ``THP_MEM_ALLOC_ENABLE=1`` (unless the caller chose a value) before its modules import
PyTorch, whose CPU allocator reads it once: tensors of 2 MB and more are then backed by transparent huge pages.
The slab-streamed U-Net allocates and frees hundreds of MB per convolution; with 4 kB pages each allocation costs
tens of thousands of page faults (a third of the CPU run's time was system time, docs/performance.md).
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
