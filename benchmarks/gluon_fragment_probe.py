"""The fragment runtime layout (issue #8, :mod:`bitsmith.kernels.fragment`, kernels in
:mod:`bitsmith.kernels.fragment_mma`) on its own: every config of its M <= 16 kernel checked
against float64 ``x @ W^T`` and timed (CUDA graph, L2 flushed) next to fp16 ``F.linear`` and
bitsmith's ``rows``-layout kernels (tuned), per weight, format and M; or, on any machine, the
kernel's sm_90 machine code (instructions a code in the main loop, registers, no shared memory).

Why the layout: the M = 1 CUDA-core kernel spends 3.75 instructions per int4 code (an AND and an
FMA are its floor), 6.3 per int3 code and 6.25 per NF4 code, and the M = 16 tensor-core kernel
waits on a shared-memory round trip per tile (benchmarks/results/kernels_ncu_h100.txt,
kernels_sass.json). In the fragment layout each lane's words are already its tensor-core operand.

    python benchmarks/gluon_fragment_probe.py [--shapes 4096x4096,...] [--m 1,8,16] [--formats ...] [--name NAME]
    python benchmarks/gluon_fragment_probe.py --orders block,group   # both word orders (fragment.ORDERS)
    python benchmarks/gluon_fragment_probe.py --sass      # sm_90 machine code only, any machine

Variants of the kernel timed with this script and then removed, each slower than the plain
kernel on the H100 (results/gluon_fragment_probe_{ahead_cap,stages,blocked,l2,tma}_h100.txt): the
scales, zeros and activations loaded a group ahead, the words through a ``cp.async`` ring in
shared memory, the scales and zeros stored row-block-major, an L2 prefetch a few groups ahead,
and (no faster rather than slower) a TMA loader warp filling a shared-memory ring. The commits that remove them say
where in the history they are.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernels_sass, _common


def loop_opcodes(cubin: bytes) -> collections.Counter:
    """Opcode counts of the compiled kernel's main loop (the longest loop with tensor-core products)."""
    import kernels_sass

    with tempfile.TemporaryDirectory() as tmp:
        ins = kernels_sass.sass_of(cubin, Path(tmp))
    return kernels_sass.main_loop(ins, holding="HMMA")


def registers(cubin: bytes) -> int:
    """Registers per thread of a cubin."""
    import kernels_sass

    with tempfile.TemporaryDirectory() as tmp:
        return kernels_sass.registers(cubin, Path(tmp))


def sass_report(w: int = 4, tok: int = 8, rb: int = 1, prefetch: bool = False, fmt: str = "int4") -> dict:
    """Instructions per code and the memory opcodes of the main loop (one group of 64 k per step:
    each lane handles 8 codes x 4 products = 32 codes of each of its ``rb`` 16-row blocks)."""
    from bitsmith.kernels.fragment_mma import compile_offline

    compiled = compile_offline(fmt, rb, tok, prefetch, W=w)
    loop = loop_opcodes(compiled.asm["cubin"])
    total = sum(loop.values())
    shared = {op: c for op, c in loop.items() if re.match(r"(LDS|STS|LDSM|SHFL|BAR)", op)}
    return {"format": fmt, "warps": w, "row_blocks": rb, "tokens": tok, "prefetch": prefetch,
            "registers": registers(compiled.asm["cubin"]), "loop_instructions": total, "per_code": total / (32 * rb),
            "shared_or_shuffle": shared, "opcodes": dict(loop.most_common())}


