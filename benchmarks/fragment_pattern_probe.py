"""Where the fragment kernel's M = 1 time goes, by subtraction: kernels that read what it reads, in
its order, and do nothing else.

The fragment kernel (:mod:`bitsmith.kernels.fragment_mma`) reads at M = 1 about 72% as fast as a
kernel that streams the same bytes (benchmarks/results/kernels_chain_ceiling_h100.txt). That
reader differs from it in three ways at once: its access order (one 8 KiB block a program, read
in one go), the loads it does not make (each group's scales and zeros, from DRAM, and its
activations, from the L2, both waited for inside the step that loads them) and the math. Here a
Gluon kernel walks the words exactly as ``_frag_kernel`` does (the same grid of row tiles and K
splits, the same :func:`bitsmith.kernels.fragment_mma._word_offsets`, the words ``PREFETCH`` groups
ahead) and adds them up, with the group's scales and zeros (``META``) and its activations (``X``)
loaded in the step and added too, or not. Every config of the kernel at M = 1 is timed in each
form (CUDA graph, L2 flushed), beside the kernel itself and the streaming reader
(:func:`bitsmith.kernels.read_ceiling.read_words`) over the same words:

* words only as fast as the streaming reader: the order is not the problem;
* words only fast, ``META`` or ``X`` slow: the loads waited for inside the step are;
* all four forms fast, the kernel slow: its math or its split-K ending is; the last form
  (``words+meta+x+splitk``) ends as the kernel does (partials, a ticket, the last program of a
  row tile adding them up), which tells those two apart, and ``words+meta+x+partials`` makes
  only that ending's stores, which splits the ending into its stores and the rest (the fence,
  the ticket, the last program's sum); ``+fence`` and ``+ticket`` add those one at a time, and
  ``+sum kernel`` ends with the stores alone and adds the partials up in a second kernel (a
  programmatic dependent launch where PDL is available), the ending without any wait in the
  split programs.

    python benchmarks/fragment_pattern_probe.py [--shapes 14336x4096,...] [--formats int4_g64] [--m 1,16] [--reps 20]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from bitsmith.kernels.fragment_mma import HAVE_GLUON  # noqa: E402

#: form -> (scales and zeros, activations, ending: 0 one sum a program, 1 the kernel's split-K ending,
#: 2 its partials' stores alone, without the fence, the ticket and the last program's sum, 3 the stores
#: and the fence, 4 the stores, the fence and the ticket (the last program resets it, sums nothing),
#: 5 the stores, then the library's second kernel (:func:`bitsmith.kernels.fragment_mma.sum_launch_args`)
#: adds the partials up and writes ``y``, a programmatic dependent where PDL is available)
FORMS = {"words": (False, False, 0), "words+meta": (True, False, 0), "words+x": (False, True, 0),
         "words+meta+x": (True, True, 0), "words+meta+x+partials": (True, True, 2),
         "words+meta+x+partials+fence": (True, True, 3), "words+meta+x+partials+ticket": (True, True, 4),
         "words+meta+x+splitk": (True, True, 1), "words+meta+x+partials+sum kernel": (True, True, 5)}

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from bitsmith.kernels.fragment_mma import _word_offsets, _write_tile

    @gluon.jit
    def _pattern_kernel(w_ptr, s_ptr, z_ptr, x_ptr, out_ptr, ws_ptr, cnt_ptr, y_ptr, M, N, NB, NG, G_PER, SPLIT,
                        stride_xm, W: gl.constexpr, RB: gl.constexpr, TOK: gl.constexpr, PREFETCH: gl.constexpr,
                        META: gl.constexpr, X: gl.constexpr, SPLITK: gl.constexpr, IS_SPLIT: gl.constexpr):
        """Program ``(row tile, K split)`` reads its groups' int4 words as ``_frag_kernel`` does
        (group-major words, no tails), with each group's scales and zeros (``META``) and the
        ``M`` tokens' 64 activations (``X``; ``TOK``: the kernel's token tile) loaded in the
        group's step, and writes their sum; ``SPLITK`` 1: as a ``[rows, TOK]`` tile through the
        kernel's own split-K ending (``_write_tile``: partials, a ticket, the last program adds
        them and writes ``y``); 2: only that ending's stores of the partials."""
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        BN: gl.constexpr = 16 * W * RB
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])
        blk, w_mask, g_stride = _word_offsets(pid_n, NB, NG, W, RB, 0, False, True)
        rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
        x_layout: gl.constexpr = gl.BlockedLayout([1, 1, 16], [8, 4, 1], [1, 1, W], [2, 1, 0])
        otok = gl.arange(0, TOK, layout=gl.SliceLayout(1, gl.SliceLayout(2, x_layout)))
        ot = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_layout)))
        oj = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_layout)))
        chan = (ot * 16)[None, :, None] + oj[None, None, :]
        x_off = otok[:, None, None] * stride_xm + chan
        x_mask = (otok < M)[:, None, None] & (chan >= 0)
        acc = blk * 0
        macc = gl.zeros([BN], gl.float32, gl.SliceLayout(1, mma))
        xacc = gl.zeros([TOK, 4, 16], gl.float32, x_layout)
        g_lo = pid_k * G_PER
        g_hi = gl.minimum(g_lo + G_PER, NG)
        if PREFETCH >= 1:
            words = gl.load(w_ptr + blk + g_lo * g_stride, mask=w_mask & (g_lo < g_hi), other=0)
        if PREFETCH == 2:
            words2 = gl.load(w_ptr + blk + (g_lo + 1) * g_stride, mask=w_mask & (g_lo + 1 < g_hi), other=0)
        for g in range(g_lo, g_hi):
            if PREFETCH == 2:
                cur = words
                words = words2
                words2 = gl.load(w_ptr + blk + (g + 2) * g_stride, mask=w_mask & (g + 2 < g_hi), other=0)
            elif PREFETCH == 1:
                cur = words
                words = gl.load(w_ptr + blk + (g + 1) * g_stride, mask=w_mask & (g + 1 < g_hi), other=0)
            else:
                cur = gl.load(w_ptr + blk + g * g_stride)
            acc += cur
            if META:
                macc += gl.load(s_ptr + g * N + rows).to(gl.float32) + gl.load(z_ptr + g * N + rows).to(gl.float32)
            if X:
                xacc += gl.load(x_ptr + g * 64 + x_off, mask=x_mask, other=0.0).to(gl.float32)
        total = gl.sum(gl.sum(gl.sum(gl.sum(acc, 3), 2), 1), 0).to(gl.float32)
        total += gl.sum(gl.sum(gl.sum(xacc, 2), 1), 0)
        if SPLITK:
            tile = gl.zeros([BN, TOK], gl.float32, mma) + macc[:, None] + total
            toks = gl.arange(0, TOK, layout=gl.SliceLayout(0, mma))
            if SPLITK == 1:
                _write_tile(tile, ws_ptr, cnt_ptr, y_ptr, y_ptr, rows, rows < N, toks, pid_n, pid_k, M, N, SPLIT,
                            IS_SPLIT, False, RB * TOK)
            else:  # the partials' stores as _write_tile makes them, then (3) its fence or (4) fence and ticket
                gl.store(ws_ptr + pid_k * M * N + toks[None, :] * N + rows[:, None], tile,
                         mask=(toks < M)[None, :] & (rows < N)[:, None])
                if SPLITK == 3:
                    gl.thread_barrier()
                    gl.inline_asm_elementwise("fence.acq_rel.gpu; // dummy $0", "=r", [], dtype=gl.int32,
                                              is_pure=False, pack=1)
                if SPLITK == 4:
                    gl.thread_barrier()
                    if gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel") == SPLIT - 1:
                        gl.atomic_xchg(cnt_ptr + pid_n, 0)
        else:
            gl.store(out_ptr + pid_k * gl.num_programs(0) + pid_n, total + gl.sum(macc, 0))


