"""The fragment layout's M = 1..16 kernel fed by the tensor memory accelerator (Gluon, Hopper,
sm_90): a loader warp streams each group's words, scales and zeros into a ring of shared-memory
slots while the four warps of :mod:`bitsmith.kernels.fragment_mma`'s kernel do the math.

Why: at M = 1 the fragment kernel reads its weight at 72% of the speed of a kernel that only
reads the same bytes (docs/gpu-kernels.md, "kernels_chain_ceiling_h100"); Nsight Compute had it
at 13 warps an SM, stalled on loads for 45% of the cycles. Three ways of putting more bytes in
flight from the compute warps themselves lost to the tuned configs (more groups in registers, a
``cp.async`` ring, an L2 prefetch): each costs the compute warps instructions and registers. Here
the bytes in flight cost them nothing: one thread of a fifth warp issues one bulk copy a group
(``W RB`` row blocks' words, contiguous in group-major order, and the tile's scales and zeros),
``STAGES`` groups ahead, and the compute warps wait on an mbarrier and read their words from
shared memory (16 bytes a lane, a warp's 512 contiguous: no bank conflicts).

* ``_tma_loader`` (one warp): for each of the program's groups, once the compute warps have
  released the slot (``empty``), three TMA loads that signal the slot's ``ready`` barrier:
  words ``[W RB, 128]`` of the ``[NG NB, 128]`` view of group-major words, scales and zeros
  ``[1, 16 W RB]`` of ``[G, N]``. Row blocks past ``NB`` in a tile at the end of the rows read
  the next group's first row blocks (harmless: rows are independent in the product, their
  scales read as zeros past ``N`` and their outputs are never stored); past the last group
  they read zeros.
* ``_tma_compute`` (the launch's four warps): the fragment kernel's loop
  (:func:`bitsmith.kernels.fragment_mma._a_operand`, ``_b_operand``, ``mma_v2``) with the words,
  scales and zeros from the slot; the slot is released as soon as they are in registers; then
  the same split-K epilogue (``_write_tile``).

Only group-major words (the default order), int4 and 16-level codebooks (int3's 96 words a row
block are not a power of two), groups of 64 or a multiple, ``N`` a multiple of 8 (TMA's 16-byte
row pitch), up to 16 tokens. Its switch: :data:`TMA` (``BITSMITH_FRAGMENT_TMA=1``: the tuner is
offered it on Hopper; off by default until it has run on a GPU).
"""
from __future__ import annotations

import os

import torch

from .fragment_mma import FMT_IDS, HAVE_GLUON, MAGIC, blocks_groups, kernel_consts, split_ok, table_planes, tokens
from .layout import RuntimeWeight

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .fragment_mma import _a_operand, _write_tile, _x_group, _x_to_b

#: whether the tuner is offered this kernel on Hopper (``BITSMITH_FRAGMENT_TMA=1``; off by default: it
#: has been compiled for sm_90 and checked offline, not yet run on a GPU)
TMA = {"enabled": os.environ.get("BITSMITH_FRAGMENT_TMA", "") == "1"}
WPG = 128  # 32-bit words a row block holds of one group (int4 and codebooks)
STAGES = (2, 4, 8)  # ring depths the tuner tries
LOADER_REGS = 40  # registers a thread of the loader warp asks for (setmaxnreg)
#: the launch's register cap by (row blocks a warp, token tile): the smallest multiple of 8 from
#: 64 at which the compute warps compile without spills for sm_90, with and without tails
#: (tests/test_fragment.py). A launch holds eight warps (the compute partition and a loader
#: warpgroup of one working warp), so the cap sets the programs an SM: 4 at 64, 3 at 80, 2 at 104.
MAXNREG = {(1, 8): 64, (1, 16): 64, (2, 8): 64, (2, 16): 80, (4, 8): 80, (4, 16): 104}

