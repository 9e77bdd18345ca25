"""``hqq``: half-quadratic optimised affine quantization (HQQ's proximal solver, extended).

Per group ``g`` of ``group_size`` weights ``w`` (the ``affine`` codec's groups, either axis),
with ``L = 2**bits`` levels, ``m = L - 1``, a step ``s`` and a zero point ``z``:

    q(w) = clamp(round(w / s + z), 0, m),      w_hat = (q - z) * s

The solver minimises the weighted lp error ``sum_j d_j |w_j - w_hat_j|**p`` (``p = lp <= 1``,
robust to the few weights a grid cannot reach; ``d_j`` = 1, or the per-input-channel ``calib``
weights such as ``E[x_j**2]``, which turns it into an estimate of the output error
``E[(x . (w - w_hat))**2]`` with a diagonal second moment) by half-quadratic splitting: an
auxiliary error ``e`` and a penalty ``beta/2 * sum_j d_j (w_j - w_hat_j - e_j)**2``, alternating

1. ``q`` <- the codes of the current grid (round to nearest);
2. ``e`` <- HQQ's shrinkage for ``|.|**p``: ``shrink(r) = sign(r) max(|r| - |r|**(p-1) / beta, 0)``
   applied to the residual ``r = w / s + z - q`` measured *in steps* (so the same ``beta`` means
   the same thing for every group, whatever its magnitude; ``d_j`` cancels in this step);
3. the quadratic step: ``z`` (and, with ``optimize_scale``, ``s``) minimise
   ``sum_j d_j ((q_j - z) s - (w_j - e_j s))**2`` — a weighted mean for ``z`` alone, a weighted
   least-squares line fit of the targets on ``q`` for ``(s, z)``; with ``zero="int"`` the zero is
   rounded to an integer in ``[0, m]``;
4. ``beta <- beta * kappa``.

The start is the min-max grid; with ``round_zero`` (default on) its zero is rounded to the nearest
integer, so the start grid has a level exactly at ``w = 0`` (the zero stays float afterwards and
moves only as far as the steps take it). Every group keeps the best ``(s, z)`` it has seen (by its
own objective), so the result is never worse than that start, and there is no per-tensor early
exit. Then (``zero_mean``, default on, float zero only) two last zero updates for that scale,
``z <- mean(q) - mean(w / s)`` with the codes re-rounded in between, make each group's
(``d``-weighted) mean error ~0: the hqq package's own zero update is this plain mean, and its
groups have zero mean error (ours had 0.008 x rms(w) on SmolLM2's v_proj/down_proj, RTN's 0.03);
it also lowers the L2 weight error. All groups of a tensor move
together (vectorised); on CPU they are processed in cache-sized blocks of groups (the math is the
same, it only keeps the working set in cache). The device is the weight's.

Differences from the hqq package (0.2.8): the residual is normalised by the step (HQQ's is in
weight units, which makes its shrinkage almost always zero, i.e. a plain mean), the scale can be
optimised (HQQ keeps the min-max scale), groups are weighted by activations (``calib``), the best
iterate is kept per group instead of stopping the whole tensor at the first non-improving step,
and the start zero is rounded at every width (``HQQLinear`` rounds it at 4 bits only).

Defaults (``iters=2, lp=1, beta=2``, float zero from a rounded start, scale optimised, zero-mean
step), measured on SmolLM2-135M's 210 linears against hqq 0.2.8 (``benchmarks/hqq_quality.py``;
weight-error ratios below on 12 real 256-row slices, perplexity on the benchmark's wiki protocol,
int4 g64, where the hqq package has 29.72 and RTN 31.86; the first three items predate
``round_zero``):

* speed: the old defaults (``lp=0.5, beta=10, iters=10``) spent ~118 ns/weight (RTN: ~17) on one
  thread, ~10 per iteration; ``sqrt``/``rsqrt``/``copysign`` cost ~10x an add on this CPU and each
  fresh ``[G, gs]`` temporary more than the arithmetic. Now: buffers reused in place, the
  shrinkage folded into ``u = clamp(r, -g, g)`` (no ``copysign``), ``p = 1`` (a constant
  threshold ``1 / beta``: no ``sqrt``/``pow`` at all), and 2 iterations: ~45 ns/weight.
* convergence: a small ``beta`` (threshold ``>= 0.5`` step, i.e. only clipped weights are
  shrunk) converges in 2-3 iterations where ``beta=10`` needs 10: error vs hqq at int4/int3/int2,
  3 iterations, no zero-mean step: ``beta=10`` 1.009/0.967/0.998, ``beta=3`` 0.990/0.945/0.978;
  with the zero-mean step, ``lp=1, beta=2``: 2 iterations 0.980/0.925/0.906, 3 iterations
  0.971/0.921/0.905 (``lp=0.5, beta=10, iters=10``: 0.947/0.923/0.922).
* perplexity before ``round_zero`` (int4 g64; all within ~0.8 of each other, none reaches the hqq
  package's 29.72):
  old defaults 31.83; ``zero="int"`` 32.85 (and 1.18x hqq's weight error: an integer zero
  cannot follow the solver); ``optimize_scale=False`` 31.36; ``lp=0.5, beta=2, iters=3`` 31.91,
  with the zero-mean step 31.24; ``lp=1, beta=2, iters=3`` + zero-mean 31.43, the same without
  scale optimisation 31.09 (but 0.994-1.0x hqq's weight error). With ``calib`` the solver weighs
  by activations and beats both (see the benchmark).

Why ``round_zero`` (the int4 perplexity gap to the hqq package, diagnosed on SmolLM2-135M):

* per-linear output error on real activations (``E||x dW^T||^2 / E||x W^T||^2`` with each input's
  second moment from the Lee corpus) was already *lower* than the hqq package's for every layer
  type but v_proj (ours/hqq 0.95-0.99; v_proj 1.02, the middle layers 10-19 up to 1.17), yet
  perplexity was 31.62 vs 29.72. Putting the hqq package's 30 v_proj weights into our model gave
  29.67; theirs with our v_proj 31.42: v_proj alone is the gap, spread over all layers (half of
  it from layers 0-14, half from 15-29). On v_proj, none of these mattered: a float32 instead of
  float16 zero (31.58), the gain ``<dW, W> / ||W||^2`` (hqq +0.36%, ours ~0: adding it to ours
  31.68, removing it from hqq's 29.63), the min-max scale without clipping
  (``optimize_scale=False``: 31.47).
* the cause is HQQ's integer start zero: the hqq package quantized with ``round_zero=False`` gives
  31.40 on v_proj, with it 29.67. v_proj reads a few massive-activation input channels (channel
  247: ~400x the mean second moment in layers 12, 14, 19) whose weights are ~7.5x smaller than
  the rest of their group: within a fraction of a step of 0, where a grid with a level near 0
  keeps them (the final zeros stay near integers: mean distance 0.17 vs 0.25 from a float start;
  the rms error of weights within a quarter step of 0 drops from ~1.55x to ~1.2x their rms at
  int4, 1.75x to 1.2x at int3). Why so small a share of the output error costs so much perplexity
  is not measured; one sign: each window's first token has ~6x the relative v error of the
  others (ours 0.093, hqq and ours with ``round_zero`` 0.087).
* with ``round_zero`` (everything else as before; ``benchmarks/results/hqq_quality_int*.json``):
  perplexity int4 29.32 (was 31.62; hqq 29.72, RTN 31.86), int3 73.45 (was 160.7; hqq 206.4, RTN
  74.1), int2 3134 (was 18584; hqq 41119, RTN 6549); weight error vs hqq 0.982/0.958/0.943 (was
  0.980/0.926/0.906); time unchanged (0.39/0.41/0.42x hqq's). With ``calib`` (Lee stats): 26.97,
  42.4, 99.0. ``optimize_scale=False`` with it: int4 29.70 at 1.004x hqq's weight error.
* not adopted: a data-free ``calib`` from the model's own RMSNorm gamma (``gamma**2`` of the norm
  feeding q/k/v and gate/up, on top of ``round_zero``): int4 29.15, int3 71.0 at 0.987/0.962x
  hqq's weight error (``|gamma|``: 29.32, 73.7). A small gain for plumbing norms into the
  streaming quantizer, with int4's weight error near the 0.99x bound; gamma does not mark the
  massive channels (channel 247's is ~0.6, ordinary; log gamma^2 vs the channels' log second
  moment correlates at -0.15..0.38).

Storage: the ``affine`` codec with ``scale_dtype`` scales (float16: the stored step is the solver's
rounded to nearest) and a float zero (``scale_dtype``) or a uint8 zero; ``quant_scale`` /
``quant_zero`` store them as 8-bit codes per ``meta_group_size`` (HQQ's quantized metadata);
codes are always computed against exactly what a reader reconstructs.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import QuantizationError, SpecError
from ..formats import QTensor
from ..formats.affine import SCALE_DTYPES, AffineParams, MetaQuant, encode_affine, group_rows, meta_shape
from ..formats.codec import matrix_shape
from ..formats.dtypes import FLOAT_DTYPES
from . import METHODS
from .rtn import resolve_group_size, round_nearest_to

#: elements per block of groups on CPU (working set ~ a few MB: stays in cache); one block on GPU
_CPU_BLOCK = 1 << 16
_GPU_BLOCK = 1 << 26
_SIGNIFICAND_BITS = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24}
#: calib weights are floored at this fraction of their mean, so no weight is entirely ignored
CALIB_FLOOR = 1e-2
#: defaults measured on SmolLM2-135M (module doc): 2 iterations of the l1 solver, beta 2
DEFAULT_ITERS = 2
DEFAULT_LP = 1.0
DEFAULT_BETA = 2.0


def lp_shrink(r: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """HQQ's generalised soft threshold, its one-step stand-in for the proximal operator of
    ``|x|**p / beta``: ``sign(r) * max(|r| - |r|**(p-1) / beta, 0)`` (plain soft thresholding at
    ``p = 1``; small residuals go to 0, large ones are kept almost whole)."""
    a = r.abs()
    ap = _pow_pm1(a, p)
    return (a - ap / beta).clamp_min_(0).copysign_(r)


def _pow_pm1(a: torch.Tensor, p: float) -> torch.Tensor:
    """``|a|**(p - 1)`` for ``a >= 0`` (floored at 1e-6 so 0 gives a large finite value)."""
    a = a.clamp_min(1e-6)
    if p == 0.5:
        return a.rsqrt_()
    if p == 1.0:
        return torch.ones_like(a)
    return a.pow_(p - 1.0)


def init_minmax(groups: torch.Tensor, bits: int, zero: str, zmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max start ``(s, z)`` per group (``[G, 1]`` each, float32), like ``rtn``: float zero
    ``s = max((hi - lo) / m, |lo| / zmax)``, ``z = -lo / s``; int zero widens the range to contain
    0 and rounds ``z``. A constant group gets ``s = |c|``; an all-zero group ``s = 0, z = 0``."""
    m = (1 << bits) - 1
    lo = groups.amin(dim=1, keepdim=True)
    hi = groups.amax(dim=1, keepdim=True)
    const = hi == lo
    if zero == "int":
        lo, hi = torch.where(const, lo, lo.clamp(max=0)), torch.where(const, hi, hi.clamp(min=0))
        s = torch.where(const, lo.abs(), (hi - lo) / m)
    else:
        s = torch.where(const, lo.abs(), torch.maximum((hi - lo) / m, lo.abs() / zmax))
    safe = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.where(s == 0, torch.zeros_like(s), -lo / safe)
    if zero == "int":
        z = z.round().clamp(0, m)
    return s, z


