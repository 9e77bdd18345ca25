"""The fragment-layout experiment (benchmarks/gluon_fragment_probe.py, issue #8): its int4 packer
against the tensor-core fragment assignment of the PTX ISA, and its Gluon kernel compiled for sm_90
(no GPU needed); on a GPU, the kernel against the float64 reference."""
from __future__ import annotations

import os
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


@needs_gluon
@pytest.mark.parametrize("rb,tok,codebook", [(1, 8, False), (2, 16, False), (2, 8, True)])
def test_fragment_kernel_compiles_without_shared_memory(rb, tok, codebook):
    """Compiled for sm_90: the word and activation tiles reach the tensor-core operand layouts
    without data movement (the kernel asserts it: ``convert_layout(..., assert_trivial=True)``),
    and the main loop has no shared-memory access, shuffle or barrier, one 16-byte weight load per
    row block and ``4 * rb * tok / 8`` products a step with the weights, plus those with the tile
    of ones for the activation sums (the same for every row block, so the compiler may share them;
    a codebook has no zeros, so none, and its lookup is 16 ``prmt`` a word)."""
    loop = probe.loop_opcodes(probe.compile_sm90(4, tok, rb, codebook=codebook).asm["cubin"])
    assert not [op for op in loop if op.startswith(("LDS", "STS", "SHFL", "BAR"))], loop
    if codebook:
        assert loop["HMMA.16816.F32"] == 4 * rb * tok // 8 and loop["PRMT"] == 16 * 4 * rb
    else:
        assert 4 * (rb + 1) * tok // 8 <= loop["HMMA.16816.F32"] <= 8 * rb * tok // 8
    assert loop["LDG.E.128"] >= rb


@pytest.mark.skipif(not (torch.cuda.is_available() and probe.HAVE_GLUON and not INTERPRETED), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("fmt", ["int4_g64", "int4_g128", "nf4_g64"])
def test_cuda_fragment_kernel_equals_reference(m, fmt):
    import bitsmith
    from bitsmith.kernels.layout import repack

    n, k = 512, 1024
    w = torch.randn(n, k, device="cuda") * 0.02
    codebook = fmt.startswith("nf")
    qt = (bitsmith.quantize_tensor(w, "nf", levels=16, block_size=64) if codebook
          else bitsmith.quantize_tensor(w, "rtn", bits=4, group_size=int(fmt.split("_g")[1])))
    rw = repack(qt)
    words = probe.fragment_pack(probe.codes_of_runtime(rw).cpu(), codebook).cuda()
    table = rw.table_bits[torch.float16] if codebook else None
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = x.double() @ qt.dequantize(torch.float64).t()
    for w, rb, split, prefetch in ((4, 1, 1, False), (4, 2, 4, True), (4, 4, 3, False), (4, 2, 16, True)):
        for _ in range(2):  # twice: the split-K counters were reset by the first launch
            out = probe.launch(x, words, rw.scale, rw.zero, n, w, rb, split, prefetch, table)
            assert out.dtype == torch.float16
            assert float((out.double() - ref).norm() / ref.norm()) < 2e-3, (w, rb, split, prefetch)
