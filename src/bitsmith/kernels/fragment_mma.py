"""Kernels for the fragment runtime layout (:mod:`bitsmith.kernels.fragment`): int4, int3 and
16-level codebook weights times float16 / bfloat16 activations.

* ``_frag_kernel`` (M = 1..16, Gluon: Triton's explicit-layout language, so the words' registers
  *are* the tensor-core operand, ``convert_layout(..., assert_trivial=True)`` proves it at compile
  time): a program owns ``16 W RB`` rows (warp ``w``, ``RB`` row blocks each) and a slice of the
  groups (split-K). Per group a lane loads its words (one 16-byte load, int3 three 4-byte loads),
  turns them into the A operand (:func:`cvt4_ptx`, :func:`cvt3_ptx`, or the byte-plane lookup
  :func:`bitsmith.kernels.small_m._lut8_ptx` for codebooks), loads its 16 activations per token
  as 32 contiguous bytes (the B operand, shared by the warps), and issues ``mma.m16n8k16``;
  affine groups take their activation sums from a product with a tile of ones, so there is no
  input preparation launch::

      y[m, n] = sum_g s[g, n] * (sum_k x[m, k] (MAGIC + q[n, k]) - (z[g, n] + MAGIC) sum_k x[m, k])

  Split-K is reduced inside the launch as the small-M kernels do it (:mod:`bitsmith.kernels.small_m`:
  float32 partials, a ticket per tile, the last program sums in split order, adds the bias,
  writes ``y`` and resets the counter), or, with the 16-token tile where the tuner picks it
  (:data:`SUM_AFTER`), by a second launch (``_sum_partials_kernel``) that adds the partials in
  the same order; on Hopper, opt-in, inside a thread-block cluster (:data:`CLUSTER`).
* ``_dequant_kernel`` (Triton, any M): ``W^T`` in the activation dtype, for cuBLAS when M is large
  (the ``rows`` layout does the same there, :func:`bitsmith.kernels.qmm.dequantize_t`). Its
  decoder (:func:`fragment_codes`, :func:`fragment_values`) is also the main loop's of the GEMM
  for 17..512 rows, :mod:`bitsmith.kernels.fragment_gemm`.

Status (issue #8): the CUDA tests pass on an H100 and an H200 (benchmarks/results/
fragment_gpu_tests_h100.txt, fragment_gpu_tests_v2_h200.txt), compute-sanitizer finds no errors
(sanitizer_fragment_h100.txt). Tuned on the H100 it beat the rows layout at M = 16 on every
measured shape and format, for int3 and NF4 at M = 1 and in the compiled decode step, and matched
it at M = 2048 but on 28672x8192 (kernels_layout{0,1}{,_m2048}_h100.json); with its 32- and
64-token tiles (:data:`WIDE`, on by default) and the Hopper kernel it leads up to 32 tokens for
int4 too (kernels_wide_layout_{all,0}_h100.json), so :func:`bitsmith.kernels.layout.repack`
builds it for the formats ``BITSMITH_FRAGMENT`` names, int4, int3 and NF4 when it is unset
(:data:`bitsmith.kernels.layout.DEFAULT_FRAGMENT_FORMATS`). Its launches carry a register cap
(:data:`MAXNREG`, :data:`MAXNREG_WIDE`). Launching it as a programmatic dependent (:data:`PDL`)
passed the GPU tests but bought nothing measurable in the decode step, so it stays opt-in.
"""
from __future__ import annotations

import os

import torch

from . import fragment
from .layout import RuntimeWeight

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
    HAVE_TRITON = False

try:  # grid dependency control (Triton 3.3+): programmatic dependent launch
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # pragma: no cover - depends on the environment
    gdc_wait = None

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the environment
    gluon = gl = mma_v2 = None
    HAVE_GLUON = False

# 16-bit float bit pattern and value of MAGIC (``MAGIC + q`` is ``MAGIC_BITS | q``, exact for q < 128)
MAGIC = {torch.float16: (0x6400, 1024.0), torch.bfloat16: (0x4300, 128.0)}
FMT_IDS = {fmt: i for i, fmt in enumerate(fragment.FORMATS)}  # the kernels' FMT constexpr
MAX_PARTIALS = 256  # split-K x M per output column: the workspace reserved per weight (reserve_workspace)
#: ``_frag_kernel``'s register cap (``maxnreg``) by row blocks a warp (a config's own ``maxnreg``
#: overrides it, 0: none). Without a cap ptxas keeps the kernel at 38-96 registers by issuing the
#: words prefetched for the next group at the end of the current group's math, so the prefetch
#: hides no latency; capped it issues them at the start (benchmarks/results/kernels_regcap_sass.json).
#: On the H100 the best config capped at 128 beat the best uncapped one in 22 of 24 cases (M = 1
#: and 16, int4/int3/NF4 g64, four shapes; up to 9.6% faster, at worst 2.4% slower:
#: kernels_regcap_m1_h100.json, kernels_oneshot_h100.json). Four row blocks spill at 128 with 16
#: tokens, so they get 192 (no local memory in any config, tests/test_fragment.py).
MAXNREG = {1: 128, 2: 128, 4: 192}
DEQUANT_ROW_BLOCKS = 8  # row blocks a program of the dequantization kernel
#: whether the fragment kernel launches as a programmatic dependent where
#: :func:`bitsmith.kernels.small_m.pdl_ok` allows it (the rows layout's small-M kernels do; PDL was
#: worth 2-10% of the compiled decode step there). On the H100 it passes the CUDA tests and
#: compute-sanitizer (fragment_gpu_tests_frag_pdl_h100.txt, sanitizer_frag_pdl_h100.txt) and saves
#: 1-2% on eight stacked layers' linears (kernels_chain_frag_pdl_h100.json), but in the compiled
#: decode step int4 took 3.17 ms with it and 3.18 without, int3 3.31 and 3.24
#: (decode_e2e_b1_frag_{pdl,nopdl}_group_h100.json), so it stays opt-in: ``BITSMITH_FRAGMENT_PDL=1``.
PDL = {"enabled": os.environ.get("BITSMITH_FRAGMENT_PDL", "") == "1"}


