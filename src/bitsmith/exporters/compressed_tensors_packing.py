"""compressed-tensors' bit order for ``pack-quantized`` (its own packer: never shared with
bitsmith's storage packing or another exporter's).

Layout (compressed-tensors 0.20 ``pack_to_int32``, checked against that package in the tests):
each row of ``b``-bit values (``0 <= v < 2**b``; a signed code ``q`` is stored as ``q + 2**(b-1)``)
is one bit stream where element ``i`` occupies stream bits ``[i*b, (i+1)*b)``, lowest bit first;
stream bit ``j`` is bit ``j % 32`` of int32 word ``j // 32`` (so for ``b = 4`` element 0 is the
lowest nibble of word 0, element 7 the highest). An element may straddle two words (``b`` = 3,
5, 6, 7). Each row takes ``ceil(cols * b / 32)`` words; the unused high bits of the last word
are 0. Words are int32 (a word with bit 31 set is negative). ``packed_dim=0`` packs along
columns instead: the transpose is packed and transposed back (``[ceil(rows * b / 32), cols]``).
"""
from __future__ import annotations

import torch

_ROW_BLOCK_BITS = 1 << 24  # stream bits expanded at once (bounds the temporary bit matrix)


def pack_rows_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` (integer ``[rows, cols]``, each in ``[0, 2**bits)``) row by row into int32
    ``[rows, ceil(cols * bits / 32)]`` (see the module docstring)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if values.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {list(values.shape)}")
    rows, cols = values.shape
    words = -(-cols * bits // 32)
    out = torch.empty(rows, words, dtype=torch.int32)
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = torch.ones(32, dtype=torch.int64) << torch.arange(32, dtype=torch.int64)
    step = max(1, _ROW_BLOCK_BITS // max(1, words * 32))
    for r0 in range(0, rows, step):  # row blocks bound memory; each block is vectorised
        v = values[r0 : r0 + step].to(torch.int64)
        stream = ((v.unsqueeze(-1) >> shifts) & 1).reshape(v.shape[0], cols * bits)
        stream = torch.nn.functional.pad(stream, (0, words * 32 - cols * bits))
        w = (stream.reshape(v.shape[0], words, 32) * weights).sum(-1)  # uint32 value in int64
        out[r0 : r0 + step] = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return out


def pack_int32(values: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    """:func:`pack_rows_int32` along ``packed_dim`` (1: within rows; 0: within columns)."""
    if packed_dim == 1:
        return pack_rows_int32(values, bits)
    if packed_dim == 0:
        return pack_rows_int32(values.t(), bits).t().contiguous()
    raise ValueError(f"packed_dim must be 0 or 1, got {packed_dim}")


__all__ = ["pack_rows_int32", "pack_int32"]
