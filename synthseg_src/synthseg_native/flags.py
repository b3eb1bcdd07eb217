"""Upstream ``SynthSeg_predict.py``'s flags as one record, shared by both engines' option types."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class SynthSegFlags:
    """The flags upstream's command line accepts, with its meanings (``crop`` per axis)."""

    i: str
    o: str
    parc: bool = False
    robust: bool = False
    fast: bool = False
    ct: bool = False
    vol: str | None = None
    qc: str | None = None
    post: str | None = None
    resample: str | None = None
    crop: list[int] | None = None
    threads: int | None = None
    cpu: bool = False
    v1: bool = False

    def upstream_flags(self) -> dict:
        """Just the upstream flags, e.g. to hand the same request to the other engine."""
        return {f.name: getattr(self, f.name) for f in fields(SynthSegFlags)}
