"""QuantLinear: a Linear whose weight is stored packed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantizationError
from ..formats import QTensor
from ..kernels import HAVE_TRITON, RuntimeWeight, quant_matmul, repack, reserve_workspace, unsupported_reason
from ..kernels.ops import OpaqueLinearMixin
from .quant_module import QuantWeightMixin, Quantizer
from .siblings import sibling_group

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


class KernelWeightMixin(OpaqueLinearMixin):
    """Fused-kernel dispatch for a module whose packed weight is ``self.qweight`` (QuantLinear,
    LowRankQuantLinear's residual): the runtime layout is repacked once (at ``.to(cuda)`` or the
    first CUDA forward), cached in ``__dict__`` (never a buffer, never saved) and dropped when
    the buffers change. ``use_kernels = False`` on an instance keeps the reference path.
    ``forward`` is :meth:`eager_forward`, which the module defines; under ``torch.compile`` it
    is emitted as one opaque op instead (:mod:`bitsmith.kernels.ops`)."""

    use_kernels: bool = True
    # runtime layout (bitsmith.kernels.layout.repack): None lets repack choose (the fragment
    # layout where BITSMITH_FRAGMENT=1 and the weight takes it); a module whose kernels need the
    # rows layout names it
    kernel_layout: str | None = None

    def prepare_kernels(self) -> RuntimeWeight | None:
        """Repack the weight into the kernels' runtime layout on its current device (CUDA only);
        returns it, or ``None`` (reason in ``self.kernel_skip_reason``)."""
        self.__dict__["_runtime"] = None
        group = sibling_group(self)
        if group is not None:  # the group's stacked weight serves this module (nn.siblings)
            self.__dict__["kernel_skip_reason"] = "runs in its sibling group's stacked weight"
            group.prepare()
            return None
        qt = self.qweight
        reason = None if HAVE_TRITON else "triton is not installed"
        if reason is None and qt.device.type != "cuda":
            reason = f"weight is on {qt.device.type}"
        reason = reason or unsupported_reason(qt)
        self.__dict__["kernel_skip_reason"] = reason
        if reason is None:
            self.__dict__["_runtime"] = repack(qt, layout=self.kernel_layout)
            reserve_workspace(self.__dict__["_runtime"])
        return self.__dict__["_runtime"]

    def _kernel_input(self, x: torch.Tensor) -> bool:
        """Whether ``x`` may take the fused kernels: CUDA, float16 / bfloat16, no gradient to
        the input (the kernels have no backward), kernels on."""
        return (self.use_kernels and HAVE_TRITON and x.is_cuda and x.dtype in _KERNEL_DTYPES
                and not (x.requires_grad and torch.is_grad_enabled()))

    def _kernel_weight(self, x: torch.Tensor) -> RuntimeWeight | None:
        if not self._kernel_input(x):
            return None
        rw = self.__dict__.get("_runtime")
        if rw is not None and rw.device == x.device:
            return rw
        if self.__dict__.get("kernel_skip_reason") is not None or torch.cuda.is_current_stream_capturing():
            return None
        return self.prepare_kernels()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        old = self.__dict__.get("_runtime")
        out = super()._apply(fn, recurse)
        dev = self.qweight.device
        if old is not None and old.device == dev:
            return out  # a dtype cast: the packed buffers (and so the runtime layout) are unchanged
        self.__dict__.pop("kernel_skip_reason", None)
        self.__dict__["_runtime"] = None
        if dev.type == "cuda" and self.use_kernels:
            self.prepare_kernels()  # repack once at .to(cuda): a CUDA graph can then capture forward
        return out

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)  # buffers changed in place: repack lazily
        self.__dict__["_runtime"] = None
        group = sibling_group(self)
        if group is not None:
            group.invalidate()
            return  # the member stays without a runtime weight of its own
        self.__dict__.pop("kernel_skip_reason", None)


class QuantLinear(KernelWeightMixin, QuantWeightMixin, nn.Module):
    """``y = x @ W^T + b`` with ``W`` dequantized on the fly (reference path: dequantize to the
    input's dtype, then ``F.linear``). The bias stays a float parameter.

    On CUDA with float16/bfloat16 inputs (no autograd through the input) and a weight the fused
    kernels take (:func:`bitsmith.kernels.unsupported_reason`), ``forward`` runs
    :func:`bitsmith.kernels.quant_matmul` on a runtime layout repacked once (at ``.to(cuda)`` or
    the first CUDA forward), cached on the module and never saved. ``use_kernels = False`` on an
    instance keeps the reference path."""

    def __init__(self, in_features: int, out_features: int, qweight: QTensor, bias: torch.Tensor | None = None):
        super().__init__()
        if tuple(qweight.shape) != (out_features, in_features):
            raise QuantizationError(
                f"QuantLinear({in_features}, {out_features}) needs a weight of shape "
                f"{[out_features, in_features]}, got {list(qweight.shape)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self._set_qweight(qweight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_float(cls, module: nn.Linear, quantize: Quantizer) -> "QuantLinear":
        """Quantize ``module.weight`` with ``quantize`` (e.g.
        ``functools.partial(bitsmith.quantize_tensor, method="nf")``)."""
        qt = quantize(module.weight.detach())
        bias = None if module.bias is None else module.bias.detach().clone()
        return cls(module.in_features, module.out_features, qt, bias)

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass outside ``torch.compile`` (inside it, ``forward`` wraps this in
        :mod:`bitsmith.kernels.ops`' custom op)."""
        group = sibling_group(self)
        if group is not None and group.takes(self, x):
            return group.output(self, x)
        rw = self._kernel_weight(x)
        if rw is not None:
            return quant_matmul(x, rw, self.bias)
        w = self.dequantize(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def fake_output(self, x: torch.Tensor) -> torch.Tensor:
        """An empty output with the shape and strides :meth:`eager_forward` gives ``x`` (what
        ``torch.compile`` is told about the opaque op: a sibling group's slice is strided)."""
        group = sibling_group(self)
        if group is not None and group.takes(self, x):
            return group.fake_output(self, x)
        return x.new_empty(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self._qrepr()}"
