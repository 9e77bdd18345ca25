"""The fragment runtime layout (bitsmith.kernels.fragment) and its kernels (fragment_mma), issue #8.

* Packing against the PTX ISA's fragment assignment of ``mma.m16n8k16`` (an independent decoder
  written from the ISA's table, not from the packer's helpers); the conversion PTX run by a small
  emulator, so the bits the kernel's inline assembly reads are checked too.
* The layout reads back the storage layout exactly (torch), for every format it holds, and says
  why it refuses the rest.
* Under Triton's interpreter (a subprocess, as in test_kernels.py): the dequantization kernel,
  the GEMM for more than 16 rows (fragment_gemm) against float64, and ``quant_matmul`` above 16 rows.
* The Gluon kernel compiled for sm_90 on this CPU: its operand conversions are trivial (no data
  movement, asserted at compile time) and its main loop has no shared memory, shuffle or barrier.
* On a CUDA GPU: the kernel against float64 for every config, format, dtype and odd sizes, and
  QuantLinear with the layout switched on (skipped without CUDA).
"""
from __future__ import annotations

import collections
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bitsmith
from bitsmith.errors import QuantizationError
from bitsmith.kernels import (HAVE_TRITON, dequantize_runtime, fragment, fragment_gemm, fragment_mma, fragment_wgmma,
                              fragment_ra_gemm, repack)
from bitsmith.kernels.layout import runtime_codes
from conftest import CUDA, INTERPRETED, needs_interp, run_interpreter_tests
from ptx_emulator import run_ptx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gluon_fragment_probe as probe  # noqa: E402  (machine-code helpers)
import kernels_sass  # noqa: E402

needs_gluon = pytest.mark.skipif(not fragment_mma.HAVE_GLUON or INTERPRETED,
                                 reason="needs triton's Gluon compiler (not under the interpreter)")
needs_cuda = pytest.mark.skipif(not (CUDA and fragment_mma.HAVE_GLUON and not INTERPRETED), reason="needs a CUDA GPU")

FORMATS = {  # name: (method, options, fragment format)
    "int4_g64": ("rtn", {"bits": 4, "group_size": 64}, "int4"),
    "int4_g64_float0": ("rtn", {"bits": 4, "group_size": 64, "zero": "float"}, "int4"),
    "int4_g128_sym": ("rtn", {"bits": 4, "group_size": 128, "symmetric": True}, "int4"),
    "int4_channel": ("rtn", {"bits": 4, "group_size": None}, "int4"),
    "int3_g64": ("rtn", {"bits": 3, "group_size": 64}, "int3"),
    "int3_g128_sym": ("rtn", {"bits": 3, "group_size": 128, "symmetric": True}, "int3"),
    "nf4_g64_dq": ("nf", {"levels": 16, "block_size": 64, "double_quant": True}, "nf4"),
    "nf4_g128": ("nf", {"levels": 16, "block_size": 128}, "nf4"),
}


def _quantize(name: str, w: torch.Tensor):
    method, opts, _ = FORMATS[name]
    return bitsmith.quantize_tensor(w, method, **opts)


def _spec_a_element(lane: int, i: int) -> tuple[int, int]:
    """PTX ISA, mma.m16n8k16 (.f16/.bf16 A, row-major): element ``a_i`` of lane ``lane`` is at
    row ``groupID`` for a0, a1, a4, a5 and ``groupID + 8`` for a2, a3, a6, a7, column
    ``threadID_in_group * 2 + (i & 1)``, plus 8 for a4..a7; a_{2r}, a_{2r+1} are the low and
    high halves of 32-bit register r."""
    group, tid = divmod(lane, 4)
    row = group + (8 if i in (2, 3, 6, 7) else 0)
    col = tid * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def _channel_of_logical_k() -> torch.Tensor:
    """Which input channel each logical k of a group stands for, derived from how the kernel
    loads the activations: lane t reads channels 16 t .. 16 t + 15 as ``[t, 16]``, viewed as
    ``[t, s, rc, h]`` and laid out ``[s, rc, t, h]`` along k."""
    chan = torch.arange(64).view(4, 16).view(4, 4, 2, 2)  # [t, s, rc, h]
    return chan.permute(1, 2, 0, 3).reshape(64)


