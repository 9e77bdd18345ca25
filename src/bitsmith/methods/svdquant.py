"""``svdquant``: smoothing + a 16-bit low-rank branch + a 4-bit residual (+ activation shift).

For one Linear weight ``W`` ``[N, K]`` (a Conv2d weight ``[N, C, kh, kw]`` is the matrix
``[N, C*kh*kw]``, smoothed per input channel ``C``) and the calibration absmax of its input:

1. **smooth**: ``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel (SmoothQuant's migration
   scale; ``alpha=None`` skips smoothing), ``W_s = W . diag(s)``; the activation becomes ``x / s``.
2. **low rank**: the best rank-``r`` approximation ``W_s ~ L1 . L2`` from a truncated SVD
   (``L1 = U sqrt(S)`` ``[N, r]`` = ``lora_up``, ``L2 = sqrt(S) V^T`` ``[r, K]`` = ``lora_down``,
   stored in 16-bit). A randomized solver (``torch.svd_lowrank``) is used where it is faster
   (:func:`low_rank_factors`).
3. **residual**: ``R = W_s - L1 . L2`` (from the *rounded* 16-bit factors, in float64, so their
   rounding is absorbed) quantized with ``rtn`` onto the affine codec (int4, group 64 by default).
4. **activations** (optional): 4/8-bit fake quantization of ``x / s (+ shift)``, per token or per
   group, on the residual branch only (the runtime module applies it).
5. **shift** (optional): a constant added to the input before quantization (e.g. after a GELU,
   so that it is non-negative and an unsigned grid fits); the bias absorbs it exactly
   (:func:`bitsmith.transforms.shift.fold_shift_bias`, with the *dequantized* residual, so the
   shift costs nothing with quantized weights).

:func:`svdquant` returns an :class:`SVDQuantResult` (what :class:`bitsmith.nn.LowRankQuantLinear`
holds); it is not a QTensor method, so it is not in ``METHODS``: it needs activation statistics
and writes a different runtime module (``bitsmith.models.svdquant`` walks a model).
"""
from __future__ import annotations

import dataclasses
import time
import warnings


import torch

from ..errors import QuantizationError
from ..formats import QTensor
from ..transforms.shift import LOW_RANK_INPUTS, fold_shift_bias
from ..transforms.smoothing import migration_scale as smoothing_migration_scale
from . import METHODS
from .rtn import rtn

