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
        if not isinstance(layout, str):
            raise SpecError(f"unknown packing layout {layout!r}; valid: dense, base")
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
            # each code needs at least one bit: bounds codes_per_symbol before radix**c is computed
            if not 1 <= self.symbol_bits <= MAX_SYMBOL_BITS or not 1 <= self.codes_per_symbol <= self.symbol_bits:
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
    if bits in (3, 5, 6, 7):  # codes straddle bytes: word-parallel, see _pack_dense
        return _pack_dense(flat, bits)
    if bits <= 8:
        v = flat.to(torch.uint8)
        if pad:
            v = torch.cat([v, v.new_zeros(pad)])
        if bits == 8:
            return v
        # 1, 2, 4: whole codes per byte; these few byte-column ORs beat the word-parallel path
        per_byte = 8 // bits
        v = v.view(-1, per_byte)
        out = v[:, 0].clone()
        for j in range(1, per_byte):
            out.bitwise_or_(v[:, j] << (j * bits))
        return out
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
    if bits < 8:
        return _unpack_dense(packed, bits)[:count]
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


# --- dense 1..7-bit codes, word-parallel ------------------------------------------------------
# pack_bits uses this for 3, 5, 6 and 7 bits (1, 2 and 4 pack faster as byte-column ORs above);
# unpack_bits uses it for every width below 8.
#
# A *block* is 64 codes: 8 int64 "code words" (the int64 view of the uint8 codes, 8 codes a word)
# <-> ``bits`` int64 "stream words" (64*bits stream bits). Packing first compacts every code word
# in place (three shift-and-mask steps over 16-, 32- and 64-bit lanes, after which its 8 codes are
# one 8*bits-bit field at the bottom of the word, in stream order), then shifts field j of the block
# to stream offset 8*bits*j: one left shift (and, for a field that straddles two stream words, one
# right shift for the spill) over all 8 fields at once, and a few ORs into the stream words.
# Unpacking runs the same steps backwards. Everything is int64 views of the uint8 data, so no
# temporary is wider than the data itself (widening each code to int64 would move 8x the bytes).
# Little-endian hosts only, which the module asserts at import.
#
# Work proceeds in chunks of _CHUNK_BLOCKS blocks per intra-op thread: each thread's share of a
# chunk (its temporaries included) stays in its core's L2, while every op is large enough for torch
# to split across its threads; with one thread the chunk is below torch's grain size (32768
# elements), so ops run inline.
_CHUNK_BLOCKS = 4000  # 32000 int64 words (256000 codes) per thread
_CHUNK_BLOCKS_ACCEL = 1 << 18  # other devices: fewer, larger launches


def _s64(m: int) -> int:
    """The signed int64 with the same 64-bit pattern as ``m``."""
    m &= (1 << 64) - 1
    return m - (1 << 64) if m >> 63 else m


