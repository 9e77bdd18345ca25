"""``nf``: round-to-nearest onto a NormalFloat table (NF-k, any level count 3..256) with one
absmax per block, optionally double-quantized (QLoRA's NF4 is ``levels=16, block_size=64``)."""
from __future__ import annotations

import torch

from ..errors import QuantizationError, SpecError
from ..formats import QTensor
from ..formats.codebook import CodebookParams, quantize_codebook
from ..formats.dtypes import FLOAT_DTYPES
from . import METHODS

DEFAULT_LEVELS = 16


def nf_levels(levels: int | None = None, bits: int | None = None) -> int:
    """The level count from ``levels`` and/or ``bits`` (``bits=k`` means ``2**k`` levels)."""
    if bits is not None:
        if type(bits) is not int or not 2 <= bits <= 8:
            raise SpecError(f"nf bits must be an integer in 2..8, got {bits!r} (or pass levels=)")
        if levels is not None and levels != 2**bits:
            raise SpecError(f"nf got levels={levels!r} and bits={bits} (= {2**bits} levels); pass one of them")
        return 2**bits
    return DEFAULT_LEVELS if levels is None else levels


@METHODS.register("nf")
def nf(
    weight: torch.Tensor,
    *,
    levels: int | None = None,
    bits: int | None = None,
    block_size: int = 64,
    double_quant: bool = False,
    dq_block: int = 256,
) -> QTensor:
    """Quantize ``weight`` (float16/bfloat16/float32/float64, any ndim >= 1; a Conv2d weight
    uses the ``[out, in*kh*kw]`` view) to the ``codebook`` codec with an NF table."""
    if not isinstance(weight, torch.Tensor):
        raise QuantizationError(f"nf needs a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        got = str(weight.dtype).removeprefix("torch.")
        raise QuantizationError(f"nf needs a floating weight (float16, bfloat16, float32, float64), got dtype {got}")
    params = CodebookParams(
        levels=nf_levels(levels, bits),
        block_size=block_size,
        table="nf",
        double_quant=double_quant,
        dq_block=dq_block,
    )
    return quantize_codebook(weight, params)
