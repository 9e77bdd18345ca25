"""Runtime module kinds a checkpoint can name.

A checkpoint rebuilds a quantized ``X.weight`` as :class:`~bitsmith.nn.QuantLinear` /
:class:`~bitsmith.nn.QuantConv2d` by default. A layer that needs another runtime module (W8A8,
the low-rank SVDQuant layer, ...) is named in the shard document's ``modules`` object
(``{"X": {"kind": "w8a8_linear", "tensors": ["migration_scale"], ...attrs}}``, see
``docs/checkpoint-format.md``), and ``kind`` is looked up here.

A registered class provides

* ``kind: str`` — its registry name, written into checkpoints;
* ``from_checkpoint(cls, module, qweight, bias, info, tensors) -> nn.Module`` — build the layer
  from the float module it replaces (on the meta device: only its geometry may be read), the
  quantized ``X.weight`` (a QTensor), the bias tensor (or ``None``), the module info dict (as
  stored: ``kind``, ``tensors``, attributes) and ``tensors``, ``{leaf: tensor}`` for every leaf the
  info lists (stored as ``X.<leaf>``). It validates ``info`` and the tensors' shapes and raises
  :class:`~bitsmith.errors.CheckpointError` / ``SpecError`` saying what is wrong;
* ``checkpoint_info(self) -> tuple[dict, dict[str, torch.Tensor]]`` — the inverse: the module
  info (with ``kind`` and ``tensors``) and the extra tensors by leaf name, for a writer. The
  quantized weight is the module's ``qweight`` and its bias ``bias``, written as usual.
"""
from __future__ import annotations

from torch import nn

from ..formats.registry import Registry

RUNTIME_MODULES: Registry[type[nn.Module]] = Registry("runtime module kind")


def register_runtime_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: register ``cls`` under its ``kind`` (checked to provide the contract)."""
    for attr in ("kind", "from_checkpoint", "checkpoint_info"):
        if not hasattr(cls, attr):
            raise TypeError(f"runtime module {cls.__name__} lacks {attr!r}")
    return RUNTIME_MODULES.register(cls.kind)(cls)


__all__ = ["RUNTIME_MODULES", "register_runtime_module"]
