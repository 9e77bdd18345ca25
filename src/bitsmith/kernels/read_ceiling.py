"""A kernel that only reads: the ceiling for any kernel that must read the same bytes once.

A quantized matmul at M = 1 reads its weight once and does little else, so its time is bounded
below by the time a launch takes to stream that many bytes. The copy bandwidth
(:func:`bitsmith.kernels.bench.copy_bandwidth`, a 1 GiB copy) overstates what a 10-70 MB read in
one launch reaches: the launch ramps up, the last wave drains, and in a decode step the next
launch waits. :func:`read_words` streams a buffer the same way, 16-byte loads, every word used
(its block's XOR is written, so nothing can be left unread), which benchmarks/kernels_chain.py
(``--read-ceiling``) times in the same CUDA graph as the decoder's quantized matmuls, buffer for
buffer of the same sizes.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
    HAVE_TRITON = False

READ_BLOCK = 2048  # int32 words a program: 8 KiB, sixteen words a thread with four warps

if HAVE_TRITON:

    @triton.jit
    def _read_kernel(src_ptr, out_ptr, n_words, BLOCK: tl.constexpr):
        """Program ``p`` reads words ``[p BLOCK, (p + 1) BLOCK)`` (past ``n_words``: zeros) and
        writes their XOR to ``out[p]``."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        words = tl.load(src_ptr + offs, mask=offs < n_words, other=0)
        tl.store(out_ptr + pid, tl.xor_sum(words, 0))


def read_out(words: torch.Tensor, block: int = READ_BLOCK) -> torch.Tensor:
    """The output :func:`read_words` writes for ``words``: one int32 a block (allocate it before a
    CUDA-graph capture)."""
    return torch.empty(-(-words.numel() // block), dtype=torch.int32, device=words.device)


def read_words(words: torch.Tensor, out: torch.Tensor | None = None, block: int = READ_BLOCK) -> torch.Tensor:
    """Read every word of the contiguous int32 tensor ``words`` once; returns each ``block``'s XOR
    (in ``out`` when given, from :func:`read_out`)."""
    if words.dtype != torch.int32 or not words.is_contiguous():
        raise ValueError(f"read_words reads a contiguous int32 tensor, got {words.dtype} "
                         f"({'contiguous' if words.is_contiguous() else 'strided'})")
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if out is None:
        out = read_out(words, block)
    elif out.numel() != -(-words.numel() // block) or out.dtype != torch.int32:
        raise ValueError(f"out must hold {-(-words.numel() // block)} int32 values (one a block of {block}), "
                         f"got {out.numel()} {out.dtype}")
    _read_kernel[(out.numel(),)](words, out, words.numel(), BLOCK=block, num_warps=4)
    return out


def compile_offline(block: int = READ_BLOCK, arch: int = 90):
    """``_read_kernel`` compiled for NVIDIA ``sm_<arch>`` on any machine (Triton's bundled
    ptxas), four warps, 16-byte aligned buffers: for its machine code in CI."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=_read_kernel, signature={"src_ptr": "*i32", "out_ptr": "*i32", "n_words": "i32", "BLOCK": "constexpr"},
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(3)}, constexprs={(3,): block})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})


__all__ = ["read_words", "read_out", "READ_BLOCK", "HAVE_TRITON"]