def probe_weight(w16: torch.Tensor, fmt: str, ms: list[int], timer, orders: tuple[str, ...] | None = None) -> list[dict]:
    """One weight quantized to ``fmt`` as the kernel table quantizes it
    (:func:`bitsmith.kernels.bench.make_qtensor`): at each M every fragment-kernel config, with
    the words in each of ``orders`` (:data:`bitsmith.kernels.fragment.ORDERS`), checked against
    float64 ``x @ W^T`` and timed, next to fp16 ``F.linear`` and the ``rows`` layout's tuned
    kernels (``quant_matmul``); one row per M with the best correct config (and the best of each
    order)."""
    import torch.nn.functional as F

    from bitsmith.kernels import fragment_mma, qmm
    from bitsmith.kernels.bench import make_qtensor
    from bitsmith.kernels.layout import FRAGMENT, repack

    n, k = w16.shape
    qt = make_qtensor(fmt, w16)
    rows_rw = repack(qt, layout="rows")
    frag_rws = {order: repack(qt, layout="fragment", order=order) for order in orders or (FRAGMENT["order"],)}
    for frag_rw in frag_rws.values():
        qmm.reserve_workspace(frag_rw)
    ref_w = qt.dequantize(torch.float64)
    out = []
    for m in ms:
        x = torch.randn(m, k, device=w16.device, dtype=torch.float16)
        ref = x.double() @ ref_w.t()
        best, by_order = None, {}
        for order, frag_rw in frag_rws.items():
            for cfg in fragment_mma.configs(frag_rw, m, x.dtype, qmm._sm_count(x.device)):
                def run(rw=frag_rw, cfg=cfg):
                    return qmm._launch(rw, x, None, cfg)

                err = float((run().double() - ref).norm() / ref.norm())
                us = timer.time_graph(run)
                name = (f"row blocks {cfg['RB']} split {cfg['SPLIT']} prefetch {cfg['PREFETCH']:d}"
                        + (f" {order}-major" if len(frag_rws) > 1 else ""))
                print(f"{n}x{k} {fmt} M={m} {name}: {us:7.1f} us  rel err {err:.1e}", flush=True)
                if err < 3e-3 and (best is None or us < best[0]):
                    best = (us, {**{kk: cfg.get(kk, 0) for kk in ("W", "RB", "SPLIT", "PREFETCH")}, "order": order}, err)
                if err < 3e-3 and us < by_order.get(order, float("inf")):
                    by_order[order] = us
        fp16 = timer.time_graph(lambda: F.linear(x, w16))
        ours = timer.time_graph(lambda: qmm.quant_matmul(x, rows_rw))
        out.append({"n": n, "k": k, "format": fmt, "m": m, "fp16_us": fp16, "rows_layout_us": ours,
                    "fragment_us": None if best is None else best[0], "fragment_cfg": None if best is None else best[1],
                    "rel_err": None if best is None else best[2], "fragment_us_by_order": by_order,
                    "repack_s": {"rows": rows_rw.repack_seconds,
                                 **{f"fragment {o}": rw.repack_seconds for o, rw in frag_rws.items()}}})
        print(f"  fp16 {fp16:.1f} us, rows layout {ours:.1f} us ({fp16 / ours:.2f}x), fragment "
              f"{'WRONG' if best is None else f'{best[0]:.1f} us ({fp16 / best[0]:.2f}x)'}"
              + ("".join(f", best {o}-major {us:.1f} us ({fp16 / us:.2f}x)" for o, us in by_order.items())
                 if len(frag_rws) > 1 else ""), flush=True)
    return out


def main() -> None:
    from _common import write_result, add_shape_args, parse_shapes, require_cuda

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "gluon_fragment_probe", 20)
    ap.add_argument("--m", default="1,8,16")
    ap.add_argument("--formats", default="int4_g64,int4_g128,nf4_g64,int3_g64")
    ap.add_argument("--orders", default=None,
                    help="the fragment words' orders to time, comma-separated (block, group: fragment.ORDERS; "
                         "default: the library's, BITSMITH_FRAGMENT_ORDER or group)")
    ap.add_argument("--sass", action="store_true", help="sm_90 machine code only (no GPU needed)")
    args = ap.parse_args()

    if args.sass:
        from bitsmith.kernels.fragment import FORMATS

        rows = [sass_report(4, tok, rb, pf, fmt) for fmt in FORMATS for pf in (0, 1, 2) for rb in (1, 2, 4)
                for tok in (8, 16)]
        for r in rows:
            print(f"{r['format']} row blocks {r['row_blocks']} tokens {r['tokens']} prefetch {r['prefetch']:d}: {r['registers']} registers, "
                  f"{r['loop_instructions']} instructions a step, "
                  f"{r['per_code']:.2f} a code, shared/shuffle {r['shared_or_shuffle'] or 'none'}")
        write_result(args.name + "_sass", {"rows": rows, "arch": "sm_90"})
        return
    require_cuda("gluon_fragment_probe", "(or --sass)")
    from bitsmith.kernels.bench import Timer

    dev = torch.device("cuda")
    timer = Timer(dev, reps=args.reps)
    rows = []
    for n, k in parse_shapes(args.shapes):
        w16 = (torch.randn(n, k, device=dev) * 0.02).to(torch.float16)
        for fmt in args.formats.split(","):
            orders = tuple(args.orders.split(",")) if args.orders else None
            rows += probe_weight(w16, fmt, [int(v) for v in args.m.split(",")], timer, orders)
            # after every weight: a run cut short by a time limit keeps what it measured
            write_result(args.name, {"device": torch.cuda.get_device_name(dev), "rows": rows,
                                     "timing": "CUDA-graph replay with the L2 flushed, median"})


if __name__ == "__main__":
    main()
