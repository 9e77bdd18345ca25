"""Whether a register cap makes the small-M kernels faster (issue #8): every tuner candidate of
the M = 1 CUDA-core kernel (``rows`` layout) and of the fragment kernel (M = 1 and 16), each
with ptxas's own register choice (``r0``) and with a cap (``maxnreg``), checked against float64
``x @ W^T``, timed in a CUDA graph with the L2 flushed, best config per variant next to fp16
``F.linear``.

Why: compiled for sm_90 without a cap, ptxas keeps both kernels near 40-96 registers by issuing
the *next* step's word loads at the end of the current step's math, so the register double
buffer the source writes is not one in the machine code (each step waits a full memory latency
for its words); with a cap of 96-192 the loads go out at the start of the step
(``python benchmarks/kernels_regcap.py --sass``, any machine).

What it found on the H100 (kernels_regcap_m1_h100.*, kernels_oneshot_h100.*): the fragment
kernel capped at 128 was faster in 22 of 24 cases (up to 9.6%), so its launches now carry a cap
(:data:`bitsmith.kernels.fragment_mma.MAXNREG`); the CUDA-core kernel gained nothing for int4
(its loads move, its occupancy falls), so it stays uncapped. Two variants timed in those runs
were then removed: the CUDA-core kernel loading the next step's activations with its words
(``fma x1``: within 2% of ``x0`` for int4) and the fragment kernel loading a whole 2-8 group
slice before its first product, as the read-ceiling kernel does (``oneshot``: 1-6% faster than
the capped kernel on 4096x4096 in 5 of 6 cases, 2-56% slower on the three larger shapes, whose
many K splits cost more in partial sums than the up-front loads saved).

    python benchmarks/kernels_regcap.py [--shapes 4096x4096,...] [--formats int4_g64,...] [--m 1,16] [--name NAME]
    python benchmarks/kernels_regcap.py --sass      # where the loop's loads sit, no GPU needed
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernels_sass, _common

FMA_CAPS = (0, 96, 128)
FRAG_CAPS = (0, 128, 168)


def loop_loads(cubin: bytes, holding: str) -> dict:
    """Registers, main-loop length and where the loop's 8- and 16-byte loads (words, scales,
    activation vectors) sit in it; the main loop is the longest one with a ``holding``
    instruction (the split-K sum's loop, unrolled, can be longer than a short main loop)."""
    import kernels_sass

    with tempfile.TemporaryDirectory() as tmp:
        ins = kernels_sass.sass_of(cubin, Path(tmp))
        regs = kernels_sass.registers(cubin, Path(tmp))
    body = kernels_sass.loop_body(ins, holding)
    wide = [i for i, t in enumerate(body) if re.search(r"LDG\.E\.(128|64)", t)]
    return {"registers": regs, "loop_instructions": len(body), "wide_loads_at": wide,
            "last_wide_load_fraction": round(max(wide) / len(body), 2) if wide else None}


def sass_rows() -> list[dict]:
    """:func:`loop_loads` of both kernels (int4 g64, one row block / 64 columns) at each cap."""
    from bitsmith.kernels import fragment_mma, small_m

    rows = []
    for bits, codebook, name in ((4, False, "int4"), (3, False, "int3"), (4, True, "nf4")):
        for cap in FMA_CAPS:
            k = small_m.compile_offline(bits, 64, 64, 2, codebook=codebook, pdl=1, maxnreg=cap)
            rows.append({"kernel": "fma", "format": name, "maxnreg": cap, **loop_loads(k.asm["cubin"], "FFMA")})
    for fmt in ("int4", "int3", "nf4"):
        for rb in (1, 2, 4):
            for cap in FRAG_CAPS:
                k = fragment_mma.compile_offline(fmt, rb, 8, 1, maxnreg=cap)
                rows.append({"kernel": "fragment", "format": fmt, "row_blocks": rb, "prefetch": 1, "maxnreg": cap,
                             **loop_loads(k.asm["cubin"], "HMMA")})
    return rows


def variants(rw, m: int, dtype, frag_caps=FRAG_CAPS) -> dict[str, list[dict]]:
    """Candidate configs by variant name: the tuner's own with each cap (``r0``: none)."""
    from bitsmith.kernels import fragment_mma, qmm

    out = {}
    if rw.layout == "fragment":
        base = fragment_mma.configs(rw, m, dtype, qmm._sm_count(rw.device))
        for cap in frag_caps:
            out[f"fragment r{cap}"] = [{**c, "maxnreg": cap} for c in base]
    elif m == 1:
        for cap in FMA_CAPS:
            out[f"fma r{cap}"] = [{**c, "maxnreg": cap} for c in qmm.fma_configs(rw, dtype)]
    return out


def main() -> None:
    from _common import write_result, add_shape_args, parse_shapes, require_cuda

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "kernels_regcap", 10)
    ap.add_argument("--formats", default="int4_g64,int3_g64,nf4_g64")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--frag-caps", default=",".join(map(str, FRAG_CAPS)), help="the fragment kernel's caps to time")
    ap.add_argument("--layouts", default="rows,fragment", help="which layouts' kernels to time")
    ap.add_argument("--sass", action="store_true", help="where the loops' loads sit (no GPU needed)")
    args = ap.parse_args()
    frag_caps = tuple(int(c) for c in args.frag_caps.split(","))

    if args.sass:
        rows = sass_rows()
        for r in rows:
            tag = "64 columns" if r["kernel"] == "fma" else f"row blocks {r['row_blocks']}"
            print(f"{r['kernel']:8s} {r['format']} {tag} cap {r['maxnreg'] or '-':>3}: {r['registers']:3d} registers, "
                  f"loop {r['loop_instructions']}, 8/16-byte loads at {r['wide_loads_at']}")
        write_result(args.name + "_sass", {"rows": rows, "arch": "sm_90"})
        return
    require_cuda("kernels_regcap", "(or --sass)")
    import torch.nn.functional as F

    from bitsmith.kernels import qmm
    from bitsmith.kernels.bench import Timer, make_qtensor
    from bitsmith.kernels.layout import repack

    dev = torch.device("cuda")
    torch.manual_seed(0)
    timer = Timer(dev, reps=args.reps, warmup=2)
    rows = []
    for n, k in parse_shapes(args.shapes):
        w16 = (torch.randn(n, k, device=dev) * 0.02).to(torch.float16)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            fp16 = timer.time_graph(lambda: F.linear(x, w16))
            for fmt in args.formats.split(","):
                qt = make_qtensor(fmt, w16)
                ref = x.double() @ qt.dequantize(torch.float64).t()
                for layout in args.layouts.split(","):
                    rw = repack(qt, layout=layout)
                    qmm.reserve_workspace(rw)
                    for name, cands in variants(rw, m, x.dtype, frag_caps).items():
                        best = None
                        for cfg in cands:
                            def run(cfg=cfg):
                                return qmm._launch(rw, x, None, cfg)
                            try:
                                err = float((run().double() - ref).norm() / ref.norm())
                            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
                                print(f"  fail {name} {cfg}: {str(e).splitlines()[0][:100]}", flush=True)
                                continue
                            if not err < 3e-3:
                                print(f"  WRONG {name} {cfg}: rel err {err:.1e}", flush=True)
                                continue
                            us = timer.time_graph(run)
                            if best is None or us < best[0]:
                                best = (us, cfg)
                        if best is None:
                            continue
                        rows.append({"n": n, "k": k, "m": m, "format": fmt, "variant": name, "us": best[0],
                                     "fp16_us": fp16, "speedup": fp16 / best[0], "config": best[1]})
                        print(f"{n}x{k} M={m} {fmt:9s} {name:16s} {best[0]:7.1f} us  {fp16 / best[0]:5.2f}x fp16 "
                              f"({fp16:.1f})  {best[1]}", flush=True)
                write_result(args.name, {"device": torch.cuda.get_device_name(dev), "rows": rows,
                                         "timing": "CUDA-graph replay with the L2 flushed, median; best config per variant"})


if __name__ == "__main__":
    main()