def hqq_solve(
    groups: torch.Tensor,
    bits: int,
    *,
    weights: torch.Tensor | None = None,
    iters: int = DEFAULT_ITERS,
    lp: float = DEFAULT_LP,
    beta: float = DEFAULT_BETA,
    kappa: float = 1.01,
    optimize_scale: bool = True,
    zero: str = "float",
    zmax: float = 256.0,
    zero_mean: bool = False,
    round_zero: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the solver on ``groups`` (``[G, gs]``, one group per row, float32) with optional
    per-element ``weights`` (``[G, gs]``, >= 0; each group's weights are normalised to sum 1).
    Returns the best ``(s, z)`` per group, float32 ``[G, 1]`` each (see the module doc).

    Implementation: with ``r`` the residual in steps and ``g = |r|**(p-1) / beta`` the shrinkage
    threshold, ``shrink(r) = r - u`` with ``u = clamp(r, -g, g)``, so the quadratic step's targets
    are ``t = w/s - shrink(r) = q - z + u``: the least-squares fit needs only the weighted means of
    ``q``, ``q*q``, ``u`` and ``q*u`` (slope ``k = 1 + cov(q, u) / var(q)``, zero
    ``mean(q) - mean(t) / k``; the zero-only update is ``z - mean(u)``). Every ``[G, gs]``
    temporary is allocated once and updated in place."""
    m = (1 << bits) - 1
    s, z = init_minmax(groups, bits, zero, zmax)
    if round_zero and zero != "int":  # HQQ's round_zero: the start grid has a level at w = 0
        z = z.round()
    dead = s == 0
    s = torch.where(dead, torch.ones_like(s), s)
    wn = groups / s  # weights in steps of the current grid (owned: rescaled in place below)
    if weights is not None:
        total = weights.sum(dim=1, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp_min(1e-30), 1.0 / groups.shape[1])
    inv_gs = 1.0 / groups.shape[1]
    r, q, a, g, u = (torch.empty_like(wn) for _ in range(5))
    tmp = torch.empty_like(wn) if weights is not None else None

    def mean(x: torch.Tensor) -> torch.Tensor:
        if weights is None:
            return x.sum(dim=1, keepdim=True).mul_(inv_gs)
        return torch.linalg.vecdot(x, weights, dim=1).unsqueeze_(1)

    def mean_prod(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if weights is None:
            return torch.linalg.vecdot(x, y, dim=1).unsqueeze_(1).mul_(inv_gs)
        return mean(torch.mul(x, y, out=tmp))

    best_s, best_z, best_c = s, z, None
    for it in range(iters + 1):
        torch.add(wn, z, out=r)
        torch.round(r, out=q).clamp_(0, m)
        r.sub_(q)  # residual in steps: w - w_hat = r * s
        torch.abs(r, out=a)
        if lp == 1.0:  # |r|**p (sqrt and pow cost ~10x an add on CPU; p = 1 needs neither)
            ap = a
        else:
            ap = torch.sqrt(a, out=g) if lp == 0.5 else torch.pow(a, lp, out=g)
        c = mean(ap) * s.pow(lp)  # sum_j d_j |w_j - w_hat_j|**p
        if best_c is None:
            best_c = c
        else:
            better = c < best_c
            best_c = torch.where(better, c, best_c)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
        if it == iters:
            break
        # u = clamp(r, -g, g), g = max(|r|, 1e-6)**(p-1) / beta (HQQ's floor); r - u = shrink(r)
        if lp == 1.0:
            torch.clamp(r, -1.0 / beta, 1.0 / beta, out=u)
        else:
            if lp == 0.5:
                g = ap.clamp_min_(1e-3).reciprocal_().mul_(1.0 / beta)
            else:
                g = torch.clamp_min(a, 1e-6, out=g).pow_(lp - 1.0).mul_(1.0 / beta)
            torch.clamp(r, min=torch.neg(g, out=a), max=g, out=u)
        mq, mu = mean(q), mean(u)
        z_mean = z - mu  # the zero-only update (HQQ's)
        if optimize_scale:
            # fit t = q - z + u as k * (q - z'): weighted least squares
            var = mean_prod(q, q) - mq * mq
            k = 1.0 + (mean_prod(q, u) - mq * mu) / var.clamp_min(1e-12)
            ok = (var > 1e-9) & (k > 1e-3)
            k = torch.where(ok, k, torch.ones_like(k))
            z_new = mq - (mq - z + mu) / k
            if zero == "int":
                z_new = z_new.round().clamp(0, m)
            ok = ok & (z_new.abs() <= zmax)
            z = torch.where(ok, z_new, z_mean.round().clamp(0, m) if zero == "int" else z_mean)
            k = torch.where(ok, k, torch.ones_like(k))
            s = s * k
            wn.div_(k)
        else:
            z = z_mean.round().clamp(0, m) if zero == "int" else z_mean
        if zero != "int":
            z = z.clamp(-zmax, zmax)
        beta *= kappa
    if zero_mean and zero != "int":
        # final zero updates for the best scale: the group's (weighted) mean error -> 0
        torch.div(groups, best_s, out=a)
        ma = mean(a)
        for _ in range(2):  # the second pass absorbs codes that moved with the first
            torch.add(a, best_z, out=q).round_().clamp_(0, m)
            best_z = (mean(q) - ma).clamp_(-zmax, zmax)
    best_s = torch.where(dead, torch.zeros_like(best_s), best_s)
    best_z = torch.where(dead, torch.zeros_like(best_z), best_z)
    return best_s, best_z


def calib_weights(calib: Any, shape: tuple[int, ...], params: AffineParams) -> torch.Tensor:
    """Per-element weights ``[num_groups, group_size]`` from per-input-channel ``calib`` (a 1-D
    tensor of ``in_features`` values, or anything with a ``sqmean`` attribute such as
    :class:`~bitsmith.calibration.ChannelStats`). A Conv2d's ``in_channels`` values are repeated
    over its kernel positions. Values are floored at ``CALIB_FLOOR`` x their mean."""
    d = getattr(calib, "sqmean", calib)
    if not isinstance(d, torch.Tensor) or not d.is_floating_point() or d.dim() != 1:
        got = f"{d.dtype} {list(d.shape)}" if isinstance(d, torch.Tensor) else type(d).__name__
        raise QuantizationError(f"hqq calib must be a 1-D float tensor of per-input-channel weights, got {got}")
    rows, cols = matrix_shape(shape)
    n = d.numel()
    if n != cols:
        if len(shape) > 2 and n == shape[1]:
            d = d.repeat_interleave(cols // n)
        else:
            raise QuantizationError(
                f"hqq calib has {n} channels, the weight {list(shape)} has {cols} input columns"
                + (f" ({shape[1]} input channels)" if len(shape) > 2 else "")
            )
    d = d.to(torch.float32)
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
        raise QuantizationError("hqq calib weights must be finite and >= 0")
    mean = float(d.mean())
    d = d + CALIB_FLOOR * mean if mean > 0 else torch.ones_like(d)
    full = d.view(1, cols).expand(rows, cols).reshape(shape)
    return group_rows(full, params)


@METHODS.register("hqq")
def hqq(
    weight: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int | str | None = 64,
    axis: int = 1,
    iters: int = DEFAULT_ITERS,
    lp: float = DEFAULT_LP,
    beta: float = DEFAULT_BETA,
    kappa: float = 1.01,
    optimize_scale: bool = True,
    zero: str = "float",
    scale_dtype: str = "float16",
    quant_scale: bool = False,
    quant_zero: bool = False,
    meta_bits: int = 8,
    meta_group_size: int = 128,
    calib: Any = None,
    zero_mean: bool = True,
    round_zero: bool = True,
) -> QTensor:
    """Quantize ``weight`` (any ndim >= 1, fp16/bf16/fp32/fp64, on its own device) to the
    ``affine`` codec with the half-quadratic solver (module doc). ``zero``: ``"float"`` (HQQ's) or
    ``"int"``; ``axis``: 1 (groups along the input dim) or 0 (HQQ's column groups; ``group_size``
    must divide the element count); ``quant_scale`` / ``quant_zero``: store the scale / zero as
    ``meta_bits`` codes per ``meta_group_size`` values; ``calib``: per-input-channel weights (e.g.
    ``ChannelStats.sqmean``) for an activation-weighted error; ``round_zero``: start from the
    min-max zero rounded to an integer, so the start grid has a level at 0 (module doc: this is
    what keeps the tiny weights of massive-activation channels; the zero stays float after)."""
    if not isinstance(weight, torch.Tensor):
        raise QuantizationError(f"hqq needs a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise QuantizationError(f"hqq needs a floating weight (float16/bfloat16/float32/float64), got {weight.dtype}")
    if weight.dim() == 0 or weight.numel() == 0:
        raise QuantizationError(f"hqq needs a non-empty tensor with ndim >= 1, got shape {list(weight.shape)}")
    weight = weight.detach()
    if not bool(torch.isfinite(weight).all()):
        raise QuantizationError("hqq: weight has inf/NaN values")
    _check_options(iters, lp, beta, kappa, optimize_scale, zero, quant_scale, quant_zero, round_zero)
    shape = tuple(weight.shape)
    _, cols = matrix_shape(shape)
    gs = resolve_group_size(group_size, cols) if axis == 1 else group_size
    if axis == 0 and (group_size is None or group_size == "channel"):
        raise SpecError("hqq axis=0 needs an integer group_size (groups are columns of [group_size, numel/group_size])")
    meta = MetaQuant(bits=meta_bits, group_size=meta_group_size) if (quant_scale or quant_zero) else None
    params = AffineParams(
        bits=bits, group_size=gs, zero=zero, scale_dtype=scale_dtype, axis=axis,
        scale_quant=meta if quant_scale else None, zero_quant=meta if quant_zero else None,
    )
    mshape = meta_shape(params, shape)
    sdt = SCALE_DTYPES[params.scale_dtype]
    zmax = float(max(params.levels - 1, 2 ** (_SIGNIFICAND_BITS[sdt] - 3)))

    groups = group_rows(weight, params)
    weights = calib_weights(calib, shape, params).to(weight.device) if calib is not None else None
    block = max(1, (_CPU_BLOCK if weight.device.type == "cpu" else _GPU_BLOCK) // params.group_size)
    s_parts, z_parts = [], []
    for g0 in range(0, groups.shape[0], block):  # blocks bound the working set; math is vectorised
        g1 = min(groups.shape[0], g0 + block)
        s, z = hqq_solve(
            groups[g0:g1].to(torch.float32), bits,
            weights=weights[g0:g1] if weights is not None else None,
            iters=iters, lp=lp, beta=beta, kappa=kappa, optimize_scale=optimize_scale, zero=zero, zmax=zmax,
            zero_mean=zero_mean, round_zero=round_zero,
        )
        s_parts.append(s)
        z_parts.append(z)
    s = torch.cat(s_parts).reshape(mshape)
    z = torch.cat(z_parts).reshape(mshape)
    return encode_affine(weight, *_storage(s, z, params), params)


def _storage(s: torch.Tensor, z: torch.Tensor, params: AffineParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero as :func:`encode_affine` takes them: float32 where the metadata is
    quantized, else rounded to nearest in their storage dtypes (uint8 for an int zero)."""
    sdt = params.torch_scale_dtype
    if params.scale_quant is None:
        fmax = torch.finfo(sdt).max
        if float(s.max()) > fmax:
            raise QuantizationError(
                f"hqq: a group's scale {float(s.max()):.4g} overflows {params.scale_dtype}; use scale_dtype='float32'"
            )
        tiny = torch.finfo(sdt).tiny * torch.finfo(sdt).eps  # smallest subnormal: a live step never rounds to 0
        scale = round_nearest_to(torch.where(s > 0, s.double().clamp_min(tiny), s.double()), sdt)
    else:
        scale = s
    if params.zero == "int":
        zero = z.round().clamp(0, params.levels - 1).to(torch.uint8)
    elif params.zero_quant is None:
        zero = round_nearest_to(z.double(), sdt)
    else:
        zero = z
    return scale, zero


def _check_options(iters, lp, beta, kappa, optimize_scale, zero, quant_scale, quant_zero, round_zero) -> None:
    if type(iters) is not int or not 0 <= iters <= 10_000:
        raise SpecError(f"hqq iters must be an integer in 0..10000, got {iters!r}")
    if type(lp) not in (int, float) or not 0.0 < lp <= 1.0:
        raise SpecError(f"hqq lp must be a number in (0, 1], got {lp!r}")
    if type(beta) not in (int, float) or not beta > 0:
        raise SpecError(f"hqq beta must be a number > 0, got {beta!r}")
    if type(kappa) not in (int, float) or not kappa >= 1.0:
        raise SpecError(f"hqq kappa must be a number >= 1, got {kappa!r}")
    for name, v in (("optimize_scale", optimize_scale), ("quant_scale", quant_scale), ("quant_zero", quant_zero),
                    ("round_zero", round_zero)):
        if type(v) is not bool:
            raise SpecError(f"hqq {name} must be true/false, got {v!r}")
    if zero not in ("float", "int"):
        raise SpecError(f"hqq zero must be 'float' or 'int', got {zero!r} (symmetric has no zero to optimise)")


__all__ = ["hqq", "hqq_solve", "lp_shrink", "init_minmax", "calib_weights"]
