"""W8A8Linear: int8 weights x int8 activations -> int32, rescaled to float (SmoothQuant's runtime).

For an input ``x`` ``[..., K]`` (flattened to ``[M, K]`` tokens) and the weight stored by the
``int8`` codec (codes ``Wq`` int8 ``[N, K]``, per-output-channel scales ``sw`` ``[N]``):

1. ``x' = x / migration_scale`` (per input channel; only when the layer keeps its SmoothQuant
   migration scale unfused), in float32 (float64 for a float64 input);
2. activation scale ``sx``: per token (dynamic) ``sx[m] = max_k |x'[m, k]| / 127`` (a row of
   zeros gets ``sx = 1``), or one static per-tensor scale ``input_scale`` from calibration;
3. ``Xq = clamp(round(x' / sx), -128, 127)`` as int8 (round half to even; with a dynamic scale
   ``|x' / sx| <= 127`` anyway, a static one can clip tokens beyond the calibrated range: the
   int8 range is what vLLM's static path and compressed-tensors use);
4. ``acc = Xq @ Wq^T`` in int32, exact (``torch._int_mm``; |acc| <= K * 128 * 127 fits int32 for
   K <= 132104, checked);
5. ``y = acc * sx[:, None] * sw[None, :] + bias`` in the compute dtype, cast to ``x.dtype``.

So ``y`` equals, up to the float rounding of step 5, ``(Xq * sx) @ (Wq * sw)^T + bias``: the
float64 reference of the same quantization (what the tests check).

Integer matmul backends (:func:`int8_matmul`): ``torch._int_mm`` on CPU (oneDNN; exact, and on
this repo's 2-core AVX-512 machine 4x faster than a float32 matmul of the same shape, see
``benchmarks/w8a8_speed``) and on CUDA (which needs M > 16 and K, N multiples of 8: smaller
shapes are zero-padded, which is exact); on other devices a float32 matmul over K-chunks of 1024,
exact because every partial sum is an integer below 2**24.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError, QuantizationError
from ..formats import QTensor
from ..kernels import HAVE_TRITON
from ..kernels.ops import OpaqueLinearMixin
from ..kernels.w8a8 import w8a8_linear as fused_w8a8_linear
from .quant_module import QuantWeightMixin, Quantizer
from .registry import register_runtime_module

QMAX = 127
ACT_QUANT = ("per_token_dynamic", "per_tensor_static")
EXTRA_BUFFERS = ("migration_scale", "input_scale")
MAX_K = (2**31 - 1) // (128 * QMAX)  # int32 accumulation is exact up to here (weights in [-127, 127])
_EXACT_F32_CHUNK = 1024  # 1024 * 128 * 128 = 2**24: float32 partial sums of int8 products are exact


# --------------------------------------------------------------------------------------------
# the torch path, as functions (the ground truth the kernels are tested against)
# --------------------------------------------------------------------------------------------
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def quantize_activation(
    x: torch.Tensor, migration_scale: torch.Tensor | None = None, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Xq, sx)`` for ``x`` ``[M, K]``: int8 codes ``[M, K]`` and float scales ``[M, 1]``
    (per token), or ``[1, 1]`` with a static ``input_scale`` (steps 1-3 of the module doc)."""
    cdt = compute_dtype(x)
    xf = x.to(cdt)
    if migration_scale is not None:
        xf = xf / migration_scale.to(cdt)
    if input_scale is None:
        sx = xf.abs().amax(dim=-1, keepdim=True).div_(QMAX)
        sx = torch.where(sx == 0, torch.ones_like(sx), sx)
    else:
        sx = input_scale.to(cdt).reshape(1, 1)
    q = (xf / sx).round_().clamp_(-128, QMAX).to(torch.int8)
    return q, sx


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t`` for int8 ``a`` ``[M, K]`` and int8 ``b_t`` ``[K, N]`` (usually the transposed
    view of a ``[N, K]`` weight), exactly, as int32 ``[M, N]``."""
    m, k = a.shape
    n = b_t.shape[1]
    if k > MAX_K:
        raise QuantizationError(f"W8A8: K = {k} input features can overflow the int32 accumulator (max {MAX_K})")
    if a.device.type == "cpu":
        return torch._int_mm(a, b_t)
    if a.device.type == "cuda":
        pm, pk, pn = max(0, 17 - m), (-k) % 8, (-n) % 8  # _int_mm on CUDA: M > 16, K and N multiples of 8
        if pm or pk or pn:
            a = torch.nn.functional.pad(a, (0, pk, 0, pm))
            b_t = torch.nn.functional.pad(b_t, (0, pn, 0, pk))
            return torch._int_mm(a, b_t)[:m, :n]
        return torch._int_mm(a, b_t)
    out = torch.zeros(m, n, dtype=torch.int32, device=a.device)
    for k0 in range(0, k, _EXACT_F32_CHUNK):  # exact chunks; the loop is over K / 1024 blocks only
        k1 = min(k, k0 + _EXACT_F32_CHUNK)
        out += (a[:, k0:k1].to(torch.float32) @ b_t[k0:k1].to(torch.float32)).to(torch.int32)
    return out


def w8a8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    migration_scale: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The W8A8 forward (torch path): ``x`` ``[..., K]``, ``codes`` int8 ``[N, K]``,
    ``weight_scale`` ``[N]``; returns ``[..., N]`` in ``x.dtype``."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = codes.shape[0]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, n)
    q, sx = quantize_activation(x2, migration_scale, input_scale)
    acc = int8_matmul(q, codes.t())
    cdt = sx.dtype
    y = acc.to(cdt).mul_(sx).mul_(weight_scale.to(cdt))
    if bias is not None:
        y = y.add_(bias.to(cdt))
    return y.to(x.dtype).reshape(*lead, n)


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
@register_runtime_module
class W8A8Linear(OpaqueLinearMixin, QuantWeightMixin, nn.Module):
    """A Linear running int8 x int8 (see the module docstring). Buffers: the ``int8`` codec's
    ``codes`` ``[N, K]`` and ``scale`` ``[N]``; optional ``migration_scale`` float ``[K]``
    (unfused SmoothQuant: the input is divided by it) and ``input_scale`` float ``[]`` (static
    per-tensor activation scale; absent: dynamic per-token). ``model.half()`` casts neither the
    codes nor these scales. Checkpoint kind ``"w8a8_linear"``."""

    kind = "w8a8_linear"
    migration_scale: torch.Tensor | None
    input_scale: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qweight: QTensor,
        bias: torch.Tensor | None = None,
        *,
        migration_scale: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        if qweight.codec != "int8":
            raise QuantizationError(f"W8A8Linear needs an int8-codec weight, got codec {qweight.codec!r}")
        if tuple(qweight.shape) != (out_features, in_features):
            raise QuantizationError(f"W8A8Linear({in_features}, {out_features}) needs a weight of shape "
                                    f"{[out_features, in_features]}, got {list(qweight.shape)}")
        if in_features > MAX_K:
            raise QuantizationError(f"W8A8Linear: {in_features} input features can overflow int32 (max {MAX_K})")
        self.in_features, self.out_features = in_features, out_features
        self._set_qweight(qweight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("migration_scale", _check_migration(migration_scale, in_features))
        self.register_buffer("input_scale", _check_input_scale(input_scale))

    @property
    def act_quant(self) -> str:
        return ACT_QUANT[0] if self.input_scale is None else ACT_QUANT[1]

    @classmethod
    def from_float(cls, module: nn.Linear, quantize: Quantizer, *, input_scale: torch.Tensor | None = None) -> "W8A8Linear":
        """Quantize ``module`` (an ``nn.Linear``, or a SmoothedLinear whose ``migration_scale``
        is carried over) with ``quantize`` (must give an ``int8``-codec QTensor)."""
        qt = quantize(module.weight.detach())
        bias = None if module.bias is None else module.bias.detach().clone()
        ms = getattr(module, "migration_scale", None)
        ms = None if ms is None else ms.detach().to(torch.float32).clone()
        return cls(module.in_features, module.out_features, qt, bias, migration_scale=ms, input_scale=input_scale)

    # --- checkpoint contract (bitsmith.nn.registry) ----------------------------------------
    @classmethod
    def from_checkpoint(cls, module: nn.Module, qweight: QTensor, bias: torch.Tensor | None, info: Mapping[str, Any],
                        tensors: Mapping[str, torch.Tensor]) -> "W8A8Linear":
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"w8a8_linear replaces an nn.Linear, the model has a {type(module).__name__} here")
        unknown = sorted(set(info) - {"kind", "tensors", "act_quant"})
        if unknown:
            raise CheckpointError(f"w8a8_linear info has unknown fields {unknown}; valid: act_quant, kind, tensors")
        act = info.get("act_quant")
        if act not in ACT_QUANT:
            raise CheckpointError(f"w8a8_linear act_quant must be one of {list(ACT_QUANT)}, got {act!r}")
        bad = sorted(set(tensors) - set(EXTRA_BUFFERS))
        if bad:
            raise CheckpointError(f"w8a8_linear has no tensor {bad}; valid: {list(EXTRA_BUFFERS)}")
        if (act == "per_tensor_static") != ("input_scale" in tensors):
            raise CheckpointError(f"w8a8_linear act_quant {act!r} {'needs' if act == 'per_tensor_static' else 'stores no'} "
                                  "an input_scale tensor")
        try:
            return cls(module.in_features, module.out_features, qweight, bias,
                       migration_scale=tensors.get("migration_scale"), input_scale=tensors.get("input_scale"))
        except QuantizationError as e:
            raise CheckpointError(e.message) from None

    def checkpoint_info(self) -> tuple[dict, dict[str, torch.Tensor]]:
        extra = {n: getattr(self, n) for n in EXTRA_BUFFERS if getattr(self, n) is not None}
        return {"kind": self.kind, "tensors": list(extra), "act_quant": self.act_quant}, extra

    # --- running ----------------------------------------------------------------------------
    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass outside ``torch.compile`` (``forward``: :class:`OpaqueLinearMixin`)."""
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and HAVE_TRITON and not (
                x.requires_grad and torch.is_grad_enabled()):
            # fused Triton path (bitsmith.kernels.w8a8): same codes and int32 sums, fused rescale
            return fused_w8a8_linear(x, self.codes, self.scale, self.bias, act_scale=self.input_scale,
                                     migration_scale=self.migration_scale,
                                     plans=self.__dict__.setdefault("_w8a8_plans", {}))
        return w8a8_linear(x, self.codes, self.scale, self.bias, self.migration_scale, self.input_scale)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Like the packed weight, the float32 scales keep their dtype under ``model.half()``.
        The fused path's launch plans hold the old tensors' addresses: dropped."""
        self.__dict__["_w8a8_plans"] = {}
        saved = {n: self._buffers[n] for n in EXTRA_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, old in saved.items():
            new = self._buffers[n]
            if new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self.__dict__["_w8a8_plans"] = {}  # tensors may have been replaced (assign=True)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"act_quant={self.act_quant}, migration_scale={self.migration_scale is not None}")


def _check_migration(scale: torch.Tensor | None, channels: int) -> torch.Tensor | None:
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or tuple(scale.shape) != (channels,):
        got = f"{scale.dtype}{list(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise QuantizationError(f"migration_scale must be a floating [{channels}] tensor, got {got}")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise QuantizationError("migration_scale must be finite and > 0 in every channel")
    return scale


def _check_input_scale(scale: torch.Tensor | None) -> torch.Tensor | None:
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or scale.numel() != 1 or scale.dim() > 1:
        got = f"{scale.dtype}{list(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise QuantizationError(f"input_scale must be a floating scalar ([] or [1]), got {got}")
    if not bool(torch.isfinite(scale).all()) or not float(scale) > 0:
        raise QuantizationError(f"input_scale must be finite and > 0, got {float(scale)}")
    return scale.reshape(())


__all__ = ["W8A8Linear", "w8a8_linear", "quantize_activation", "int8_matmul", "ACT_QUANT", "MAX_K"]
