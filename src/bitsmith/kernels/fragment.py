"""The *fragment* runtime layout (torch only: packing and unpacking run and are tested anywhere;
the kernels that read it are in :mod:`bitsmith.kernels.fragment_mma`).

The small-M kernels of the ``rows`` layout (:mod:`bitsmith.kernels.layout`) turn codes into
floats one at a time on the CUDA cores, or stage a tile in shared memory for the tensor cores.
Here every 32-bit word a lane loads is already its part of one tensor-core operand: the weight is
the 16-row A operand of ``mma.m16n8k16`` and the tokens are its 8 (or 16) columns, so a shift and
a LOP3 turn a word into two operand halves, ``magic + q`` (float16 ``1024 + q``, bfloat16 ``128 +
q``), with no shared memory, shuffle or table in between. The magic and the zero point are taken
out afterwards with the group's activation sums. Formats: affine int4 and int3, and codebooks of
up to 16 levels (NF4) whose codes feed a byte-plane lookup (``prmt``) instead.

Layout of a weight ``W [N, K]``, ``N`` padded with zero codes to a multiple of 16 (``NB`` row
blocks), ``K`` to a multiple of 64 (``KG`` groups of 64 input channels):

* ``words``: int32 ``[NB, KG, WPG]``, the ``WPG`` words of one row block and group
  (:data:`WORDS_PER_GROUP`): four products of ``k`` 16 for each of 32 lanes. int4 and codebooks
  take 4 words a lane (``[lane, product]``: one 16-byte load), int3 3 words (``[word, lane]``:
  three coalesced 4-byte loads), exactly 4 and 3 bits a weight.
* Lane ``4 g + t`` holds, in product ``s``, A register ``r``'s two halves ``h``: the code of row
  ``g + 8 (r % 2)`` and logical ``k = 16 s + 8 (r // 2) + 2 t + h`` (the PTX ISA's fragment of
  ``mma.m16n8k16``, :func:`fragment_position`). Logical ``k`` stands for input channel
  :func:`physical_k`, chosen so a lane's 16 activations of a group are 32 contiguous bytes.
* The bits of each code: :func:`code_bits` (int4: bits ``4 r + 16 h`` of the product's word;
  codebooks ``8 r + 4 h``, a register's two codes in one byte; int3: five 3-bit slots a word,
  register ``4 s + r`` in word ``(4 s + r) // 5`` at ``3 ((4 s + r) % 5) + 16 h``, the sixteenth
  register from bits 15 and 31 of the three words).
* Order (:data:`ORDERS`): ``words`` as :func:`pack` writes it is *block-major*, ``[NB, KG, WPG]``
  (a row block's groups contiguous). *Group-major* is ``[KG, NB, WPG]``
  (:func:`to_order`): a group's row blocks contiguous, so a program's row blocks are one run
  of bytes a step, and the programs of one K split, all at about the same group, read
  neighbouring bytes at the same time, as the ``rows`` layout's kernels and a plain reader do.
* ``scale``, ``zero``, ``table``: as the ``rows`` layout keeps them (``[ceil(Kp / group), N]``,
  unpadded ``N``); groups are 64 input channels or a multiple (or one per row).
"""
from __future__ import annotations

import functools

import torch

GROUP = 64  # input channels a step: four products of k 16
ROWS = 16  # rows of a block: the A operand's height
FORMATS = ("int4", "nf4", "int3")
WORDS_PER_GROUP = {"int4": 128, "nf4": 128, "int3": 96}  # per row block and group
ORDERS = ("block", "group")  # the words' order: [NB, KG, WPG] or [KG, NB, WPG] (module docstring)
CODE_BITS = {"int4": 4, "nf4": 4, "int3": 3}
INT3_WORDS = 3  # words a lane holds per group in int3


