"""Bit packing for bitsmith's own storage layout (exporters have their own packers).

Layouts (the name is stored in every QTensor spec, so the file says how to read it):

``dense`` — ``bits`` in 1..8. Codes are unsigned integers ``< 2**bits``, written as one
    LSB-first bit stream: code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, stream bit
    ``j`` is bit ``j % 8`` of byte ``j // 8``. Eight codes fill exactly ``bits`` bytes, so 3-, 5-,
    6- and 7-bit codes cost exactly ``bits`` bits each; the code count is padded with zero codes
    to a multiple of 8. For 4 bits this means byte ``b`` holds code ``2b`` in its low nibble and
    code ``2b+1`` in its high nibble.

``base`` — for level counts that are not powers of two. ``codes_per_symbol`` codes in radix
    ``radix`` form one integer symbol ``sum(code[j] * radix**j)`` (code 0 least significant),
    and the symbols (each ``< 2**symbol_bits``, ``symbol_bits <= 63``) are written as the same
    LSB-first bit stream, padded to a multiple of 8 symbols. 7 levels: 21 codes in 59 bits
    (2.81 bits/code); 12 levels: 17 in 61 (3.59); 24 levels: 5 in 23 (4.60).

All functions are vectorised torch; no Python loop runs per element or per block.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from ..errors import SpecError

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("bitsmith's packing assumes a little-endian host")

MAX_SYMBOL_BITS = 63  # symbols live in int64 without touching the sign bit
_CHUNK_SYMBOLS = 1 << 16  # bit-expansion chunk for wide symbols (multiple of 8)


@dataclass(frozen=True)
class Packing:
    """How codes are laid out in a uint8 tensor. ``layout`` is ``"dense"`` or ``"base"``."""

    layout: str
    bits: int = 0  # dense: bits per code
    radix: int = 0  # base: level count
    codes_per_symbol: int = 0
    symbol_bits: int = 0

    # --- construction -------------------------------------------------------------------
    @staticmethod
    def dense(bits: int) -> "Packing":
        p = Packing("dense", bits=int(bits))
        p.validate()
        return p

    @staticmethod
    def for_levels(levels: int) -> "Packing":
        """The cheapest layout for codes in ``[0, levels)``: dense when a power of two (or when
        radix packing saves nothing), else base-``levels`` symbols of up to 63 bits."""
        levels = int(levels)
        if not 2 <= levels <= 256:
            raise SpecError(f"levels must be in 2..256, got {levels}")
        dense_bits = max(1, (levels - 1).bit_length())
        best = (float(dense_bits), 1, dense_bits)
        c = 1
        while True:
            sym_bits = (levels**c - 1).bit_length()
            if sym_bits > MAX_SYMBOL_BITS:
                break
            if sym_bits / c < best[0] - 1e-12:
                best = (sym_bits / c, c, sym_bits)
            c += 1
        if best[1] == 1:
            return Packing.dense(dense_bits)
        p = Packing("base", radix=levels, codes_per_symbol=best[1], symbol_bits=best[2])
        p.validate()
        return p

    # --- (de)serialisation -------------------------------------------------------------
    def to_json(self) -> dict:
        if self.layout == "dense":
            return {"layout": "dense", "bits": self.bits}
        return {
            "layout": "base",
            "radix": self.radix,
            "codes_per_symbol": self.codes_per_symbol,
            "symbol_bits": self.symbol_bits,
        }

    @staticmethod
    def from_json(raw: object) -> "Packing":
        if not isinstance(raw, dict):
            raise SpecError(f"packing must be an object, got {type(raw).__name__}")
        layout = raw.get("layout")
        allowed = {"dense": {"layout", "bits"}, "base": {"layout", "radix", "codes_per_symbol", "symbol_bits"}}
        if layout not in allowed:
            raise SpecError(f"unknown packing layout {layout!r}; valid: dense, base")
        extra = set(raw) - allowed[layout]
        missing = allowed[layout] - set(raw)
        if extra or missing:
            raise SpecError(f"packing {layout}: unexpected fields {sorted(extra)}, missing {sorted(missing)}")
        for k in allowed[layout] - {"layout"}:
            if type(raw[k]) is not int:
                raise SpecError(f"packing field {k} must be an integer, got {raw[k]!r}")
        p = Packing(**raw)
        p.validate()
        return p

    def validate(self) -> None:
        if self.layout == "dense":
            if not 1 <= self.bits <= 8:
                raise SpecError(f"dense packing supports 1..8 bits, got {self.bits}")
        elif self.layout == "base":
            if not 2 <= self.radix <= 256:
                raise SpecError(f"base packing radix must be in 2..256, got {self.radix}")
            if not 1 <= self.symbol_bits <= MAX_SYMBOL_BITS or self.codes_per_symbol < 1:
                raise SpecError(f"base packing needs 1..63 symbol bits and >=1 code, got {self.to_json()}")
            if (self.radix**self.codes_per_symbol - 1).bit_length() > self.symbol_bits:
                raise SpecError(
                    f"base packing: {self.codes_per_symbol} codes of radix {self.radix} do not fit "
                    f"in {self.symbol_bits} bits"
                )
        else:
            raise SpecError(f"unknown packing layout {self.layout!r}")

    # --- sizes --------------------------------------------------------------------------
    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1 if self.layout == "dense" else self.radix - 1

    @property
    def bits_per_code(self) -> float:
        if self.layout == "dense":
            return float(self.bits)
        return self.symbol_bits / self.codes_per_symbol

    def packed_nbytes(self, count: int) -> int:
        """Bytes that ``count`` codes occupy."""
        if self.layout == "dense":
            return _ceil_div(count, 8) * self.bits
        symbols = _ceil_div(count, self.codes_per_symbol)
        return _ceil_div(symbols, 8) * self.symbol_bits

    # --- the work -----------------------------------------------------------------------
    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes``: any-shape integer tensor with values in ``[0, max_code]``; packed
        row-major. Returns a 1-D uint8 tensor of ``packed_nbytes(codes.numel())`` bytes."""
        flat = codes.reshape(-1)
        if self.layout == "dense":
            return pack_bits(flat, self.bits)
        n = flat.numel()
        c = self.codes_per_symbol
        pad = (-n) % c
        grouped = flat.to(torch.int64)
        if pad:
            grouped = torch.cat([grouped, grouped.new_zeros(pad)])
        grouped = grouped.view(-1, c)
        symbols = grouped[:, c - 1].clone()
        for j in range(c - 2, -1, -1):  # Horner over the (<= 63) digits, vectorised over symbols
            symbols.mul_(self.radix).add_(grouped[:, j])
        return pack_bits(symbols, self.symbol_bits)

    def unpack(self, packed: torch.Tensor, count: int) -> torch.Tensor:
        """Inverse of :meth:`pack`: a 1-D uint8 tensor of ``count`` codes."""
        expected = self.packed_nbytes(count)
        if packed.numel() != expected:
            raise SpecError(f"packed tensor holds {packed.numel()} bytes, {count} codes need {expected}")
        if self.layout == "dense":
            return unpack_bits(packed, self.bits, count)
        c = self.codes_per_symbol
        symbols = unpack_bits(packed, self.symbol_bits, _ceil_div(count, c))
        powers = torch.tensor([self.radix**j for j in range(c)], dtype=torch.int64, device=packed.device)
        digits = torch.div(symbols.unsqueeze(1), powers, rounding_mode="floor").remainder_(self.radix)
        return digits.reshape(-1)[:count].to(torch.uint8)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """LSB-first bit stream of ``bits``-wide unsigned values (1 <= bits <= 63).

    Values are padded with zeros to a multiple of 8, so the result holds ``ceil(n/8) * bits``
    bytes. Values must already be in range; they are not checked here (callers clamp).
    """
    if not 1 <= bits <= MAX_SYMBOL_BITS:
        raise SpecError(f"bit width must be in 1..63, got {bits}")
    flat = values.reshape(-1)
    n = flat.numel()
    pad = (-n) % 8
    if bits <= 8:
        v = flat.to(torch.uint8)
        if pad:
            v = torch.cat([v, v.new_zeros(pad)])
        if bits == 8:
            return v
        if bits in (1, 2, 4):
            per_byte = 8 // bits
            v = v.view(-1, per_byte)
            out = v[:, 0].clone()
            for j in range(1, per_byte):
                out.bitwise_or_(v[:, j] << (j * bits))
            return out
        # 3, 5, 6, 7: eight codes fit one int64 accumulator; keep its low `bits` bytes
        v = v.view(-1, 8).to(torch.int64)
        shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=v.device)
        acc = (v << shifts).sum(dim=1)
        return acc.view(torch.uint8).view(-1, 8)[:, :bits].reshape(-1)
    # wide symbols: expand to bits, regroup as bytes; chunked so temporaries stay small
    v = flat.to(torch.int64)
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    bit_idx = torch.arange(bits, dtype=torch.int64, device=v.device)
    byte_w = torch.tensor([1 << j for j in range(8)], dtype=torch.int64, device=v.device)
    out = torch.empty(v.numel() // 8 * bits, dtype=torch.uint8, device=v.device)
    for start in range(0, v.numel(), _CHUNK_SYMBOLS):
        chunk = v[start : start + _CHUNK_SYMBOLS]
        stream = ((chunk.unsqueeze(1) >> bit_idx) & 1).reshape(-1, 8)
        o = start // 8 * bits
        out[o : o + stream.shape[0]] = (stream * byte_w).sum(dim=1).to(torch.uint8)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` values (uint8 for bits <= 8, else int64)."""
    if not 1 <= bits <= MAX_SYMBOL_BITS:
        raise SpecError(f"bit width must be in 1..63, got {bits}")
    expected = _ceil_div(count, 8) * bits
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise SpecError(
            f"packed stream must be 1-D uint8 of {expected} bytes for {count} {bits}-bit values, "
            f"got {tuple(packed.shape)} {packed.dtype}"
        )
    if bits == 8:
        return packed[:count]
    if bits <= 8:
        mask = (1 << bits) - 1
        if bits in (1, 2, 4):
            per_byte = 8 // bits
            shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
            out = (packed.unsqueeze(1) >> shifts) & mask
            return out.reshape(-1)[:count]
        words = torch.zeros(packed.numel() // bits, 8, dtype=torch.uint8, device=packed.device)
        words[:, :bits] = packed.view(-1, bits)
        acc = words.view(torch.int64)  # (groups, 1)
        shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=packed.device)
        out = ((acc >> shifts) & mask).to(torch.uint8)
        return out.reshape(-1)[:count]
    bit_idx = torch.arange(8, dtype=torch.uint8, device=packed.device)
    sym_w = torch.tensor([1 << j for j in range(bits)], dtype=torch.int64, device=packed.device)
    n_sym = packed.numel() // bits * 8
    out = torch.empty(n_sym, dtype=torch.int64, device=packed.device)
    step = _CHUNK_SYMBOLS // 8 * bits  # bytes per chunk
    for start in range(0, packed.numel(), step):
        chunk = packed[start : start + step]
        stream = ((chunk.unsqueeze(1) >> bit_idx) & 1).reshape(-1, bits).to(torch.int64)
        o = start // bits * 8
        out[o : o + stream.shape[0]] = (stream * sym_w).sum(dim=1)
    return out[:count]


def ideal_bits(levels: int) -> float:
    return math.log2(levels)
