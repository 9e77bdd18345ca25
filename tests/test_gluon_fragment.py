"""The fragment-layout experiment (benchmarks/gluon_fragment_probe.py, issue #8): its int4 and int3
packers against the tensor-core fragment assignment of the PTX ISA (int3 through its conversion PTX,
run by a small emulator), and its Gluon kernel compiled for sm_90 (no GPU needed); on a GPU, the
kernel against the float64 reference."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gluon_fragment_probe as probe  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_gluon = pytest.mark.skipif(not probe.HAVE_GLUON or INTERPRETED,
                                 reason="needs triton's Gluon compiler (not under the interpreter)")


def _spec_a_element(lane: int, i: int) -> tuple[int, int]:
    """PTX ISA, mma.m16n8k16 (.f16 A, row-major): element ``a_i`` of lane ``lane`` is at row
    ``groupID`` for a0, a1, a4, a5 and ``groupID + 8`` for a2, a3, a6, a7, column
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


@pytest.mark.parametrize("codebook", [False, True], ids=["affine", "codebook"])
def test_fragment_pack_feeds_each_product_the_right_weight_for_each_activation(codebook):
    """Decode the packed words as the tensor cores read them (the PTX fragment assignment above,
    not the packer's own helper; register r's halves at bits 4r and 16 + 4r for affine codes, 8r
    and 8r + 4 for codebooks), pair them with the activations as the kernel loads them, and the
    products summed over a group equal ``W . x`` exactly (integer codes, float64)."""
    g = torch.Generator().manual_seed(3)
    n, k, tok = 32, 128, 8
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    x = torch.randint(-8, 8, (tok, k), generator=g).double()  # integers: every sum is exact
    words = probe.fragment_pack(codes, codebook).to(torch.int64) & 0xFFFFFFFF  # [N/16, K/64, 32, 4]
    chan = _channel_of_logical_k()
    for rb in range(n // 16):
        for grp in range(k // 64):
            a = torch.full((16, 64), -1.0, dtype=torch.float64)  # logical A tile of the group
            for lane in range(32):
                for step in range(4):
                    word = int(words[rb, grp, lane, step])
                    for i in range(8):
                        row, col = _spec_a_element(lane, i)
                        bit = 8 * (i // 2) + 4 * (i % 2) if codebook else 4 * (i // 2) + 16 * (i % 2)
                        a[row, 16 * step + col] = (word >> bit) & 15
            assert (a >= 0).all(), "every element of every product is in exactly one lane's word"
            b = x[:, grp * 64 + chan].t()  # [64 logical k, tokens]
            want = codes[16 * rb:16 * rb + 16, grp * 64:grp * 64 + 64].double() @ x[:, grp * 64:grp * 64 + 64].t()
            assert torch.equal(a @ b, want)
    assert [probe.physical_k(kk) for kk in range(64)] == chan.tolist()


def test_fragment_pack_refuses_shapes_it_cannot_tile():
    with pytest.raises(ValueError, match="multiple of 16"):
        probe.fragment_pack(torch.zeros(24, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 16"):
        probe.fragment_pack3(torch.zeros(16, 96, dtype=torch.uint8))
    with pytest.raises(ValueError, match="3 bits hold 0..7"):
        probe.fragment_pack3(torch.full((16, 64), 8, dtype=torch.uint8))


def _run_ptx(ptx: str, inputs: dict[int, int]) -> dict[int, int]:
    """A small PTX interpreter for the conversion's instruction set (``shr.b32`` by an immediate,
    ``lop3.b32`` with any truth table, ``mov.b32 {lo, hi}``): 32-bit inputs by operand number ->
    the 16-bit outputs by operand number."""
    regs: dict[str, int] = {f"${i}": v & 0xFFFFFFFF for i, v in inputs.items()}
    out: dict[int, int] = {}

    def val(tok: str) -> int:
        return int(tok, 0) & 0xFFFFFFFF if tok[0].isdigit() else regs[tok]

    for line in ptx.splitlines():
        ops = [t for t in re.split(r"[\s,{};]+", line) if t]
        if not ops or ops[0].startswith(".reg"):
            continue
        if ops[0] == "shr.b32":
            regs[ops[1]] = val(ops[2]) >> int(ops[3])
        elif ops[0] == "lop3.b32":
            a, b, c, lut = val(ops[2]), val(ops[3]), val(ops[4]), int(ops[5], 0)
            regs[ops[1]] = sum(((lut >> (((a >> i & 1) << 2) | ((b >> i & 1) << 1) | (c >> i & 1))) & 1) << i
                               for i in range(32))
        elif ops[0] == "mov.b32":
            lo, hi, src = ops[1], ops[2], val(ops[3])
            out[int(lo[1:])], out[int(hi[1:])] = src & 0xFFFF, src >> 16
        else:
            raise AssertionError(f"instruction the emulator does not know: {line!r}")
    return out


def test_int3_fragment_words_convert_to_each_products_weights():
    """int3: the packed words run through the kernel's conversion PTX (emulated above) give float16
    ``1024 + q`` halves; placed by the PTX fragment assignment (register ``i = 4 s + r`` of
    product ``s``: elements ``a_{2r}``, ``a_{2r+1}``) and paired with the activations as the
    kernel loads them, the products over a group equal ``W . x`` exactly, 3 bits a weight."""
    g = torch.Generator().manual_seed(5)
    n, k, tok = 32, 128, 4
    codes = torch.randint(0, 8, (n, k), generator=g, dtype=torch.uint8)
    codes[0, :64] = 7  # every bit set somewhere, the top code in every slot of a block
    x = torch.randint(-8, 8, (tok, k), generator=g).double()
    words = probe.fragment_pack3(codes).to(torch.int64) & 0xFFFFFFFF  # [N/16, K/64, 3, 32]
    assert words.numel() * 32 == codes.numel() * 3
    nwords = words.shape[2]
    ptx = probe.int3_cvt_ptx()
    chan = _channel_of_logical_k()
    for rb in range(n // 16):
        for grp in range(k // 64):
            a = torch.full((16, 64), -1.0, dtype=torch.float64)
            for lane in range(32):
                halves = _run_ptx(ptx, {32 + j: int(words[rb, grp, j, lane]) for j in range(nwords)})
                assert sorted(halves) == list(range(32))
                for step in range(4):
                    for i in range(8):
                        row, col = _spec_a_element(lane, i)
                        h16 = halves[2 * (4 * step + i // 2) + i % 2]
                        assert h16 & 0xFFF8 == 0x6400, hex(h16)  # float16 1024 + q: q in the mantissa
                        a[row, 16 * step + col] = h16 & 7
            assert (a >= 0).all()
            b = x[:, grp * 64 + chan].t()
            want = codes[16 * rb:16 * rb + 16, grp * 64:grp * 64 + 64].double() @ x[:, grp * 64:grp * 64 + 64].t()
            assert torch.equal(a @ b, want)


@needs_gluon
@pytest.mark.parametrize("rb,tok,fmt", [(1, 8, "int4"), (2, 16, "int4"), (2, 8, "nf4"), (2, 8, "int3"), (1, 16, "int3")])
def test_fragment_kernel_compiles_without_shared_memory(rb, tok, fmt):
    """Compiled for sm_90: the word and activation tiles reach the tensor-core operand layouts
    without data movement (the kernel asserts it: ``convert_layout(..., assert_trivial=True)``),
    and the main loop has no shared-memory access, shuffle or barrier, one 16-byte weight load per
    row block (int3: three 4-byte loads, the fourth word of the tile masked off at compile time)
    and ``4 * rb * tok / 8`` products a step with the weights, plus those with the tile
    of ones for the activation sums (the same for every row block, so the compiler may share them;
    a codebook has no zeros, so none, and its lookup is 16 ``prmt`` a word)."""
    loop = probe.loop_opcodes(probe.compile_sm90(4, tok, rb, fmt=fmt).asm["cubin"])
    assert not [op for op in loop if op.startswith(("LDS", "STS", "SHFL", "BAR"))], loop
    if fmt == "nf4":
        assert loop["HMMA.16816.F32"] == 4 * rb * tok // 8 and loop["PRMT"] == 16 * 4 * rb
    else:
        assert 4 * (rb + 1) * tok // 8 <= loop["HMMA.16816.F32"] <= 8 * rb * tok // 8
    if fmt == "int3":
        assert loop["LDG.E"] == probe.INT3_WORDS * rb, loop
    else:
        assert loop["LDG.E.128"] >= rb


@pytest.mark.skipif(not (torch.cuda.is_available() and probe.HAVE_GLUON and not INTERPRETED), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("fmt", ["int4_g64", "int4_g128", "nf4_g64", "int3_g64", "int3_g128"])
def test_cuda_fragment_kernel_equals_reference(m, fmt):
    import bitsmith
    from bitsmith.kernels.layout import repack

    n, k = 512, 1024
    w = torch.randn(n, k, device="cuda") * 0.02
    kind = fmt.split("_g")[0]
    qt = (bitsmith.quantize_tensor(w, "nf", levels=16, block_size=64) if kind == "nf4"
          else bitsmith.quantize_tensor(w, "rtn", bits=int(kind[3:]), group_size=int(fmt.split("_g")[1])))
    rw = repack(qt)
    words = probe.fragment_words(rw, kind)
    table = rw.table_bits[torch.float16] if kind == "nf4" else None
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = x.double() @ qt.dequantize(torch.float64).t()
    for w, rb, split, prefetch in ((4, 1, 1, False), (4, 2, 4, True), (4, 4, 3, False), (4, 2, 16, True)):
        for _ in range(2):  # twice: the split-K counters were reset by the first launch
            out = probe.launch(x, words, rw.scale, rw.zero, n, w, rb, split, prefetch, table, kind)
            assert out.dtype == torch.float16
            assert float((out.double() - ref).norm() / ref.norm()) < 2e-3, (w, rb, split, prefetch)
