"""HQQ's own bit packings, written from its documented layout (not bitsmith's ``formats.packing``).

HQQ packs a 2-D code matrix ``q`` of shape ``[R, C]`` (for ``axis=1`` that is ``[groups,
group_size]``, for ``axis=0`` ``[group_size, groups]``) *along dim 0*: the rows are cut into
``n = 8 // bits`` (``10`` for ``3bit_32``) equal chunks of ``s = R / n`` rows, and chunk ``k``
(rows ``k*s .. (k+1)*s - 1``) goes to bits ``[shift_k, shift_k + bits)`` of the word at row
``r - k*s`` of the packed ``[s, C]`` matrix, with ``shift_k = bits * (n - 1 - k)`` — the first
chunk in the most significant bits:

========== ========= ======== ====================================================================
packing    container chunks   word at packed row ``i``, column ``j``
========== ========= ======== ====================================================================
8bit_u8    uint8     1        ``q[i, j]``
4bit_u8    uint8     2        ``q[i, j] << 4 | q[i + s, j]``           (row i paired with i + R/2)
2bit_u8    uint8     4        ``q[i] << 6 | q[i+s] << 4 | q[i+2s] << 2 | q[i+3s]``
1bit_u8    uint8     8        ``q[i] << 7 | q[i+s] << 6 | ... | q[i+7s]``
3bit_32    int32     10       ``q[i] << 27 | q[i+s] << 24 | ... | q[i+9s]`` (bits 30, 31 zero)
========== ========= ======== ====================================================================

``3bit_32`` first pads ``R`` with zero rows up to a multiple of 10 (``s = ceil(R / 10)``) and the
reader drops the padded rows; the other packings need ``R`` divisible by their chunk count (HQQ's
own packer fails otherwise, and its reader does not trim), which :func:`packed_shape` checks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SpecError


@dataclass(frozen=True)
class HqqPacking:
    """One HQQ packing: ``name`` as HQQ stores it, code width, chunks per word, container."""

    name: str
    bits: int
    chunks: int
    container: torch.dtype

    @property
    def pads_rows(self) -> bool:
        """Only ``3bit_32`` pads the row count (to a multiple of 10)."""
        return self.chunks == 10

    @property
    def view_dtype_name(self) -> str:
        """HQQ's ``unpack_view_dtype`` string for this packing."""
        return "torch.int32" if self.container == torch.int32 else "torch.uint8"

    def shifts(self, device: torch.device) -> torch.Tensor:
        """``[chunks, 1, 1]`` left shifts: ``bits * (chunks - 1 - k)`` for chunk ``k``."""
        k = torch.arange(self.chunks, device=device, dtype=torch.int32)
        return (self.bits * (self.chunks - 1 - k)).view(-1, 1, 1)

    def packed_rows(self, rows: int) -> int:
        """Rows of the packed matrix for ``rows`` code rows (raises when HQQ can't pack them)."""
        if self.pads_rows:
            return -(-rows // self.chunks)
        if rows % self.chunks:
            raise SpecError(
                f"HQQ packing {self.name} needs a row count divisible by {self.chunks} (HQQ neither pads "
                f"nor trims it), got {rows} rows"
            )
        return rows // self.chunks

    def packed_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return self.packed_rows(rows), cols

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes``: integer ``[R, C]`` with values in ``[0, 2**bits)`` -> the packed
        ``[packed_rows(R), C]`` matrix in ``container``."""
        if codes.dim() != 2:
            raise SpecError(f"HQQ {self.name}: codes must be 2-D [rows, cols], got shape {list(codes.shape)}")
        rows, cols = codes.shape
        s = self.packed_rows(rows)
        q = codes.to(self.container)  # uint8 fields shifted within a byte never overflow it
        pad = s * self.chunks - rows
        if pad:
            q = torch.cat([q, q.new_zeros(pad, cols)])
        chunks = q.view(self.chunks, s, cols)
        words = chunks[0] << self.bits * (self.chunks - 1)
        for k in range(1, self.chunks):  # one vectorised OR per chunk (at most 10)
            words |= chunks[k] << self.bits * (self.chunks - 1 - k)
        return words

    def unpack(self, packed: torch.Tensor, rows: int) -> torch.Tensor:
        """The packed ``[s, C]`` matrix -> uint8 codes ``[rows, C]`` (padded rows dropped)."""
        if packed.dim() != 2 or packed.dtype != self.container:
            raise SpecError(
                f"HQQ {self.name}: packed codes must be a 2-D {self.container} tensor, got "
                f"{packed.dtype} of shape {list(packed.shape)}"
            )
        s, cols = packed.shape
        if s != self.packed_rows(rows):
            raise SpecError(f"HQQ {self.name}: {rows} code rows pack into {self.packed_rows(rows)} rows, got {s}")
        mask = (1 << self.bits) - 1
        # in the container's own dtype (uint8 stays uint8: a quarter of int32's memory traffic)
        q = (packed.unsqueeze(0) >> self.shifts(packed.device).to(self.container)) & mask
        return q.reshape(self.chunks * s, cols)[:rows].to(torch.uint8)


PACKINGS: dict[str, HqqPacking] = {
    p.name: p
    for p in (
        HqqPacking("8bit_u8", 8, 1, torch.uint8),
        HqqPacking("4bit_u8", 4, 2, torch.uint8),
        HqqPacking("3bit_32", 3, 10, torch.int32),
        HqqPacking("2bit_u8", 2, 4, torch.uint8),
        HqqPacking("1bit_u8", 1, 8, torch.uint8),
    )
}
#: the packing HQQ uses for each code width it can store
PACKING_FOR_BITS: dict[int, HqqPacking] = {p.bits: p for p in PACKINGS.values()}


def packing_named(name: str) -> HqqPacking:
    try:
        return PACKINGS[name]
    except KeyError:
        raise SpecError(f"unknown HQQ packing {name!r}; known: {', '.join(PACKINGS)}") from None


def packing_for_bits(bits: int) -> HqqPacking:
    try:
        return PACKING_FOR_BITS[bits]
    except KeyError:
        raise SpecError(
            f"HQQ stores {bits}-bit codes in no packing of its own; it packs {sorted(PACKING_FOR_BITS)} bits"
        ) from None


__all__ = ["HqqPacking", "PACKINGS", "PACKING_FOR_BITS", "packing_named", "packing_for_bits"]
