"""LowRankQuantLinear: SVDQuant's runtime module -- a 16-bit low-rank branch beside a 4-bit
residual, on a smoothed (and optionally shifted, optionally fake-quantized) activation.

For an input row ``x`` ``[K]`` (float64 reference semantics; see :func:`low_rank_linear`)::

    x~ = x / s                       (skipped when ``smooth_fused``: the previous op outputs x / s)
    d  = shift / s   or   shift      (not fused / fused; ``shift`` is added to the module's input)
    y  = Q(R) . A(x~ + d)  +  L1 . L2 . (x~ + [low_rank_input == "shifted"] * d)  +  b'

``Q(R)`` is the packed residual (any codec; SVDQuant uses affine int4 g64), ``L1`` = ``lora_up``
``[N, r]`` and ``L2`` = ``lora_down`` ``[r, K]`` in 16-bit, ``A`` the activation fake-quant
(:func:`fake_quantize_activation`; identity for ``act_bits=16``) -- applied to the main branch
only, the low-rank branch reads the unquantized activation -- and ``b'`` the folded bias from
:func:`bitsmith.transforms.shift.fold_shift_bias`:

==========================  ==================================  ==========================
low-rank branch reads        b'                                  seed 000's ``shift.s^-1.R``
==========================  ==================================  ==========================
unshifted (Nunchaku)         ``b - Q(R) d``                      present (it is all of it)
shifted                      ``b - (Q(R) + L1 L2) d``            present, plus L1 L2 d
no shift                     ``b``                               --
==========================  ==================================  ==========================

so that with quantization disabled ``y == x . W^T + b`` exactly
(``tests/test_svdquant.py::test_fold_matrix_exact``, every combination of shift none / scalar /
per-channel, bias or not, smoothing fused or not, low-rank input shifted or not, 1e-10 relative
in float64) and with int4 weights and 4/8-bit activations the module equals a float64
fake-quant simulation up to its dtype's rounding
(``tests/test_svdquant.py::test_module_matches_fake_quant_simulation``, fp32/fp16/bf16).

The activation path (smoothing, shift, fake-quant) is computed in float32 (float64 for float64
inputs), the two matmuls in the input's dtype.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, QuantizationError
from ..formats import QTensor
from ..kernels import quant_matmul
from ..kernels.low_rank import LowRankRuntime, low_rank_matmul, prepare
from .quant_linear import KernelWeightMixin
from .quant_module import QuantWeightMixin
from .registry import register_runtime_module

LOW_RANK_INPUTS = ("unshifted", "shifted")
ACT_BITS = (4, 8, 16)


def fake_quantize_activation(
    x: torch.Tensor, bits: int, group_size: int | None = None, *, unsigned: bool = False
) -> torch.Tensor:
    """Quantize-dequantize ``x`` ``[..., K]`` per token (``group_size=None``: one scale per row)
    or per group of ``group_size`` consecutive channels (the last group may be short), in
    ``x``'s dtype.

    Signed (default): ``scale = absmax / (2**(bits-1) - 1)``, codes ``round(x / scale)`` clamped
    to ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``. Unsigned (for a shifted, non-negative input):
    ``scale = max(x) / (2**bits - 1)``, codes clamped to ``[0, 2**bits - 1]`` (negative values
    become 0). A group whose scale is 0 gives 0. Ties round to even."""
    if bits not in (4, 8):
        raise QuantizationError(f"activation fake-quant supports 4 or 8 bits, got {bits}")
    k = x.shape[-1]
    g = k if group_size is None else int(group_size)
    if g < 1:
        raise QuantizationError(f"activation group size must be >= 1, got {group_size}")
    ng = -(-k // g)
    pad = ng * g - k
    xp = F.pad(x, (0, pad)) if pad else x  # zeros change neither absmax nor a non-negative max
    xg = xp.reshape(*x.shape[:-1], ng, g)
    if unsigned:
        qmin, qmax = 0.0, float((1 << bits) - 1)
        top = xg.amax(dim=-1, keepdim=True).clamp_min(0)
    else:
        qmax = float((1 << (bits - 1)) - 1)
        qmin = -qmax
        top = xg.abs().amax(dim=-1, keepdim=True)
    scale = top / qmax
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(xg / safe).clamp_(qmin, qmax)
    out = (q * scale).reshape(*x.shape[:-1], ng * g)
    return out[..., :k] if pad else out


def low_rank_linear(
    x: torch.Tensor,
    residual: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    lora_down: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    smooth: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    smooth_fused: bool = False,
    low_rank_input: str = "unshifted",
    act_bits: int = 16,
    act_group_size: int | None = None,
    act_unsigned: bool = False,
) -> torch.Tensor:
    """The module's formula with an explicit (dequantized) ``residual`` ``[N, K]``, or a function
    computing ``x @ R^T`` from the main-branch activation (in ``x``'s dtype: the fused kernels);
    see the module docstring. ``shift`` is ``[K]`` or ``[1]``, in the domain of the module's input."""
    dt = x.dtype
    cdt = torch.float64 if dt == torch.float64 else torch.float32
    xs = x.to(cdt)
    divide = smooth is not None and not smooth_fused
    if divide:
        xs = xs / smooth.to(cdt)
    xm = xs
    if shift is not None:
        d = shift.to(cdt)
        if divide:
            d = d / smooth.to(cdt)
        xm = xs + d
    xl = xm if low_rank_input == "shifted" else xs
    if act_bits != 16:
        xm = fake_quantize_activation(xm, act_bits, act_group_size, unsigned=act_unsigned)
    y = residual(xm.to(dt)) if callable(residual) else F.linear(xm.to(dt), residual.to(dt))
    if lora_down is not None and lora_up is not None and lora_down.shape[0] > 0:
        y = y + F.linear(F.linear(xl.to(dt), lora_down.to(dt)), lora_up.to(dt))
    if bias is not None:
        y = y + bias.to(dt)
    return y


class LowRankCheckpointMixin:
    """What LowRankQuantLinear and LowRankQuantConv2d share: the non-tensor settings, the
    checkpoint record (``kind``, stored leaves, settings) and the rebuild from it. A subclass sets
    ``kind`` and ``float_type`` (the float module it replaces) and implements ``_from_float``."""

    kind: str
    float_type: type
    _ATTRS = ("smooth_fused", "low_rank_input", "act_bits", "act_group_size", "act_unsigned")
    _LEAVES = ("lora_down", "lora_up", "smooth", "shift")

    def checkpoint_info(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Module info for a checkpoint (``kind``, the stored leaves, :meth:`options`) and the
        extra tensors ``lora_down``, ``lora_up``, ``smooth``, ``shift`` (those present). The
        residual is written as ``X.weight`` and the folded bias as ``X.bias``; the geometry is
        not stored (it is the model's own module's)."""
        tensors = {n: getattr(self, n) for n in self._LEAVES if getattr(self, n) is not None}
        return {"kind": self.kind, "tensors": sorted(tensors), **self.options()}, tensors

    @classmethod
    def from_checkpoint(cls, module: nn.Module, qweight: QTensor, bias: torch.Tensor | None, info: dict,
                        tensors: dict[str, torch.Tensor]):
        """Rebuild from a checkpoint (see :mod:`bitsmith.nn.registry`); ``module`` is the float
        module it replaces (only its geometry is read)."""
        unknown = sorted(set(info) - {"kind", "tensors", *cls._ATTRS})
        extra = sorted(set(tensors) - set(cls._LEAVES))
        if unknown or extra:
            raise CheckpointError(f"{cls.kind}: unknown attributes {unknown} / tensors {extra}")
        if not isinstance(module, cls.float_type):
            raise CheckpointError(f"{cls.kind} replaces a {cls.float_type.__name__}, the model has a {type(module).__name__}")
        opts = {k: info[k] for k in cls._ATTRS if k in info}
        try:
            return cls._from_float(module, qweight, tensors.get("lora_down"), tensors.get("lora_up"), bias,
                                   smooth=tensors.get("smooth"), shift=tensors.get("shift"), **opts)
        except QuantizationError as e:
            raise CheckpointError(f"{cls.kind}: {e.message}") from None

    @property
    def rank(self) -> int:
        return 0 if self.lora_down is None else int(self.lora_down.shape[0])

    def options(self) -> dict:
        """The non-tensor settings (what a checkpoint records next to the buffers)."""
        return {"smooth_fused": self.smooth_fused, "low_rank_input": self.low_rank_input, "act_bits": self.act_bits,
                "act_group_size": self.act_group_size, "act_unsigned": self.act_unsigned}

    def _stored_nbytes(self) -> int:
        """Bytes of the residual (codes, scales, zeros) plus the 16-bit factors."""
        extra = 0 if self.lora_down is None else (self.lora_down.numel() * self.lora_down.element_size()
                                                  + self.lora_up.numel() * self.lora_up.element_size())
        return self.qweight.nbytes + extra


@register_runtime_module
class LowRankQuantLinear(LowRankCheckpointMixin, KernelWeightMixin, QuantWeightMixin, nn.Module):
    """SVDQuant's linear layer (formula and the bias table in the module docstring).

    On CUDA with float16/bfloat16 inputs the residual's matmul runs on the fused kernels (as
    :class:`~bitsmith.nn.QuantLinear`'s does; ``use_kernels = False`` keeps the reference path).
    With 16-bit activations (``act_bits=16``, the deployable case) the whole layer is two
    launches (:mod:`bitsmith.kernels.low_rank`: smoothing, shift and the down-projection in one,
    the 4-bit matmul with the up-projection and bias in its epilogue); the factors are laid out
    for it once per activation dtype, at ``.to(cuda)`` for their own dtype. With simulated 4/8-bit
    activations the activation path and the two low-rank matmuls stay torch ops.

    Buffers: the residual's packed tensors (``codes``, ``scale``, ``zero``, ...), ``lora_down``
    ``[r, K]`` and ``lora_up`` ``[N, r]`` (16-bit; absent for rank 0), ``smooth`` float32 ``[K]``
    (absent when there is no smoothing), ``shift`` float32 ``[K]`` or ``[1]`` (absent when there
    is no shift); ``bias`` is a float32 parameter holding the folded ``b'``."""

    kernel_layout = "rows"  # the low-rank epilogue and the overlapped branch live in the rows layout's kernels

    def __init__(
        self,
        in_features: int,
        out_features: int,
        residual: QTensor,
        lora_down: torch.Tensor | None = None,
        lora_up: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        smooth: torch.Tensor | None = None,
        shift: torch.Tensor | float | None = None,
        smooth_fused: bool = False,
        low_rank_input: str = "unshifted",
        act_bits: int = 16,
        act_group_size: int | None = None,
        act_unsigned: bool = False,
    ):
        super().__init__()
        n, k = out_features, in_features
        if tuple(residual.shape) != (n, k):
            raise QuantizationError(f"LowRankQuantLinear({k}, {n}) needs a residual of shape {[n, k]}, got {list(residual.shape)}")
        if (lora_down is None) != (lora_up is None):
            raise QuantizationError("pass both lora_down and lora_up, or neither")
        if lora_down is not None:
            r = lora_down.shape[0]
            if tuple(lora_down.shape) != (r, k) or tuple(lora_up.shape) != (n, r):
                raise QuantizationError(
                    f"lora_down must be [r, {k}] and lora_up [{n}, r], got {list(lora_down.shape)} / {list(lora_up.shape)}"
                )
        if low_rank_input not in LOW_RANK_INPUTS:
            raise QuantizationError(f"low_rank_input must be one of {LOW_RANK_INPUTS}, got {low_rank_input!r}")
        if act_bits not in ACT_BITS:
            raise QuantizationError(f"act_bits must be one of {ACT_BITS}, got {act_bits}")
        self.in_features, self.out_features = k, n
        self._set_qweight(residual)
        self.register_buffer("lora_down", None if lora_down is None else lora_down.detach())
        self.register_buffer("lora_up", None if lora_up is None else lora_up.detach())
        sm = None if smooth is None else smooth.detach().to(torch.float32).reshape(-1)
        if sm is not None and sm.numel() != k:
            raise QuantizationError(f"smooth must be [{k}], got {list(smooth.shape)}")
        self.register_buffer("smooth", sm)
        sh = None if shift is None else torch.as_tensor(shift, dtype=torch.float32).detach().reshape(-1)
        if sh is not None and sh.numel() not in (1, k):
            raise QuantizationError(f"shift must be a scalar or [{k}], got {sh.numel()} values")
        self.register_buffer("shift", sh)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
        self.smooth_fused = bool(smooth_fused)
        self.low_rank_input = low_rank_input
        self.act_bits = int(act_bits)
        self.act_group_size = None if act_group_size is None else int(act_group_size)
        self.act_unsigned = bool(act_unsigned)

    kind = "low_rank_linear"
    float_type = nn.Linear
    fuse_low_rank: bool = True  # False on an instance: the kernels run the residual only (for comparison)

    @classmethod
    def _from_float(cls, module: nn.Linear, residual: QTensor, lora_down, lora_up, bias, **kwargs) -> "LowRankQuantLinear":
        return cls(module.in_features, module.out_features, residual, lora_down, lora_up, bias, **kwargs)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self.__dict__["_low_rank_rt"] = {}  # factors, smoothing or shift may have changed
        out = super()._apply(fn, recurse)
        if self.__dict__.get("_runtime") is not None and self.act_bits == 16:
            dtype = self.lora_down.dtype if self.lora_down is not None else torch.float16
            if dtype in (torch.float16, torch.bfloat16):
                self._low_rank_runtime(dtype)  # at .to(cuda): a CUDA graph can then capture forward
        return out

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self.__dict__["_low_rank_rt"] = {}

    def _low_rank_runtime(self, dtype: torch.dtype) -> LowRankRuntime | None:
        """The branch laid out for the kernels in ``dtype`` (built once; ``None`` under CUDA-graph
        capture when not built yet: the torch path runs)."""
        cache = self.__dict__.setdefault("_low_rank_rt", {})
        lr = cache.get(dtype)
        if lr is None and not torch.cuda.is_current_stream_capturing():
            lr = cache[dtype] = prepare(
                self.lora_down, self.lora_up, self.smooth, self.shift,
                divide=self.smooth is not None and not self.smooth_fused, shifted_input=self.low_rank_input == "shifted",
                dtype=dtype, k=self.in_features, n=self.out_features, device=self.qweight.device)
        return lr

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass outside ``torch.compile`` (see :class:`KernelWeightMixin`'s ``forward``)."""
        rw = self._kernel_weight(x)
        if rw is not None and self.act_bits == 16 and self.fuse_low_rank:
            lr = self._low_rank_runtime(x.dtype)
            if lr is not None:
                return low_rank_matmul(x, rw, lr, self.bias)
        residual = self.dequantize(x.dtype) if rw is None else (lambda xm: quant_matmul(xm, rw))
        return low_rank_linear(
            x, residual, self.lora_down, self.lora_up, self.bias,
            smooth=self.smooth, shift=self.shift, **self.options(),
        )

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: residual (codes + scales + zeros) plus the 16-bit factors."""
        return 8.0 * self._stored_nbytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"act_bits={self.act_bits}, shift={self.shift is not None}, low_rank_input={self.low_rank_input}, "
                f"{self.bits_per_weight:.2f} bits/weight (factors counted)")


__all__ = ["LowRankQuantLinear", "low_rank_linear", "fake_quantize_activation"]
