"""Machine code of the M = 1 CUDA-core kernel (:mod:`bitsmith.kernels.small_m`) for the H100
(sm_90), and of the small-M tensor-core kernel's two step kinds, compiled on any machine, no GPU
needed (Triton's bundled ptxas and cuobjdump): per format and tile, the instructions of the main
loop (one quantization group per iteration), the codes one thread handles per iteration,
instructions per code and registers. At M = 1 the kernel has to
issue a few instructions per 4-bit code while reading 0.5 bytes, so instructions per code is what
caps its bandwidth (about 30e12 thread-instructions/s on an H100 SXM against 3.35e12 bytes/s).

    python benchmarks/kernels_sass.py [--name kernels_sass]
    python benchmarks/kernels_sass.py --prev OLD_small_m.py --name kernels_sass_prev   # an earlier kernel
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from bitsmith.kernels import small_m  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def cuobjdump(cubin: bytes, tmp: Path, flag: str) -> str:
    """cuobjdump's ``flag`` output (``-sass``, ``-res-usage``) for a cubin."""
    path = tmp / "k.cubin"
    path.write_bytes(cubin)
    return subprocess.run([str(TOOLS / "cuobjdump"), flag, str(path)], capture_output=True, text=True,
                          check=True).stdout


def sass_of(cubin: bytes, tmp: Path) -> list[tuple[int, str]]:
    """``(address, instruction)`` of a cubin."""
    return [(int(m.group(1), 16), m.group(2)) for m in
            (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line) for line in cuobjdump(cubin, tmp, "-sass").splitlines())
            if m]


def registers(cubin: bytes, tmp: Path) -> int:
    """Registers per thread of a cubin."""
    return int(re.search(r"REG:(\d+)", cuobjdump(cubin, tmp, "-res-usage")).group(1))


def opcode(t: str) -> str:
    """An instruction's opcode, its predicate (``@P0``, ``@!UP1``) dropped."""
    return re.sub(r"^@!?U?P\w+\s+", "", t).split()[0]


def loop_body(ins: list[tuple[int, str]], holding: str | None = None) -> list[str]:
    """The instructions, in order, of the longest backward branch's body (the loop over groups);
    with ``holding``, of the longest one with an instruction of that opcode prefix (the split-K
    reduction loop can be the longer one when the main loop is short)."""
    spans = [(int(m.group(1), 16), addr) for addr, t in ins if (m := re.search(r"BRA (0x[0-9a-f]+)", t))
             and int(m.group(1), 16) < addr]
    if holding is not None:
        spans = [(lo, hi) for lo, hi in spans if any(lo <= a <= hi and opcode(t).startswith(holding) for a, t in ins)]
    lo, hi = max(spans, key=lambda s: s[1] - s[0])
    return [t for a, t in ins if lo <= a <= hi]


def main_loop(ins: list[tuple[int, str]], holding: str | None = None) -> collections.Counter:
    """Opcode counts of :func:`loop_body`."""
    return collections.Counter(opcode(t) for t in loop_body(ins, holding))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="kernels_sass")
    ap.add_argument("--prev", help="an earlier small_m.py: compile its _fma_kernel instead")
    args = ap.parse_args()
    kernel = None
    if args.prev:
        from kernels_m1_ab import load_prev

        kernel = load_prev(args.prev)._fma_kernel
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    rows = []
    print(f"{'format':<12} {'act':<5} {'BLOCK_N':>7} {'warps':>5} {'loop instr':>10} {'codes/thread':>12} "
          f"{'instr/code':>10} {'regs':>5}  top opcodes")
    cases = [(4, 64, False), (4, 128, False), (3, 64, False), (2, 64, False), (8, 128, False), (4, 64, True)]
    for (bits, group, codebook), act, (bn, warps) in (
            (c, a, t) for c in cases for a in ("fp16", "bf16") for t in ((128, 4), (256, 4))):
        ck = small_m.compile_offline(bits, group, bn, warps, codebook, act, kernel=kernel)
        ops = main_loop(sass_of(ck.asm["cubin"], tmp))
        regs = registers(ck.asm["cubin"], tmp)
        total = sum(ops.values())
        codes = group * bn / (warps * 32)
        fmt = f"{'nf' if codebook else 'int'}{bits}_g{group}"
        rows.append({"format": fmt, "act": act, "block_n": bn, "warps": warps, "loop_instructions": total,
                     "codes_per_thread": codes, "instructions_per_code": total / codes, "registers": regs,
                     "ftz_in_ptx": ".ftz" in ck.asm["ptx"], "opcodes": dict(ops.most_common())})
        top = " ".join(f"{k}:{v}" for k, v in ops.most_common(5))
        print(f"{fmt:<12} {act:<5} {bn:>7} {warps:>5} {total:>10} {codes:>12.0f} {total / codes:>10.2f} "
              f"{regs:>5}  {top}", flush=True)
    tc_rows = [] if args.prev else tensor_core_rows(tmp)
    write_result(args.name, {"target": "sm_90 (compiled offline, triton " + triton.__version__ + ")",
                             "kernel": args.prev or "bitsmith.kernels.small_m", "rows": rows, "tc_rows": tc_rows})


def tensor_core_rows(tmp: Path) -> list[dict]:
    """The small-M tensor-core kernel (16 rows, one group of 64 a step) with whole code tiles
    against the half-word steps: main-loop instructions, shared-memory stores and barriers."""
    import torch

    import bitsmith
    from bitsmith.kernels import repack

    nf4 = repack(bitsmith.quantize_tensor(torch.randn(8, 64), "nf", levels=16, block_size=64))
    lut = small_m.lut_pair_ptx(nf4.table_bits[torch.float16])
    print(f"\nsmall-M tensor-core kernel, M tile 16, group 64, fp16: {'format':<8} {'steps':<10} {'BLOCK_N':>7} "
          f"{'loop instr':>10} {'instr/code':>10} {'STS':>4} {'BAR':>4} {'regs':>5}")
    out = []
    for codebook, bn, half in ((c, b, h) for c in (False, True) for b in (64, 128) for h in (0, 2)):
        ck = small_m.compile_offline_tc(4, 64, bn, half, codebook, lut if codebook and half else "")
        ops = main_loop(sass_of(ck.asm["cubin"], tmp))
        total = sum(ops.values())
        codes = 64 * bn / 128
        sts = sum(v for k, v in ops.items() if k.startswith("STS"))
        bars = sum(v for k, v in ops.items() if k.startswith("BAR.SYNC"))
        fmt, steps = ("nf4_g64" if codebook else "int4_g64"), ("half-word" if half else "tiles")
        out.append({"format": fmt, "steps": steps, "block_n": bn, "loop_instructions": total,
                    "instructions_per_code": total / codes, "shared_stores": sts, "barriers": bars,
                    "registers": registers(ck.asm["cubin"], tmp), "opcodes": dict(ops.most_common())})
        print(f"{'':<54} {fmt:<8} {steps:<10} {bn:>7} {total:>10} {total / codes:>10.2f} {sts:>4} {bars:>4} "
              f"{out[-1]['registers']:>5}", flush=True)
    return out


if __name__ == "__main__":
    main()