def _group_products_equal_w_dot_x(codes: torch.Tensor, tile_of) -> None:
    """For every row block and group: the A tile that ``tile_of(rb, grp)`` decodes (``[16, 64]``
    by logical k), times the activations as the kernel loads them, equals ``W . x`` exactly."""
    g = torch.Generator().manual_seed(11)
    n, k = codes.shape
    x = torch.randint(-8, 8, (4, k), generator=g).double()  # integers: every sum is exact
    chan = _channel_of_logical_k()
    for rb in range(n // 16):
        for grp in range(k // 64):
            a = tile_of(rb, grp)
            assert (a >= 0).all(), "every element of every product is in exactly one lane's word"
            want = codes[16 * rb:16 * rb + 16, grp * 64:grp * 64 + 64].double() @ x[:, grp * 64:grp * 64 + 64].t()
            assert torch.equal(a @ x[:, grp * 64 + chan].t(), want)


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_4bit_fragment_words_hold_each_products_weights(fmt):
    """int4 and codebooks: decode the packed words as the tensor cores read them (register r's
    halves at bits 4r and 16 + 4r for affine codes, 8r and 8r + 4 for codebooks, one word a
    product) and each group's products equal ``W . x``."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (32, 128), generator=g, dtype=torch.uint8)
    words = fragment.pack(codes, fmt).to(torch.int64) & 0xFFFFFFFF  # [NB, KG, 128]: lane * 4 + product
    assert words.shape == (2, 2, 128)

    def tile_of(rb, grp):
        a = torch.full((16, 64), -1.0, dtype=torch.float64)
        for lane in range(32):
            for step in range(4):
                word = int(words[rb, grp, lane * 4 + step])
                for i in range(8):
                    row, col = _spec_a_element(lane, i)
                    bit = 8 * (i // 2) + 4 * (i % 2) if fmt == "nf4" else 4 * (i // 2) + 16 * (i % 2)
                    a[row, 16 * step + col] = (word >> bit) & 15
        return a

    _group_products_equal_w_dot_x(codes, tile_of)


@pytest.mark.parametrize("magic", [0x6400, 0x4300], ids=["float16", "bfloat16"])
def test_int4_conversion_writes_each_register_whole(magic):
    """The int4 conversion PTX (operands as Triton numbers them with ``pack=2``: the word in
    ``$4`` and again in ``$5``), emulated: register ``r`` (``$r``) holds ``magic | q`` of the codes
    at bits ``4 r`` (low half) and ``16 + 4 r`` (high half), whatever the other bits hold."""
    g = torch.Generator().manual_seed(9)
    ptx = fragment_mma.cvt4_ptx(magic)
    for word in torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64).tolist() + [0xFFFFFFFF, 0]:
        regs = run_ptx(ptx, {"$4": word, "$5": word})
        for r in range(4):
            for h in range(2):
                half = (regs[f"${r}"] >> (16 * h)) & 0xFFFF
                assert half == magic | (word >> (4 * r + 16 * h)) & 15, (hex(word), r, h)


def test_int4_sixteenths_conversion_and_fma_give_code_minus_zero_exactly():
    """``SIXTEENTHS`` (float16 only), emulated: the conversion PTX writes ``MAGIC | q`` halves in
    the even registers and ``MAGIC | q << 4`` (``MAGIC + 16 q``) in the odd ones; the odd
    registers' elements are rows ``g + 8`` of the product (ISA), the rows the kernel multiplies by
    1/16; ``a * (1 or 1/16) - (MAGIC or MAGIC / 16) - zero``, each step a float16 value, is ``q -
    zero`` for every code and integer zero below 128."""
    import numpy as np

    magic = 0x6400
    ptx = fragment_mma.cvt4_ptx(magic, sixteenths=True)
    assert ptx.count("shr.b32") == 1
    g = torch.Generator().manual_seed(12)
    for word in torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64).tolist() + [0xFFFFFFFF, 0]:
        regs = run_ptx(ptx, {"$4": word, "$5": word})
        for r in range(4):
            for h in range(2):
                half = (regs[f"${r}"] >> (16 * h)) & 0xFFFF
                q = (word >> (4 * r + 16 * h)) & 15
                assert half == magic | (q << 4 if r % 2 else q), (hex(word), r, h)
                assert all(_spec_a_element(lane, 2 * r + h)[0] >= 8 for lane in range(32)) == bool(r % 2)
    f16 = np.float16
    for q in range(16):
        for zero in range(128):
            for high in (False, True):
                a = f16(1024 + (16 * q if high else q))
                per_code, offset = (f16(1 / 16), f16(1024 / 16)) if high else (f16(1), f16(1024))
                zero16 = f16(f16(1024 + zero) - (f16(1024) - offset))  # the kernel's 16-bit zero of that row
                assert float(zero16) == float(offset) + zero
                assert float(a) * float(per_code) - float(zero16) == q - zero  # one rounding in the FMA: none needed


def test_codebook_lookup_writes_each_register_whole():
    """NF4: the byte-plane lookup with whole-register outputs (``small_m._lut8_ptx(pairs=True)``,
    ``pack=2`` operands: the word in ``$4``, plane ``p`` in ``$6 + 2 p``), emulated on packed
    fragment words: register ``r`` of each product holds the float16 levels of the codes the ISA's
    fragment assignment puts there (the packer's ``8 r + 4 h`` bits)."""
    import numpy as np

    from bitsmith.formats.codebook import _codebook
    from bitsmith.kernels.small_m import _lut8_ptx

    levels = _codebook("nf", 16).levels32.half()
    bits = levels.view(torch.int16).to(torch.int64) & 0xFFFF
    planes = fragment_mma.table_planes(type("RW", (), {"kind": "codebook", "table_bits": {torch.float16: tuple(bits.tolist())}})(),
                                       torch.float16)
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.uint8)
    words = fragment.pack(codes, "nf4").to(torch.int64) & 0xFFFFFFFF
    ptx = _lut8_ptx(pairs=True)
    for lane in range(32):
        for step in range(4):
            word = int(words[0, 0, lane * 4 + step])
            regs = run_ptx(ptx, {"$4": word, "$5": word, **{f"${6 + 2 * p}": v & 0xFFFFFFFF for p, v in enumerate(planes)},
                                 **{f"${7 + 2 * p}": v & 0xFFFFFFFF for p, v in enumerate(planes)}})
            for i in range(8):
                row, col = _spec_a_element(lane, i)
                half = (regs[f"${i // 2}"] >> (16 * (i % 2))) & 0xFFFF
                q = int(codes[row, _channel_of_logical_k()[16 * step + col]])
                assert np.uint16(half).view(np.float16) == levels[q].numpy(), (lane, step, i)


@pytest.mark.parametrize("magic", [0x6400, 0x4300], ids=["float16", "bfloat16"])
def test_int3_fragment_words_convert_to_each_products_weights(magic):
    """int3: the packed words run through the kernel's conversion PTX (emulated; ``pack=2``
    operands, word ``b`` in ``$16 + 2 b``, register ``i`` written whole to ``$i``) give ``magic |
    q`` halves; placed by the ISA's fragment assignment (register ``i = 4 s + r`` of product ``s``:
    elements ``a_{2r}``, ``a_{2r+1}``), each group's products equal ``W . x``; 3 bits a weight."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 8, (32, 128), generator=g, dtype=torch.uint8)
    codes[0, :64] = 7  # every bit set somewhere, the top code in every slot of a block
    words = fragment.pack(codes, "int3").to(torch.int64) & 0xFFFFFFFF  # [NB, KG, 96]: word * 32 + lane
    assert words.numel() * 32 == codes.numel() * 3
    ptx = fragment_mma.cvt3_ptx(magic)

    def tile_of(rb, grp):
        a = torch.full((16, 64), -1.0, dtype=torch.float64)
        for lane in range(32):
            ws = [int(words[rb, grp, j * 32 + lane]) for j in range(3)]
            regs = run_ptx(ptx, {f"${16 + 2 * j + c}": ws[j] for j in range(3) for c in range(2)})  # pack=2: twice
            for step in range(4):
                for i in range(8):
                    row, col = _spec_a_element(lane, i)
                    h16 = (regs[f"${4 * step + i // 2}"] >> (16 * (i % 2))) & 0xFFFF
                    assert h16 & ~7 == magic, hex(h16)
                    a[row, 16 * step + col] = h16 & 7
        return a

    _group_products_equal_w_dot_x(codes, tile_of)


@pytest.mark.parametrize("fmt", fragment.FORMATS)
@pytest.mark.parametrize("shape", [(37, 100), (16, 64), (5, 200)])
def test_pack_unpack_round_trip_with_padding(fmt, shape):
    g = torch.Generator().manual_seed(hash((fmt, shape)) % 2**31)
    codes = torch.randint(0, 1 << fragment.CODE_BITS[fmt], shape, generator=g, dtype=torch.uint8)
    words = fragment.pack(codes, fmt)
    assert words.shape == (-(-shape[0] // 16), -(-shape[1] // 64), fragment.WORDS_PER_GROUP[fmt])
    assert torch.equal(fragment.unpack(words, *shape, fmt), codes)
    assert torch.equal(fragment.unpack(words, words.shape[0] * 16, words.shape[1] * 64, fmt)[shape[0]:],
                       torch.zeros(words.shape[0] * 16 - shape[0], words.shape[1] * 64, dtype=torch.uint8))


def test_pack_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="int3 codes reach 8"):
        fragment.pack(torch.full((16, 64), 8, dtype=torch.uint8), "int3")
    with pytest.raises(ValueError, match="not one of"):
        fragment.pack(torch.zeros(16, 64, dtype=torch.uint8), "int2")
    with pytest.raises(ValueError, match="2-D"):
        fragment.pack(torch.zeros(16, 64, 2, dtype=torch.uint8), "int4")
    with pytest.raises(ValueError, match="do not hold"):
        fragment.unpack(torch.zeros(1, 1, 96, dtype=torch.int32), 16, 64, "int4")


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("shape", [(37, 100), (64, 576), (5, 31)])
@pytest.mark.parametrize("order", fragment.ORDERS)
def test_fragment_layout_reads_back_the_storage_layout(name, shape, order, monkeypatch):
    from bitsmith.kernels import layout

    monkeypatch.setitem(layout.FRAGMENT, "order", order)
    g = torch.Generator().manual_seed(hash((name, shape)) % 2**31)
    w = torch.randn(shape, generator=g) * 0.05
    qt = _quantize(name, w)
    rw = repack(qt, layout="fragment")
    assert rw.layout == "fragment" and rw.fragment_format == FORMATS[name][2] and rw.words_hi is None
    assert rw.kp % 64 == 0 and rw.kp >= shape[1] and rw.fragment_order == order
    nb, ng = -(-shape[0] // 16), rw.kp // 64
    assert fragment_mma.blocks_groups(rw) == (nb, ng)
    assert rw.words.shape == ((nb, ng) if order == "block" else (ng, nb)) + (fragment.WORDS_PER_GROUP[rw.fragment_format],)
    assert torch.equal(dequantize_runtime(rw), qt.dequantize(torch.float32))
    assert torch.equal(runtime_codes(rw), runtime_codes(repack(qt, layout="rows")))
    if order == "group":  # row block b of group j is where block-major order has group j of row block b
        block = repack(qt, layout="fragment", order="block").words
        assert torch.equal(rw.words[ng - 1, nb - 1], block[nb - 1, ng - 1]) and torch.equal(rw.words[0, nb - 1], block[nb - 1, 0])


def test_fragment_layout_refusals_name_the_reason():
    w = torch.randn(32, 128) * 0.05
    for method, opts, what in (("rtn", {"bits": 4, "group_size": 32}, "groups of 32"),
                               ("rtn", {"bits": 2, "group_size": 64}, "2-bit"),
                               ("rtn", {"bits": 8, "group_size": 64}, "8-bit"),
                               ("nf", {"levels": 8, "block_size": 64}, "codebook 3-bit")):
        with pytest.raises(QuantizationError, match=what):
            repack(bitsmith.quantize_tensor(w, method, **opts), layout="fragment")
    with pytest.raises(QuantizationError, match="not one of"):
        repack(bitsmith.quantize_tensor(w, "rtn", bits=4, group_size=64), layout="columns")


def test_fragment_layout_is_only_chosen_when_switched_on_and_on_a_gpu(monkeypatch):
    from bitsmith.kernels import layout

    qt = bitsmith.quantize_tensor(torch.randn(32, 128) * 0.05, "rtn", bits=4, group_size=64)
    monkeypatch.setitem(layout.FRAGMENT, "formats", frozenset())
    assert repack(qt).layout == "rows"
    monkeypatch.setitem(layout.FRAGMENT, "formats", frozenset({"int4", "nf4", "int3"}))
    assert repack(qt).layout == "rows"  # a CPU weight: no kernel would read it


def test_fragment_order_setting_parses_and_names_unknown_orders():
    from bitsmith.kernels.layout import fragment_order

    assert fragment_order(None) == fragment_order("") == "group"
    assert fragment_order(" Block ") == "block"
    with pytest.raises(ValueError, match="BITSMITH_FRAGMENT_ORDER='rows': not one of"):
        fragment_order("rows")
    with pytest.raises(ValueError, match="not one of"):
        fragment.to_order(torch.zeros(1, 1, 128, dtype=torch.int32), "rows")


def test_fragment_switches_default_on_and_turn_off():
    """Unset, the environment puts int4, int3 and NF4 in the fragment layout and offers the Gluon
    kernel's wide tiles and the Hopper kernel (the H100 results in the layout's comments), PDL
    off; ``=0`` turns each off. Read at import, so each setting is its own process."""
    import json
    import os
    import subprocess

    code = ("import json; from bitsmith.kernels import fragment_mma as m, fragment_wgmma as w, layout as l; "
            "print(json.dumps([sorted(l.FRAGMENT['formats']), m.WIDE['enabled'], w.WGMMA['enabled'], m.PDL['enabled']]))")
    switches = ("BITSMITH_FRAGMENT", "BITSMITH_FRAGMENT_WIDE", "BITSMITH_FRAGMENT_WGMMA", "BITSMITH_FRAGMENT_PDL")
    base = {k: v for k, v in os.environ.items() if k not in switches}
    src = str(Path(__file__).resolve().parents[1] / "src")
    base["PYTHONPATH"] = src + os.pathsep + base.get("PYTHONPATH", "")

    def read(**env):
        out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert read() == [["int3", "int4", "nf4"], True, True, False]
    assert read(BITSMITH_FRAGMENT="0", BITSMITH_FRAGMENT_WIDE="0", BITSMITH_FRAGMENT_WGMMA="0",
                BITSMITH_FRAGMENT_PDL="1") == [[], False, False, True]


def test_fragment_setting_parses_and_names_unknown_formats():
    from bitsmith.kernels.layout import DEFAULT_FRAGMENT_FORMATS, fragment_formats

    assert fragment_formats(None) == fragment_formats("") == DEFAULT_FRAGMENT_FORMATS
    assert fragment_formats("1") == fragment_formats("all") == frozenset(fragment.FORMATS)
    assert fragment_formats("0") == fragment_formats("none") == frozenset()
    assert fragment_formats(" int3, NF4 ") == frozenset({"int3", "nf4"})
    with pytest.raises(ValueError, match=r"\['int2'\] not among"):
        fragment_formats("int3,int2")


# --- Triton's interpreter ---------------------------------------------------------------------------
@pytest.mark.skipif(INTERPRETED or not HAVE_TRITON, reason="the subprocess itself" if INTERPRETED else "triton is not installed")
def test_interpreter_suite():
    run_interpreter_tests(__file__)


@needs_interp
@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("order", fragment.ORDERS)
def test_interp_dequantize_kernel_equals_the_layout(name, dtype, order, monkeypatch):
    from bitsmith.kernels import layout, qmm

    monkeypatch.setitem(layout.FRAGMENT, "order", order)
    g = torch.Generator().manual_seed(hash(name) % 2**31)
    qt = _quantize(name, torch.randn(45, 200, generator=g) * 0.05)
    rw = repack(qt, layout="fragment")
    wt = qmm.dequantize_t(rw, dtype)
    assert wt.shape == (200, 45) and wt.dtype == dtype
    assert torch.equal(wt, dequantize_runtime(rw, torch.float32).to(dtype).t())


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("split,bias", [(2, True), (5, False)])
def test_interp_sum_partials_kernel_adds_in_split_order(dtype, split, bias):
    """The second kernel of a ``SUM_AFTER`` launch (``_sum_partials_kernel``, in the interpreter):
    ``out`` is the float32 partials added from zero in split order, plus the bias, rounded once,
    bit for bit what the last program of a tile computes (``_write_tile``), over a size that is
    not a multiple of its block. (Not bfloat16 here: the interpreter truncates float32 to
    bfloat16 where the GPU rounds to nearest; the CUDA test compares bfloat16 on the GPU.)"""
    from bitsmith.kernels import qmm

    m, n = 3, 700
    g = torch.Generator().manual_seed(split)
    ws = torch.randn(split * m * n, generator=g) * 10
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    main_args = (None, None, ws, torch.zeros(1, dtype=dtype))
    kernel, grid, args, consts, options = fragment_mma.sum_launch_args(main_args, b, out, split)
    assert grid == (-(-m * n // fragment_mma.SUM_BLOCK),) and not consts["PDL"] and "launch_pdl" not in options
    qmm._run(kernel, grid, args, consts, options)
    ref = torch.zeros(m, n, dtype=torch.float32)
    for part in ws.view(split, m, n):
        ref += part
    if bias:
        ref += b.float()
    assert torch.equal(out, ref.to(dtype))


@needs_interp
@pytest.mark.parametrize("m", [1, 33])
def test_interp_quant_matmul_off_the_gpu_dequantizes(m):
    """Off a CUDA GPU (here: the interpreter) and above 16 rows the layout is read by the
    dequantization kernel and the product is torch's."""
    from bitsmith.kernels import qmm

    g = torch.Generator().manual_seed(7)
    qt = _quantize("int3_g64", torch.randn(45, 200, generator=g) * 0.05)
    rw = repack(qt, layout="fragment")
    assert "CUDA" in fragment_mma.supports(rw, torch.float16)
    x = torch.randn(m, 200, generator=g)
    bias = torch.randn(45, generator=g)
    qmm.AUTOTUNE["enabled"] = False
    out = qmm.quant_matmul(x, rw, bias)
    ref = F.linear(x.double(), qt.dequantize(torch.float64), bias.double())
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


def _gemm_cfg(bm, rbs, split):
    return {"KERNEL": "fragment_gemm", "BLOCK_M": bm, "RBS": rbs, "SPLIT_K": split, "GROUP_M": 8,
            "num_warps": 4, "num_stages": 3}


@needs_interp
@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("order", fragment.ORDERS)
def test_interp_fragment_gemm_equals_float64(name, order, monkeypatch):
    """The GEMM for more than 16 rows against float64: N = 45 (a row-block tail), K = 200 (a group
    tail), token tiles wider than M, split-K with a split left without groups (3 splits of 4
    groups), a bias; float16 (the interpreter's bfloat16 products are wrong,
    the rows layout's kernel's too, so bfloat16 is tested on the GPU)."""
    from bitsmith.kernels import layout, qmm

    monkeypatch.setitem(layout.FRAGMENT, "order", order)
    g = torch.Generator().manual_seed(hash((name, order)) % 2**31)
    qt = _quantize(name, torch.randn(45, 200, generator=g) * 0.05)
    rw = repack(qt, layout="fragment")
    w64 = qt.dequantize(torch.float64)
    for m, bm, rbs, split in [(17, 32, 8, 1), (33, 64, 4, 3), (20, 32, 4, 2), (5, 32, 8, 1), (130, 128, 8, 2)]:
        x = torch.randn(m, 200, generator=g).half()
        b = torch.randn(45, generator=g).half()
        out = qmm._launch(rw, x, b, _gemm_cfg(bm, rbs, split))
        ref = F.linear(x.double(), w64, b.double())
        assert out.dtype == torch.float16 and out.shape == (m, 45)
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-3, (m, bm, rbs, split)


@needs_interp
@pytest.mark.parametrize("split", [1, 2])
def test_interp_fragment_gemm_low_rank_epilogue(split):
    """SVDQuant's branch ``t @ U`` (``t`` float32 ``[M, R]``, ``U`` float16 ``[R, N]``) added in
    the epilogue by the first K split only."""
    from bitsmith.kernels import qmm

    g = torch.Generator().manual_seed(11)
    qt = _quantize("int4_g64", torch.randn(45, 200, generator=g) * 0.05)
    rw = repack(qt, layout="fragment")
    x = torch.randn(24, 200, generator=g).half()
    t = torch.randn(24, 16, generator=g)
    up = (torch.randn(16, 45, generator=g) * 0.1).half()
    out = qmm._launch(rw, x, None, _gemm_cfg(32, 4, split), lowrank=(t, up))
    ref = x.double() @ qt.dequantize(torch.float64).t() + t.half().double() @ up.double()
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-3


@needs_interp
def test_interp_quant_matmul_between_16_and_512_rows_takes_the_gemm(monkeypatch):
    """Untuned, 17..512 rows of float16 go to the GEMM (its default config), float32 and more than
    512 rows to dequantize + matmul; each equals float64."""
    from bitsmith.kernels import qmm

    g = torch.Generator().manual_seed(3)
    qt = _quantize("nf4_g64_dq", torch.randn(45, 200, generator=g) * 0.05)
    rw = repack(qt, layout="fragment")
    monkeypatch.setitem(qmm.AUTOTUNE, "enabled", False)
    launched = []
    real = qmm._launch
    monkeypatch.setattr(qmm, "_launch", lambda rw_, x_, b_, cfg, *a, **kw: launched.append(cfg) or real(rw_, x_, b_, cfg, *a, **kw))
    for m, dtype, kernel in [(17, torch.float16, "fragment_gemm"), (512, torch.float16, "fragment_gemm"),
                             (513, torch.float16, None), (40, torch.float32, None)]:
        x = torch.randn(m, 200, generator=g).to(dtype)
        out = qmm.quant_matmul(x, rw)
        ref = x.double() @ qt.dequantize(torch.float64).t()
        assert launched[-1].get("KERNEL") == kernel and (kernel or launched[-1].get("DEQUANT_MM")), launched[-1]
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-3


def test_fragment_gemm_candidates():
    """What the tuner is offered: nothing from the GEMM up to 16 rows or past 512; above 16 rows
    the GEMM's configs and dequantize + cuBLAS; split-K only while the tiles leave SMs idle."""
    from bitsmith.kernels import qmm

    qt = _quantize("int4_g64", torch.randn(4096, 1024) * 0.05)
    rw = repack(qt, layout="fragment")
    for m in (1, 16, 513):
        assert fragment_gemm.configs(rw, m, torch.float16, 132) == []
    assert fragment_gemm.configs(rw, 64, torch.float32, 132) == []
    cands = fragment_gemm.configs(rw, 128, torch.float16, 132)
    assert {c["BLOCK_M"] for c in cands} == {64, 128}
    assert {c["RBS"] for c in cands} == {4, 8}
    # 4096 rows: 64 or 32 tiles of 64/128 columns a token tile; a split is offered only while the
    # splits before it left fewer than two programs an SM
    for c in cands:
        tiles = -(-128 // c["BLOCK_M"]) * (256 // c["RBS"])
        assert c["SPLIT_K"] == 1 or tiles * c["SPLIT_K"] // 2 < 2 * 132, c
    assert max(c["SPLIT_K"] for c in cands) == 8
    every = qmm._configs(rw, 33, torch.float16)
    assert every[-1] == {"DEQUANT_MM": True} and every[:-1] == [c for c in every if c.get("KERNEL") != "fragment"][:-1]
    assert [c for c in every if c.get("KERNEL") == "fragment_gemm"] == fragment_gemm.configs(rw, 33, torch.float16,
                                                                                              qmm._sm_count(rw.device))


# --- compiled for sm_90 on this CPU -----------------------------------------------------------------
@needs_gluon
@pytest.mark.parametrize("rb,tok,fmt,dtype", [(1, 8, "int4", "fp16"), (2, 16, "int4", "bf16"), (2, 8, "nf4", "fp16"),
                                              (2, 8, "int3", "fp16"), (1, 16, "int3", "bf16")])
def test_fragment_kernel_compiles_without_shared_memory(rb, tok, fmt, dtype):
    """The word and activation tiles reach the tensor-core operand layouts without data movement
    (the kernel asserts it: ``convert_layout(..., assert_trivial=True)``), and the main loop has
    no shared-memory access, shuffle or barrier; one 16-byte weight load per row block (int3:
    three 4-byte loads, the tile's fourth word masked off at compile time), ``4 * rb * tok / 8``
    products a step with the weights, plus those with the tile of ones for the activation sums
    (the same for every row block, so the compiler may share them; a codebook has no zeros, so
    none, and its lookup is 16 ``prmt`` a word)."""
    loop = probe.loop_opcodes(fragment_mma.compile_offline(fmt, rb, tok, act=dtype).asm["cubin"])
    assert not [op for op in loop if op.startswith(("LDS", "STS", "SHFL", "BAR"))], loop
    mma = [op for op in loop if op.startswith("HMMA.16816.F32")]
    assert len(mma) == 1, loop
    if fmt == "nf4":
        assert loop[mma[0]] == 4 * rb * tok // 8 and loop["PRMT"] == 16 * 4 * rb
    else:
        assert 4 * (rb + 1) * tok // 8 <= loop[mma[0]] <= 8 * rb * tok // 8
    if fmt == "int3":
        assert loop["LDG.E"] == 3 * rb, loop
    else:
        assert loop["LDG.E.128"] >= rb


def _loop_sass(cubin: bytes, holding: str = "HMMA") -> list[str]:
    """The main loop's instructions (the longest loop with tensor-core products: ``holding``), in order."""
    with tempfile.TemporaryDirectory() as tmp:
        return kernels_sass.loop_body(kernels_sass.sass_of(cubin, Path(tmp)), holding=holding)


@needs_gluon
@pytest.mark.parametrize("fmt", fragment.FORMATS)
def test_fragment_kernel_register_cap_issues_the_prefetch_first(fmt):
    """Compiled with the launch's register cap (:func:`fragment_mma.register_cap`), the next
    group's words (one 16-byte load a lane, int3 three 4-byte loads) go out before the loop's first
    tensor-core product, so they load during this group's math: without a cap ptxas issued them
    after it (benchmarks/results/kernels_regcap_sass.json)."""
    cfg = {"RB": 1}
    assert fragment_mma.register_cap(cfg) == 128 and fragment_mma.register_cap({"RB": 1, "maxnreg": 0}) == 0
    loop = _loop_sass(fragment_mma.compile_offline(fmt, 1, 8, 1).asm["cubin"])
    first_mma = next(i for i, t in enumerate(loop) if "HMMA" in t)
    words = [i for i, t in enumerate(loop) if ("LDG.E " in t if fmt == "int3" else "LDG.E.128" in t)]
    assert words and max(words) < first_mma, (words, first_mma)


@needs_gluon
@pytest.mark.parametrize("fmt,rb,tok,prefetch", [("int3", 4, 16, 2), ("int4", 4, 16, 2), ("nf4", 4, 16, 2),
                                                 ("int3", 2, 16, 2), ("int4", 2, 16, 2)])
def test_fragment_kernel_register_cap_never_spills(fmt, rb, tok, prefetch):
    """The heaviest configs the tuner tries (most row blocks, 16 tokens, two groups ahead) fit
    the launch's register cap: no local-memory loads or stores."""
    compiled = fragment_mma.compile_offline(fmt, rb, tok, prefetch)
    with tempfile.TemporaryDirectory() as tmp:
        ins = kernels_sass.sass_of(compiled.asm["cubin"], Path(tmp))
        regs = kernels_sass.registers(compiled.asm["cubin"], Path(tmp))
    assert regs <= fragment_mma.register_cap({"RB": rb})
    assert not [t for a, t in ins if re.match(r"(LDL|STL)\b", t)]


def test_fragment_launch_carries_the_register_cap():
    """Every launch of the fragment kernel compiles with the cap of its row blocks, unless the
    config names its own (0: none), on any device."""
    g = torch.Generator().manual_seed(3)
    qt = _quantize("int4_g64", torch.randn(128, 128, generator=g))
    rw = repack(qt, layout="fragment")
    x = torch.randn(1, 128, dtype=torch.float16)
    out = torch.empty(1, 128, dtype=torch.float16)
    for cfg, cap in (({"RB": 2}, 128), ({"RB": 4}, 192), ({"RB": 1, "maxnreg": 0}, None), ({"RB": 1, "maxnreg": 96}, 96)):
        full = {"KERNEL": "fragment", "W": 4, "SPLIT": 1, "PREFETCH": 1, "num_warps": 4, **cfg}
        options = fragment_mma.launch_args(rw, x, None, full, out)[4]
        assert options.get("maxnreg") == cap, (cfg, options)


@needs_gluon
@pytest.mark.parametrize("fmt", fragment.FORMATS)
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_fragment_kernel_pdl_loads_only_words_before_the_wait(fmt, prefetch):
    """As a programmatic dependent launch the fragment kernel may start while the previous kernel
    still writes (sm_90 PTX and SASS, no GPU needed): it signals the next launch first, loads the
    ``prefetch`` groups' words it prefetches (int4/NF4 one 16-byte load a row block and group,
    int3 four 4-byte loads, the fourth masked off) and then waits, before any scale (16-bit) load,
    store or atomic (a codebook's 16 levels, weight data as well, load there too: one 4-byte
    load a lane); without PDL there is no grid dependency instruction at all."""
    rb = 2
    compiled = fragment_mma.compile_offline(fmt, rb, 8, prefetch, PDL=True)
    ptx = compiled.asm["ptx"].splitlines()
    at = {key: [i for i, line in enumerate(ptx) if key in line]
          for key in ("griddepcontrol.launch_dependents", "griddepcontrol.wait", "ld.global", "ld.global.b16",
                      "st.global", "atom.")}
    assert len(at["griddepcontrol.launch_dependents"]) == 1 and len(at["griddepcontrol.wait"]) == 1
    signal, wait = at["griddepcontrol.launch_dependents"][0], at["griddepcontrol.wait"][0]
    early = [i for i in at["ld.global"] if i < wait]
    table = 1 if fmt == "nf4" else 0
    assert len(early) == prefetch * rb * (4 if fmt == "int3" else 1) + table and all(i > signal for i in early), early
    after = at["ld.global.b16"] + at["st.global"] + at["atom."]
    assert after and min(after) > wait
    with tempfile.TemporaryDirectory() as tmp:
        ops = [kernels_sass.opcode(t) for _, t in kernels_sass.sass_of(compiled.asm["cubin"], Path(tmp))]
    acq = ops.index("ACQBULK")  # griddepcontrol.wait in sm_90 machine code
    assert "PREEXIT" in ops[:acq] and not [op for op in ops[:acq] if op.startswith(("LDG.E.U16", "STG", "ATOMG"))]
    assert "griddepcontrol" not in fragment_mma.compile_offline(fmt, rb, 8, prefetch).asm["ptx"]


def test_fragment_launch_is_a_programmatic_dependent_where_pdl_is_on(monkeypatch):
    """With :data:`fragment_mma.PDL` on (``BITSMITH_FRAGMENT_PDL=1``, until a GPU has run it) the
    fragment kernel's launches take programmatic dependent launch exactly where
    :func:`bitsmith.kernels.small_m.pdl_ok` allows it (the kernel's ``PDL`` and the launch option);
    off, never."""
    from bitsmith.kernels import small_m

    qt = _quantize("int4_g64", torch.randn(128, 128, generator=torch.Generator().manual_seed(4)))
    rw = repack(qt, layout="fragment")
    x = torch.randn(1, 128, dtype=torch.float16)
    out = torch.empty(1, 128, dtype=torch.float16)
    cfg = {"KERNEL": "fragment", "W": 4, "RB": 1, "SPLIT": 1, "PREFETCH": 1, "num_warps": 4}
    for enabled, allowed in ((True, False), (True, True), (False, True)):
        monkeypatch.setitem(fragment_mma.PDL, "enabled", enabled)
        monkeypatch.setattr(small_m, "pdl_ok", lambda device, allowed=allowed: allowed)
        _, _, _, consts, options = fragment_mma.launch_args(rw, x, None, cfg, out)
        on = enabled and allowed
        assert consts["PDL"] is on and options.get("launch_pdl", False) is on


@needs_gluon
@pytest.mark.parametrize("fmt", fragment.FORMATS)
def test_group_major_order_loads_the_same_words_a_group(fmt):
    """Group-major words (``GROUP_MAJOR``) change only where a group's words are: compiled for
    sm_90, the main loop issues the same global loads as block-major order (one 16-byte load a
    lane and row block, int3 three 4-byte loads), still no shared memory, no spills; the
    dequantization kernel too loads the same."""
    def loop_and_spills(compiled):
        with tempfile.TemporaryDirectory() as tmp:
            ins = kernels_sass.sass_of(compiled.asm["cubin"], Path(tmp))
        loop = collections.Counter(kernels_sass.opcode(t) for t in kernels_sass.loop_body(ins, holding="HMMA"))
        return {op: c for op, c in loop.items() if op.startswith(("LDG", "LDS", "STS"))}, [
            t for _, t in ins if re.match(r"(LDL|STL)\b", t)]

    block, group = (loop_and_spills(fragment_mma.compile_offline(fmt, 2, 8, 1, GROUP_MAJOR=gm)) for gm in (False, True))
    assert group == block and not group[1] and not any(op.startswith(("LDS", "STS")) for op in group[0]), (block, group)
    ptx = [fragment_mma.compile_dequant_offline(fmt, GROUP_MAJOR=gm).asm["ptx"] for gm in (False, True)]
    assert [p.count("ld.global") for p in ptx] == [ptx[0].count("ld.global")] * 2 and ptx[0] != ptx[1]


@needs_gluon
def test_split_k_sum_loads_partials_together():
    """The last program of a tile adds the split-K partials: compiled for sm_90, the M = 1 kernel's
    sum loop loads 8 partials before its first add (8 L2 latencies overlapped, not one per
    partial) and the fragment kernel's (one row block, 8 tokens: 4 values a thread) 32."""
    from bitsmith.kernels import small_m

    for cubin, loads in ((small_m.compile_offline(4, 64, 64, 2).asm["cubin"], 8),
                         (fragment_mma.compile_offline("int4", 1, 8, 1).asm["cubin"], 32)):
        with tempfile.TemporaryDirectory() as tmp:
            body = kernels_sass.loop_body(kernels_sass.sass_of(cubin, Path(tmp)), holding="LDG.E.STRONG.GPU")
        first_add = next(i for i, t in enumerate(body) if re.match(r"FADD\b", t))
        assert sum("LDG.E.STRONG.GPU" in t for t in body[:first_add]) >= loads, body


@needs_gluon
@pytest.mark.parametrize("fmt,rb,tok,cluster", [("int4", 2, 8, 4), ("nf4", 1, 8, 8), ("int3", 2, 16, 2),
                                                ("int4", 1, 16, 8)])
def test_cluster_split_k_ending_compiles_for_sm90(fmt, rb, tok, cluster):
    """The K splits of a tile as one cluster (``CLUSTER``; sm_90 PTX and SASS, no GPU needed): the
    kernel's only shared memory is the partials' slots, so they start at ``global_smem``, where
    the push's address assumes them; each value a thread holds is pushed once through a mapped
    (``mapa``) distributed-shared-memory address; one cluster barrier (arrive with release, wait
    with acquire); no workspace atomics; the main loop is the workspace kernel's."""
    compiled = fragment_mma.compile_offline(fmt, rb, tok, 1, CLUSTER=cluster)
    assert compiled.metadata.shared == cluster * 64 * rb * tok * 4
    ptx = compiled.asm["ptx"]
    held = 64 * rb * tok // 128  # accumulator values a thread holds
    assert ptx.count("st.shared::cluster.f32") == held and ptx.count("mapa.shared::cluster.u32") == held
    assert ptx.count("barrier.cluster.arrive.release") == 1 and ptx.count("barrier.cluster.wait.acquire") == 1
    assert "atom." not in ptx and "ld.global.cg" not in ptx
    with tempfile.TemporaryDirectory() as tmp:
        ops = [kernels_sass.opcode(t) for _, t in kernels_sass.sass_of(compiled.asm["cubin"], Path(tmp))]
    assert ops.count("UCGABAR_ARV") == 1 and ops.count("UCGABAR_WAIT") == 1
    assert not [op for op in ops if op.startswith(("ATOM", "RED"))]
    loops = [probe.loop_opcodes(c.asm["cubin"]) for c in (compiled, fragment_mma.compile_offline(fmt, rb, tok, 1))]
    memory_and_mma = [{op: n for op, n in loop.items() if op.startswith(("LD", "ST", "HMMA", "BAR"))} for loop in loops]
    assert memory_and_mma[0] == memory_and_mma[1] and not any(op.startswith(("LDS", "STS")) for op in loops[0])
    assert abs(sum(loops[0].values()) - sum(loops[1].values())) <= 0.1 * sum(loops[1].values()), loops


def test_cluster_configs_pair_each_workspace_split_and_launch_as_clusters(monkeypatch):
    """Where clusters are allowed (:func:`fragment_mma.cluster_ok`: Hopper, :data:`CLUSTER` on,
    which it is not by default) every split of 2 to 8 whose slots fit
    (:func:`fragment_mma.cluster_fits`) is offered both ways; a cluster launch has one grid column (``qmm._run`` makes each program a cluster of
    ``SPLIT`` CTAs), takes no workspace and tells the kernel the cluster size. (``configs`` asks
    for a CUDA weight, so ``supports`` is bypassed here.)"""
    rw = repack(_quantize("int4_g64", torch.randn(4096, 1024) * 0.05), layout="fragment")
    monkeypatch.setattr(fragment_mma, "supports", lambda rw_, dtype: None)
    allowed = fragment_mma.cluster_ok
    assert not fragment_mma.CLUSTER["enabled"]  # opt-in
    monkeypatch.setitem(fragment_mma.CLUSTER, "enabled", True)
    assert not allowed(rw.device)  # a CPU weight
    assert not any(c.get("CLUSTER") for c in fragment_mma.configs(rw, 1, torch.float16, 132))
    monkeypatch.setattr(fragment_mma, "cluster_ok", lambda device: True)
    for m in (1, 16):
        cands = fragment_mma.configs(rw, m, torch.float16, 132)
        clustered = [c for c in cands if c.get("CLUSTER")]
        assert clustered and all(2 <= c["SPLIT"] <= 8 for c in clustered)
        plain = [c for c in cands if not c.get("CLUSTER") and not c.get("SUM_AFTER")]
        assert [{k: v for k, v in c.items() if k != "CLUSTER"} for c in clustered] == [
            c for c in plain if fragment_mma.cluster_fits(c["SPLIT"], c["RB"], fragment_mma.tokens(m))]
    assert fragment_mma.cluster_fits(8, 2, 8) and not fragment_mma.cluster_fits(8, 4, 8)
    assert not any(fragment_mma.cluster_fits(split, 1, 8) for split in (1, 3, 16))
    x = torch.randn(1, 1024, dtype=torch.float16)
    out = torch.empty(1, 4096, dtype=torch.float16)
    cfg = {"KERNEL": "fragment", "W": 4, "RB": 2, "SPLIT": 4, "PREFETCH": 1, "num_warps": 4}
    kernel, grid, args, consts, options = fragment_mma.launch_args(rw, x, None, {**cfg, "CLUSTER": True}, out)
    _, grid_ws, args_ws, consts_ws, options_ws = fragment_mma.launch_args(rw, x, None, cfg, out)
    assert grid == (32, 1) and grid_ws == (32, 4)
    assert options["cluster"] == 4 and "cluster" not in options_ws
    assert consts["CLUSTER"] == 4 and consts_ws["CLUSTER"] == 1
    assert args[2] is rw.scale and args_ws[2] is not rw.scale  # no workspace for the cluster
    assert args[14:16] == args_ws[14:16] == (4, 4)  # groups a split (16 groups of 64), splits
    monkeypatch.setitem(fragment_mma.CLUSTER, "enabled", False)
    assert not allowed(torch.device("cuda"))  # switched off: never, without asking the device


@needs_gluon
@pytest.mark.parametrize("fmt,tok", [("int4", 16), ("nf4", 32), ("int3", 16)])
def test_sum_after_ending_only_stores_partials(fmt, tok):
    """``SUM_AFTER`` (sm_90 PTX, no GPU needed): the split programs store their float32 partials
    and end, with no ticket (atomic), no fence and no output store; the main loop is the same."""
    after = fragment_mma.compile_offline(fmt, 1, tok, 1, SUM_AFTER=True)
    ticket = fragment_mma.compile_offline(fmt, 1, tok, 1)
    ptx = after.asm["ptx"]
    assert "atom." not in ptx and "fence" not in ptx and "st.global.b16" not in ptx
    assert ptx.count("st.global.b32") == tok // 2  # a thread's values of the [64, tok] tile (the ticket path: twice)
    assert "atom." in ticket.asm["ptx"]
    loops = [probe.loop_opcodes(c.asm["cubin"]) for c in (after, ticket)]
    assert {op: n for op, n in loops[0].items() if op.startswith(("LD", "ST", "HMMA"))} == {
        op: n for op, n in loops[1].items() if op.startswith(("LD", "ST", "HMMA"))}


def test_sum_after_configs_with_the_16_token_tile(monkeypatch):
    """The tuner offers each split of the 16-token tile also ending in the second kernel (none
    at 8 tokens, where the probe timed no gain, none with the wider tiles, which no GPU has run
    it with yet, and none without a split), at 16 splits and more only so, and the untuned
    default takes it, unless ``BITSMITH_FRAGMENT_SUM_KERNEL=0``; such a launch tells the kernel,
    the second launch reads the first's workspace and writes the output, with the bias."""
    rw = repack(_quantize("int4_g64", torch.randn(4096, 1024) * 0.05), layout="fragment")
    monkeypatch.setattr(fragment_mma, "supports", lambda rw_, dtype: None)
    for m in (8, 17, 40):  # 8 tokens: no gain measured; 32- and 64-token tiles: not run on a GPU yet
        assert not any(c.get("SUM_AFTER") for c in fragment_mma.configs(rw, m, torch.float16, 132))
        assert not fragment_mma.default_config(rw, m, 132).get("SUM_AFTER")
    for m in (9, 16):
        cands = fragment_mma.configs(rw, m, torch.float16, 132)
        after = [c for c in cands if c.get("SUM_AFTER")]
        assert after and all(c["SPLIT"] > 1 and fragment_mma.sums_after(c) for c in after)
        assert {c["SPLIT"] for c in after} >= {2, 16}
        assert [{k: v for k, v in c.items() if k != "SUM_AFTER"} for c in after if c["SPLIT"] < 16] == [
            c for c in cands if not c.get("SUM_AFTER") and c["SPLIT"] > 1]  # at 16 splits and more, only the second kernel
    assert fragment_mma.sums_after(fragment_mma.default_config(rw, 16, 132))
    monkeypatch.setitem(fragment_mma.SUM_AFTER, "enabled", False)
    off = fragment_mma.configs(rw, 16, torch.float16, 132)
    assert not any(c.get("SUM_AFTER") for c in off) and 16 in {c["SPLIT"] for c in off}
    assert not fragment_mma.default_config(rw, 16, 132).get("SUM_AFTER")
    x = torch.randn(16, 1024, dtype=torch.float16)
    out = torch.empty(16, 4096, dtype=torch.float16)
    b = torch.randn(4096, dtype=torch.float16)
    cfg = {"KERNEL": "fragment", "W": 4, "RB": 2, "SPLIT": 4, "PREFETCH": 1, "num_warps": 4, "SUM_AFTER": True}
    _, grid, args, consts, _ = fragment_mma.launch_args(rw, x, b, cfg, out)
    assert consts["SUM_AFTER"] and grid == (32, 4)
    assert not fragment_mma.launch_args(rw, x, b, {**cfg, "SPLIT": 1}, out)[3]["SUM_AFTER"]
    _, fgrid, fargs, fconsts, _ = fragment_mma.sum_launch_args(args, b, out, 4)
    assert fargs[0] is args[2] and fargs[1] is b and fargs[2] is out and fargs[3:] == (16, 4096, 4)
    assert fconsts["HAS_BIAS"] and fgrid == (16 * 4096 // fragment_mma.SUM_BLOCK,)


@needs_gluon
@pytest.mark.parametrize("fmt,rb,tok", [("int4", 2, 16), ("int3", 1, 32), ("nf4", 1, 64), ("int4", 1, 64)])
def test_zsub_takes_the_zero_off_the_operand_and_drops_the_ones_product(fmt, rb, tok):
    """``ZSUB`` (sm_90 machine code, no GPU needed): with the integer zero taken off the A
    operand in 16 bits (1) the main loop has no product with the tile of ones (the HMMA count
    falls to the weight products alone: row blocks x 4 k-steps x token tiles of 8) and keeps one
    float32 multiply-add per accumulator for the scale; with the scale applied there too (2) the
    loop has no float32 arithmetic at all, the tensor cores accumulating; both with a 16-bit
    subtraction (affine) and multiplication (2) per A register, no spill and no shared memory."""
    plain = probe.loop_opcodes(fragment_mma.compile_offline(fmt, rb, tok, 1).asm["cubin"])
    products = rb * 4 * tok // 8
    accumulators = 16 * rb * tok // 32  # float32 values a lane holds
    a_registers = 16 * rb  # per lane and group: 4 k-steps x 4 registers a row block
    affine = fmt != "nf4"

    def count(ops, *prefixes):
        return sum(n for op, n in ops.items() if op.split(".")[0] in prefixes)

    assert count(plain, "HMMA") == products + (4 * tok // 8 if affine else 0)  # the ones product: once for all row blocks
    for zsub in (1, 2) if affine else (2,):
        compiled = fragment_mma.compile_offline(fmt, rb, tok, 1, ZSUB=zsub, INT_ZERO=affine)
        ops = probe.loop_opcodes(compiled.asm["cubin"])
        assert count(ops, "HMMA") == products, (zsub, ops)
        assert count(ops, "HADD2") >= (a_registers if affine else 0), ops
        if zsub == 1:
            assert count(ops, "FFMA", "FMUL") == accumulators, ops
        else:
            assert count(ops, "FFMA", "FMUL", "FADD") == 0 and count(ops, "HMUL2", "HFMA2") >= a_registers, ops
        assert not [op for op in ops if op.startswith(("LDS", "STS", "SHFL", "BAR", "LDL", "STL"))], ops
        with tempfile.TemporaryDirectory() as tmp:
            ins = kernels_sass.sass_of(compiled.asm["cubin"], Path(tmp))
        assert not [t for a, t in ins if re.match(r"(LDL|STL)\b", t)]
        if fmt == "int4":  # codes of rows g + 8 left in place: a word's conversion shifts once, not three times
            six = probe.loop_opcodes(fragment_mma.compile_offline(fmt, rb, tok, 1, ZSUB=zsub, SIXTEENTHS=True).asm["cubin"])
            words = a_registers // 4
            assert count(six, "HMMA") == products and count(six, "HFMA2") >= a_registers, six
            shifts = [sum(n for op, n in c.items() if op.startswith("SHF.R.U32")) for c in (ops, six)]
            assert shifts[1] <= shifts[0] - 2 * words, (six, ops)
            assert sum(six.values()) < sum(ops.values()), (six, ops)


def test_zsub_and_sum_token_settings_parse_and_name_bad_values():
    """``BITSMITH_FRAGMENT_ZSUB`` / ``_SUM_TOKENS``: unset is the default, a comma list of allowed
    values is taken as given, anything else names the variable and what it takes."""
    parse = fragment_mma.int_list
    assert parse("BITSMITH_FRAGMENT_ZSUB", None, (0, 1, 2), (0,)) == (0,)
    # the library's own default: every mode offered, unless the environment says otherwise
    assert fragment_mma.ZSUB["modes"] == ((0, 1, 2) if "BITSMITH_FRAGMENT_ZSUB" not in os.environ else
                                         parse("BITSMITH_FRAGMENT_ZSUB", os.environ["BITSMITH_FRAGMENT_ZSUB"], (0, 1, 2), (0,)))
    assert parse("BITSMITH_FRAGMENT_ZSUB", " 0, 2 ", (0, 1, 2), (0,)) == (0, 2)
    assert parse("BITSMITH_FRAGMENT_SUM_TOKENS", "16,32,64", (16, 32, 64), (16,)) == (16, 32, 64)
    for bad in ("3", "x", "0;1", ","):
        with pytest.raises(ValueError, match=r"BITSMITH_FRAGMENT_ZSUB=.*0, 1, 2"):
            parse("BITSMITH_FRAGMENT_ZSUB", bad, (0, 1, 2), (0,))


def test_integer_zeros_from_128_take_the_float_path(monkeypatch):
    """A stored uint8 zero may reach 255, and ``MAGIC + zero`` is exact in bfloat16 (MAGIC 128)
    only below 128: such a weight is not marked ``int_zero``, so no kernel subtracts it in one
    16-bit step (the torch reference reads it the same either way)."""
    monkeypatch.setitem(fragment_mma.ZSUB, "modes", (0, 1, 2))
    qt = _quantize("int4_g64", torch.randn(64, 256) * 0.05)
    assert repack(qt, layout="fragment").int_zero and int(qt.tensors["zero"].max()) < 16
    qt.tensors["zero"][0, 0] = 200
    rw = repack(qt, layout="fragment")
    assert not rw.int_zero and fragment_mma.zsub_modes(rw) == (0,)


def test_zsub_modes_follow_the_weight_and_the_setting(monkeypatch):
    """What the tuner offers (``BITSMITH_FRAGMENT_ZSUB``, default all three): the zero off the
    operand (1) only for integer zeros, the scale too (2) for integer zeros and codebooks, never
    for float zeros; each offered mode doubles the candidates and reaches the launch's constexprs."""
    ints = repack(_quantize("int4_g64", torch.randn(256, 1024) * 0.05), layout="fragment")
    sym = repack(_quantize("int4_g128_sym", torch.randn(256, 1024) * 0.05), layout="fragment")
    floats = repack(_quantize("int4_g64_float0", torch.randn(256, 1024) * 0.05), layout="fragment")
    nf4 = repack(_quantize("nf4_g64_dq", torch.randn(256, 1024) * 0.05), layout="fragment")
    monkeypatch.setitem(fragment_mma.ZSUB, "modes", (0,))
    assert all(fragment_mma.zsub_modes(rw) == (0,) for rw in (ints, floats, nf4))
    monkeypatch.setitem(fragment_mma.ZSUB, "modes", (0, 1, 2))
    assert fragment_mma.zsub_modes(ints) == (0, 1, 2) and fragment_mma.zsub_modes(sym) == (0, 1, 2)
    assert fragment_mma.zsub_modes(floats) == (0,) and fragment_mma.zsub_modes(nf4) == (0, 2)
    monkeypatch.setitem(fragment_mma.ZSUB, "modes", (2,))
    assert fragment_mma.zsub_modes(floats) == (0,)  # nothing offered applies: the plain kernel
    monkeypatch.setattr(fragment_mma, "supports", lambda rw_, dtype: None)
    monkeypatch.setitem(fragment_mma.ZSUB, "modes", (0,))
    base = fragment_mma.configs(nf4, 16, torch.float16, 132)
    monkeypatch.setitem(fragment_mma.ZSUB, "modes", (0, 2))
    both = fragment_mma.configs(nf4, 16, torch.float16, 132)
    assert len(both) == 2 * len(base) and [c for c in both if "ZSUB" not in c] == base
    assert all(c["ZSUB"] == 2 for c in both if "ZSUB" in c)
    x = torch.randn(16, 1024, dtype=torch.float16)
    out = torch.empty(16, 256, dtype=torch.float16)
    cfg = {"KERNEL": "fragment", "W": 4, "RB": 2, "SPLIT": 1, "PREFETCH": 1, "num_warps": 4}
    assert fragment_mma.launch_args(ints, x, None, {**cfg, "ZSUB": 1}, out)[3]["ZSUB"] == 1
    consts = fragment_mma.launch_args(ints, x, None, cfg, out)[3]
    assert consts["ZSUB"] == 0 and consts["INT_ZERO"]
    assert not fragment_mma.launch_args(floats, x, None, cfg, out)[3]["INT_ZERO"]
    assert not fragment_mma.launch_args(nf4, x, None, cfg, out)[3]["INT_ZERO"]
    # sixteenths (when on): int4 with integer zeros, float16, a ZSUB mode; never bfloat16, codebooks or float zeros
    monkeypatch.setitem(fragment_mma.SIXTEENTHS, "enabled", True)
    assert fragment_mma.launch_args(ints, x, None, {**cfg, "ZSUB": 1}, out)[3]["SIXTEENTHS"]
    assert not fragment_mma.launch_args(ints, x, None, cfg, out)[3]["SIXTEENTHS"]
    assert fragment_mma.sixteenths(sym, torch.float16, 2) and not fragment_mma.sixteenths(ints, torch.bfloat16, 1)
    assert not fragment_mma.sixteenths(nf4, torch.float16, 2) and not fragment_mma.sixteenths(floats, torch.float16, 1)
    monkeypatch.setitem(fragment_mma.SIXTEENTHS, "enabled", False)
    assert not fragment_mma.sixteenths(ints, torch.float16, 1)


@needs_gluon
@pytest.mark.parametrize("fmt", fragment.FORMATS)
def test_wide_token_tiles_compile_without_spills_or_shared_memory(fmt):
    """``TOK`` 32 and 64 (:data:`WIDE`) under their caps (:data:`MAXNREG_WIDE`):
    the operand conversions stay trivial (asserted while compiling), the main loop has no shared
    memory, shuffle or barrier, and nothing spills to local memory."""
    for (rb, tok), cap in fragment_mma.MAXNREG_WIDE.items():
        compiled = fragment_mma.compile_offline(fmt, rb, tok, 1)
        with tempfile.TemporaryDirectory() as tmp:
            ins = kernels_sass.sass_of(compiled.asm["cubin"], Path(tmp))
            assert kernels_sass.registers(compiled.asm["cubin"], Path(tmp)) <= cap
        loop = probe.loop_opcodes(compiled.asm["cubin"])
        assert not [op for op in loop if op.startswith(("LDS", "STS", "SHFL", "BAR"))], (rb, tok, loop)
        assert not [t for _, t in ins if re.match(r"(LDL|STL)\b", t)], (rb, tok)


def test_wide_token_tiles_can_be_switched_off(monkeypatch):
    """With :data:`WIDE` off (``BITSMITH_FRAGMENT_WIDE=0``) the Gluon kernel's configs stop at 16
    tokens; on (the default) they reach 64, with the token tile and row blocks of
    :data:`MAXNREG_WIDE` and split-K x M within the workspace. (``configs`` asks for a CUDA
    weight, so ``supports`` is bypassed here.)"""
    rw = repack(_quantize("int4_g64", torch.randn(4096, 1024) * 0.05), layout="fragment")
    monkeypatch.setattr(fragment_mma, "supports", lambda rw_, dtype: None)
    monkeypatch.setitem(fragment_mma.WIDE, "enabled", False)
    assert fragment_mma.max_m() == 16 and fragment_mma.configs(rw, 17, torch.float16, 132) == []
    monkeypatch.setitem(fragment_mma.WIDE, "enabled", True)
    assert fragment_mma.configs(rw, 65, torch.float16, 132) == []
    for m, tok in ((17, 32), (32, 32), (33, 64), (64, 64)):
        cands = fragment_mma.configs(rw, m, torch.float16, 132)
        assert cands and {c["RB"] for c in cands} == {r for r, t in fragment_mma.MAXNREG_WIDE if t == tok}
        assert all(c["SPLIT"] * m <= fragment_mma.MAX_PARTIALS for c in cands)
        assert fragment_mma.tokens(m) == tok
        dflt = fragment_mma.default_config(rw, m, 132)
        assert fragment_mma.register_cap(dflt, tok) == fragment_mma.MAXNREG_WIDE[(dflt["RB"], tok)]


@needs_gluon
@pytest.mark.parametrize("fmt", fragment.FORMATS)
def test_wgmma_kernel_compiles_for_sm90(fmt):
    """The Hopper kernel, compiled for sm_90 at every (row blocks,
    token tile) its configs use, plain and with tails, a bias and group-major words: the fragment
    words reach ``wgmma``'s register A operand without data movement (asserted while compiling),
    each group is four ``HGMMA.64xTOKx16`` a row block with one shared-memory tile of activations
    between two barriers (stored 16 bytes at a time with ``K_MAJOR``), no spills; integer zeros
    dequantize with one 16-bit subtraction a register, float zeros with two; int4 in sixteenths
    (:data:`bitsmith.kernels.fragment_mma.SIXTEENTHS`) with one multiply-add a register and a shift
    a word fewer than two."""
    for rb, tok in ((1, 16), (2, 16), (1, 32), (2, 32), (1, 64)):
        for extra in ({}, {"TAIL": True, "HAS_BIAS": True, "GROUP_MAJOR": True}, {"K_MAJOR": True},
                      {"K_MAJOR": True, "TAIL": True, "BF16": True}):
            compiled = fragment_wgmma.compile_offline(fmt, rb, tok, 1, act="bf16" if extra.get("BF16") else "fp16", **extra)
            with tempfile.TemporaryDirectory() as tmp:
                ins = kernels_sass.sass_of(compiled.asm["cubin"], Path(tmp))
            loop_ins = kernels_sass.loop_body(ins, holding="HGMMA")
            loop = collections.Counter(kernels_sass.opcode(t) for t in loop_ins)
            dt = ".BF16" if extra.get("BF16") else ""
            assert loop[f"HGMMA.64x{tok}x16.F32{dt}"] == 4 * rb, (rb, tok, extra, loop)
            assert sum(c for op, c in loop.items() if op.startswith("BAR")) == 2, (rb, tok, loop)
            assert not [t for _, t in ins if re.match(r"(LDL|STL)\b", t)], (rb, tok, extra)
            stores = {op: c for op, c in loop.items() if op.startswith("STS")}
            # a thread's share of the [TOK, 64] activations: 16-byte stores k-major, 2-byte ones else
            assert stores == ({"STS.128": tok // 16} if extra.get("K_MAJOR") else {"STS.U16": tok // 2}), (rb, tok, stores)
            # the group's MMA is waited for before the next group begins
            assert [t for t in loop_ins if t.startswith("WARPGROUP.DEPBAR")] == ["WARPGROUP.DEPBAR.LE gsb0, 0x0"]
            if fmt != "nf4" and not extra:  # integer zeros: one exact 16-bit subtraction an A register (of 16 a row
                # block), then the scale's product; float zeros take the magic off first, a second subtraction
                assert loop["HMUL2"] == 16 * rb and 16 * rb <= loop["HADD2"] <= 16 * rb + 2, loop
                floats = fragment_wgmma.compile_offline(fmt, rb, tok, 1, INT_ZERO=False)
                fl = collections.Counter(map(kernels_sass.opcode, _loop_sass(floats.asm["cubin"], "HGMMA")))
                assert fl["HADD2"] >= 32 * rb, fl
            if fmt == "int4" and not extra:  # in sixteenths (float16): one multiply-add a register, a shift a word
                six = fragment_wgmma.compile_offline(fmt, rb, tok, 1, SIXTEENTHS=True)
                sx = collections.Counter(map(kernels_sass.opcode, _loop_sass(six.asm["cubin"], "HGMMA")))
                assert sx["HFMA2"] == 16 * rb and sx["HMUL2"] == 16 * rb and sx["HADD2"] <= 2 * rb, sx
                assert sx["SHF.R.U32.HI"] <= loop["SHF.R.U32.HI"] - 8 * rb and sum(sx.values()) < sum(loop.values()), sx


def _spills_inside_partitions(ins) -> list:
    """Local-memory traffic of a warp-specialized kernel's SASS other than ptxas's carrying of a
    few prologue values across the register split (stored before the first ``USETMAXREG``,
    reloaded within a few instructions of one): a partition's own spills."""
    split = [i for i, (_, t) in enumerate(ins) if t.startswith("USETMAXREG")]
    return [t for i, (_, t) in enumerate(ins) if re.match(r"(LDL|STL)\b", t)
            and not (t.startswith("STL") and i < split[0])
            and not (t.startswith("LDL") and any(0 < i - j <= 8 for j in split))]


def test_spills_inside_partitions_tells_the_prologue_carry_from_a_spill():
    ins = [(0, "STL [R1], R2"), (1, "USETMAXREG.DEALLOC.CTAPOOL 0x50"), (2, "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xa8"),
           (3, "LDL R6, [R1]")] + [(4 + i, "FADD R1, R2, R3") for i in range(20)]
    assert _spills_inside_partitions(ins) == []
    assert _spills_inside_partitions(ins + [(30, "STL [R1+0x8], R7")]) == ["STL [R1+0x8], R7"]
    assert _spills_inside_partitions(ins + [(30, "LDL R7, [R1]")]) == ["LDL R7, [R1]"]


@pytest.mark.parametrize("magic", [0x6400, 0x4300], ids=["float16", "bfloat16"])
def test_ra_gemm_cuts_each_lanes_wgmma_registers_from_its_quads_words(magic):
    """The register-operand GEMM's A operand, emulated lane by lane on packed int4 fragment words:
    lane ``4 g + t`` gives words ``2 rc`` and ``2 rc + 1`` of lane ``4 g + s`` (its quad's 16
    words) and its :func:`fragment_ra_gemm.selector` to :func:`fragment_ra_gemm.cut4_ptx`;
    register ``rr`` half
    ``h`` must be ``magic | q`` of row ``g + 8 rr``, channel ``16 s + 8 rc + 2 t + h`` in the
    channels' own order: ``wgmma``'s register fragment (the PTX ISA's ``m16n8k16`` A layout in each
    warp), with no permutation of the activations. :func:`fragment_ra_gemm.source_of` states the
    same rule; both are checked against the packer."""
    g_ = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (16, 64), generator=g_, dtype=torch.uint8)
    words = fragment.pack(codes, "int4")[0, 0].tolist()  # one row block and group: [lane * 4 + word]
    ptx = fragment_ra_gemm.cut4_ptx(magic)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for s_ in range(4):
            for rc in range(2):
                pair = [words[(4 * g + s_) * 4 + 2 * rc + j] & 0xFFFFFFFF for j in (0, 1)]
                sel = fragment_ra_gemm.selector(t, codebook=False)
                regs = run_ptx(ptx, {"$2": pair[0], "$3": pair[0], "$4": pair[1], "$5": pair[1], "$6": sel, "$7": sel})
                for rr in range(2):
                    for h in range(2):
                        q = int(codes[g + 8 * rr, 16 * s_ + 8 * rc + 2 * t + h])
                        assert (regs[f"${rr}"] >> (16 * h)) & 0xFFFF == magic | q, (lane, s_, rc, rr, h)
                        src_lane, src_word, bit = fragment_ra_gemm.source_of(lane, rr + 2 * rc, h, s_)
                        assert (words[src_lane * 4 + src_word] >> bit) & 15 == q, (lane, s_, rc, rr, h)


def _innermost_loop_holding(ins, prefix: str) -> list:
    """The instructions of the shortest backward branch's body holding an instruction of opcode
    ``prefix`` (a group's loop, inside the loop over tiles)."""
    spans = [(int(m.group(1), 16), addr) for addr, t in ins if (m := re.search(r"BRA (0x[0-9a-f]+)", t))
             and int(m.group(1), 16) < addr]
    spans = [(lo, hi) for lo, hi in spans
             if any(lo <= a <= hi and kernels_sass.opcode(t).startswith(prefix) for a, t in ins)]
    lo, hi = min(spans, key=lambda sp: sp[1] - sp[0])
    return [t for a, t in ins if lo <= a <= hi]


def test_ra_gemm_cuts_codebook_levels_from_its_quads_words():
    """NF4 in the register-operand GEMM, emulated lane by lane: the word pair (as for int4) and the
    lane's codebook selector run through :func:`fragment_ra_gemm.cut_lut_ptx` give register ``rr``'s
    float16 levels of row ``g + 8 rr``, channels ``16 s + 8 rc + 2 t + h`` (the codebook's byte
    planes, ``pack=2`` operands)."""
    import numpy as np

    from bitsmith.formats.codebook import _codebook

    levels = _codebook("nf", 16).levels32.half()
    bits = levels.view(torch.int16).to(torch.int64) & 0xFFFF
    planes = fragment_mma.table_planes(type("RW", (), {"kind": "codebook", "table_bits": {torch.float16: tuple(bits.tolist())}})(),
                                       torch.float16)
    g_ = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (16, 64), generator=g_, dtype=torch.uint8)
    words = fragment.pack(codes, "nf4")[0, 0].tolist()
    ptx = fragment_ra_gemm.cut_lut_ptx()
    for lane in range(32):
        g, t = divmod(lane, 4)
        for s_ in range(4):
            for rc in range(2):
                pair = [words[(4 * g + s_) * 4 + 2 * rc + j] & 0xFFFFFFFF for j in (0, 1)]
                sel = fragment_ra_gemm.selector(t, codebook=True)
                regs = run_ptx(ptx, {"$2": pair[0], "$3": pair[0], "$4": pair[1], "$5": pair[1], "$6": sel, "$7": sel,
                                     **{f"${8 + 2 * p}": v & 0xFFFFFFFF for p, v in enumerate(planes)},
                                     **{f"${9 + 2 * p}": v & 0xFFFFFFFF for p, v in enumerate(planes)}})
                for rr in range(2):
                    for h in range(2):
                        q = int(codes[g + 8 * rr, 16 * s_ + 8 * rc + 2 * t + h])
                        half = (regs[f"${rr}"] >> (16 * h)) & 0xFFFF
                        assert np.uint16(half).view(np.float16) == levels[q].numpy(), (lane, s_, rc, rr, h)


@needs_gluon
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_ra_gemm_compiles_for_sm90(fmt):
    """The register-operand GEMM compiled for sm_90, every candidate (the first also in bfloat16,
    without a bias or zeros, per-row scales, float zeros): no partition spills, fits the H100's
    227 KiB, each consumer's loop reads its quad's words with four 16-byte shared loads, cuts and
    dequantizes them in registers (no shuffle, no shared store) and issues four
    register-operand ``wgmma`` a group, waiting for them before the slot is released; every load
    comes by TMA (the activations 2-D, the words 3-D); the outputs leave by ``stmatrix`` and a TMA
    store, or by masked 2-byte stores."""
    variants = ({"BF16": True}, {"HAS_BIAS": False, "HAS_ZERO": False, "SG": 0}) + (({"INT_ZERO": False},)
                                                                                   if fmt == "int4" else ())
    for cand in fragment_ra_gemm.CANDIDATES:
        bt, bn, st, pipe, tma_out = cand
        for extra in ({},) + (variants if cand == fragment_ra_gemm.CANDIDATES[0] else ()):
            compiled = fragment_ra_gemm.compile_offline(fmt, bt, bn, st, pipe, tma_out,
                                                        act="bf16" if extra.get("BF16") else "fp16", **extra)
            case = (cand, extra)
            assert compiled.metadata.shared <= 227 * 1024, (case, compiled.metadata.shared)
            with tempfile.TemporaryDirectory() as tmp:
                ins = kernels_sass.sass_of(compiled.asm["cubin"], Path(tmp))
            ops = collections.Counter(kernels_sass.opcode(t) for _, t in ins)
            assert not _spills_inside_partitions(ins), case
            dt = ".BF16" if extra.get("BF16") else ""
            steps = 2 if pipe == 2 else 1  # steps a loop iteration
            assert ops[f"HGMMA.64x{bt}x16.F32{dt}"] == 8 * steps, ops  # four a group in each consumer's loop
            loop = _innermost_loop_holding(ins, "HGMMA")
            lops = collections.Counter(kernels_sass.opcode(t) for t in loop)
            assert lops["LDS.128"] >= 4 * steps and not lops["SHFL.IDX"] and not lops["STS"] and not lops["LDL"], lops
            assert lops["WARPGROUP.DEPBAR.LE"] == steps and lops["SYNCS.ARRIVE.TRANS64.A1T0"] == steps, lops
            # PIPE: each step's wgmma waits only after the next step's weights are scaled (built in
            # the shadow of the wgmma, not behind its wait); PIPE 2 without copying the register set
            scaled, since_mma = [], 0  # products between each step's last wgmma and its wait
            for t in loop:
                op = kernels_sass.opcode(t)
                since_mma = 0 if op.startswith("HGMMA") else since_mma + op.startswith("HMUL2")
                scaled += [since_mma] if op == "WARPGROUP.DEPBAR.LE" else []
            assert (min(scaled) >= 16) == bool(pipe), (case, scaled)
            copies = sum(bool(re.match(r"IMAD\.MOV\.U32 R\d+, RZ, RZ, R\d+$", t)) for t in loop)
            assert (copies >= 16) == (pipe == 1) or fmt == "nf4", (case, copies)
            assert ops["UTMALDG.2D"] >= 1 and ops["UTMALDG.3D"] >= 1 and not ops["LDG.E.128"], ops
            assert ops["USETMAXREG.TRY_ALLOC.CTAPOOL"] >= 1, ops
            if tma_out:  # the outputs transposed into shared memory by stmatrix, out by TMA
                assert ops["STSM.16.MT88.4"] and ops["UTMASTG.2D"] and not ops["STG.E.U16"], ops
            else:
                assert ops["STG.E.U16"] and not ops["UTMASTG.2D"], ops


def test_ra_gemm_is_offered_from_513_rows_for_int4_and_nf4(monkeypatch):
    from bitsmith.kernels import qmm

    rw = repack(_quantize("int4_g64", torch.randn(256, 128) * 0.05), layout="fragment")
    assert fragment_ra_gemm.configs(rw, 2048, torch.float16) == []  # a CPU weight: Hopper only
    assert "Hopper" in fragment_ra_gemm.supports(rw, torch.zeros(4, 128)) or not fragment_mma.HAVE_GLUON
    monkeypatch.setattr(fragment_wgmma, "supports", lambda rw_, dtype: None if dtype in fragment_mma.MAGIC else "dtype")
    assert fragment_ra_gemm._offered("") == ("int4", "nf4") == fragment_ra_gemm._offered("1")
    assert fragment_ra_gemm._offered("int4") == ("int4",) and fragment_ra_gemm._offered("0") == ()
    monkeypatch.setitem(fragment_ra_gemm.RA_GEMM, "formats", ())
    assert fragment_ra_gemm.configs(rw, 2048, torch.float16) == []
    monkeypatch.setitem(fragment_ra_gemm.RA_GEMM, "formats", ("int4",))
    assert fragment_ra_gemm.configs(rw, 512, torch.float16) == []
    assert fragment_ra_gemm.configs(rw, 2048, torch.float32) == []
    cands = fragment_ra_gemm.configs(rw, 2048, torch.bfloat16)
    assert [(c["BLOCK_T"], c["BLOCK_N"], c["STAGES"], c["PIPE"], c["TMA_OUT"]) for c in cands] == \
        list(fragment_ra_gemm.CANDIDATES)
    assert all(c in qmm._configs(rw, 2048, torch.float16) for c in cands)
    odd = repack(_quantize("int4_g64", torch.randn(256, 192) * 0.05), layout="fragment")  # 3 groups: no pairs
    assert [c for c in fragment_ra_gemm.CANDIDATES if c[3] != 2] == \
        [(c["BLOCK_T"], c["BLOCK_N"], c["STAGES"], c["PIPE"], c["TMA_OUT"]) for c in fragment_ra_gemm.configs(odd, 2048, torch.float16)]
    pair_cfg = next(c for c in cands if c["PIPE"] == 2)  # a cached pair config on such a weight runs one step at a time
    x = torch.zeros(2048, 192, dtype=torch.float16)
    assert fragment_ra_gemm.launch_args(odd, x, None, pair_cfg, torch.empty(2048, 256, dtype=torch.float16), 132)[3]["PIPE"] == 1
    nf4 = repack(_quantize("nf4_g128", torch.randn(256, 128) * 0.05), layout="fragment")
    assert fragment_ra_gemm.configs(nf4, 2048, torch.float16) == []  # NF4 not with BITSMITH_FRAGMENT_RA_GEMM=int4
    monkeypatch.setitem(fragment_ra_gemm.RA_GEMM, "formats", ("int4", "nf4"))
    assert len(fragment_ra_gemm.configs(nf4, 2048, torch.float16)) == len(fragment_ra_gemm.CANDIDATES)
    for name, n in (("int3_g64", 256), ("int4_g64", 260)):  # int3; scale rows TMA cannot read
        other = repack(_quantize(name, torch.randn(n, 128) * 0.05), layout="fragment")
        assert not fragment_ra_gemm.meta_tma_ok(other) and fragment_ra_gemm.configs(other, 2048, torch.float16) == [], name
    assert fragment_ra_gemm.meta_tma_ok(rw) and fragment_ra_gemm.meta_tma_ok(nf4)


def test_wgmma_activation_tiles_follow_the_fragment_k_order():
    """The permutations the Hopper kernel stores its activations with (``TO_K_TOKEN``, and
    ``TO_TOKEN_K`` with ``K_MAJOR``), applied by torch to a ``[token, 64]`` tile viewed as
    ``[token, t, s, rc, h]``: logical ``k`` of the B operand holds channel ``physical_k(k)``."""
    tok = 3
    x = torch.arange(tok * 64).view(tok, 64)  # x[token, channel] = 64 token + channel
    x5 = x.view(tok, 4, 4, 2, 2)
    k_token = x5.permute(*fragment_wgmma.TO_K_TOKEN).reshape(64, tok)
    token_k = x5.permute(*fragment_wgmma.TO_TOKEN_K).reshape(tok, 64)
    want = torch.tensor([[64 * m + fragment.physical_k(k) for m in range(tok)] for k in range(64)])
    assert torch.equal(k_token, want) and torch.equal(token_k, want.t())


def test_wgmma_kernel_can_be_switched_off_and_is_hopper_only(monkeypatch):
    """Its configs are offered only with :data:`WGMMA` on (unless ``BITSMITH_FRAGMENT_WGMMA=0``),
    from :data:`MIN_M` tokens, and only on compute capability 9.0 (``supports`` names why not); token tiles are powers of two up to
    :data:`TOK_MAX`, several tiles above it."""
    rw = repack(_quantize("int4_g64", torch.randn(4096, 1024) * 0.05), layout="fragment")
    assert "Hopper" in fragment_wgmma.supports(rw, torch.float16) or not fragment_mma.HAVE_GLUON
    monkeypatch.setitem(fragment_wgmma.WGMMA, "enabled", True)
    assert fragment_wgmma.configs(rw, 16, torch.float16, 132) == []  # a CPU weight
    monkeypatch.setattr(fragment_wgmma, "supports", lambda rw_, dtype: None)
    assert [fragment_wgmma.tokens(m) for m in (1, 16, 17, 33, 64, 65, 256)] == [16, 16, 32, 64, 64, 64, 64]
    cands = fragment_wgmma.configs(rw, 130, torch.float16, 132)
    assert cands and {c["RB"] for c in cands} == {1} and all(c["SPLIT"] * 130 <= fragment_mma.MAX_PARTIALS for c in cands)
    assert {c["RB"] for c in fragment_wgmma.configs(rw, 24, torch.float16, 132)} == {1, 2}
    # below MIN_M the Gluon kernel won every tuning: not offered, unless asked for
    assert fragment_wgmma.configs(rw, 16, torch.float16, 132) == []
    assert fragment_wgmma.configs(rw, 16, torch.float16, 132, min_m=1)
    assert fragment_wgmma.configs(rw, 257, torch.float16, 132) == []
    monkeypatch.setitem(fragment_wgmma.WGMMA, "enabled", False)
    assert fragment_wgmma.configs(rw, 24, torch.float16, 132) == []


@needs_gluon
def test_fragment_kernel_tails_compile():
    """Rows past the tile, channels past a group, per-row scales, a symmetric zero and a bias."""
    loop = probe.loop_opcodes(fragment_mma.compile_offline("int4", 2, 8, True, TAIL=True, SG=0, HAS_ZERO=False,
                                                           HAS_BIAS=True).asm["cubin"])
    assert not [op for op in loop if op.startswith(("LDS", "STS", "SHFL", "BAR"))], loop


@pytest.mark.skipif(not HAVE_TRITON or INTERPRETED, reason="needs triton's compiler (not under the interpreter)")
@pytest.mark.parametrize("fmt", fragment.FORMATS)
def test_fragment_gemm_compiles_for_sm90(fmt):
    """The GEMM compiled for sm_90: Hopper's ``wgmma`` where a warpgroup's 64 rows fit (64 and 128
    tokens), no local memory (spills), also with split-K, a bias and a low-rank epilogue."""
    for consts, warps in [({"BLOCK_M": 128, "RBS": 8}, 8), ({"BLOCK_M": 64, "RBS": 4}, 4),
                          ({"BLOCK_M": 64, "RBS": 8, "ATOMIC": True, "HAS_BIAS": True, "RANK": 16}, 4)]:
        compiled = fragment_gemm.compile_offline(fmt, num_warps=warps, **consts)
        with tempfile.TemporaryDirectory() as tmp:
            ins = kernels_sass.sass_of(compiled.asm["cubin"], Path(tmp))
        assert "wgmma" in compiled.asm["ptx"], consts
        assert not [t for _, t in ins if re.match(r"(LDL|STL)\b", t)], consts


@pytest.mark.skipif(not HAVE_TRITON or INTERPRETED, reason="needs triton's compiler (not under the interpreter)")
@pytest.mark.parametrize("fmt", fragment.FORMATS)
def test_dequantize_kernel_compiles_with_whole_word_loads(fmt):
    """The interpreter runs what the compiler may refuse, so the dequantization kernel is also
    compiled for sm_90: each word is loaded once, whole (eight row blocks of 128 words, int3 96,
    over 128 threads), and ``W^T`` is written in 16-byte stores, eight a thread for the ``[64,
    128]`` float16 tile (the first version stored a code at a time, 2 bytes, and was 5-8x
    slower); NF4 adds one 4-byte table load a code."""

    with tempfile.TemporaryDirectory() as tmp:
        ins = kernels_sass.sass_of(fragment_mma.compile_dequant_offline(fmt).asm["cubin"], Path(tmp))
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for _, t in ins)
    assert [op for op in ops if op.startswith("STG")] == ["STG.E.128"] and ops["STG.E.128"] == 8, ops
    words = sum(c * {"LDG.E": 1, "LDG.E.64": 2, "LDG.E.128": 4}.get(op, 0) for op, c in ops.items())
    table_loads = 64 if fmt == "nf4" else 0
    assert words - table_loads == 8 * fragment.WORDS_PER_GROUP[fmt] // 128, ops


# --- on a CUDA GPU ----------------------------------------------------------------------------------
def _cuda_case(name, m, n, k, dtype, bias=True):
    from bitsmith.kernels import qmm

    g = torch.Generator().manual_seed(hash((name, m, n, k)) % 2**31)
    qt = _quantize(name, (torch.randn(n, k, generator=g) * 0.05).cuda())
    rw = repack(qt, layout="fragment")
    qmm.reserve_workspace(rw)
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    b = torch.randn(n, generator=g).to("cuda", dtype) if bias else None
    ref = F.linear(x.double(), qt.dequantize(torch.float64), None if b is None else b.double())
    return qmm, rw, x, b, ref


def _check_configs(name, m, dtype, prefetch=(0, 1, 2), splits=(1, 4, 9)):
    """Every row-block count x ``prefetch`` x ``splits`` (9 = one group a program; 4 leaves the
    last program of a tile without groups), and the tuner's candidates and default."""
    qmm, rw, x, b, ref = _cuda_case(name, m, 200, 576, dtype)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    sms = qmm._sm_count(x.device)
    tok = fragment_mma.tokens(m)
    rbs = (1, 2, 4) if tok <= 16 else [r for r, t in fragment_mma.MAXNREG_WIDE if t == tok]
    cfgs = [{"KERNEL": "fragment", "W": 4, "RB": rb, "SPLIT": split, "PREFETCH": pf, "num_warps": 4}
            for rb in rbs for pf in prefetch for split in splits]
    if fragment_mma.cluster_capable(x.device):  # the splits of a tile as a cluster, 8 leaving programs without groups
        cfgs += [{"KERNEL": "fragment", "W": 4, "RB": rb, "SPLIT": split, "PREFETCH": pf, "num_warps": 4, "CLUSTER": True}
                 for rb in rbs for pf in prefetch for split in (2, 4, 8) if fragment_mma.cluster_fits(split, rb, tok)]
    cfgs += fragment_mma.configs(rw, m, dtype, sms) + [fragment_mma.default_config(rw, m, sms)]
    for cfg in cfgs:
        for _ in range(2):  # twice: the split-K counters were reset by the first launch
            out = qmm._launch(rw, x, b, cfg)
            assert out.dtype == dtype and out.shape == (m, 200)
            assert float((out.double() - ref).norm() / ref.norm()) < tol, cfg


@needs_cuda
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_cuda_smollm2_weights_every_fragment_kernel(name, smollm2_kernel_weights):
    """Three SmolLM2-135M weights (conftest's ``smollm2_kernel_weights``) in the fragment layout,
    each of its kernels at its default config where it takes the tokens: the Gluon kernel (1, 16,
    40 tokens), on Hopper the ``wgmma`` kernel (16, 40, 100), the GEMM (40, 100, 600) and
    dequantize + cuBLAS (40, 600); float16 with a bias, against float64."""
    from bitsmith.kernels import qmm

    for w in smollm2_kernel_weights.values():
        qt = _quantize(name, w.float().cuda())
        rw = repack(qt, layout="fragment")
        qmm.reserve_workspace(rw)
        w64 = qt.dequantize(torch.float64)
        sms = qmm._sm_count(rw.device)
        hopper = fragment_wgmma.supports(rw, torch.float16) is None
        launched = set()
        for m in (1, 16, 40, 100, 600):
            g = torch.Generator().manual_seed(m)
            x = torch.randn(m, rw.k, generator=g).to("cuda", torch.float16)
            b = torch.randn(rw.n, generator=g).to("cuda", torch.float16)
            ref = F.linear(x.double(), w64, b.double())
            cfgs = [fragment_mma.default_config(rw, m, sms)] if m <= fragment_mma.max_m() else []
            cfgs += [fragment_wgmma.default_config(rw, m, sms)] if hopper and 16 <= m <= fragment_wgmma.MAX_M else []
            cfgs += [fragment_gemm.default_config(rw, m, sms)] if fragment_gemm.MIN_M <= m <= fragment_gemm.MAX_M else []
            cfgs += [{"DEQUANT_MM": True}] if m in (40, 600) else []
            for cfg in cfgs:
                out = qmm._launch(rw, x, b, cfg)
                assert float((out.double() - ref).norm() / ref.norm()) < 2e-3, (m, cfg)
                launched.add(cfg.get("KERNEL", "dequant"))
        assert {"fragment", "fragment_gemm", "dequant"} | ({"fragment_wgmma"} if hopper else set()) == launched


@needs_cuda
@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("m", [1, 16])
def test_cuda_every_config_equals_reference(name, m):
    """float16, N = 200 and K = 576 (a row tail), a bias."""
    _check_configs(name, m, torch.float16)


@needs_cuda
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_cuda_block_major_order_equals_reference(name, monkeypatch):
    """The words in block-major order (``BITSMITH_FRAGMENT_ORDER=block``; the other tests run the
    default, group-major), M = 1 and 16, and the dequantization path at 33 rows."""
    from bitsmith.kernels import layout

    monkeypatch.setitem(layout.FRAGMENT, "order", "block")
    for m in (1, 16):
        _check_configs(name, m, torch.float16, prefetch=(0, 2), splits=(1, 4, 9))
    qmm, rw, x, b, ref = _cuda_case(name, 33, 200, 576, torch.float16)
    assert rw.fragment_order == "block"
    out = qmm._launch(rw, x, b, {"DEQUANT_MM": True})
    assert float((out.double() - ref).norm() / ref.norm()) < 2e-3


@needs_cuda
@pytest.mark.parametrize("name", sorted(n for n, (_, _, fmt) in FORMATS.items() if fmt != "int3"))
def test_cuda_ra_gemm_equals_reference(name, monkeypatch):
    """The register-operand GEMM, every candidate, persistent over 1, 5 and all the SMs' programs:
    600 rows (a partial token tile), N = 328 and 200 (partial channel tiles), K = 576 (9 groups),
    1000 (16, the last partial) and 1024, a bias, float16 and bfloat16; a strided view of the
    activations (TMA cannot read it) takes the dequantize + cuBLAS path instead."""
    from bitsmith.kernels import qmm

    monkeypatch.setitem(fragment_ra_gemm.RA_GEMM, "formats", ("int4", "nf4"))
    for k, dtype, n in ((576, torch.float16, 328), (1000, torch.float16, 200), (576, torch.bfloat16, 328),
                        (1024, torch.bfloat16, 328)):  # 16 groups: the paired steps too
        _, rw, x, b, ref = _cuda_case(name, 600, n, k, dtype)
        tol = 2e-3 if dtype == torch.float16 else 1.6e-2
        cfgs = fragment_ra_gemm.configs(rw, 600, dtype)
        assert cfgs, (name, n, k)
        for sms in (1, 5, qmm._sm_count(x.device)):
            monkeypatch.setattr(qmm, "_sm_count", lambda dev, sms=sms: sms)
            for cfg in cfgs:
                out = qmm._launch(rw, x, b, cfg)
                assert out.dtype == dtype and out.shape == (600, n)
                assert float((out.double() - ref).norm() / ref.norm()) < tol, (k, dtype, n, cfg, sms)
    wide = torch.zeros(600, 2 * k, device="cuda", dtype=dtype)  # a strided view TMA cannot read: dequantize + cuBLAS
    wide[:, ::2] = x
    assert fragment_ra_gemm.supports(rw, wide[:, ::2]) is not None
    out = qmm._launch(rw, wide[:, ::2], b, cfgs[0])
    assert float((out.double() - ref).norm() / ref.norm()) < tol


@needs_cuda
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_cuda_bfloat16_and_odd_m(name):
    """bfloat16 (magic 128) at M = 5."""
    _check_configs(name, 5, torch.bfloat16, prefetch=(0, 2), splits=(1, 4))


needs_hopper = pytest.mark.skipif(not (CUDA and fragment_mma.HAVE_GLUON and not INTERPRETED
                                       and torch.cuda.get_device_capability() == (9, 0)),
                                  reason="needs a Hopper GPU (wgmma)")


@needs_hopper
@pytest.mark.parametrize("name", ["int4_g64", "nf4_g64_dq", "int3_g64"])
def test_cuda_cluster_sum_equals_workspace_sum_bitwise(name):
    """Split-K reduced in a cluster (rank 0's partial plus the others' in rank order) or by a
    second kernel (``SUM_AFTER``) gives the workspace's sum (zero plus every partial in split
    order) bit for bit, at M = 1 and 16 with a bias, every split and row-block count that fits
    a cluster; and both, launched through a launch plan, replay in a CUDA graph with new
    activations."""
    for m in (1, 16):
        qmm, rw, x, b, ref = _cuda_case(name, m, 1000, 4096, torch.float16)
        tok = fragment_mma.tokens(m)
        for rb in (1, 2, 4):
            for split in (2, 4, 8):
                if not fragment_mma.cluster_fits(split, rb, tok):
                    continue
                cfg = {"KERNEL": "fragment", "W": 4, "RB": rb, "SPLIT": split, "PREFETCH": 1, "num_warps": 4}
                ws = qmm._launch(rw, x, b, cfg)
                cl = qmm._launch(rw, x, b, {**cfg, "CLUSTER": True})
                assert torch.equal(ws, cl), (m, rb, split)
                assert torch.equal(ws, qmm._launch(rw, x, b, {**cfg, "SUM_AFTER": True})), (m, rb, split)
                assert float((cl.double() - ref).norm() / ref.norm()) < 2e-3
        if m == 16:  # bfloat16 activations, the second kernel rounding the sums
            qb, rwb, xb, bb, _ = _cuda_case(name, m, 1000, 4096, torch.bfloat16)
            cfg = {"KERNEL": "fragment", "W": 4, "RB": 2, "SPLIT": 4, "PREFETCH": 1, "num_warps": 4}
            assert torch.equal(qb._launch(rwb, xb, bb, cfg), qb._launch(rwb, xb, bb, {**cfg, "SUM_AFTER": True}))
        for ending in ({"CLUSTER": True}, {"SUM_AFTER": True}):  # in a CUDA graph, and through a launch plan
            cfg = {"KERNEL": "fragment", "W": 4, "RB": 2, "SPLIT": 4, "PREFETCH": 1, "num_warps": 4, **ending}
            qmm._launch(rw, x, b, cfg, plan_key=("test", m, *ending))
            planned = rw.plans[("test", m, *ending)](x, b)
            assert torch.equal(planned, qmm._launch(rw, x, b, cfg))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = rw.plans[("test", m, *ending)](x, b)
            x.copy_(torch.randn_like(x))
            graph.replay()
            assert torch.equal(captured, qmm._launch(rw, x, b, cfg)), ending


@needs_hopper
@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("order", fragment.ORDERS)
def test_cuda_wgmma_kernel_equals_reference(name, order, monkeypatch):
    """The Hopper kernel: every config and the default at M = 1, 5, 16, 24, 40, 64 and
    130 (three token tiles), float16, N = 200 and K = 576 (tails), a bias, both word orders, each
    launch twice (the split-K tickets reset); bfloat16 at M = 24."""
    from bitsmith.kernels import layout

    monkeypatch.setitem(layout.FRAGMENT, "order", order)
    monkeypatch.setitem(fragment_wgmma.WGMMA, "enabled", True)
    for m, dtype in [(1, torch.float16), (5, torch.float16), (16, torch.float16), (24, torch.float16),
                     (40, torch.float16), (64, torch.float16), (130, torch.float16), (24, torch.bfloat16)]:
        qmm, rw, x, b, ref = _cuda_case(name, m, 200, 576, dtype)
        tol = 2e-3 if dtype == torch.float16 else 1.6e-2
        sms = qmm._sm_count(x.device)
        cfgs = fragment_wgmma.configs(rw, m, dtype, sms, min_m=1) + [fragment_wgmma.default_config(rw, m, sms)]
        assert len(cfgs) > 2
        for cfg in cfgs:
            for _ in range(2):
                out = qmm._launch(rw, x, b, cfg)
                assert out.dtype == dtype and out.shape == (m, 200)
                assert float((out.double() - ref).norm() / ref.norm()) < tol, (m, cfg)


@needs_cuda
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_cuda_zsub_equals_reference(name, monkeypatch):
    """The zeros (and scales) applied to the A operand in 16 bits (``ZSUB``): every mode the
    weight allows, every config at 1, 16, 24 and 64 tokens (float16, a bias, tails), bfloat16
    at 5 and 40; with the scale applied there too (2) the weights are the reference's own
    16-bit dequantization, so the output is within float32 sums of ``F.linear`` over them."""
    monkeypatch.setitem(fragment_mma.ZSUB, "modes", (0, 1, 2))
    monkeypatch.setitem(fragment_mma.WIDE, "enabled", True)
    for m, dtype in [(1, torch.float16), (16, torch.float16), (24, torch.float16), (64, torch.float16),
                     (5, torch.bfloat16), (40, torch.bfloat16)]:
        qmm, rw, x, b, ref = _cuda_case(name, m, 200, 576, dtype)
        modes = set(fragment_mma.zsub_modes(rw)) - {0}
        assert modes or FORMATS[name][1].get("zero") == "float"
        cfgs = [c for c in fragment_mma.configs(rw, m, dtype, qmm._sm_count(x.device)) if c.get("ZSUB")]
        assert {c["ZSUB"] for c in cfgs} == modes
        tol = 2e-3 if dtype == torch.float16 else 1.6e-2
        own = F.linear(x.double(), _dequantized_in(rw, dtype), b.double())
        for cfg in cfgs:
            for _ in range(2):
                out = qmm._launch(rw, x, b, cfg)
                assert float((out.double() - ref).norm() / ref.norm()) < tol, (m, cfg)
            if cfg["ZSUB"] == 2:  # the reference's 16-bit weights: only the sums' and the output's rounding
                assert float((out.double() - own).norm() / own.norm()) < (1e-3 if dtype == torch.float16 else 8e-3), cfg


@needs_cuda
@pytest.mark.parametrize("name", ["int4_g64", "int4_g128_sym", "int4_channel"])
def test_cuda_zsub_sixteenths_equal_shifted_codes_bit_for_bit(name, monkeypatch):
    """int4 converted in sixteenths (:data:`bitsmith.kernels.fragment_mma.SIXTEENTHS`) gives the same
    16-bit ``q - zero`` as the shifted codes, so every ``ZSUB`` config and every wgmma config
    without split-K (whose ticket order may vary the float32 sums) writes the same bits with it
    on and off, at 16, 24 and 64 tokens in float16 (a bias, tails)."""
    monkeypatch.setitem(fragment_mma.ZSUB, "modes", (0, 1, 2))
    monkeypatch.setitem(fragment_mma.WIDE, "enabled", True)
    monkeypatch.setitem(fragment_wgmma.WGMMA, "enabled", True)
    compared = 0
    for m in (16, 24, 64):
        qmm, rw, x, b, ref = _cuda_case(name, m, 200, 576, torch.float16)
        monkeypatch.setitem(fragment_mma.SIXTEENTHS, "enabled", True)
        assert rw.int_zero and fragment_mma.sixteenths(rw, torch.float16, 1)  # the launches below take it
        sms = qmm._sm_count(x.device)
        cfgs = [c for c in fragment_mma.configs(rw, m, torch.float16, sms) if c.get("ZSUB") and c["SPLIT"] == 1]
        cfgs += [c for c in fragment_wgmma.configs(rw, m, torch.float16, sms, min_m=1) if c["SPLIT"] == 1]
        for cfg in cfgs:
            monkeypatch.setitem(fragment_mma.SIXTEENTHS, "enabled", True)
            on = qmm._launch(rw, x, b, cfg).clone()
            monkeypatch.setitem(fragment_mma.SIXTEENTHS, "enabled", False)
            off = qmm._launch(rw, x, b, cfg)
            assert torch.equal(on, off), (m, cfg, float((on.double() - off.double()).abs().max()))
            assert float((on.double() - ref).norm() / ref.norm()) < 2e-3, (m, cfg)
            compared += 1
    assert compared >= 6


def _dequantized_in(rw, dtype):
    """The runtime weight dequantized in ``dtype`` (what the torch path multiplies), as float64."""
    return dequantize_runtime(rw).to(dtype).double()


@needs_cuda
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_cuda_wide_token_tiles_equal_reference(name, monkeypatch):
    """The Gluon kernel at 17..64 tokens (``TOK`` 32 and 64), every
    config at M = 24, 32 and 64, float16 with a bias, bfloat16 at M = 40."""
    monkeypatch.setitem(fragment_mma.WIDE, "enabled", True)
    for m in (24, 32, 64):
        _check_configs(name, m, torch.float16, prefetch=(0, 1, 2), splits=(1, 4))
    _check_configs(name, 40, torch.bfloat16, prefetch=(0, 2), splits=(1, 4))


@needs_cuda
@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("order", fragment.ORDERS)
def test_cuda_fragment_gemm_every_config_equals_reference(name, order, monkeypatch):
    """The GEMM for more than 16 rows: every candidate config and the default at M = 17, 33 and
    130, float16, N = 200 and K = 576 (a row tail), a bias; bfloat16 and a low-rank branch at
    M = 40."""
    from bitsmith.kernels import layout

    monkeypatch.setitem(layout.FRAGMENT, "order", order)
    for m in (17, 33, 130):
        qmm, rw, x, b, ref = _cuda_case(name, m, 200, 576, torch.float16)
        sms = qmm._sm_count(x.device)
        cfgs = fragment_gemm.configs(rw, m, torch.float16, sms) + [fragment_gemm.default_config(rw, m, sms)]
        assert len(cfgs) > 4
        for cfg in cfgs:
            out = qmm._launch(rw, x, b, cfg)
            assert out.dtype == torch.float16 and out.shape == (m, 200)
            assert float((out.double() - ref).norm() / ref.norm()) < 2e-3, cfg
    qmm, rw, x, b, ref = _cuda_case(name, 40, 200, 576, torch.bfloat16)
    t = torch.randn(40, 16, device="cuda")
    up = (torch.randn(16, 200, device="cuda") * 0.1).to(torch.bfloat16)
    ref = ref + t.to(torch.bfloat16).double() @ up.double()
    for cfg in fragment_gemm.configs(rw, 40, torch.bfloat16, qmm._sm_count(x.device)):
        out = qmm._launch(rw, x, b, cfg, lowrank=(t, up))
        assert out.dtype == torch.bfloat16 and float((out.double() - ref).norm() / ref.norm()) < 1.6e-2, cfg


@needs_cuda
@pytest.mark.parametrize("name", ["int4_g64", "int3_g64", "nf4_g64_dq"])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (16, 1024, 14336), (33, 512, 1000), (130, 512, 1000), (3, 45, 200)])
def test_cuda_quant_matmul_tuned_and_planned(name, m, n, k):
    qmm, rw, x, b, ref = _cuda_case(name, m, n, k, torch.float16)
    first = qmm.quant_matmul(x, rw, b)
    again = qmm.quant_matmul(x, rw, b)  # through the launch plan
    for out in (first, again):
        assert float((out.double() - ref).norm() / ref.norm()) < 2e-3
    assert torch.equal(first, again)


@needs_cuda
def test_cuda_quantlinear_uses_the_fragment_layout_and_captures(monkeypatch):
    import functools

    from bitsmith.kernels import layout
    from bitsmith.nn import QuantLinear

    monkeypatch.setitem(layout.FRAGMENT, "formats", frozenset({"int4", "nf4", "int3"}))
    q = functools.partial(bitsmith.quantize_tensor, method="rtn", bits=4, group_size=64)
    lin = QuantLinear.from_float(torch.nn.Linear(512, 384), q).cuda()
    rw = lin.__dict__["_runtime"]
    assert rw is not None and rw.layout == "fragment", lin.__dict__.get("kernel_skip_reason")
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    ref = F.linear(x.double(), lin.dequantize(torch.float64), lin.bias.double())
    y = lin(x)
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = lin(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, y)


@needs_gluon
@pytest.mark.parametrize("act", ["fp16", "bf16"])
def test_codebook_planes_stay_in_vector_registers(act):
    """The byte planes of the codebook lookup are built in the kernel (``_table_planes``), so
    ptxas cannot keep them in uniform registers: compiled for sm_90, the NF4 loop of each kernel
    that looks codes up (the fragment kernel at 1, 2 and 4 row blocks, the Hopper ``wgmma``
    kernel, every register-operand GEMM candidate) copies no more values out of uniform registers
    than the same kernel's int4 loop, which has no lookup (as eight plane arguments, two of the
    lookup's ``prmt`` sources a pair of codes came from uniform registers: 129 such copies in the
    GEMM's paired loop against int4's 5)."""
    from_uniform = re.compile(r"(IMAD\.U32 R\d+, RZ, RZ, |MOV R\d+, )UR\d+$")

    def copies(compiled, holding):
        with tempfile.TemporaryDirectory() as tmp:
            loop = _innermost_loop_holding(kernels_sass.sass_of(compiled.asm["cubin"], Path(tmp)), holding)
        return sum(bool(from_uniform.match(t)) for t in loop)

    builds = [(lambda fmt, rb=rb: fragment_mma.compile_offline(fmt, rb, 8, 1, act=act), "HMMA") for rb in (1, 2, 4)]
    builds.append((lambda fmt: fragment_wgmma.compile_offline(fmt, act=act), "HGMMA"))
    builds += [(lambda fmt, cand=cand: fragment_ra_gemm.compile_offline(fmt, *cand, act=act), "HGMMA")
               for cand in fragment_ra_gemm.CANDIDATES]
    for build, holding in builds:
        assert copies(build("nf4"), holding) <= copies(build("int4"), holding)


@needs_gluon
def test_pattern_probe_compiles_for_sm90_in_every_form():
    """benchmarks/fragment_pattern_probe.py's kernel (the fragment kernel's reads without its math)
    compiles for sm_90 in each of its forms, so the probe keeps working as the kernel's helpers
    change: the words' 16-byte loads in every form, 16-bit scale and zero loads only with
    ``+meta``, the partials' 4-byte stores in every split-K form, a GPU-wide fence from ``+fence``
    on, the ending's ticket (an atomic) only in ``+ticket`` and the full ending; and the second
    kernel it ends ``+sum kernel`` with (the library's) waits for the first when launched as its
    dependent."""
    import fragment_pattern_probe as pattern
    from bitsmith.kernels.small_m import _compile_offline

    ptrs = {"w_ptr": "i32", "s_ptr": "fp16", "z_ptr": "fp16", "x_ptr": "fp16", "out_ptr": "fp32", "ws_ptr": "fp32",
            "cnt_ptr": "i32", "y_ptr": "fp16"}
    for form, (meta, xs, splitk) in pattern.FORMS.items():
        compiled = _compile_offline(pattern._pattern_kernel, {"W": 4, "RB": 2, "TOK": 16, "PREFETCH": 1, "META": meta, "X": xs,
                                                              "SPLITK": splitk, "IS_SPLIT": True},
                                    "fp16", 4, 1, 90, gluon=True, maxnreg=128, ptr_types=ptrs)
        with tempfile.TemporaryDirectory() as tmp:
            ops = collections.Counter(kernels_sass.opcode(t) for _, t in kernels_sass.sass_of(compiled.asm["cubin"], Path(tmp)))
        assert ops["LDG.E.128"] >= 2, (form, ops)
        assert bool(ops["LDG.E.U16"]) == meta, (form, ops)
        assert bool(ops["ATOMG.E.ADD.STRONG.GPU"]) == (splitk in (1, 4)), (form, ops)
        assert bool(ops["MEMBAR.ALL.GPU"] + ops["MEMBAR.SC.GPU"]) == (splitk in (1, 3, 4)), (form, ops)
        assert (ops["STG.E"] > 1) == bool(splitk), (form, ops)  # float32 partials (else the one sum)
    for pdl in (False, True):  # the second kernel it ends with (the library's)
        compiled = _compile_offline(fragment_mma._sum_partials_kernel, {"HAS_BIAS": False, "PDL": pdl, "BLOCK": 1024},
                                    "fp16", 4, 1, 90, ptr_types={"ws_ptr": "fp32", "b_ptr": "fp16", "out_ptr": "fp16"},
                                    aligned_ints=())
        assert ("griddepcontrol.wait" in compiled.asm["ptx"]) == pdl