FACTOR_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: from this min(N, K) up the randomized solver is used (rank 32, float64, this 2-core CPU under load:
#: 576x1536 full 3.1 s vs randomized 0.13 s, 2048x2048 15.6 s vs 0.35 s; below it both take milliseconds).
#: Its accuracy is checked in tests/test_svdquant.py::test_randomized_svd_accuracy_vs_full.
RANDOMIZED_MIN_DIM = 512


@dataclasses.dataclass
class SVDQuantResult:
    """One layer's SVDQuant decomposition (see the module docstring); ``bias`` is the folded
    ``b'`` (float32) and ``shift`` the shift in the input's domain (float32 ``[K]`` or ``[1]``)."""

    residual: QTensor
    lora_down: torch.Tensor | None
    lora_up: torch.Tensor | None
    smooth: torch.Tensor | None
    shift: torch.Tensor | None
    bias: torch.Tensor | None
    act_bits: int
    act_group_size: int | None
    act_unsigned: bool
    low_rank_input: str
    seconds: float = 0.0

    @property
    def rank(self) -> int:
        return 0 if self.lora_down is None else int(self.lora_down.shape[0])

    @property
    def bits_per_weight(self) -> float:
        """Residual codes + scales + zeros + the 16-bit factors, per weight."""
        nbytes = self.residual.nbytes
        if self.lora_down is not None:
            nbytes += self.lora_down.numel() * self.lora_down.element_size()
            nbytes += self.lora_up.numel() * self.lora_up.element_size()
        return 8.0 * nbytes / self.residual.numel

    def effective_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``(Q(R) + L1 L2) . diag(1/s)`` as the original weight's shape: what the layer computes
        with 16-bit activations and no shift."""
        shape = self.residual.shape
        w = self.residual.dequantize(torch.float64).reshape(shape[0], -1)
        if self.lora_down is not None:
            w = w + self.lora_up.double() @ self.lora_down.double()
        if self.smooth is not None:
            w = w / expand_channels(self.smooth.double(), w.shape[1])
        return w.reshape(shape).to(dtype)


def expand_channels(per_channel: torch.Tensor, cols: int) -> torch.Tensor:
    """A per-input-channel vector ``[C]`` as a per-column vector ``[cols]`` of the 2-D weight
    (``cols = C * kh * kw`` for a conv: each channel's ``kh*kw`` columns are consecutive)."""
    c = per_channel.numel()
    if cols % c:
        raise QuantizationError(f"{cols} weight columns are not a multiple of {c} input channels")
    return per_channel.repeat_interleave(cols // c)


def migration_scale(act_absmax: torch.Tensor, weight2d: torch.Tensor, alpha: float, channels: int) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel, float64 ``[channels]``
    (SmoothQuant eq. 4, :func:`bitsmith.transforms.smoothing.migration_scale`; ``max|W|`` over the
    output rows and, for a conv, the channel's ``kh*kw`` kernel taps; a dead channel gets 1)."""
    n, cols = weight2d.shape
    w_absmax = weight2d.abs().to(torch.float64).reshape(n, channels, cols // channels).amax(dim=(0, 2))
    return smoothing_migration_scale(act_absmax.to(torch.float64).reshape(-1), w_absmax, alpha)


def low_rank_factors(w: torch.Tensor, rank: int, *, solver: str = "auto", niter: int = 4,
                     oversample: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1 [N, r], L2 [r, K])``, float64, with ``L1 L2`` the rank-``r`` truncated SVD of ``w``
    (``L1 = U_r sqrt(S_r)``, ``L2 = sqrt(S_r) V_r^T``: balanced magnitudes for 16-bit storage).

    ``solver``: ``"full"`` (``torch.linalg.svd``), ``"randomized"`` (``torch.svd_lowrank`` with
    ``r + oversample`` columns and ``niter`` power iterations, then truncated to ``r``), or
    ``"auto"``: randomized when ``min(N, K) >= RANDOMIZED_MIN_DIM`` and ``r + oversample`` is at
    most a quarter of it (where it is faster and, per the test, within 1% of the optimal error)."""
    n, k = w.shape
    w = w.to(torch.float64)
    if solver == "auto":
        small = min(n, k)
        solver = "randomized" if small >= RANDOMIZED_MIN_DIM and 4 * (rank + oversample) <= small else "full"
    if solver == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    elif solver == "randomized":
        q = min(rank + oversample, n, k)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # deterministic factors for the same weight
        try:
            u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
        finally:
            torch.random.set_rng_state(gen_state)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        raise QuantizationError(f"unknown SVD solver {solver!r}; valid: auto, full, randomized")
    root = s.sqrt()
    return u * root, root[:, None] * vh


def svdquant(
    weight: torch.Tensor,
    *,
    act_absmax: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    rank: int = 32,
    bits: int = 4,
    group_size: int = 64,
    symmetric: bool = False,
    alpha: float | None = 0.5,
    act_bits: int = 16,
    act_group_size: int | None = 64,
    act_unsigned: bool | None = None,
    shift: torch.Tensor | float | None = None,
    low_rank_input: str = "unshifted",
    factor_dtype: str = "float16",
    solver: str = "auto",
    name: str | None = None,
) -> SVDQuantResult:
    """Decompose one weight (see the module docstring). ``act_absmax``: the calibration max|x|
    per input channel (required unless ``alpha`` is None); ``shift``: scalar or ``[C]`` in the
    input's domain; ``act_unsigned`` defaults to "a shift is given"; ``symmetric``: the residual
    on a symmetric grid (no zero point: what Nunchaku's signed int4 kernel stores). The smoothing
    scale is rounded to ``factor_dtype`` (so a 16-bit engine divides by exactly the scale the
    weights were built with). ``name`` only labels errors."""
    t0 = time.perf_counter()
    where = f"layer {name}: " if name else ""
    if weight.dim() not in (2, 4):
        raise QuantizationError(f"{where}svdquant takes a Linear [N, K] or Conv2d [N, C, kh, kw] weight, got {list(weight.shape)}")
    n, channels = weight.shape[0], weight.shape[1]
    w2 = weight.detach().reshape(n, -1).to(torch.float64)
    cols = w2.shape[1]
    if type(rank) is not int or rank < 0 or rank > min(n, cols):
        raise QuantizationError(f"{where}rank must be an integer in 0..min(N, K) = 0..{min(n, cols)} for a "
                                f"{n}x{cols} weight, got {rank!r}")
    if act_bits not in (4, 8, 16):
        raise QuantizationError(f"{where}act_bits must be 4, 8 or 16, got {act_bits!r}")
    if rank == 0 and act_bits == 4:
        warnings.warn(f"{where}svdquant with rank 0 and 4-bit activations is plain (smoothed) W4A4", stacklevel=2)
    if low_rank_input not in LOW_RANK_INPUTS:
        raise QuantizationError(f"{where}low_rank_input must be one of {LOW_RANK_INPUTS}, got {low_rank_input!r}")
    if factor_dtype not in FACTOR_DTYPES:
        raise QuantizationError(f"{where}factor_dtype must be one of {', '.join(FACTOR_DTYPES)}, got {factor_dtype!r}")
    if shift is not None and weight.dim() == 4 and weight.shape[2:] != (1, 1):
        raise QuantizationError(f"{where}a shift on a {weight.shape[2]}x{weight.shape[3]} conv is not exact "
                                "(zero padding is not shifted); shift only Linear and 1x1 Conv2d inputs")

    smooth = None
    if alpha is not None:
        if act_absmax is None:
            raise QuantizationError(f"{where}smoothing needs the input's calibration absmax (no stats for this layer)")
        if act_absmax.numel() != channels:
            raise QuantizationError(f"{where}calibration stats have {act_absmax.numel()} channels, the weight has {channels} inputs")
        # rounded to 16-bit first: every runtime (ours in float32, a 16-bit engine) divides by exactly it
        smooth = migration_scale(act_absmax, w2, float(alpha), channels).to(FACTOR_DTYPES.get(factor_dtype, torch.float16))
        smooth = smooth.to(torch.float64)
        w2 = w2 * expand_channels(smooth, cols)

    fdt = FACTOR_DTYPES[factor_dtype]
    lora_down = lora_up = None
    target = w2
    if rank > 0:
        l1, l2 = low_rank_factors(w2, rank, solver=solver)
        lora_up, lora_down = l1.to(fdt), l2.to(fdt)
        target = w2 - lora_up.double() @ lora_down.double()
    qt = rtn(target.reshape(weight.shape), bits=bits, group_size=group_size, symmetric=symmetric)
    qt = dataclasses.replace(qt, dtype=weight.dtype)

    # the shift as stored (float32) is the one folded, so the fold matches the runtime exactly
    shift_t = None if shift is None else torch.as_tensor(shift, dtype=torch.float32).reshape(-1).clone()
    if shift_t is not None and (not bool(torch.isfinite(shift_t).all()) or shift_t.numel() not in (1, channels)):
        raise QuantizationError(f"{where}shift must be a finite scalar or [{channels}] vector")
    folded = bias
    if shift_t is not None:
        folded = fold_shift_bias(
            bias, shift=shift_t.double(), smooth=smooth, residual=qt.dequantize(torch.float64).reshape(n, cols),
            lora_down=lora_down, lora_up=lora_up, smooth_fused=False, low_rank_input=low_rank_input,
        )
    return SVDQuantResult(
        residual=qt,
        lora_down=lora_down,
        lora_up=lora_up,
        smooth=None if smooth is None else smooth.to(torch.float32),
        shift=shift_t,
        bias=None if folded is None else folded.to(torch.float32),
        act_bits=act_bits,
        act_group_size=act_group_size,
        act_unsigned=(shift is not None) if act_unsigned is None else bool(act_unsigned),
        low_rank_input=low_rank_input,
        seconds=time.perf_counter() - t0,
    )


def auto_shift(act_min: torch.Tensor) -> torch.Tensor:
    """``--shift auto``: the per-channel shift that makes every calibration value non-negative,
    ``max(0, -min x)`` (float32 ``[C]``)."""
    return (-act_min.to(torch.float32)).clamp_min(0)


__all__ = ["svdquant", "SVDQuantResult", "low_rank_factors", "migration_scale", "auto_shift", "expand_channels"]


@METHODS.register("svdquant")
def svdquant_recipe_entry(
    weight: torch.Tensor,
    *,
    rank: int = 32,
    bits: int = 4,
    group_size: int = 64,
    symmetric: bool = False,
    alpha: float | None = 0.5,
    act_bits: int = 16,
    act_group_size: int | None = 64,
    shift: str | float | None = None,
    smooth: str = "unfused",
) -> QTensor:
    """The recipe entry of ``svdquant`` (so a checkpoint's recipe names it and its options are
    validated like any method's). SVDQuant needs activation statistics and writes a
    LowRankQuantLinear, so it cannot run tensor by tensor: this raises, naming the way that works."""
    raise QuantizationError("svdquant needs calibration statistics and the loaded model: "
                            "bitsmith quantize MODEL --method svdquant --calib STATS.safetensors "
                            "(bitsmith.api.quantize_svdquant)")
