"""Activation shift with bias correction: the one function that folds a shift into the bias.

The runtime computes (:class:`bitsmith.nn.LowRankQuantLinear`), for an input row ``x`` ``[K]``::

    x~      = x / s                  (s: smoothing scale [K]; skipped when smoothing is fused
                                      into the previous op, which then already outputs x / s)
    d       = shift / s  (not fused)  or  shift  (fused)   -- the shift seen in the smoothed domain
    y       = Q(R) . (x~ + d)  +  L1 . L2 . (x~ + [low-rank reads shifted] * d)  +  b'

where ``W . diag(s) = L1 . L2 + R`` (``L1`` = ``lora_up`` ``[N, r]``, ``L2`` = ``lora_down``
``[r, K]``), and the shift is added to the module's *input* (for a GELU -> fc2 pair: to the GELU
output, before the division by ``s``). Expanding, with quantization disabled (``Q(R) = R``)::

    y = (L1 L2 + R) x~ + R d + [shifted] L1 L2 d + b'
      = W x + R d + [shifted] L1 L2 d + b'

so ``y == W x + b`` exactly iff

    b' = b - R . d - [low-rank reads shifted] * L1 . (L2 . d)                       (*)

That is the whole answer to seed 000 ("is shift . s^-1 . R missing from the bias?"):

* low-rank branch reads the **unshifted** input (Nunchaku's INT4 kernel): ``b' = b - R d``. A
  converter that starts from ``b - W.shift`` (= ``b - (L1 L2 + R) d``, the "shifted linear" of
  the quantization run) and adds back ``L1 L2 d`` -- deepcompressor's ``convert.py`` -- lands
  exactly on (*): the ``shift . s^-1 . R`` term is **not** missing, it is the part of
  ``- shift . W`` that is *not* added back. Adding ``R d`` as well would double-count it.
* low-rank branch reads the **shifted** input: ``b' = b - W.shift``; adding back ``L1 L2 d``
  here would be the bug.
* smoothing fused or not only changes ``d`` (``shift`` vs ``shift / s``), and a scalar shift is
  the per-channel shift with every channel equal.

Tests: ``tests/test_svdquant.py::test_fold_matrix_exact`` (every combination, float64, 1e-10),
``::test_fold_matches_deepcompressor_convention`` (the seed's formula), and
``::test_module_matches_fake_quant_simulation`` (quantization on, fp32/fp16/bf16 inputs).

Pass the *dequantized* residual ``Q(R)`` as ``residual`` (what the main branch multiplies): then
the shift cancels exactly even with quantized weights, and only the activation quantization sees
it (which is the point of shifting).
"""
from __future__ import annotations

import torch

from ..errors import QuantizationError

LOW_RANK_INPUTS = ("unshifted", "shifted")


def shift_vector(shift: torch.Tensor | float | None, channels: int) -> torch.Tensor | None:
    """``shift`` (``None``, a float, a 0-d/1-element tensor or a ``[channels]`` tensor) as a
    float64 ``[channels]`` vector, or ``None``."""
    if shift is None:
        return None
    t = torch.as_tensor(shift, dtype=torch.float64).detach().cpu()
    if t.numel() == 1:
        return t.reshape(1).expand(channels).clone()
    if t.dim() != 1 or t.numel() != channels:
        raise QuantizationError(f"shift must be a scalar or a [{channels}] vector, got shape {list(t.shape)}")
    return t.clone()


def smoothed_shift(
    shift: torch.Tensor | float | None, smooth: torch.Tensor | None, channels: int, *, smooth_fused: bool
) -> torch.Tensor | None:
    """``d``: the shift as the smoothed activation sees it, float64 ``[channels]`` --
    ``shift / s`` when the module divides by ``s`` itself, ``shift`` when the smoothing is fused
    into the previous op (its output is already ``x / s`` and the shift is added to that)."""
    d = shift_vector(shift, channels)
    if d is None or smooth is None or smooth_fused:
        return d
    s = smooth.detach().to(torch.float64).cpu().reshape(-1)
    if s.numel() != channels:
        raise QuantizationError(f"smooth must be [{channels}], got {list(smooth.shape)}")
    return d / s


def fold_shift_bias(
    bias: torch.Tensor | None,
    *,
    shift: torch.Tensor | float | None,
    smooth: torch.Tensor | None,
    residual: torch.Tensor,
    lora_down: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    smooth_fused: bool = False,
    low_rank_input: str = "unshifted",
) -> torch.Tensor | None:
    """The corrected bias ``b'`` of (*) in the module docstring, float64 ``[N]``.

    ``residual``: the ``[N, K]`` matrix the main branch multiplies (``Q(R)`` dequantized, or
    ``R``), in the smoothed domain; ``lora_down`` ``[r, K]`` / ``lora_up`` ``[N, r]`` (both or
    neither); ``low_rank_input``: ``"unshifted"`` or ``"shifted"``. Returns ``bias`` (as float64)
    unchanged when there is no shift, and ``None`` when there is neither shift nor bias. All
    arithmetic in float64."""
    if low_rank_input not in LOW_RANK_INPUTS:
        raise QuantizationError(f"low_rank_input must be one of {LOW_RANK_INPUTS}, got {low_rank_input!r}")
    if (lora_down is None) != (lora_up is None):
        raise QuantizationError("pass both lora_down and lora_up, or neither")
    n, k = residual.shape
    b = None if bias is None else bias.detach().to(torch.float64).cpu().reshape(-1)
    if b is not None and b.numel() != n:
        raise QuantizationError(f"bias must be [{n}], got {list(bias.shape)}")
    d = smoothed_shift(shift, smooth, k, smooth_fused=smooth_fused)
    if d is None:
        return b
    out = torch.zeros(n, dtype=torch.float64) if b is None else b.clone()
    out -= residual.detach().to(torch.float64).cpu() @ d
    if lora_down is not None and low_rank_input == "shifted":
        l2 = lora_down.detach().to(torch.float64).cpu()
        l1 = lora_up.detach().to(torch.float64).cpu()
        if l2.shape[1] != k or l1.shape[0] != n or l1.shape[1] != l2.shape[0]:
            raise QuantizationError(
                f"lora_down {list(l2.shape)} / lora_up {list(l1.shape)} do not fit a [{n}, {k}] weight"
            )
        out -= l1 @ (l2 @ d)
    return out


__all__ = ["fold_shift_bias", "smoothed_shift", "shift_vector", "LOW_RANK_INPUTS"]