def int_list(name: str, setting: str | None, allowed: tuple[int, ...], default: tuple[int, ...]) -> tuple[int, ...]:
    """A comma list of integers from the environment variable ``name`` (``setting``; unset or
    empty: ``default``), each one of ``allowed``. Raises ``ValueError`` naming the variable."""
    if setting is None or not setting.strip():
        return default
    try:
        values = tuple(int(v) for v in setting.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or set(values) - set(allowed):
        raise ValueError(f"{name}={setting!r}: expected a comma list of {', '.join(map(str, allowed))}")
    return values


#: whether ``_frag_kernel``'s tuner also weighs split-K reduced inside thread-block clusters
#: (Hopper and later: the K splits of a tile are one cluster, the partials meet in rank 0's shared
#: memory; :func:`_write_tile_cluster`). Opt-in (``BITSMITH_FRAGMENT_CLUSTER=1``): on the H100 the
#: CUDA tests pass, but against the same config through the global workspace a cluster was a
#: median 1.4-1.9% faster at 2 and 4 splits and M = 1, no faster at 8, and at M = 16 and 8 splits
#: 1.2-1.9x slower; the best cluster config beat the best workspace one in 4 of 16 cases, by
#: 1.0-2.3% (kernels_configs_cluster_h100.txt), which does not pay for the tuner's extra compiles.
CLUSTER = {"enabled": os.environ.get("BITSMITH_FRAGMENT_CLUSTER", "") == "1"}
#: whether the tuner also weighs ``_frag_kernel`` at 9-16 tokens with its K splits only storing
#: their partials and a second kernel adding them up (:func:`_sum_partials_kernel`, a programmatic
#: dependent where PDL is on) instead of the ticket and the last program's sum: the pattern probe
#: timed that ending 1.5-6.7 us faster at M = 16 (nothing at M = 1:
#: fragment_pattern_probe_ending_h100.txt); on the H100 the CUDA tests pass (the sums bit for bit
#: the ticket's) and against the same config it is a median 0.5, 2.0, 5.3 and 10.2% faster at 2,
#: 4, 8 and 16 splits (M = 16, int4 g64 and NF4, four shapes); the tuner took it in 7 of 8 cases,
#: 0.9-5% ahead of the best ticket config (kernels_configs_sum_after_h100.txt).
#: ``BITSMITH_FRAGMENT_SUM_KERNEL=0`` turns it off;
#: ``"tokens"``: the token tiles it is offered with (``BITSMITH_FRAGMENT_SUM_TOKENS``, default 16).
SUM_AFTER = {"enabled": os.environ.get("BITSMITH_FRAGMENT_SUM_KERNEL", "") != "0",
             "tokens": int_list("BITSMITH_FRAGMENT_SUM_TOKENS", os.environ.get("BITSMITH_FRAGMENT_SUM_TOKENS"),
                                (16, 32, 64), (16,))}
#: how ``_frag_kernel``'s tuner may apply a group's zero and scale (:func:`_add_group`'s ``ZSUB``):
#: 0 in float32 after the product (the zero through a product with a tile of ones), 1 the
#: integer zero taken off the A operand in 16 bits before it (exact), 2 the scale applied there
#: too, rounded once like the reference's dequantization, the tensor cores accumulating across
#: groups. Compiled for sm_90 (int4 g64, instructions a group of the main loop / HMMA): at 8
#: tokens two row blocks 158/12, 172/8, 192/8; at 16 tokens 195/24, 208/16, 217/16; at 32 tokens
#: one row block 170/32, 145/16, 143/16; at 64 tokens 271/64, 213/32, 193/32 (NF4 has no zero: 2
#: only). On the H100 (kernels_configs_zsub_h100.txt, kernels_configs_sixteenths0_h100.txt, two
#: runs on one machine): the best M = 16 int4 g64 config 28.7 -> 26.9 us on 14336x4096 and
#: 75.6 -> 66.2 us on 28672x8192 (ZSUB 1, split-K summed by the second kernel), level on
#: 4096x14336 (29.4 / 29.6, the latter in sixteenths); NF4's best stayed ZSUB 0. The library's tuner, offered all three, took 1 or 2 for int4 and int3 in 10 of 12 cases
#: at M = 16 (kernels_defaults_zsub_h100.txt) and for int4 at M = 1 (24.3 -> 22.3 us on 14336x4096:
#: kernels_m1_zsub_h100.txt). ``BITSMITH_FRAGMENT_ZSUB``: the modes offered, comma-separated
#: (default ``0,1,2``; ``0`` alone is the float32 path only, as before).
ZSUB = {"modes": int_list("BITSMITH_FRAGMENT_ZSUB", os.environ.get("BITSMITH_FRAGMENT_ZSUB"), (0, 1, 2), (0, 1, 2))}
#: whether int4's conversion leaves the codes of rows ``g + 8`` in place, ``MAGIC + 16 q``, where
#: the zero comes off in 16 bits (:data:`ZSUB` 1 and 2, the wgmma kernel; float16 activations,
#: integer zeros): the fused multiply-add that takes the zero off divides by 16 too, and a word's
#: conversion takes one shift instead of three (:func:`cvt4_ptx`, :func:`dequant_math`).
#: Exact: on the H100 its CUDA test gives the same bits as the shifted codes in every ZSUB and
#: wgmma config (zsub_gpu_tests_h100.txt). But it is slower where it matters: against the same
#: configs the median is level (0.997-0.999), and the fastest configs lose 2-32% (14336x4096 M = 16
#: ZSUB 1 rb4 split8 26.9 -> 32.8 us, 28672x8192 66.2 -> 87.3 us: kernels_configs_sixteenths{0,1}_h100.txt),
#: so it stays off (``BITSMITH_FRAGMENT_SIXTEENTHS=1`` turns it on).
SIXTEENTHS = {"enabled": os.environ.get("BITSMITH_FRAGMENT_SIXTEENTHS", "") == "1"}
#: the most shared memory a cluster config's partial slots take (``split`` slots of the tile, float32)
CLUSTER_SLOTS_BYTES = 32 * 1024


#: whether ``_frag_kernel`` also takes 17..64 tokens (``TOK`` 32 and 64: :func:`tokens`; on unless
#: ``BITSMITH_FRAGMENT_WIDE=0``). Compiled for sm_90 these configs keep the main loop free of shared
#: memory and spills under the caps of :data:`MAXNREG_WIDE` (tests/test_fragment.py). On the H100
#: their CUDA tests pass, compute-sanitizer finds no error (fragment_wide_gpu_tests_h100.txt,
#: sanitizer_wide_h100.txt), and the tuner picked them at M = 32 for int4 and NF4 on 14336x4096 and
#: 28672x8192, where they beat the fragment GEMM (kernels_wide_layout_all_h100.json).
WIDE = {"enabled": os.environ.get("BITSMITH_FRAGMENT_WIDE", "") != "0"}
#: register caps of the wide configs by (row blocks a warp, tokens): the largest combinations
#: that compile without spills (two row blocks at 64 tokens spill even at 255)
MAXNREG_WIDE = {(1, 32): 128, (2, 32): 192, (1, 64): 192}


def max_m() -> int:
    """The most tokens ``_frag_kernel`` takes: 64 with :data:`WIDE` on (the default), else 16."""
    return 64 if WIDE["enabled"] else 16


def tokens(m: int) -> int:
    """The kernel's token tile ``TOK`` (the B operand's width) for ``m`` tokens."""
    return 8 if m <= 8 else 16 if m <= 16 else 32 if m <= 32 else 64


def register_cap(cfg: dict, tok: int = 16) -> int:
    """The register cap a launch of ``cfg`` at token tile ``tok`` compiles with (0: none, ptxas chooses)."""
    if "maxnreg" in cfg:
        return cfg["maxnreg"]
    return MAXNREG_WIDE[(cfg["RB"], tok)] if tok > 16 else MAXNREG.get(cfg["RB"], 0)


def cvt4_ptx(magic_bits: int, sixteenths: bool = False) -> str:
    """int4 fragment word -> its product's four A registers, each whole: ``$r`` holds register
    ``r``'s halves ``magic + q`` (codes at bits ``4 r`` and ``16 + 4 r``, so a shift, none for ``r
    = 0``, and one LOP3 ``(a & b) | c`` make it). Operands as Triton numbers them with ``pack=2``
    (two elements a call: every input twice): the word in ``$4`` (and ``$5``).
    ``sixteenths`` (float16 only, :data:`SIXTEENTHS`): the odd registers (rows ``g + 8`` of the
    product) keep their codes where they are, at bits 4..7 of each half: ``magic + 16 q``, exact in
    float16's ten mantissa bits; the caller's fused multiply-add by ``1/16`` takes that factor off.
    One shift a word instead of three."""
    magic = f"{magic_bits * 0x10001:#010x}"
    lines = ["{", ".reg .b32 t;", f"lop3.b32 $0, $4, 0x000F000F, {magic}, 0xea;"]
    if sixteenths:
        lines += [f"lop3.b32 $1, $4, 0x00F000F0, {magic}, 0xea;", "shr.b32 t, $4, 8;",
                  f"lop3.b32 $2, t, 0x000F000F, {magic}, 0xea;", f"lop3.b32 $3, t, 0x00F000F0, {magic}, 0xea;"]
        return "\n".join(lines + ["}"])
    for r in (1, 2, 3):
        lines += [f"shr.b32 t, $4, {4 * r};", f"lop3.b32 ${r}, t, 0x000F000F, {magic}, 0xea;"]
    return "\n".join(lines + ["}"])


def cvt3_ptx(magic_bits: int) -> str:
    """A lane's three int3 fragment words -> the 16 A registers of a group's four products, each
    whole (``$i`` holds register ``i = 4 s + r``'s halves ``magic + q``): a shift and a LOP3 per
    register of a word's five slots; register 15 gathers its bits from the top of each word (bit
    ``15 + 16 h`` of word ``b`` is its code bit ``b``). ``pack=2`` operands: word ``b`` in ``$16 +
    2 b``."""
    magic = f"{magic_bits * 0x10001:#010x}"
    word = [f"${16 + 2 * b}" for b in range(fragment.INT3_WORDS)]
    lines = ["{", ".reg .b32 t;"]
    for i in range(15):
        w, slot = divmod(i, 5)
        src = word[w]
        if slot:
            lines.append(f"shr.b32 t, {src}, {3 * slot};")
            src = "t"
        lines.append(f"lop3.b32 ${i}, {src}, 0x00070007, {magic}, 0xea;")
    for b in range(3):
        lines.append(f"shr.b32 t, {word[b]}, {15 - b};")
        lines.append(f"lop3.b32 $15, t, {(1 << b) * 0x10001:#010x}, {magic if b == 0 else '$15'}, 0xea;")
    return "\n".join(lines + ["}"])


def lut8_ptx() -> str:
    """A codebook fragment word (register ``r``'s two codes in byte ``r``) -> the 16-bit levels
    of its product's A registers, whole (``$r``), through the byte planes: the M = 1 kernel's
    lookup (:func:`bitsmith.kernels.small_m._lut8_ptx`), ``pack=2`` operands."""
    from .small_m import _lut8_ptx

    return _lut8_ptx(pairs=True)


def table_planes(rw: RuntimeWeight, dtype: torch.dtype) -> list[int]:
    """The codebook's levels in ``dtype`` as :func:`lut8_ptx`'s eight byte planes (signed int32),
    computed on the host: what the kernels' ``_table_planes`` builds from ``rw.table`` on the GPU,
    and the planes the PTX emulation tests feed the lookups; eight zeros for an affine weight."""
    if rw.kind != "codebook":
        return [0] * 8
    from .small_m import byte_planes

    return [p - (1 << 32) if p >= 1 << 31 else p for p in byte_planes(rw.table_bits[dtype])]


if HAVE_GLUON:
    _CVT4_F16 = gl.constexpr(cvt4_ptx(MAGIC[torch.float16][0]))
    _CVT4_BF16 = gl.constexpr(cvt4_ptx(MAGIC[torch.bfloat16][0]))
    _CVT4_F16_SIXTEENTHS = gl.constexpr(cvt4_ptx(MAGIC[torch.float16][0], sixteenths=True))
    _CVT3_F16 = gl.constexpr(cvt3_ptx(MAGIC[torch.float16][0]))
    _CVT3_BF16 = gl.constexpr(cvt3_ptx(MAGIC[torch.bfloat16][0]))
    _LUT8 = gl.constexpr(lut8_ptx())
    _CVT3_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 16 + ["r"] * (2 * fragment.INT3_WORDS)))
    _LUT8_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 4 + ["r"] * 18))
    _INT3_WORDS = gl.constexpr(fragment.INT3_WORDS)

    #: rank ``r > 0`` of a cluster writes one float32 partial (``$1``) into slot ``r`` of rank 0's
    #: buffer (``$2``: its byte offset in the kernel's shared memory, which holds nothing else),
    #: where ``$3`` is nonzero; ``$0`` is a dummy result
    _PUSH_PTX = gl.constexpr("""{
    .reg .pred p;
    .reg .b32 a;
    setp.ne.b32 p, $3, 0;
    mov.u32 a, global_smem;
    add.u32 a, a, $2;
    mapa.shared::cluster.u32 a, a, 0;
    @p st.shared::cluster.f32 [a], $1;
    mov.u32 $0, 0;
    }""")
    #: every thread of the cluster: its shared-memory writes released, the others' acquired
    _CLUSTER_SYNC_PTX = gl.constexpr("barrier.cluster.arrive.release.aligned;\n"
                                     "barrier.cluster.wait.acquire.aligned; // dummy $0")

    @gluon.jit
    def _table_planes(t_ptr, FMT: gl.constexpr, BF16: gl.constexpr):
        """A codebook's 16 levels (float32 at ``t_ptr``) in the activation dtype as the eight byte
        planes the lookups take (``(L0, .., L3, H0, .., H3)``: byte ``i`` of ``L{b}`` (``H{b}``)
        the low (high) byte of level ``4 b + i``, as :func:`table_planes` builds them on the host),
        int32, in every thread; zeros for affine formats (``FMT != 1``). Built in the kernel
        rather than passed as arguments because ptxas keeps arguments, and loads it can prove
        uniform, in uniform registers, and a ``prmt`` takes at most one operand from those: it
        copied the other plane into a vector register before every lookup ``prmt`` (in the
        register-operand GEMM 32 of NF4's 199 instructions a step). Each lane loads one level and
        the planes come out of a cross-lane sum, which ptxas does not prove uniform, so they stay
        in vector registers across the loop."""
        if FMT != 1:
            return (0, 0, 0, 0, 0, 0, 0, 0)
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        idx = gl.arange(0, 16, layout=lay)
        bits = gl.load(t_ptr + idx).to(DT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        shift = (idx % 4) * 8
        bank = idx // 4
        lo = (bits & 0xFF) << shift
        hi = (bits >> 8) << shift
        return (gl.sum(gl.where(bank == 0, lo, 0), 0), gl.sum(gl.where(bank == 1, lo, 0), 0),
                gl.sum(gl.where(bank == 2, lo, 0), 0), gl.sum(gl.where(bank == 3, lo, 0), 0),
                gl.sum(gl.where(bank == 0, hi, 0), 0), gl.sum(gl.where(bank == 1, hi, 0), 0),
                gl.sum(gl.where(bank == 2, hi, 0), 0), gl.sum(gl.where(bank == 3, hi, 0), 0))

    @gluon.jit
    def _fragment_tile(o, W: gl.constexpr, RB: gl.constexpr, a_layout: gl.constexpr):
        """Four 16-bit tensors ``[RB, W, 32, 4, 2]`` (A register ``r`` of a lane's product ``s``,
        halves ``h`` last) -> the ``[16 W RB, 64]`` A operand: row ``16 (rb W + w) + 8 rr + g``
        (``r = rr + 2 rc``), logical ``k = 16 s + 8 rc + 2 t + h`` of lane ``4 g + t``."""
        a = gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3]))  # [RB, W, 32, s, h, rr, rc]
        a = gl.reshape(a, [RB, W, 8, 4, 4, 2, 2, 2])
        a = gl.permute(a, [0, 1, 6, 2, 4, 7, 3, 5])  # [RB, W, rr, g, s, rc, t, h]
        a = gl.reshape(a, [16 * W * RB, 64])
        return gl.convert_layout(a, a_layout, assert_trivial=True)

    @gluon.jit
    def _product3(o, s: gl.constexpr):
        """Product ``s``'s four registers of :func:`cvt3_ptx` (``[.., h]`` each) as ``[.., h, rr, rc]``."""
        return gl.join(gl.join(o[4 * s + 0], o[4 * s + 1]), gl.join(o[4 * s + 2], o[4 * s + 3]))

    @gluon.jit
    def _a_operand(words, planes, W: gl.constexpr, RB: gl.constexpr, a_layout: gl.constexpr,
                   FMT: gl.constexpr, BF16: gl.constexpr, SIXTEENTHS: gl.constexpr = False):
        """A lane's words of one group (``[RB, W, 32, 4]``; int3: the fourth unused) -> the A
        operand ``[16 W RB, 64]`` in the activation dtype (``BF16``: bfloat16, else float16):
        ``MAGIC + q``, or a codebook's levels. Each input is joined with itself (``[.., 2]``, the
        two halves of a register) and the assembly runs with ``pack=2``, so it writes every A
        register whole, with no 16-bit moves to pair the halves afterwards. ``SIXTEENTHS``
        (:data:`SIXTEENTHS`): rows ``g + 8`` of each 16 hold ``MAGIC + 16 q`` (int4, float16)."""
        if BF16:
            dts4: gl.constexpr = (gl.bfloat16,) * 4
            dts16: gl.constexpr = (gl.bfloat16,) * 16
            cvt3: gl.constexpr = _CVT3_BF16
            cvt4: gl.constexpr = _CVT4_BF16
        else:
            dts4: gl.constexpr = (gl.float16,) * 4
            dts16: gl.constexpr = (gl.float16,) * 16
            cvt3: gl.constexpr = _CVT3_F16
            cvt4: gl.constexpr = _CVT4_F16
        if FMT == 2:
            even, odd = gl.split(gl.reshape(words, [RB, W, 32, 2, 2]))  # word 2 a + b: split takes b
            w0, w2 = gl.split(even)
            w1, w3 = gl.split(odd)
            o = gl.inline_asm_elementwise(cvt3, _CVT3_CONSTRAINTS, [gl.join(w0, w0), gl.join(w1, w1), gl.join(w2, w2)],
                                          dtype=dts16, is_pure=True, pack=2)
            a = gl.join(gl.join(_product3(o, 0), _product3(o, 1)), gl.join(_product3(o, 2), _product3(o, 3)))
            a = gl.reshape(a, [RB, W, 8, 4, 2, 2, 2, 2, 2])  # [RB, W, g, t, h, rr, rc, s % 2, s // 2]
            a = gl.permute(a, [0, 1, 5, 2, 8, 7, 6, 3, 4])  # [RB, W, rr, g, s // 2, s % 2, rc, t, h]
            a = gl.reshape(a, [16 * W * RB, 64])
            return gl.convert_layout(a, a_layout, assert_trivial=True)
        elif FMT == 1:
            w2 = gl.join(words, words)
            o = gl.inline_asm_elementwise(_LUT8, _LUT8_CONSTRAINTS,
                                          [w2, gl.full(w2.shape, planes[0], gl.int32, w2.type.layout),
                                           gl.full(w2.shape, planes[1], gl.int32, w2.type.layout),
                                           gl.full(w2.shape, planes[2], gl.int32, w2.type.layout),
                                           gl.full(w2.shape, planes[3], gl.int32, w2.type.layout),
                                           gl.full(w2.shape, planes[4], gl.int32, w2.type.layout),
                                           gl.full(w2.shape, planes[5], gl.int32, w2.type.layout),
                                           gl.full(w2.shape, planes[6], gl.int32, w2.type.layout),
                                           gl.full(w2.shape, planes[7], gl.int32, w2.type.layout)],
                                          dtype=dts4, is_pure=True, pack=2)
            return _fragment_tile(o, W, RB, a_layout)
        else:
            o = gl.inline_asm_elementwise(_CVT4_F16_SIXTEENTHS if SIXTEENTHS else cvt4, "=r,=r,=r,=r,r,r",
                                          [gl.join(words, words)], dtype=dts4, is_pure=True, pack=2)
            return _fragment_tile(o, W, RB, a_layout)

    @gluon.jit
    def _b_operand(x_ptr, g, M, K, stride_xm, W: gl.constexpr, TOK: gl.constexpr, b_layout: gl.constexpr,
                   TAIL: gl.constexpr):
        """Group ``g``'s activations as the ``[64, TOK]`` B operand: lane ``4 g' + t`` loads the 16
        contiguous channels ``16 t ..`` of token ``g'`` (and ``g' + 8``), exactly its fragment
        (:func:`bitsmith.kernels.fragment.physical_k`); the warps load the same (broadcast).
        Tokens past ``M`` and (``TAIL``) channels past ``K`` read 0."""
        x_layout: gl.constexpr = gl.BlockedLayout([1, 1, 16], [8, 4, 1], [1, 1, W], [2, 1, 0])
        otok = gl.arange(0, TOK, layout=gl.SliceLayout(1, gl.SliceLayout(2, x_layout)))
        ot = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_layout)))
        oj = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_layout)))
        chan = (g * 64 + ot * 16)[None, :, None] + oj[None, None, :]
        if TAIL:
            x_mask = (otok < M)[:, None, None] & (chan < K)
        else:
            x_mask = (otok < M)[:, None, None] & (chan >= 0)
        xv = gl.load(x_ptr + otok[:, None, None] * stride_xm + chan, mask=x_mask, other=0.0)
        b = gl.reshape(xv, [TOK, 4, 4, 2, 2])  # [token, t, s, rc, h]
        b = gl.permute(b, [2, 3, 1, 4, 0])  # [s, rc, t, h, token]
        b = gl.reshape(b, [64, TOK])
        return gl.convert_layout(b, b_layout, assert_trivial=True)

    @gluon.jit
    def _group_meta(s_ptr, z_ptr, g, N, rows, row_ok, zconst, SG: gl.constexpr, FMT: gl.constexpr,
                    HAS_ZERO: gl.constexpr, MAGIC_F: gl.constexpr, MASKED: gl.constexpr):
        """Group ``g``'s scales and (affine) zeros plus the magic of the tile's ``rows``, float32.
        ``MASKED``: rows past ``N`` (``row_ok``) read zeros; else every load is in bounds and
        unmasked. A codebook's second value is its scales again (it has no zeros)."""
        if SG == 0:
            s_off = rows
        else:
            s_off = (g // SG) * N + rows
        if MASKED:
            sc = gl.load(s_ptr + s_off, mask=row_ok, other=0.0).to(gl.float32)
        else:
            sc = gl.load(s_ptr + s_off).to(gl.float32)
        if FMT == 1:
            zc = sc
        elif HAS_ZERO:
            if MASKED:
                zc = gl.load(z_ptr + s_off, mask=row_ok, other=0.0).to(gl.float32) + MAGIC_F
            else:
                zc = gl.load(z_ptr + s_off).to(gl.float32) + MAGIC_F
        else:
            zc = gl.full(rows.shape, 0.0, gl.float32, layout=rows.type.layout) + (zconst + MAGIC_F)
        return sc, zc

    @gluon.jit
    def _word_offsets(pid_n, NB, NG, W: gl.constexpr, RB: gl.constexpr, FMT: gl.constexpr, TAIL: gl.constexpr,
                      GROUP_MAJOR: gl.constexpr):
        """``(offsets, mask, group stride)`` of row tile ``pid_n``'s words in group 0, ``[RB, W,
        32, 4]`` (row block ``rb W + w`` of the tile in warp ``w``, a lane's four words; int3's
        fourth masked off), for words in either order (:func:`bitsmith.kernels.fragment.to_order`)."""
        WPG: gl.constexpr = 32 * _INT3_WORDS if FMT == 2 else 128
        w_layout: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 1, 32, 1], [1, W, 1, 1], [3, 2, 1, 0])
        orb = gl.arange(0, RB, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, w_layout))))
        ow = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, w_layout))))
        ol = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, w_layout))))
        os_ = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, w_layout))))
        rblock = pid_n * (W * RB) + orb[:, None] * W + ow[None, :]
        if GROUP_MAJOR:  # words [NG, NB, WPG]: a group's row blocks contiguous
            rb_stride = WPG
            g_stride = NB * WPG
        else:  # [NB, NG, WPG]: a row block's groups contiguous
            rb_stride = NG * WPG
            g_stride = WPG
        if FMT == 2:  # [.., lane, word]: words of the 32 lanes contiguous
            blk = rblock[:, :, None, None] * rb_stride + ol[None, None, :, None] + os_[None, None, None, :] * 32
            w_mask = (os_ < _INT3_WORDS)[None, None, None, :] & (blk >= 0)
            if TAIL:
                w_mask = w_mask & (rblock < NB)[:, :, None, None]
        else:  # [.., lane, product]: one 16-byte load a lane
            blk = rblock[:, :, None, None] * rb_stride + ol[None, None, :, None] * 4 + os_[None, None, None, :]
            w_mask = (rblock < NB)[:, :, None, None] & (blk >= 0)
        return blk, w_mask, g_stride

    @gluon.jit
    def _write_tile(acc, ws_ptr, cnt_ptr, b_ptr, out_ptr, rows, row_ok, toks, tile, pid_k, M, N, SPLIT,
                    IS_SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr, VALS: gl.constexpr, SUM_AFTER: gl.constexpr = False):
        """``acc`` (float32 ``[rows, toks]``) plus the bias to ``out`` (``[M, N]``); split-K as the
        small-M kernels do it (:mod:`bitsmith.kernels.small_m`): the partials go to the workspace,
        the last program of tile ``tile`` (by its ticket) adds them in split order, adds the bias,
        writes ``out`` and resets the ticket. ``VALS``: twice the values a thread holds.
        ``SUM_AFTER``: the partials go to the workspace and nothing else happens here (no fence, no
        ticket): :func:`_sum_partials_kernel`, launched next, adds them up."""
        DT: gl.constexpr = out_ptr.dtype.element_ty
        o_off = toks[None, :] * N + rows[:, None]
        o_mask = (toks < M)[None, :] & row_ok[:, None]
        if IS_SPLIT and SUM_AFTER:
            gl.store(ws_ptr + pid_k * M * N + o_off, acc, mask=o_mask)
        elif IS_SPLIT:
            gl.store(ws_ptr + pid_k * M * N + o_off, acc, mask=o_mask)
            gl.thread_barrier()  # every thread's partials are written before the ticket is taken
            ticket = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if ticket == SPLIT - 1:
                gl.thread_barrier()
                tot = gl.zeros_like(acc)
                # U partials loaded at a time, added in split order (small_m._finish): at most 32
                # values a thread in flight (a thread holds VALS / 2 of the tile)
                U: gl.constexpr = max(1, min(8, 64 // VALS))
                for i0 in range(0, SPLIT, U):
                    for j in gl.static_range(U):
                        tot += gl.load(ws_ptr + (i0 + j) * M * N + o_off, mask=o_mask & (i0 + j < SPLIT), other=0.0,
                                       cache_modifier=".cg")
                if HAS_BIAS:
                    tot += gl.load(b_ptr + rows, mask=row_ok, other=0.0).to(gl.float32)[:, None]
                gl.store(out_ptr + o_off, tot.to(DT), mask=o_mask)
                gl.atomic_xchg(cnt_ptr + tile, 0)
        else:
            if HAS_BIAS:
                acc += gl.load(b_ptr + rows, mask=row_ok, other=0.0).to(gl.float32)[:, None]
            gl.store(out_ptr + o_off, acc.to(DT), mask=o_mask)

    @gluon.jit
    def _write_tile_cluster(acc, b_ptr, out_ptr, rows, row_ok, toks, rank, M, N, C: gl.constexpr,
                            HAS_BIAS: gl.constexpr):
        """``acc`` (float32 ``[rows, toks]``, the K split of rank ``rank`` of a ``C``-CTA cluster)
        summed over the cluster plus the bias to ``out`` (``[M, N]``) without a global round trip:
        ranks ``1 ..`` write their partials into rank 0's shared memory (distributed shared
        memory, a slot each), one cluster barrier releases them, and rank 0 adds them to its own
        in rank order and stores the tile (the global workspace's order, so the sums are the same)."""
        DT: gl.constexpr = out_ptr.dtype.element_ty
        BN: gl.constexpr = acc.shape[0]
        TOK: gl.constexpr = acc.shape[1]
        mma: gl.constexpr = acc.type.layout
        slots = gl.allocate_shared_memory(gl.float32, [C * BN, TOK],  # rank r's slot: rows r BN .. (0 unused)
                                          gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        local = gl.arange(0, BN, layout=gl.SliceLayout(1, mma))[:, None] * TOK + toks[None, :]
        o_mask = (toks < M)[None, :] & row_ok[:, None]
        push = o_mask & (rank > 0)
        gl.inline_asm_elementwise(_PUSH_PTX, "=r,f,r,r", [acc, (local + rank * (BN * TOK)) * 4,
                                                           push.to(gl.int32)], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise(_CLUSTER_SYNC_PTX, "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        if rank == 0:
            tot = acc
            for r in gl.static_range(1, C):
                tot += slots.slice(r * BN, BN).load(mma)
            if HAS_BIAS:
                tot += gl.load(b_ptr + rows, mask=row_ok, other=0.0).to(gl.float32)[:, None]
            gl.store(out_ptr + toks[None, :] * N + rows[:, None], tot.to(DT), mask=o_mask)

    @gluon.jit
    def dequant_math(a, sc, zc, FMT: gl.constexpr, INT_ZERO: gl.constexpr, BF16: gl.constexpr,
                     SCALE: gl.constexpr = True, rows=None, SIXTEENTHS: gl.constexpr = False):
        """``MAGIC + q`` (or a codebook's levels) ``a [n, 64]`` -> the weights, with a row's float32
        scale ``sc`` and zero ``zc`` (plus the magic where ``INT_ZERO``): exact subtractions, then
        one rounded product (the register-operand GEMM's, the wgmma kernel's and, with :data:`ZSUB`,
        ``_frag_kernel``'s dequantization). ``SCALE`` off: ``q - zero`` only (affine), the scale
        left to the caller. ``SIXTEENTHS`` (int4, float16, integer zeros; :data:`SIXTEENTHS`): the
        ``rows`` ``g + 8`` of each 16 come as ``MAGIC + 16 q``, and one fused multiply-add per
        register, ``a / 16 - (MAGIC / 16 + zero)`` there and ``a - (MAGIC + zero)`` in the other
        rows, takes the zero off: exact, as the subtraction is."""
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        MAGIC_F: gl.constexpr = 128.0 if BF16 else 1024.0
        if FMT == 1:
            return a * sc.to(DT)[:, None] if SCALE else a
        if SIXTEENTHS:
            high = (rows % 16) >= 8
            zero16 = zc.to(DT) - gl.where(high, MAGIC_F - MAGIC_F / 16, 0.0).to(DT)  # exact: integers
            q = gl.fma(a, gl.where(high, 1.0 / 16, 1.0).to(DT)[:, None], -zero16[:, None])
        elif INT_ZERO:  # (MAGIC + q) - (MAGIC + zero): exact
            q = a - zc.to(DT)[:, None]
        else:
            q = (a - MAGIC_F) - zc.to(DT)[:, None]
        return q * sc.to(DT)[:, None] if SCALE else q

    @gluon.jit
    def _add_group(acc, cur, ones, x_ptr, s_ptr, z_ptr, g, M, N, K, stride_xm, rows, row_ok, zconst, planes,
                   W: gl.constexpr, RB: gl.constexpr, TOK: gl.constexpr, SG: gl.constexpr, FMT: gl.constexpr,
                   HAS_ZERO: gl.constexpr, TAIL: gl.constexpr, BF16: gl.constexpr, ZSUB: gl.constexpr,
                   INT_ZERO: gl.constexpr, SIXTEENTHS: gl.constexpr):
        """``acc`` plus group ``g``'s products of a tile's words ``cur`` (module docstring): the A
        operand, the activations as B, the scales and zeros; ``ones``: the A tile of ones whose
        product with B gives every row the group's sum of the activations (affine formats).
        ``ZSUB`` (:data:`ZSUB`) 1: the zero is taken off the A operand in 16 bits instead (no
        product with the ones, no zero term); 2: the scale too (:func:`dequant_math`), and the
        tensor cores accumulate across groups. ``SIXTEENTHS``: the conversion and subtraction of
        :func:`dequant_math` (with ``ZSUB`` only)."""
        MAGIC_F: gl.constexpr = 128.0 if BF16 else 1024.0
        mma: gl.constexpr = acc.type.layout
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        a = _a_operand(cur, planes, W, RB, a_layout, FMT, BF16, SIXTEENTHS)
        b = _b_operand(x_ptr, g, M, K, stride_xm, W, TOK, b_layout, TAIL)
        sc, zc = _group_meta(s_ptr, z_ptr, g, N, rows, row_ok, zconst, SG, FMT, HAS_ZERO,
                             MAGIC_F if INT_ZERO or ZSUB == 0 else 0.0, TAIL)
        if ZSUB > 0:
            row_a: gl.constexpr = gl.SliceLayout(1, a_layout)
            a = dequant_math(a, gl.convert_layout(sc, row_a, assert_trivial=True),
                             gl.convert_layout(zc, row_a, assert_trivial=True), FMT, INT_ZERO, BF16, ZSUB == 2,
                             gl.convert_layout(rows, row_a, assert_trivial=True), SIXTEENTHS)
            if ZSUB == 2:
                acc = mma_v2(a, b, acc)
            else:
                acc += mma_v2(a, b, gl.zeros(acc.shape, gl.float32, layout=mma)) * sc[:, None]
            return acc
        part = mma_v2(a, b, gl.zeros(acc.shape, gl.float32, layout=mma))
        if FMT == 1:
            acc += part * sc[:, None]
        else:
            xs = mma_v2(ones, b, gl.zeros(acc.shape, gl.float32, layout=mma))  # every row: the group's sum of x
            acc += (part - zc[:, None] * xs) * sc[:, None]
        return acc

    @gluon.jit
    def _frag_kernel(x_ptr, w_ptr, ws_ptr, s_ptr, z_ptr, cnt_ptr, b_ptr, out_ptr, t_ptr,
                     M, N, K, NB, NG, G_PER, SPLIT, zconst, stride_xm,
                     W: gl.constexpr, RB: gl.constexpr, TOK: gl.constexpr, PREFETCH: gl.constexpr,
                     IS_SPLIT: gl.constexpr, SG: gl.constexpr, FMT: gl.constexpr, HAS_ZERO: gl.constexpr,
                     HAS_BIAS: gl.constexpr, TAIL: gl.constexpr, BF16: gl.constexpr, PDL: gl.constexpr,
                     GROUP_MAJOR: gl.constexpr, CLUSTER: gl.constexpr, SUM_AFTER: gl.constexpr,
                     ZSUB: gl.constexpr, INT_ZERO: gl.constexpr, SIXTEENTHS: gl.constexpr):
        """See the module docstring. Program ``(row tile, K split)``; ``SG``: groups of 64 per
        scale group (0: one scale a row); ``FMT``: :data:`FMT_IDS`; ``t_ptr``: a codebook's 16
        levels, float32 (:func:`_table_planes`); ``zconst``: the symmetric zero when ``HAS_ZERO``
        is off; ``TAIL``: ``N`` is not a multiple of the tile or ``K`` of 64 (loads are masked);
        ``BF16``: the activations are bfloat16 (else float16); ``PREFETCH``: how many later groups' words are loaded ahead into
        registers (0, 1 or 2); a group's scales, zeros and activations are loaded in its own step
        (loading them a group ahead, or the words through a ``cp.async`` ring in shared memory,
        was slower on the H100: gluon_fragment_probe_{ahead_cap,stages}_h100.txt; a TMA loader
        warp filling a ring of them was no faster: gluon_fragment_probe_tma_h100.txt). ``PDL``: launched
        as a programmatic dependent (:func:`bitsmith.kernels.small_m.pdl_ok`): the next launch may
        start at once, and the words prefetched before the loop load before the wait for the
        previous kernel (activations, partials, counters and output only after it); every program
        waits, so a later kernel's wait on this one covers the earlier ones too. ``GROUP_MAJOR``:
        the words are in group-major order (:func:`bitsmith.kernels.fragment.to_order`).
        ``CLUSTER``: the K splits of a tile are a cluster of that many CTAs (:func:`_write_tile_cluster`);
        ``SUM_AFTER``: the splits only store their partials, a second kernel adds them up.
        ``ZSUB``: where the zero (1) or zero and scale (2) apply, :func:`_add_group`;
        ``INT_ZERO``: the zeros are integers (exact beside the magic in 16 bits); ``SIXTEENTHS``:
        :func:`_add_group`'s, set only where it applies (:func:`sixteenths`)."""
        DT: gl.constexpr = x_ptr.dtype.element_ty
        if CLUSTER > 1:  # the K splits of a tile: one cluster of consecutive CTAs along x (qmm._run)
            pid_n = gl.program_id(0) // CLUSTER
            pid_k = gl.program_id(0) % CLUSTER
        else:
            pid_n = gl.program_id(0)
            pid_k = gl.program_id(1)
        BN: gl.constexpr = 16 * W * RB
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        blk, w_mask, g_stride = _word_offsets(pid_n, NB, NG, W, RB, FMT, TAIL, GROUP_MAJOR)
        rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
        toks = gl.arange(0, TOK, layout=gl.SliceLayout(0, mma))
        row_ok = rows < N
        acc = gl.zeros([BN, TOK], gl.float32, layout=mma)
        ones = gl.full([BN, 64], 1.0, DT, layout=a_layout)
        g_lo = pid_k * G_PER
        g_hi = gl.minimum(g_lo + G_PER, NG)
        if PDL:  # the next launch may start now: it too only loads weights until its wait
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
        planes = _table_planes(t_ptr, FMT, BF16)  # weight data too: loaded before the wait
        if PREFETCH >= 1:
            words = gl.load(w_ptr + blk + g_lo * g_stride, mask=w_mask & (g_lo < g_hi), other=0)
        if PREFETCH == 2:
            words2 = gl.load(w_ptr + blk + (g_lo + 1) * g_stride, mask=w_mask & (g_lo + 1 < g_hi), other=0)
        if PDL:  # the weights above never change; x, the workspace and the output wait for the previous kernel
            gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                      pack=1)
        for g in range(g_lo, g_hi):
            if PREFETCH == 2:  # two groups' words in flight beside this one's products
                cur = words
                words = words2
                words2 = gl.load(w_ptr + blk + (g + 2) * g_stride, mask=w_mask & (g + 2 < g_hi), other=0)
            elif PREFETCH == 1:
                cur = words
                words = gl.load(w_ptr + blk + (g + 1) * g_stride, mask=w_mask & (g + 1 < g_hi), other=0)
            elif FMT == 2 or TAIL:
                cur = gl.load(w_ptr + blk + g * g_stride, mask=w_mask, other=0)
            else:
                cur = gl.load(w_ptr + blk + g * g_stride)
            acc = _add_group(acc, cur, ones, x_ptr, s_ptr, z_ptr, g, M, N, K, stride_xm, rows, row_ok, zconst,
                             planes, W, RB, TOK, SG, FMT, HAS_ZERO, TAIL, BF16, ZSUB, INT_ZERO, SIXTEENTHS)
        if CLUSTER > 1:
            _write_tile_cluster(acc, b_ptr, out_ptr, rows, row_ok, toks, pid_k, M, N, CLUSTER, HAS_BIAS)
        else:
            _write_tile(acc, ws_ptr, cnt_ptr, b_ptr, out_ptr, rows, row_ok, toks, pid_n, pid_k, M, N, SPLIT, IS_SPLIT,
                        HAS_BIAS, RB * TOK, SUM_AFTER)


if HAVE_TRITON:

    @triton.jit
    def fragment_codes(w_ptr, rb, g, NB, NG, FMT: tl.constexpr, RBS: tl.constexpr, GROUP_MAJOR: tl.constexpr):
        """Codes (int8) of row blocks ``rb`` (``[RBS]``; those past ``NB`` read as zero codes) in
        group ``g``, ``[64, 16 RBS]`` in ``[k, n]`` order, the words in either order
        (:func:`bitsmith.kernels.fragment.to_order`). The row blocks' words are loaded whole and
        coalesced, every code is cut out where the fragment assignment put it (codes ``[row block,
        lane, product s, register r, half h]``), and the codes are then permuted, the lane ``4 g +
        t`` standing for row ``g + 8 (r % 2)`` and input channel ``16 t + 4 s + 2 (r // 2) + h``
        (:func:`bitsmith.kernels.fragment.physical_k`)."""
        WPG: tl.constexpr = 96 if FMT == 2 else 128
        ok_rb = (rb < NB)[:, None]
        base = ((g * NB + rb) if GROUP_MAJOR else (rb * NG + g)) * WPG
        lane = tl.arange(0, 32)
        if FMT == 2:  # three words a lane, [word, lane]; register i = 4 s + r: word i // 5, slot i % 5
            i = tl.arange(0, 16)[None, None, :, None]
            h16 = 16 * tl.arange(0, 2)[None, None, None, :]
            w0 = tl.load(w_ptr + base[:, None] + lane[None, :], mask=ok_rb, other=0)[:, :, None, None]
            w1 = tl.load(w_ptr + base[:, None] + 32 + lane[None, :], mask=ok_rb, other=0)[:, :, None, None]
            w2 = tl.load(w_ptr + base[:, None] + 64 + lane[None, :], mask=ok_rb, other=0)[:, :, None, None]
            word = tl.where(i < 5, w0, tl.where(i < 10, w1, w2))
            q = (word >> (3 * (i % 5) + h16)) & 7
            top = ((w0 >> (15 + h16)) & 1) | (((w1 >> (15 + h16)) & 1) << 1) | (((w2 >> (15 + h16)) & 1) << 2)
            q = tl.where(i == 15, top, q)  # [RBS, 32, 16, 2]
        else:  # four words a lane, [lane, product]
            s = tl.arange(0, 4)
            words = tl.load(w_ptr + base[:, None, None] + lane[None, :, None] * 4 + s[None, None, :],
                            mask=ok_rb[:, :, None], other=0)
            r = tl.arange(0, 4)[:, None]
            h = tl.arange(0, 2)[None, :]
            shift = 8 * r + 4 * h if FMT == 1 else 4 * r + 16 * h  # [4 r, 2 h]
            q = (words[:, :, :, None, None] >> shift[None, None, None, :, :]) & 15  # [RBS, 32, 4, 4, 2]
        # [RBS, lane = (g, t), s, r = (r // 2, r % 2), h] -> k = (t, s, r // 2, h), n = (RBS, r % 2, g)
        q = tl.reshape(q.to(tl.int8), (RBS, 8, 4, 4, 2, 2, 2))
        return tl.reshape(tl.permute(q, (2, 3, 4, 6, 0, 5, 1)), (64, 16 * RBS))

    @triton.jit
    def fragment_values(q, s_ptr, z_ptr, t_ptr, g, N, n, n_ok, zconst, FMT: tl.constexpr, SG: tl.constexpr,
                        HAS_ZERO: tl.constexpr):
        """The weights (float32 ``[64, 16 RBS]``) that codes ``q`` of group ``g``
        (:func:`fragment_codes`) stand for: affine ``(q - zero) * scale``, codebook ``table[q] *
        scale``, the scales and zeros of columns ``n`` (``n_ok``: inside ``N``)."""
        if SG == 0:
            s_row = 0
        else:
            s_row = (g // SG) * N
        sc = tl.load(s_ptr + s_row + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if FMT == 1:
            w = tl.load(t_ptr + q.to(tl.int32)) * sc
        else:
            if HAS_ZERO:
                z = tl.load(z_ptr + s_row + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            else:
                z = zconst
            w = (q.to(tl.float32) - z) * sc
        return w

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, t_ptr, out_ptr, N, K, NB, NG, zconst,
                        FMT: tl.constexpr, SG: tl.constexpr, HAS_ZERO: tl.constexpr, RBS: tl.constexpr,
                        GROUP_MAJOR: tl.constexpr):
        """``W^T [K, N]`` in ``out``'s dtype from fragment words: program ``(RBS row blocks,
        group)`` writes the ``[64, 16 RBS]`` tile of ``W^T`` (:func:`fragment_codes` in ``[k, n]``
        order), so the scales are read and the tile stored as rows of ``16 RBS`` contiguous values
        (the compiler routes the permutation through shared memory; a store a code, scattered in
        16-byte pieces, made the first version of this kernel 5-8x slower than writing ``W^T``
        from the rows layout). ``GROUP_MAJOR``: the words in group-major order
        (:func:`bitsmith.kernels.fragment.to_order`)."""
        pid_r = tl.program_id(0)
        g = tl.program_id(1)
        BN: tl.constexpr = 16 * RBS
        q = fragment_codes(w_ptr, pid_r * RBS + tl.arange(0, RBS), g, NB, NG, FMT, RBS, GROUP_MAJOR)
        k = g * 64 + tl.arange(0, 64)[:, None]
        n = pid_r * BN + tl.arange(0, BN)
        n_ok = n < N
        w = fragment_values(q, s_ptr, z_ptr, t_ptr, g, N, n, n_ok, zconst, FMT, SG, HAS_ZERO)
        tl.store(out_ptr + k * N + n[None, :], w.to(out_ptr.dtype.element_ty), mask=(k < K) & n_ok[None, :])


if HAVE_TRITON:

    @triton.jit
    def _sum_partials_kernel(ws_ptr, b_ptr, out_ptr, M, N, SPLIT, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
                             BLOCK: tl.constexpr):
        """``out [M, N]`` = the ``SPLIT`` float32 partials ``_frag_kernel`` left in the workspace
        (``[SPLIT, M, N]``), added in split order from zero, plus the bias, in ``out``'s dtype: the
        same sums, in the same order, as the last program of a tile makes them
        (:func:`_write_tile`). ``PDL``: launched as a programmatic dependent, it waits for the
        matmul before reading (:func:`bitsmith.kernels.small_m.pdl_ok`)."""
        if PDL:
            gdc_wait()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * N
        tot = tl.zeros([BLOCK], tl.float32)
        for i in range(SPLIT):
            tot += tl.load(ws_ptr + i * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            tot += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, tot.to(out_ptr.dtype.element_ty), mask=mask)


def _scale_steps(rw: RuntimeWeight) -> int:
    """Groups of 64 per scale group (0: one scale a row)."""
    return rw.group // fragment.GROUP


def supports(rw: RuntimeWeight, dtype: torch.dtype) -> str | None:
    """Why ``_frag_kernel`` cannot take ``rw`` with ``dtype`` activations (``None`` when it can)."""
    if not HAVE_GLUON:
        return "triton's Gluon language is not available"
    if rw.layout != "fragment":
        return f"weight in the {rw.layout!r} layout"
    if rw.device.type != "cuda":
        return f"weight on {rw.device.type} (Gluon kernels run on CUDA GPUs only, not under Triton's interpreter)"
    if dtype not in MAGIC:
        return f"activations in {dtype} (the tensor-core path takes float16 and bfloat16)"
    return None


def blocks_groups(rw: RuntimeWeight) -> tuple[int, int]:
    """``(NB, NG)``: row blocks and groups of 64 of a fragment weight, in either word order."""
    a, b = rw.words.shape[0], rw.words.shape[1]
    return (b, a) if rw.fragment_order == "group" else (a, b)


def _tiles(rw: RuntimeWeight, w: int, rb: int) -> int:
    return -(-blocks_groups(rw)[0] // (w * rb))


def split_ok(split: int, m: int, ng: int, programs: int, sms: int) -> bool:
    """Whether ``split`` K splits are a candidate for ``programs`` output tiles of ``m`` tokens
    over ``ng`` groups on ``sms`` multiprocessors: at most one a group, within the workspace
    (:data:`MAX_PARTIALS`), and (split at all) between half a program and 16 programs an SM."""
    return split <= ng and split * m <= MAX_PARTIALS and (split == 1 or sms // 2 <= programs * split <= 16 * sms)


def zsub_modes(rw: RuntimeWeight, offered: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The ways of applying ``rw``'s zeros and scales (:data:`ZSUB`) the tuner weighs for it:
    those ``offered`` (default: the setting's) that the weight allows (1: integer zeros; 2:
    integer zeros or a codebook)."""
    codebook = rw.kind == "codebook"
    ok = {0: True, 1: not codebook and rw.int_zero, 2: codebook or rw.int_zero}
    return tuple(mode for mode in (ZSUB["modes"] if offered is None else offered) if ok.get(mode)) or (0,)


def cluster_capable(device: torch.device) -> bool:
    """Whether ``device`` launches thread-block clusters (a CUDA GPU of compute capability 9.0 or later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def cluster_ok(device: torch.device) -> bool:
    """Whether the tuner offers ``_frag_kernel`` split-K reduced inside thread-block clusters on
    ``device`` (:data:`CLUSTER` on and :func:`cluster_capable`)."""
    return CLUSTER["enabled"] and cluster_capable(device)


def cluster_fits(split: int, rb: int, tok: int) -> bool:
    """Whether ``split`` K splits of a ``16 * 4 * rb``-row, ``tok``-token tile may form one
    cluster: 2, 4 or 8 CTAs (portable cluster sizes; the slots' buffer takes a power of two) and
    the partials' slots within :data:`CLUSTER_SLOTS_BYTES` of shared memory."""
    return split in (2, 4, 8) and split * 64 * rb * tok * 4 <= CLUSTER_SLOTS_BYTES


def _sum_after_offered(split: int, tok: int) -> bool:
    """Whether ``split`` K splits of a ``tok``-token tile may end in the second kernel (:data:`SUM_AFTER`)."""
    return split > 1 and tok in SUM_AFTER["tokens"] and SUM_AFTER["enabled"]


def configs(rw: RuntimeWeight, m: int, dtype: torch.dtype, sms: int) -> list[dict]:
    """Candidate configs of ``_frag_kernel`` at ``m <= max_m()`` rows on a GPU of ``sms``
    multiprocessors: row blocks a warp (above 16 tokens those of :data:`MAXNREG_WIDE`) x split-K
    (between half a program and 16 programs an SM, within :data:`MAX_PARTIALS`) x the next one or
    two groups' words loaded ahead in registers (``PREFETCH`` 0, 1, 2); where :func:`cluster_ok`
    and :func:`cluster_fits`, each split also as a cluster (``CLUSTER``: the splits of a tile
    add up in distributed shared memory instead of the global workspace); with the token tiles
    of :data:`SUM_AFTER` (16 unless set), each split also ending in a second kernel that adds the
    partials up; each config in every way of applying the zeros and scales that
    :func:`zsub_modes` offers for the weight (``ZSUB``, absent for 0)."""
    if m > max_m() or supports(rw, dtype) is not None:
        return []
    ng = blocks_groups(rw)[1]
    tok = tokens(m)
    clusters = cluster_ok(rw.device)
    zsubs = zsub_modes(rw)
    out = []
    for rb in (1, 2, 4) if tok <= 16 else sorted(r for r, t in MAXNREG_WIDE if t == tok):
        programs = _tiles(rw, 4, rb)
        for split in (1, 2, 4, 8, 16, 32):
            if not split_ok(split, m, ng, programs, sms):
                continue
            sum_after = _sum_after_offered(split, tok)
            # at 16 splits and more the second kernel won every pair timed (54 of 54 at M = 16,
            # kernels_configs_sum_after_h100.json), so the ticket's ending is not timed there
            endings = [] if sum_after and split >= 16 else [{}]
            if split > 1 and clusters and cluster_fits(split, rb, tok):
                endings.append({"CLUSTER": True})
            if sum_after:
                endings.append({"SUM_AFTER": True})
            for ending in endings:
                for prefetch in (0, 1, 2):
                    for zsub in zsubs:
                        out.append({"KERNEL": "fragment", "W": 4, "RB": rb, "SPLIT": split, "PREFETCH": prefetch,
                                    "num_warps": 4, **ending, **({"ZSUB": zsub} if zsub else {})})
    return out


def default_config(rw: RuntimeWeight, m: int, sms: int) -> dict:
    """Two row blocks a warp (one at 64 tokens), split-K until about four programs an SM; from
    16-token tile the splits summed by the second kernel (:data:`SUM_AFTER`, faster than the
    ticket for the same config at every split count measured, in the median)."""
    ng = blocks_groups(rw)[1]
    rb = 1 if tokens(m) == 64 else 2
    tiles = _tiles(rw, 4, rb)
    split = 1
    while tiles * split < 4 * sms and split * 2 <= min(ng, 32) and split * 2 * m <= MAX_PARTIALS:
        split *= 2
    cfg = {"KERNEL": "fragment", "W": 4, "RB": rb, "SPLIT": split, "PREFETCH": 0, "num_warps": 4}
    return {**cfg, "SUM_AFTER": True} if _sum_after_offered(split, tokens(m)) else cfg


def kernel_args(rw: RuntimeWeight, x2: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, split: int,
                tiles: int, cluster: bool = False) -> tuple:
    """The runtime arguments of ``_frag_kernel`` and of the Hopper kernel
    (:mod:`bitsmith.kernels.fragment_wgmma`), which share their signature up to the constexprs:
    split-K over ``split`` programs takes the device's workspace with a counter for each of
    ``tiles`` output tiles, unless the splits form a ``cluster`` (argument positions 0, 6 and 7
    are the activation, bias and output, as every launch plan of :mod:`bitsmith.kernels.qmm`
    expects; 8 is a codebook's float32 levels, which the kernels turn into their lookup's byte planes)."""
    from .small_m import workspace

    m, k = x2.shape
    nb, ng = blocks_groups(rw)
    dummy = rw.scale
    ws, cnt = workspace(x2.device, split * m * rw.n, tiles) if split > 1 and not cluster else (dummy, rw.words)
    return (x2, rw.words, ws, rw.scale, rw.zero if rw.zero is not None else dummy, cnt,
            bias if bias is not None else dummy, out, rw.table if rw.table is not None else dummy,
            m, rw.n, k, nb, ng, -(-ng // split), split, float(rw.zconst), x2.stride(0))


def sixteenths(rw: RuntimeWeight, dtype: torch.dtype, zsub: int) -> bool:
    """Whether a fragment kernel converts ``rw``'s codes in sixteenths (:data:`SIXTEENTHS`): on, an
    int4 affine weight with integer zeros, float16 activations, and a :data:`ZSUB` mode ``zsub``
    that takes the zero off in 16 bits (the wgmma kernel, which always does, passes 2)."""
    return (SIXTEENTHS["enabled"] and zsub > 0 and rw.kind == "affine" and rw.fragment_format == "int4"
            and rw.int_zero and dtype == torch.float16)


def kernel_consts(rw: RuntimeWeight, x2: torch.Tensor, bias: torch.Tensor | None, cfg: dict, tile_rows: int) -> dict:
    """The constexprs both kernels of :func:`kernel_args` take from the weight, the call and
    ``cfg`` (``TAIL``: ``N`` not a multiple of the ``tile_rows`` rows of a program, or ``K`` of 64)."""
    return {"PREFETCH": int(cfg["PREFETCH"]), "IS_SPLIT": cfg["SPLIT"] > 1, "SG": _scale_steps(rw),
            "FMT": FMT_IDS[rw.fragment_format], "HAS_ZERO": rw.zero is not None, "HAS_BIAS": bias is not None,
            "TAIL": rw.n % tile_rows != 0 or x2.shape[1] % 64 != 0, "BF16": x2.dtype == torch.bfloat16,
            "GROUP_MAJOR": rw.fragment_order == "group", "INT_ZERO": rw.kind == "affine" and rw.int_zero}


def launch_args(rw: RuntimeWeight, x2: torch.Tensor, bias: torch.Tensor | None, cfg: dict, out: torch.Tensor):
    """``(kernel, grid, args, constexprs, options)`` of one ``_frag_kernel`` launch writing ``out``."""
    from .small_m import pdl_ok

    pdl = PDL["enabled"] and pdl_ok(x2.device)
    w, rb, split = cfg["W"], cfg["RB"], cfg["SPLIT"]
    cluster = bool(cfg.get("CLUSTER")) and split > 1
    tiles = _tiles(rw, w, rb)
    args = kernel_args(rw, x2, bias, out, split, tiles, cluster)
    consts = {"W": w, "RB": rb, "TOK": tokens(x2.shape[0]), **kernel_consts(rw, x2, bias, cfg, 16 * w * rb), "PDL": pdl,
              "CLUSTER": split if cluster else 1, "SUM_AFTER": sums_after(cfg), "ZSUB": int(cfg.get("ZSUB", 0))}
    consts["SIXTEENTHS"] = sixteenths(rw, x2.dtype, consts["ZSUB"])
    options = {"num_warps": cfg["num_warps"]}
    if cluster:  # grid x counts tiles; the launch makes each a cluster of ``split`` CTAs (qmm._run)
        options["cluster"] = split
    if pdl:
        options["launch_pdl"] = True
    maxnreg = register_cap(cfg, consts["TOK"])
    if maxnreg:
        options["maxnreg"] = maxnreg
    return _frag_kernel, (tiles, 1) if cluster else (tiles, split), args, consts, options


def sums_after(cfg: dict) -> bool:
    """Whether a config's K splits leave their partials to :func:`_sum_partials_kernel`."""
    return bool(cfg.get("SUM_AFTER")) and cfg["SPLIT"] > 1 and not cfg.get("CLUSTER")


#: values a program of :func:`_sum_partials_kernel` adds up
SUM_BLOCK = 1024


def sum_launch_args(main_args: tuple, bias: torch.Tensor | None, out: torch.Tensor, split: int):
    """``(kernel, grid, args, constexprs, options)`` of the launch that adds up the partials a
    :func:`sums_after` launch of ``_frag_kernel`` (arguments ``main_args``: its workspace at 2)
    left, into ``out`` (argument 2; the bias at 1), as a programmatic dependent where
    :func:`bitsmith.kernels.small_m.pdl_ok` allows it."""
    from .small_m import pdl_ok

    m, n = out.shape
    pdl = pdl_ok(out.device)
    args = (main_args[2], bias if bias is not None else main_args[3], out, m, n, split)
    options = {"num_warps": 4, **({"launch_pdl": True} if pdl else {})}
    return (_sum_partials_kernel, (-(-(m * n) // SUM_BLOCK),), args,
            {"HAS_BIAS": bias is not None, "PDL": pdl, "BLOCK": SUM_BLOCK}, options)


def dequantize_t(rw: RuntimeWeight, dtype: torch.dtype, run, row_blocks: int = DEQUANT_ROW_BLOCKS,
                 num_warps: int = 4) -> torch.Tensor:
    """``W^T [K, N]`` in ``dtype`` from the fragment layout (one memory-bound kernel); ``run`` is
    the launcher (:func:`bitsmith.kernels.qmm._run`); a program writes ``row_blocks`` row blocks
    (a power of two) of one group (benchmarks/fragment_dequant_probe.py times the choices)."""
    out = torch.empty(rw.k, rw.n, dtype=dtype, device=rw.device)
    nb, ng = blocks_groups(rw)
    dummy = rw.scale
    args = (rw.words, rw.scale, rw.zero if rw.zero is not None else dummy, rw.table if rw.table is not None else dummy,
            out, rw.n, rw.k, nb, ng, float(rw.zconst))
    consts = {"FMT": FMT_IDS[rw.fragment_format], "SG": _scale_steps(rw), "HAS_ZERO": rw.zero is not None, "RBS": row_blocks,
              "GROUP_MAJOR": rw.fragment_order == "group"}
    run(_dequant_kernel, (-(-nb // row_blocks), ng), args, consts, {"num_warps": num_warps})
    return out


def compile_offline(fmt: str = "int4", rb: int = 1, tok: int = 8, prefetch: int = 0, act: str = "fp16",
                    arch: int = 90, maxnreg: int | None = None, **consts):
    """``_frag_kernel`` compiled for NVIDIA ``sm_<arch>`` on any machine (Triton's bundled ptxas),
    for its machine code (benchmarks/gluon_fragment_probe.py ``--sass``) and compile checks in CI:
    four warps, split-K on, groups of 64 with zeros (codebooks: none), no bias, no tails, unless
    ``consts`` says otherwise; the launch's register cap (:func:`register_cap`) unless ``maxnreg``
    says otherwise (0: none)."""
    from .small_m import _compile_offline

    cx = {"W": 4, "RB": rb, "TOK": tok, "PREFETCH": int(prefetch), "IS_SPLIT": True, "SG": 1, "FMT": FMT_IDS[fmt],
          "HAS_ZERO": fmt != "nf4", "HAS_BIAS": False, "TAIL": False, "BF16": act == "bf16", "PDL": False, "GROUP_MAJOR": False,
          "CLUSTER": 1, "SUM_AFTER": False, "ZSUB": 0, "INT_ZERO": fmt != "nf4", "SIXTEENTHS": False, **consts}
    cap = register_cap({"RB": rb}, tok) if maxnreg is None else maxnreg
    return _compile_offline(_frag_kernel, cx, act, cx["W"], 1, arch, gluon=True, maxnreg=cap)


def compile_dequant_offline(fmt: str = "int4", act: str = "fp16", arch: int = 90, **consts):
    """``_dequant_kernel`` compiled like :func:`compile_offline` (groups of 64, zeros for affine,
    block-major words, unless ``consts`` says otherwise)."""
    from .small_m import _compile_offline

    cx = {"FMT": FMT_IDS[fmt], "SG": 1, "HAS_ZERO": fmt != "nf4", "RBS": DEQUANT_ROW_BLOCKS, "GROUP_MAJOR": False,
          **consts}
    return _compile_offline(_dequant_kernel, cx, act, 4, 1, arch)


__all__ = ["HAVE_GLUON", "configs", "default_config", "launch_args", "sum_launch_args", "dequantize_t", "supports",
           "cvt4_ptx", "cvt3_ptx"]