if HAVE_GLUON:
    _LOADER_REGS = gl.constexpr(LOADER_REGS)

    @gluon.jit
    def _tma_loader(w_desc, s_desc, z_desc, w_smem, s_smem, z_smem, ready, empty, NB, NG, G_PER,
                    W: gl.constexpr, RB: gl.constexpr, SG: gl.constexpr, HAS_ZERO: gl.constexpr,
                    STAGES: gl.constexpr):
        """The loader partition: group ``g_lo + i`` into slot ``i % STAGES`` once it is free
        (``empty``; a fresh barrier passes the first round), all three loads signalling ``ready``."""
        BN: gl.constexpr = 16 * W * RB
        META_BYTES: gl.constexpr = BN * s_desc.dtype.primitive_bitwidth // 8
        nbytes: gl.constexpr = W * RB * 128 * 4 + META_BYTES * (2 if HAS_ZERO else 1)
        rb0 = gl.program_id(0) * (W * RB)
        g_lo = gl.program_id(1) * G_PER
        steps = gl.minimum(g_lo + G_PER, NG) - g_lo
        for i in range(steps):
            g = g_lo + i
            slot = i % STAGES
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), nbytes)
            tma.async_copy_global_to_shared(w_desc, [g * NB + rb0, 0], ready.index(slot), w_smem.index(slot))
            s_row = 0 if SG == 0 else g // SG
            tma.async_copy_global_to_shared(s_desc, [s_row, rb0 * 16], ready.index(slot), s_smem.index(slot))
            if HAS_ZERO:
                tma.async_copy_global_to_shared(z_desc, [s_row, rb0 * 16], ready.index(slot), z_smem.index(slot))

    @gluon.jit
    def _tma_compute(x_ptr, ws_ptr, cnt_ptr, b_ptr, out_ptr, w_smem, s_smem, z_smem, ready, empty,
                     M, N, K, NG, G_PER, SPLIT, L0, L1, L2, L3, H0, H1, H2, H3, zconst, stride_xm,
                     W: gl.constexpr, RB: gl.constexpr, TOK: gl.constexpr, IS_SPLIT: gl.constexpr,
                     FMT: gl.constexpr, HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, TAIL: gl.constexpr,
                     BF16: gl.constexpr, STAGES: gl.constexpr):
        """The compute partition: the loop of ``bitsmith.kernels.fragment_mma._frag_kernel`` with
        each group's words, scales and zeros read from its slot (released once in registers)."""
        DT: gl.constexpr = x_ptr.dtype.element_ty
        MAGIC_F: gl.constexpr = 128.0 if BF16 else 1024.0
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        BN: gl.constexpr = 16 * W * RB
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        # a slot's words [W RB, 128]: row block rb W + w of the tile in warp w, 16 bytes a lane
        ws_layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [W, 1], [1, 0])
        w_layout: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 1, 32, 1], [1, W, 1, 1], [3, 2, 1, 0])
        meta_layout: gl.constexpr = gl.SliceLayout(1, mma)
        rows = pid_n * BN + gl.arange(0, BN, layout=meta_layout)
        toks = gl.arange(0, TOK, layout=gl.SliceLayout(0, mma))
        row_ok = rows < N
        acc = gl.zeros([BN, TOK], gl.float32, layout=mma)
        ones = gl.full([BN, 64], 1.0, DT, layout=a_layout)
        g_lo = pid_k * G_PER
        steps = gl.minimum(g_lo + G_PER, NG) - g_lo
        xv = _x_group(x_ptr, g_lo, M * (steps > 0).to(gl.int32), K, stride_xm, W, TOK, TAIL)  # none: a program past K
        for i in range(steps):
            # the next group's activations load (from the L2) while this group is multiplied
            x_cur = xv
            xv = _x_group(x_ptr, g_lo + i + 1, M * (i + 1 < steps).to(gl.int32), K, stride_xm, W, TOK, TAIL)
            slot = i % STAGES
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            cur = w_smem.index(slot).load(ws_layout)
            sc = s_smem.index(slot).reshape([BN]).load(meta_layout).to(gl.float32)
            if HAS_ZERO:
                zc = z_smem.index(slot).reshape([BN]).load(meta_layout).to(gl.float32) + MAGIC_F
            mbarrier.arrive(empty.index(slot), count=1)
            if FMT != 1:
                if not HAS_ZERO:
                    zc = gl.full([BN], 0.0, gl.float32, layout=meta_layout) + (zconst + MAGIC_F)
            cur = gl.convert_layout(gl.reshape(cur, [RB, W, 32, 4]), w_layout, assert_trivial=True)
            a = _a_operand(cur, (L0, L1, L2, L3, H0, H1, H2, H3), W, RB, a_layout, FMT, BF16)
            b = _x_to_b(x_cur, TOK, b_layout)
            part = mma_v2(a, b, gl.zeros([BN, TOK], gl.float32, layout=mma))
            if FMT == 1:
                acc += part * sc[:, None]
            else:
                xs = mma_v2(ones, b, gl.zeros([BN, TOK], gl.float32, layout=mma))  # every row: the group's sum of x
                acc += (part - zc[:, None] * xs) * sc[:, None]
        _write_tile(acc, ws_ptr, cnt_ptr, b_ptr, out_ptr, rows, row_ok, toks, pid_n, pid_k, M, N, SPLIT, IS_SPLIT,
                    HAS_BIAS, RB * TOK)

    @gluon.jit
    def _frag_tma_kernel(x_ptr, w_desc, ws_ptr, s_desc, z_desc, cnt_ptr, b_ptr, out_ptr,
                         M, N, K, NB, NG, G_PER, SPLIT, L0, L1, L2, L3, H0, H1, H2, H3, zconst, stride_xm,
                         W: gl.constexpr, RB: gl.constexpr, TOK: gl.constexpr, IS_SPLIT: gl.constexpr,
                         SG: gl.constexpr, FMT: gl.constexpr, HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr,
                         TAIL: gl.constexpr, BF16: gl.constexpr, STAGES: gl.constexpr):
        """See the module docstring; the arguments are ``_frag_kernel``'s with the words, scales
        and zeros as TMA descriptors (``z_desc`` is the scales' again when there are no zeros)."""
        BN: gl.constexpr = 16 * W * RB
        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, W * RB, 128], w_desc.layout)
        s_smem = gl.allocate_shared_memory(s_desc.dtype, [STAGES, 1, BN], s_desc.layout)
        z_smem = gl.allocate_shared_memory(z_desc.dtype, [STAGES if HAS_ZERO else 1, 1, BN], z_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        fence_async_shared()
        gl.warp_specialize([
            (_tma_compute, (x_ptr, ws_ptr, cnt_ptr, b_ptr, out_ptr, w_smem, s_smem, z_smem, ready, empty,
                            M, N, K, NG, G_PER, SPLIT, L0, L1, L2, L3, H0, H1, H2, H3, zconst, stride_xm,
                            W, RB, TOK, IS_SPLIT, FMT, HAS_ZERO, HAS_BIAS, TAIL, BF16, STAGES)),
            (_tma_loader, (w_desc, s_desc, z_desc, w_smem, s_smem, z_smem, ready, empty, NB, NG, G_PER,
                           W, RB, SG, HAS_ZERO, STAGES)),
        ], [1], [_LOADER_REGS])


def supports(rw: RuntimeWeight, dtype: torch.dtype, m: int = 1) -> str | None:
    """Why ``_frag_tma_kernel`` cannot take ``rw`` with ``m`` tokens of ``dtype`` (``None`` when it can)."""
    if not HAVE_GLUON:
        return "triton's Gluon language is not available"
    if rw.layout != "fragment":
        return f"weight in the {rw.layout!r} layout"
    if rw.fragment_format not in ("int4", "nf4"):
        return f"{rw.fragment_format} words ({rw.fragment_format} is not a power-of-two slot)"
    if rw.fragment_order != "group":
        return "block-major words (a tile's row blocks are not contiguous)"
    if rw.n % 8:
        return f"N = {rw.n} is not a multiple of 8 (the scales' rows must be 16-byte aligned for TMA)"
    if rw.group % 64 and rw.group != 0:
        return f"group {rw.group}"
    if m > 16:
        return f"{m} tokens (it takes up to 16)"
    if rw.device.type != "cuda" or torch.cuda.get_device_capability(rw.device) != (9, 0):
        return "TMA and warp specialization need a Hopper GPU (compute capability 9.0)"
    if dtype not in MAGIC:
        return f"activations in {dtype} (the tensor-core path takes float16 and bfloat16)"
    return None


def _tiles(rw: RuntimeWeight, rb: int) -> int:
    return -(-blocks_groups(rw)[0] // (4 * rb))


def configs(rw: RuntimeWeight, m: int, dtype: torch.dtype, sms: int) -> list[dict]:
    """Candidate configs at ``m <= 16`` tokens (with :data:`TMA` on): row blocks a warp (1, 2, 4) x
    split-K (as :func:`bitsmith.kernels.fragment_mma.configs` bounds it) x ring depth (:data:`STAGES`)."""
    if not TMA["enabled"] or supports(rw, dtype, m) is not None:
        return []
    ng = blocks_groups(rw)[1]
    out = []
    for rb in (1, 2, 4):
        programs = _tiles(rw, rb)
        for split in (1, 2, 4, 8, 16, 32):
            if not split_ok(split, m, ng, programs, sms):
                continue
            for stages in STAGES:
                out.append({"KERNEL": "fragment_tma", "W": 4, "RB": rb, "SPLIT": split, "STAGES": stages,
                            "num_warps": 4})
    return out


def _plain(t: torch.Tensor, rows: int, cols: int, block: list[int]) -> "TensorDescriptor":
    """A TMA descriptor of ``t`` viewed as ``[rows, cols]`` (row-major), ``block`` a load, no swizzle."""
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=t.element_size() * 8, rank=2)
    return TensorDescriptor(t.reshape(rows, cols), [rows, cols], [cols, 1], block, layout)


def descriptors(rw: RuntimeWeight, rb: int) -> tuple:
    """``(words, scales, zeros)`` TMA descriptors of a weight for tiles of ``rb`` row blocks a warp
    (the zeros' is the scales' again when there are none)."""
    w_desc = _plain(rw.words, rw.words.numel() // WPG, WPG, [4 * rb, WPG])
    s_desc = _plain(rw.scale, rw.scale.numel() // rw.n, rw.n, [1, 64 * rb])
    if rw.zero is None:
        return w_desc, s_desc, s_desc
    return w_desc, s_desc, _plain(rw.zero, rw.zero.numel() // rw.n, rw.n, [1, 64 * rb])


def launch_args(rw: RuntimeWeight, x2: torch.Tensor, bias: torch.Tensor | None, cfg: dict, out: torch.Tensor):
    """``(kernel, grid, args, constexprs, options)`` of one ``_frag_tma_kernel`` launch writing ``out``
    (argument positions 0, 6 and 7 are the activation, bias and output, as the launch plans expect)."""
    from .small_m import workspace

    rb, split = cfg["RB"], cfg["SPLIT"]
    tiles = _tiles(rw, rb)
    m, k = x2.shape
    nb, ng = blocks_groups(rw)
    w_desc, s_desc, z_desc = descriptors(rw, rb)
    dummy = rw.scale
    ws, cnt = workspace(x2.device, split * m * rw.n, tiles) if split > 1 else (dummy, rw.words)
    args = (x2, w_desc, ws, s_desc, z_desc, cnt, bias if bias is not None else dummy, out,
            m, rw.n, k, nb, ng, -(-ng // split), split, *table_planes(rw, x2.dtype), float(rw.zconst), x2.stride(0))
    consts = {"W": 4, "RB": rb, "TOK": tokens(m), **kernel_consts(rw, x2, bias, cfg | {"PREFETCH": 0}, 64 * rb),
              "STAGES": cfg["STAGES"]}
    del consts["PREFETCH"], consts["GROUP_MAJOR"]
    return _frag_tma_kernel, (tiles, split), args, consts, {"num_warps": 4, "maxnreg": register_cap(cfg, consts["TOK"])}


def register_cap(cfg: dict, tok: int) -> int:
    """The register cap a launch of ``cfg`` at token tile ``tok`` compiles with (a config's own
    ``maxnreg`` overrides :data:`MAXNREG`)."""
    return cfg.get("maxnreg") or MAXNREG[(cfg["RB"], tok)]


def compile_offline(fmt: str = "int4", rb: int = 1, tok: int = 8, stages: int = 4, act: str = "fp16", arch: int = 90,
                    maxnreg: int | None = None, **consts):
    """``_frag_tma_kernel`` compiled for NVIDIA ``sm_<arch>`` on any machine, for CI's checks of its
    machine code: split-K on, groups of 64 with zeros (codebooks: none), no bias, no tails, the
    launch's register cap, unless told otherwise."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from .small_m import _compile_offline

    cx = {"W": 4, "RB": rb, "TOK": tok, "IS_SPLIT": True, "SG": 1, "FMT": FMT_IDS[fmt], "HAS_ZERO": fmt != "nf4",
          "HAS_BIAS": False, "TAIL": False, "BF16": act == "bf16", "STAGES": stages, **consts}
    bn = 64 * rb
    meta_dt = torch.bfloat16 if act == "bf16" else torch.float16
    w_desc = _plain(torch.zeros(8 * rb, WPG, dtype=torch.int32), 8 * rb, WPG, [4 * rb, WPG])
    m_desc = _plain(torch.zeros(2, bn, dtype=meta_dt), 2, bn, [1, bn])
    desc = {name: native_specialize_impl(BaseBackend, d, False, True, True)[0]
            for name, d in (("w_desc", w_desc), ("s_desc", m_desc), ("z_desc", m_desc))}
    return _compile_offline(_frag_tma_kernel, cx, act, 4, 1, arch, gluon=True,
                            maxnreg=MAXNREG[(rb, tok)] if maxnreg is None else maxnreg, arg_types=desc)


__all__ = ["TMA", "STAGES", "supports", "configs", "descriptors", "launch_args", "compile_offline"]