def fragment_position(lane: int, reg: int, half: int, step: int) -> tuple[int, int]:
    """``(row, logical k)`` inside a row block and group of half ``half`` of 32-bit A register
    ``reg`` of lane ``lane`` in product ``step`` (``mma.m16n8k16``, row-major A, PTX ISA "Matrix
    Fragments for mma.m16n8k16 with floating point type"): ``a0,a1`` (row g, k 2t, 2t + 1),
    ``a2,a3`` (row g + 8), ``a4,a5`` (row g, k + 8), ``a6,a7`` (row g + 8, k + 8)."""
    g, t = divmod(lane, 4)
    return g + 8 * (reg % 2), 16 * step + 8 * (reg // 2) + 2 * t + half


def physical_k(k_logical: int) -> int:
    """The input channel (inside a group) that logical ``k`` of the products stands for: logical
    ``16 s + 8 rc + 2 t + h`` is channel ``16 t + 4 s + 2 rc + h``, so the 16 activations lane
    ``t`` needs in a group are contiguous. The B operand (the activations) has the same ``k`` in
    its lane ``4 g' + t``, so each product still pairs ``W[n, c]`` with ``x[c]``."""
    s, r = divmod(k_logical, 16)
    rc, r = divmod(r, 8)
    t, h = divmod(r, 2)
    return 16 * t + 4 * s + 2 * rc + h


def _word_index(fmt: str, lane: int, word: int) -> int:
    """Position of a lane's ``word``-th word among a row block and group's words."""
    return word * 32 + lane if fmt == "int3" else lane * 4 + word


def code_bits(fmt: str, reg: int, half: int, step: int) -> list[tuple[int, int]]:
    """``(word, bit)`` of each bit (LSB first) of the code in half ``half`` of A register ``reg``
    in product ``step``, ``word`` counting the lane's own words (see the module docstring)."""
    if fmt == "int3":
        i = 4 * step + reg
        if i < 15:
            word, slot = divmod(i, 5)
            return [(word, 3 * slot + 16 * half + b) for b in range(3)]
        return [(b, 15 + 16 * half) for b in range(3)]
    base = 8 * reg + 4 * half if fmt == "nf4" else 4 * reg + 16 * half
    return [(step, base + b) for b in range(4)]


@functools.lru_cache(maxsize=None)
def _tables(fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(src, src_bit, word_of, bit_of)``: for each bit of a group's ``WPG`` words (word-major)
    the code it holds (``row * 64 + channel``) and which of that code's bits; for each code and
    code bit, the word and bit holding it. Every bit is used exactly once."""
    wpg, nbits = WORDS_PER_GROUP[fmt], CODE_BITS[fmt]
    src = torch.full((wpg * 32,), -1, dtype=torch.int64)
    src_bit = torch.zeros(wpg * 32, dtype=torch.uint8)
    word_of = torch.zeros(ROWS * GROUP, nbits, dtype=torch.int64)
    bit_of = torch.zeros(ROWS * GROUP, nbits, dtype=torch.int32)
    for lane in range(32):
        for step in range(4):
            for reg in range(4):
                for half in range(2):
                    row, kk = fragment_position(lane, reg, half, step)
                    code = row * GROUP + physical_k(kk)
                    for b, (word, bit) in enumerate(code_bits(fmt, reg, half, step)):
                        at = _word_index(fmt, lane, word) * 32 + bit
                        assert src[at] < 0, (fmt, lane, step, reg, half, b)
                        src[at], src_bit[at] = code, b
                        word_of[code, b], bit_of[code, b] = _word_index(fmt, lane, word), bit
    assert bool((src >= 0).all()), f"{fmt}: a bit of the fragment words holds no code"
    return src, src_bit, word_of, bit_of


def fragment_format(kind: str, rbits: int, group: int) -> str | None:
    """The fragment format of a runtime weight (``kind`` "affine"/"codebook", runtime code width,
    group size, 0 for one group a row), or ``None`` where this layout cannot hold it."""
    if group % GROUP:  # 0 (per row) passes
        return None
    if kind == "affine" and rbits in (3, 4):
        return "int3" if rbits == 3 else "int4"
    if kind == "codebook" and rbits == 4:
        return "nf4"
    return None


def pack(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Codes ``[N, K]`` (uint8, below ``2 ** CODE_BITS[fmt]``) -> fragment words int32 ``[NB, KG,
    WPG]`` on the codes' device, padded with zero codes."""
    if fmt not in FORMATS:
        raise ValueError(f"fragment.pack: format {fmt!r} is not one of {FORMATS}")
    if codes.dim() != 2:
        raise ValueError(f"fragment.pack: codes must be 2-D [N, K], got shape {list(codes.shape)}")
    n, k = codes.shape
    top = int(codes.max()) if codes.numel() else 0
    if top >= 1 << CODE_BITS[fmt]:
        raise ValueError(f"fragment.pack: {fmt} codes reach {top}, {CODE_BITS[fmt]} bits hold 0..{(1 << CODE_BITS[fmt]) - 1}")
    nb, kg = -(-n // ROWS), -(-k // GROUP)
    padded = torch.zeros(nb * ROWS, kg * GROUP, dtype=torch.uint8, device=codes.device)
    padded[:n, :k] = codes
    blocks = padded.view(nb, ROWS, kg, GROUP).permute(0, 2, 1, 3).reshape(nb, kg, ROWS * GROUP)
    src, src_bit, _, _ = (t.to(codes.device) for t in _tables(fmt))
    wpg = WORDS_PER_GROUP[fmt]
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    out = torch.empty(nb, kg, wpg, dtype=torch.int32, device=codes.device)
    chunk = max(1, (1 << 24) // max(1, kg * wpg * 32))  # row blocks at a time: ~16 MB of bits
    for r0 in range(0, nb, chunk):
        part = blocks[r0:r0 + chunk]
        bits = (part[:, :, src] >> src_bit) & 1  # [c, KG, WPG * 32], word-major
        byte = (bits.view(part.shape[0], kg, wpg * 4, 8) << shifts).sum(-1).to(torch.uint8)
        out[r0:r0 + chunk] = byte.view(part.shape[0], kg, wpg * 4).view(torch.int32)  # little-endian bytes
    return out


def unpack(words: torch.Tensor, n: int, k: int, fmt: str) -> torch.Tensor:
    """Fragment words ``[NB, KG, WPG]`` -> codes uint8 ``[N, K]`` (the inverse of :func:`pack`)."""
    nb, kg, wpg = words.shape
    if wpg != WORDS_PER_GROUP[fmt] or nb * ROWS < n or kg * GROUP < k:
        raise ValueError(f"fragment.unpack: words {list(words.shape)} do not hold a {fmt} weight of {n}x{k}")
    _, _, word_of, bit_of = (t.to(words.device) for t in _tables(fmt))
    codes = torch.zeros(nb, kg, ROWS * GROUP, dtype=torch.int32, device=words.device)
    for b in range(CODE_BITS[fmt]):
        codes |= ((words[:, :, word_of[:, b]] >> bit_of[:, b]) & 1) << b
    codes = codes.view(nb, kg, ROWS, GROUP).permute(0, 2, 1, 3).reshape(nb * ROWS, kg * GROUP)
    return codes[:n, :k].to(torch.uint8)


def to_order(words: torch.Tensor, order: str) -> torch.Tensor:
    """Block-major words ``[NB, KG, WPG]`` (:func:`pack`) in ``order`` (:data:`ORDERS`)."""
    if order not in ORDERS:
        raise ValueError(f"fragment word order {order!r} is not one of {ORDERS}")
    return words if order == "block" else words.permute(1, 0, 2).contiguous()


def from_order(words: torch.Tensor, order: str) -> torch.Tensor:
    """Words in ``order`` back to block-major ``[NB, KG, WPG]``: the inverse of :func:`to_order`,
    which is its own (swapping the first two dimensions twice changes nothing)."""
    return to_order(words, order)


__all__ = ["pack", "unpack", "to_order", "from_order", "ORDERS", "fragment_format", "fragment_position", "physical_k", "code_bits", "FORMATS",
           "WORDS_PER_GROUP", "GROUP", "ROWS"]
