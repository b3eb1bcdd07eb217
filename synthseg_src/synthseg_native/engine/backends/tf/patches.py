"""Process-wide patches that let SynthSeg's networks and upstream's code run on today's stack.

BatchNorm: tensorflow-metal has no 5-D ``FusedBatchNormV3`` kernel ("input must be 4-dimensional",
SynthSeg issue #81), and Keras 2.15 picks that kernel for every 5-D BatchNormalization. Keras makes
the choice in two places, so the patch hooks both on ``BatchNormalizationBase``:

* ``_fused_can_be_used`` is consulted only in ``__init__``; answering False there gives the layer
  ``fused=False`` for life, exactly as if it had been built with ``fused=False``. This is what makes a
  model built inside :func:`unfused_batchnorm` stay unfused when it is traced later, outside it.
* ``call`` reads ``self.fused`` at trace time. Layers constructed before the patch (``fused`` None or
  already True after ``build``) never consult ``_fused_can_be_used`` again, so the wrapped ``call``
  turns their ``fused`` off the first time they are traced while the patch is active.

Functions that were already traced (e.g. a cached ``Model.predict_function``) are not retraced.
The unfused form (Rsqrt/Mul/Sub/AddV2) is not bit-identical to the fused kernel (~1e-7), which is why
the patch is opt-in rather than applied on import.

NumPy aliases: upstream SynthSeg still spells ``np.int``/``np.float``, removed in NumPy 1.24.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import importlib
import inspect
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

_BN_MODULE = "keras.src.layers.normalization.batch_normalization"
_CALL_PARAMS = ["self", "inputs", "training", "mask"]
_MISSING = object()

# Original class attributes (raw ``__dict__`` entries, or _MISSING) while the patch is active.
_bn_saved: dict[str, Any] = {}

_NUMPY_ALIASES = ("int", "float", "bool", "object", "str", "complex")
# Aliases this module added to numpy, so that removal never deletes numpy's own attributes.
_numpy_added: list[str] = []


logger = logging.getLogger(__name__)


def _bn_base() -> type:
    """Import Keras only when a patch is requested, so importing this module stays cheap."""
    try:
        module = importlib.import_module(_BN_MODULE)
        return module.BatchNormalizationBase
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"cannot patch BatchNormalization: {_BN_MODULE}.BatchNormalizationBase "
                           f"not found ({exc}); Keras 2.15 is expected") from exc


def _never_fused(self: Any) -> bool:
    """Replacement for ``_fused_can_be_used``: new layers are constructed with ``fused=False``."""
    return False


def _unfused_call(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``call`` keeping its exact signature: Keras derives its call spec (whether to pass
    ``training``/``mask``) from the signature, and ``*args`` would change that."""

    @functools.wraps(original)
    def call(self: Any, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if self.fused:
            self.fused = False
        return original(self, inputs, training=training, mask=mask)

    call._synthseg_unfused = True  # type: ignore[attr-defined]
    return call


def _replacements(cls: type) -> dict[str, Callable[..., Any]]:
    """What to install; the call hook is skipped (with a warning) on an unexpected Keras."""
    new: dict[str, Callable[..., Any]] = {"_fused_can_be_used": _never_fused}
    original_call = cls.call
    if list(inspect.signature(original_call).parameters) == _CALL_PARAMS:
        new["call"] = _unfused_call(original_call)
    else:
        logger.warning("BatchNormalization.call has an unexpected signature; only layers constructed after "
              "the patch will be unfused")
    return new


def bn_patch_active() -> bool:
    """True while :func:`apply_bn_patch` is in effect (does not import Keras)."""
    if not _bn_saved:
        return False
    cls = sys.modules[_BN_MODULE].BatchNormalizationBase
    return cls.__dict__.get("_fused_can_be_used") is _never_fused


def apply_bn_patch() -> bool:
    """Make Keras BatchNormalization use its unfused form; True if this call changed anything."""
    if bn_patch_active():
        return False
    cls = _bn_base()
    for name, func in _replacements(cls).items():
        _bn_saved[name] = cls.__dict__.get(name, _MISSING)
        setattr(cls, name, func)
    logger.info(f"BatchNorm patch applied: {cls.__name__}.{' and .'.join(_bn_saved)} hooked, "
          "BatchNormalization layers run unfused (no FusedBatchNormV3)")
    return True


def remove_bn_patch() -> bool:
    """Restore Keras's own methods; True if a patch was removed.

    Layers constructed or traced while the patch was active keep ``fused=False``.
    """
    if not _bn_saved:
        return False
    cls = sys.modules[_BN_MODULE].BatchNormalizationBase
    for name, original in _bn_saved.items():
        if original is _MISSING:
            delattr(cls, name)
        else:
            setattr(cls, name, original)
    _bn_saved.clear()
    logger.info("BatchNorm patch removed: Keras chooses the fused kernel again")
    return True


@contextlib.contextmanager
def unfused_batchnorm() -> Iterator[None]:
    """Build (and trace) models inside this block to get unfused BatchNorm layers.

    Leaves an already active patch in place, so nesting and a process-wide patch both survive.
    """
    changed = apply_bn_patch()
    try:
        yield
    finally:
        if changed:
            remove_bn_patch()


def _numpy_has(np: Any, name: str) -> bool:
    """``hasattr`` without NumPy 1.2x's FutureWarning about names it will define again later."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return hasattr(np, name)


def apply_numpy_alias_shim() -> list[str]:
    """Define the removed NumPy aliases as the builtins they stood for; returns the names added.

    Only missing names are added, so a NumPy that has them again (``np.bool`` in 2.x) is untouched.
    """
    added = []
    for name in _NUMPY_ALIASES:
        if name not in _numpy_added and not _numpy_has(np, name):
            setattr(np, name, getattr(builtins, name))
            _numpy_added.append(name)
            added.append(name)
    return added


def remove_numpy_alias_shim() -> list[str]:
    """Delete the aliases :func:`apply_numpy_alias_shim` added; returns their names."""
    removed = []
    while _numpy_added:
        name = _numpy_added.pop()
        if np.__dict__.get(name) is getattr(builtins, name):
            delattr(np, name)
            removed.append(name)
    return removed


def graph_op_types(concrete_function: Any) -> set[str]:
    """Every op type in a traced function, including those hidden in nested function bodies.

    Calls to inner tf.functions appear as (Stateful)PartitionedCall ops whose bodies live in the
    graph's function library; that library is flat and holds every function reachable from the
    graph, so scanning it covers any depth of nesting.
    """
    graph = concrete_function.graph
    types = {op.type for op in graph.get_operations()}
    for fdef in graph.as_graph_def().library.function:
        types.update(node.op for node in fdef.node_def)
    return types