def _lanes(field: int, lane: int) -> int:
    """``field`` repeated in every ``lane``-bit lane of a 64-bit word."""
    return sum(field << (lane * k) for k in range(64 // lane))


@dataclass(frozen=True, eq=False)
class _DensePlan:
    """The shifts and masks of one code width, built once per (bits, device)."""

    bits: int
    # compaction steps, 16- then 32- then 64-bit lanes: (right shift, keep mask, moved mask)
    steps: tuple
    # expansion steps, the inverse order: (left shift, keep mask, moved mask)
    usteps: tuple
    lsh: torch.Tensor  # (8,) field j's offset inside its first stream word
    rsh: torch.Tensor  # (8,) 64 - offset: the spill of a straddling field into the next word
    crosses: bool  # does any field straddle two stream words (bits 3, 5, 6, 7)
    # pack: stream words as ORs of shifted fields, one entry per strided slice of words:
    # (first word, word step, word count, (("a" | "b", first field, field step), ...))
    runs: tuple
    first: torch.Tensor  # (8,) unpack: stream word holding the start of field j
    second: torch.Tensor  # (8,) unpack: the next word (a straddling field's tail)
    umask: torch.Tensor  # (8,) unpack: clears the sign fill of the arithmetic right shift
    ulsh: torch.Tensor  # (8,) unpack: tail shift, 64 (i.e. nothing) when the field fits


_PLANS: dict = {}


def _dense_plan(bits: int, device: torch.device) -> _DensePlan:
    key = (bits, device)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    steps = []
    for lane, fw in ((16, bits), (32, 2 * bits), (64, 4 * bits)):
        half, field = lane // 2, (1 << fw) - 1
        steps.append((half - fw, _s64(_lanes(field, lane)), _s64(_lanes(field << fw, lane))))
    usteps = []
    for lane, fw in ((64, 4 * bits), (32, 2 * bits), (16, bits)):
        half, field = lane // 2, (1 << fw) - 1
        usteps.append((half - fw, _s64(_lanes(field, lane)), _s64(_lanes(field << half, lane))))
    width = 8 * bits  # bits per compacted field
    offs = [divmod(width * j, 64) for j in range(8)]  # (stream word, bit offset) of field j
    cross = [r + width > 64 for _, r in offs]
    # pieces of each stream word, in stream order: ("a", j) = field j << offset, ("b", j) = the
    # spill of field j >> (64 - offset) from the previous word
    words: list[list[tuple[str, int]]] = [[] for _ in range(bits)]
    for j, (k, _) in enumerate(offs):
        words[k].append(("a", j))
        if cross[j]:
            words[k + 1].append(("b", j))
    for pieces in words:
        pieces.sort(key=lambda p: (p[0] == "a", p[1]))  # the spill sits lowest, then fields by j
    # group stream words with the same piece pattern whose word and field indices advance in
    # step, so one strided-slice op serves several words
    groups: dict = {}
    for k, pieces in enumerate(words):
        j0 = pieces[0][1]
        sig = tuple((src, j - j0) for src, j in pieces)
        groups.setdefault(sig, []).append((k, j0))
    runs = []
    for sig, members in groups.items():
        i = 0
        while i < len(members):
            k0, j0 = members[i]
            cnt, dk, dj = 1, 1, 1
            if i + 1 < len(members):
                dk, dj = members[i + 1][0] - k0, members[i + 1][1] - j0
                if dj > 0:
                    while i + cnt < len(members) and members[i + cnt] == (k0 + cnt * dk, j0 + cnt * dj):
                        cnt += 1
                else:
                    dk, dj = 1, 1
            runs.append((k0, dk, cnt, tuple((src, j0 + rel, dj) for src, rel in sig)))
            i += cnt

    def t(vals):
        return torch.tensor(vals, dtype=torch.int64, device=device)

    plan = _DensePlan(
        bits=bits,
        steps=tuple(steps),
        usteps=tuple(usteps),
        lsh=t([r for _, r in offs]),
        rsh=t([64 - r if c else 63 for (_, r), c in zip(offs, cross)]),
        crosses=any(cross),
        runs=tuple(runs),
        first=t([k for k, _ in offs]),
        second=t([k + 1 if c else k for (k, _), c in zip(offs, cross)]),
        umask=t([_s64((1 << (64 - r)) - 1) if c else -1 for (_, r), c in zip(offs, cross)]),
        ulsh=t([64 - r if c else 64 for (_, r), c in zip(offs, cross)]),
    )
    _PLANS[key] = plan
    return plan


def _chunk_blocks(device: torch.device) -> int:
    if device.type != "cpu":
        return _CHUNK_BLOCKS_ACCEL
    return _CHUNK_BLOCKS * max(1, torch.get_num_threads())


def _pack_dense(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_bits for 1 <= bits <= 7 (used for 3, 5, 6, 7); ``flat`` is 1-D, any integer dtype."""
    device = flat.device
    n = flat.numel()
    out = torch.empty(_ceil_div(n, 8) * bits, dtype=torch.uint8, device=device)
    if n == 0:
        return out
    plan = _dense_plan(bits, device)
    step = _chunk_blocks(device) * 64  # codes per chunk
    # whole chunks go straight from `flat` into `out`; a last chunk that ends in a partial
    # block goes through zero-padded copies
    direct = n if n % 64 == 0 else (n - 1) // step * step
    scratch = torch.empty(3, min(_ceil_div(n, 64), step // 64) * 8, dtype=torch.int64, device=device)
    conv = None
    for start in range(0, n, step):
        c = flat[start : start + step]
        m = c.numel()
        nblk = _ceil_div(m, 64)
        o = start // 8 * bits
        if start < direct:
            if c.dtype != torch.uint8:
                if conv is None:
                    conv = torch.empty(step, dtype=torch.uint8, device=device)
                c = conv[:m].copy_(c)
            dst = out[o : o + nblk * 8 * bits].view(torch.int64).view(nblk, bits)
            _pack_blocks(_as_words(c), dst, scratch[:, : nblk * 8], plan)
        else:
            dst = torch.empty(nblk, bits, dtype=torch.int64, device=device)
            _pack_blocks(_padded_words(c, nblk * 64), dst, scratch[:, : nblk * 8], plan)
            out[o:] = dst.view(-1).view(torch.uint8)[: _ceil_div(m, 8) * bits]
    return out


def _pack_blocks(w: torch.Tensor, dst: torch.Tensor, scratch: torch.Tensor, plan: _DensePlan) -> None:
    """w: (8*blocks,) int64 code words (read only) -> dst: (blocks, bits) int64 stream words.
    scratch: (3, 8*blocks) int64."""
    x, t, a = scratch
    for i, (sh, keep, moved) in enumerate(plan.steps):  # compact each word's 8 codes
        src = w if i == 0 else x
        torch.bitwise_right_shift(src, sh, out=t)
        t.bitwise_and_(moved)
        torch.bitwise_and(src, keep, out=x)
        x.bitwise_or_(t)
    nblk = dst.shape[0]
    x, t, a = x.view(nblk, 8), t.view(nblk, 8), a.view(nblk, 8)
    torch.bitwise_left_shift(x, plan.lsh, out=a)  # field j at its offset in its first stream word
    if plan.crosses:
        torch.bitwise_right_shift(x, plan.rsh, out=t)  # the spill of a straddling field
    src = {"a": a, "b": t}
    for k0, dk, cnt, pieces in plan.runs:
        d = dst[:, k0 : k0 + (cnt - 1) * dk + 1 : dk]
        cols = [src[s][:, j0 : j0 + (cnt - 1) * dj + 1 : dj] for s, j0, dj in pieces]
        if len(cols) == 1:
            d.copy_(cols[0])
            continue
        torch.bitwise_or(cols[0], cols[1], out=d)
        for col in cols[2:]:
            d.bitwise_or_(col)


def _unpack_dense(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """unpack_bits for 1 <= bits <= 7: all ``8 * numel // bits`` codes of the stream, uint8."""
    device = packed.device
    nbytes = packed.numel()
    out = torch.empty(nbytes // bits * 8, dtype=torch.uint8, device=device)
    if nbytes == 0:
        return out
    plan = _dense_plan(bits, device)
    blk = 8 * bits  # bytes per block
    step = _chunk_blocks(device) * blk  # bytes per chunk
    direct = nbytes if nbytes % blk == 0 else (nbytes - 1) // step * step
    scratch = torch.empty(3, min(_ceil_div(nbytes, blk), step // blk) * 8, dtype=torch.int64, device=device)
    for start in range(0, nbytes, step):
        c = packed[start : start + step]
        m = c.numel()
        nblk = _ceil_div(m, blk)
        o = start // bits * 8
        if start < direct:
            dst = out[o : o + nblk * 64].view(torch.int64)
            _unpack_blocks(_as_words(c).view(nblk, bits), dst, scratch[:, : nblk * 8], plan)
        else:
            dst = torch.empty(nblk * 8, dtype=torch.int64, device=device)
            _unpack_blocks(_padded_words(c, nblk * blk).view(nblk, bits), dst, scratch[:, : nblk * 8], plan)
            out[o:] = dst.view(torch.uint8)[: m // bits * 8]
    return out


def _unpack_blocks(pw: torch.Tensor, dst: torch.Tensor, scratch: torch.Tensor, plan: _DensePlan) -> None:
    """pw: (blocks, bits) int64 stream words (read only) -> dst: (8*blocks,) int64 code words.
    scratch: (3, 8*blocks) int64."""
    nblk, bits = pw.shape
    x, t, g = scratch
    x2, t2, g2 = x.view(nblk, 8), t.view(nblk, 8), g.view(nblk, 8)
    if plan.crosses:  # field j = (word first[j] >> offset) | (word second[j] << (64 - offset))
        torch.gather(pw, 1, plan.first.expand(nblk, 8), out=g2)
        torch.bitwise_right_shift(g2, plan.lsh, out=x2)
        x2.bitwise_and_(plan.umask)  # a logical shift: drop the sign fill
        torch.gather(pw, 1, plan.second.expand(nblk, 8), out=g2)
        torch.bitwise_left_shift(g2, plan.ulsh, out=t2)
        x2.bitwise_or_(t2)
    else:  # 1, 2, 4 bits: fields never straddle words; field j = word j*bits//8 >> offset
        per = 8 // bits
        shifts = plan.lsh.view(bits, per)
        torch.bitwise_right_shift(pw.view(nblk, bits, 1), shifts, out=x2.view(nblk, bits, per))
    # bits above each field are junk here; every expansion step masks them away
    last = len(plan.usteps) - 1
    for i, (sh, keep, moved) in enumerate(plan.usteps):
        torch.bitwise_left_shift(x, sh, out=t)
        t.bitwise_and_(moved)
        x.bitwise_and_(keep)
        torch.bitwise_or(x, t, out=dst if i == last else x)


def _as_words(u8: torch.Tensor) -> torch.Tensor:
    """int64 view of a 1-D uint8 tensor whose length is a multiple of 8 (a copy when the data
    is not contiguous or not 8-byte aligned)."""
    if u8.storage_offset() % 8 or u8.data_ptr() % 8 or not u8.is_contiguous():
        return _padded_words(u8, u8.numel())
    return u8.view(torch.int64)


def _padded_words(src: torch.Tensor, nbytes: int) -> torch.Tensor:
    """A fresh int64 tensor holding ``src`` as uint8 bytes, zero-filled to ``nbytes``."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device=src.device)
    buf[src.numel() :].zero_()
    buf[: src.numel()] = src
    return buf.view(torch.int64)


def ideal_bits(levels: int) -> float:
    return math.log2(levels)
