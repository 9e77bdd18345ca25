"""Shared part of the runtime modules: hold a QTensor's stored tensors as buffers."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..formats import QTensor
from ..kernels import ops

Quantizer = Callable[[torch.Tensor], QTensor]


class QuantWeightMixin(ops.OpHandleMixin):
    """Keeps the packed weight as persistent buffers named by the codec's fields (``codes``,
    ``scale``, ...), plus the codec name, params and original shape/dtype as attributes.
    ``.to(device)`` moves the packed buffers like any buffer. Under ``torch.compile``,
    :meth:`dequantize` is one opaque op (:mod:`bitsmith.kernels.ops`)."""

    codec: str
    qparams: Any
    weight_shape: tuple[int, ...]
    weight_dtype: torch.dtype
    _qfields: tuple[str, ...]

    def _set_qweight(self, qt: QTensor) -> None:
        module: nn.Module = self  # type: ignore[assignment]
        for name in getattr(self, "_qfields", ()):
            delattr(module, name)
        self.codec = qt.codec
        self.qparams = qt.params
        self.weight_shape = qt.shape
        self.weight_dtype = qt.dtype
        self._qfields = tuple(qt.tensors)
        for name, t in qt.tensors.items():
            module.register_buffer(name, t)

    @property
    def qweight(self) -> QTensor:
        """The weight as a QTensor (sharing this module's buffers)."""
        module: nn.Module = self  # type: ignore[assignment]
        return QTensor(
            self.codec,
            self.qparams,
            self.weight_shape,
            self.weight_dtype,
            {n: getattr(module, n) for n in self._qfields},
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (torch reference path), in ``dtype`` (default: original)."""
        if torch.compiler.is_compiling():  # the unpacking is not traceable: one op instead
            return ops.dequantize(getattr(self, self._qfields[0]), self._op_handle, dtype)
        return self.qweight.dequantize(dtype)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Device moves apply to the packed buffers; dtype casts (``model.half()``) do not:
        codes, scales and absmax keep their storage dtypes, so numerics stay exactly those of
        the checkpoint and float layers still follow the cast."""
        saved = {n: self._buffers[n] for n in self._qfields}  # type: ignore[attr-defined]
        super()._apply(fn, recurse)  # type: ignore[misc]
        for n, old in saved.items():
            new = self._buffers[n]  # type: ignore[attr-defined]
            if new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)  # type: ignore[attr-defined]
        return self

    def _qrepr(self) -> str:
        return f"codec={self.codec}, {self.qweight.bits_per_weight:.2f} bits/weight"
