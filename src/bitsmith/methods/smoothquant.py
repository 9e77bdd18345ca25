"""``smoothquant``: the weight half of SmoothQuant W8A8 — int8 codes, one scale per output channel.

Per row ``i`` of the weight's matrix view (in float64): ``scale[i] = max_j |W[i, j]| / 127``
rounded *up* to ``scale_dtype`` (so ``|W / scale| <= 127`` and nothing clips), codes
``clamp(round(W / scale), -127, 127)`` from exactly the stored scale (:func:`encode_int8`). An
all-zero row gets scale 0 and codes 0.

The smoothing itself (moving activation outliers into the weights, fused or unfused) is a
transform applied to the model *before* this runs (:mod:`bitsmith.transforms.smoothing`); the
options ``alpha``, ``smooth`` and ``variant`` are accepted here so that a recipe records them and
are validated, but they do not change how one weight is encoded. The activation half (per-token
dynamic int8, or a static per-tensor scale, :func:`static_input_scale`) is the runtime's
(:class:`~bitsmith.nn.W8A8Linear`).
"""
from __future__ import annotations

import math

import torch

from ..errors import QuantizationError, SpecError
from ..formats import QTensor
from ..formats.dtypes import FLOAT_DTYPES
from ..formats.int8 import QMAX, SCALE_DTYPES, Int8Params, encode_int8
from ..formats.codec import matrix_shape
from . import METHODS
from .rtn import round_up_to

SMOOTH_MODES = ("fused", "unfused", "none")
VARIANTS = ("paper", "lmdeploy")
ACTIVATIONS = ("dynamic", "static")


def check_options(alpha: float, smooth: str | None, variant: str, activations: str) -> None:
    """Reject out-of-range SmoothQuant options with a message naming the valid ones. ``smooth=None``
    means ``"none"`` (a recipe's option parser reads the word ``none`` as null)."""
    smooth = "none" if smooth is None else smooth
    if type(alpha) not in (int, float) or not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise SpecError(f"alpha must be a number in [0, 1], got {alpha!r}")
    for name, value, valid in (("smooth", smooth, SMOOTH_MODES), ("variant", variant, VARIANTS),
                               ("activations", activations, ACTIVATIONS)):
        if value not in valid:
            raise SpecError(f"{name} must be one of {', '.join(valid)}, got {value!r}")


def int8_weight(weight: torch.Tensor, *, scale_dtype: str = "float32") -> QTensor:
    """Symmetric per-output-channel int8 (see the module docstring)."""
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise QuantizationError(f"int8 weight quantization needs a floating tensor, got {got}")
    if weight.dim() == 0 or weight.numel() == 0:
        raise QuantizationError(f"int8 weight quantization needs a non-empty tensor, got shape {list(weight.shape)}")
    weight = weight.detach()
    if not bool(torch.isfinite(weight).all()):
        raise QuantizationError("int8 weight quantization: weight has inf/NaN values")
    params = Int8Params(scale_dtype=scale_dtype)
    rows, cols = matrix_shape(tuple(weight.shape))
    f64 = torch.float32 if weight.device.type == "mps" else torch.float64
    absmax = weight.reshape(rows, cols).abs().amax(dim=1).to(f64)
    sdt = SCALE_DTYPES[scale_dtype]
    if float(absmax.max()) / QMAX > torch.finfo(sdt).max:
        raise QuantizationError(f"a row's scale overflows {scale_dtype}; use scale_dtype='float32'")
    scale = round_up_to(absmax / QMAX, sdt)
    return encode_int8(weight, scale, params)


@METHODS.register("smoothquant")
def smoothquant(
    weight: torch.Tensor,
    *,
    alpha: float = 0.5,
    smooth: str | None = "fused",
    variant: str = "paper",
    activations: str = "dynamic",
    scale_dtype: str = "float32",
) -> QTensor:
    """int8 per-channel weight codes for W8A8 (``alpha``/``smooth``/``variant``/``activations``
    are validated and recorded; see the module docstring)."""
    check_options(alpha, smooth, variant, activations)
    return int8_weight(weight, scale_dtype=scale_dtype)


def static_input_scale(act_absmax: torch.Tensor, migration_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The static per-tensor activation scale ``max_j (absmax[j] / s[j]) / 127`` (``s`` the
    migration scale applied to this layer's input, fused or unfused; 1 without smoothing), float32
    ``[]``, from calibration's per-channel ``absmax``. A layer whose input was always 0 gets 1."""
    a = act_absmax.to(torch.float64)
    if migration_scale is not None:
        if migration_scale.shape != a.shape:
            raise QuantizationError(f"migration scale {list(migration_scale.shape)} does not match the "
                                    f"activation stats {list(a.shape)}")
        a = a / migration_scale.to(torch.float64)
    top = float(a.max()) if a.numel() else 0.0
    return torch.tensor(top / QMAX if top > 0 else 1.0, dtype=torch.float32)


__all__ = ["smoothquant", "int8_weight", "static_input_scale", "check_options", "SMOOTH_MODES", "VARIANTS", "ACTIVATIONS"]
