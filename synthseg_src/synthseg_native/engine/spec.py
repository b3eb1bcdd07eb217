"""What the engine needs to know about a run, decided once from the options: a frozen :class:`ModelSpec`.

The command line's :class:`~synthseg_native.config.Options` has some thirty fields, most of them about files and
batches. The engine reads a handful, and several of them only in a normalised form ("robust implies fast", "--cpu
is --device cpu", a QC *file* meaning "load the QC network"). Deriving them here, once, means every engine function
takes the same small record and no module repeats a rule: the networks a run loads, the form of the posteriors'
post-processing, the device, the precision and the memory budget are read off the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Options


@dataclass(frozen=True)
class ModelSpec:
    """The networks and how they run. ``fast``: no flipped pass and no topology clean-up (``--fast``, and
    ``--robust``, which implies it as upstream's script says); ``backend`` is the one ``--backend`` resolved to."""

    model: str                          # key of the segmentation network's weights (engine.weights.MODEL_FILES)
    v1: bool
    robust: bool
    fast: bool
    parc: bool
    qc: bool
    ct: bool
    crop: tuple[int, int, int] | None   # the network grid's centred patch (three sizes), None: the whole image
    keepgeom: bool
    backend: str                        # tf or torch
    device: str                         # auto, cpu, cuda, mps
    bn: str                             # auto, fused, unfused
    precision: str
    threads: int | None                 # None: all cores
    models: str | None                  # an explicit weights folder (the only one searched), or None
    max_memory: float | None            # bytes; None: the memory available
    device_check: str = "error"         # error, cpu, off: what a GPU's failed self-check does (engine.selfcheck)
    profile: bool = False
    debug: bool = False
    autocrop: bool = False              # the network sees only the box around the foreground (FreeSurfer 8)
    photo: str | None = None            # Photo-SynthSeg's hemisphere(s): left, right, both (FreeSurfer 8)
    model_file: str | None = None       # --model: the segmentation network's weights file, instead of MODEL_FILES'
    conventions: str = "upstream"       # upstream or freesurfer (where the two programs differ)

    @property
    def flip(self) -> bool:
        """Whether the flipped pass runs and is averaged in (upstream's default path; FreeSurfer's Photo-SynthSeg
        only for both hemispheres, since one hemisphere has no mirror image)."""
        return not self.fast and self.photo in (None, "both")

    @property
    def freesurfer_first(self) -> bool:
        """Weights searched in ``$FREESURFER_HOME/models`` first, as FreeSurfer's mri_synthseg looks there."""
        return self.conventions == "freesurfer"

    @property
    def mirrored(self) -> bool:
        """Photo-SynthSeg of a right hemisphere: the network, trained on left ones, sees it mirrored along the first
        (left-right) axis, and its outputs are mirrored back."""
        return self.photo == "right"

    @property
    def networks(self) -> tuple[str, ...]:
        """The weight files' keys of every network the run loads: segmentation, then parcellation and QC."""
        return (self.model,) + (("parc",) if self.parc else ()) + (("qc",) if self.qc else ())

    @classmethod
    def of(cls, opts: Options) -> ModelSpec:
        """The spec of ``opts`` (normalised here, so any :class:`Options` will do; ``opts.backend`` should already
        be resolved from ``auto``)."""
        o = opts.normalised()
        crop = None if o.crop is None else tuple(int(c) for c in o.crop)
        return cls(model=o.segmentation_model, v1=o.v1, robust=o.robust, fast=o.fast, parc=o.parc, qc=bool(o.qc),
                   ct=o.ct, crop=crop, keepgeom=o.keepgeom, backend=o.backend, device=o.device, bn=o.bn,  # type: ignore[arg-type]
                   precision=o.precision, threads=o.threads, models=o.models, max_memory=o.max_memory_bytes,
                   device_check=o.device_check, profile=o.profile, debug=o.debug, autocrop=o.autocrop,
                   photo=o.photo, model_file=o.model, conventions=o.conventions)