def pattern_launch(rw, x: torch.Tensor, cfg: dict, form: str, out: torch.Tensor, y: torch.Tensor):
    """One launch of :func:`_pattern_kernel` over ``rw``'s words with ``cfg``'s grid and prefetch
    and ``x``'s tokens (``y``: the ``[M, N]`` output of the split-K form)."""
    from bitsmith.kernels.fragment_mma import _tiles, blocks_groups, kernel_args, tokens

    nb, ng = blocks_groups(rw)
    split = cfg["SPLIT"]
    tiles = _tiles(rw, cfg["W"], cfg["RB"])
    args = kernel_args(rw, x, None, y, split, tiles)  # the device's split-K workspace and tickets
    meta, xs, splitk = FORMS[form]
    _pattern_kernel[(tiles, split)](
        rw.words, rw.scale, rw.zero, x, out, args[2], args[5], y, x.shape[0], rw.n, nb, ng, -(-ng // split), split,
        x.stride(0), W=cfg["W"], RB=cfg["RB"], TOK=tokens(x.shape[0]), PREFETCH=cfg["PREFETCH"], META=meta, X=xs,
        SPLITK=2 if splitk == 5 else splitk, IS_SPLIT=split > 1, num_warps=cfg["num_warps"], maxnreg=128)
    if splitk == 5:  # the partials added up by the library's second kernel (a PDL dependent where allowed)
        from bitsmith.kernels.fragment_mma import sum_launch_args

        kernel, grid, sargs, consts, options = sum_launch_args(args, None, y, split)
        kernel[grid](*sargs, **consts, **options)
    return out


def probe(n: int, k: int, fmt: str, m: int, timer) -> dict:
    """Every config of the fragment kernel at ``m`` tokens (at most 16) on an ``n x k`` weight in
    ``fmt`` (int4, groups of 64, zeros): the kernel itself and the reading forms, best time of
    each; the streaming reader over the same words; fp16 ``F.linear``."""
    import torch.nn.functional as F

    from bitsmith.kernels import fragment_mma, qmm, read_ceiling
    from bitsmith.kernels.bench import make_qtensor
    from bitsmith.kernels.layout import repack

    dev = torch.device("cuda")
    w16 = (torch.randn(n, k, device=dev) * 0.02).half()
    rw = repack(make_qtensor(fmt, w16), layout="fragment", order="group")
    if rw.fragment_format != "int4" or rw.group != 64 or rw.zero is None:
        raise SystemExit(f"{fmt}: the probe reads int4 words in groups of 64 with zeros")
    qmm.reserve_workspace(rw)
    if not 1 <= m <= 16:
        raise SystemExit(f"M = {m}: the probe takes 1 to 16 tokens (the kernel's 8- and 16-token tiles)")
    x = torch.randn(m, k, device=dev, dtype=torch.float16)
    sums = torch.empty(1 << 16, dtype=torch.float32, device=dev)
    y = torch.empty(m, n, dtype=torch.float16, device=dev)
    best = {}
    for cfg in fragment_mma.configs(rw, m, x.dtype, qmm._sm_count(dev)):
        if cfg.get("CLUSTER"):  # the probe's forms end as the workspace does
            continue
        runs = {"kernel": lambda cfg=cfg: qmm._launch(rw, x, None, cfg)}
        runs.update({form: (lambda cfg=cfg, form=form: pattern_launch(rw, x, cfg, form, sums, y)) for form in FORMS})
        for name, fn in runs.items():
            us = timer.time_graph(fn)
            if us < best.get(name, (float("inf"),))[0]:
                best[name] = (us, {key: cfg[key] for key in ("RB", "SPLIT", "PREFETCH")})
    flat = rw.words.reshape(-1)
    read_out = read_ceiling.read_out(flat)
    reader = timer.time_graph(lambda: read_ceiling.read_words(flat, read_out))
    fp16 = timer.time_graph(lambda: F.linear(x, w16))
    words_mb = rw.words.numel() * 4 / 1e6
    meta_mb = (rw.scale.numel() + rw.zero.numel()) * rw.scale.element_size() / 1e6
    row = {"n": n, "k": k, "m": m, "format": fmt, "words_mb": words_mb, "meta_mb": meta_mb, "fp16_us": fp16,
           "reader_us": reader, **{f"{name}_us": us for name, (us, _) in best.items()},
           "best_cfg": {name: cfg for name, (_, cfg) in best.items()}}
    cells = "  ".join(f"{name} {us:6.1f} ({words_mb / us * 1e3:5.0f} GB/s of words)" for name, (us, _) in best.items())
    print(f"{n}x{k} M={m} {fmt}: fp16 {fp16:6.1f}  reader {reader:6.1f} ({words_mb / reader * 1e3:5.0f} GB/s)  {cells}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="14336x4096,4096x14336,28672x8192")
    ap.add_argument("--formats", default="int4_g64")
    ap.add_argument("--m", default="1", help="token counts, 1 to 16 (comma list)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--name", default="fragment_pattern_probe")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not HAVE_GLUON:
        raise SystemExit("needs a CUDA GPU and triton's Gluon")
    from bitsmith.kernels.bench import Timer

    timer = Timer(torch.device("cuda"), reps=args.reps)
    rows = [probe(*map(int, shape.split("x")), fmt, int(m), timer) for shape in args.shapes.split(",")
            for fmt in args.formats.split(",") for m in args.m.split(",")]
    write_result(args.name, {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "rows": rows,
                             "timing": "CUDA-graph replay with the L2 flushed, median; best config of each form"})


if __name__ == "__main__":
    main()
