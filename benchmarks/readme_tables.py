"""The README's GPU summary tables, built from committed H100 results (no GPU needed), so every
number there can be traced to one JSON and the command inside it:

* kernels at M = 1 and 16, every format in its default layout (the fragment layout, group-major
  words) and torch's tinygemm: M = 1 from one run (``kernels_defaults_m1m16_planes_h100.json``),
  M = 16 from a later one with the zeros' 16-bit modes offered (``kernels_defaults_zsub_h100.json``);
  each ratio against the fp16 of its own run;
* M = 2048: every format in its default path (int4 and NF4 by the register-operand GEMM, int3 by
  dequantize + cuBLAS), tinygemm and W8A8 in one run (``kernels_m2048_ra_pair_h100.json``);
* the compiled decode step: int4 at batch 1 in each layout with one tuning cache shared by the two
  processes (``decode_e2e_b1_int4_{frag,rows}_h100.json``) and int4 and NF4 at batch 16
  (``decode_e2e_b16_frag_h100.json``); every format at batch 1 as of the release before
  (``decode_e2e_b1_cap_h100.json``); int4's two layouts in alternating runs before the wide
  kernels (``decode_e2e_b1_{default,fraggroup}_r{1,2}_h100.json``, printed in docs/gpu-kernels.md).

    python benchmarks/readme_tables.py
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
#: column -> (kernel name in the JSONs, {M: file})
SMALL_M = "kernels_defaults_m1m16_planes_h100.json"
#: M = 16 with every way of applying the zeros offered to the tuner (ZSUB 0, 1, 2, the default since)
M16 = "kernels_defaults_zsub_h100.json"
BIG_M = "kernels_m2048_ra_pair_h100.json"
FILES = {1: SMALL_M, 16: M16, 2048: BIG_M}
COLUMNS = {"int4 g64": ("int4_g64", FILES),
           "int4 g128": ("int4_g128", FILES),
           "int3 g64": ("int3_g64", FILES),
           "NF4": ("nf4_g64", FILES),
           "torch tinygemm int4 g64": ("tinygemm_int4_g64", FILES),
           "W8A8": ("w8a8", {2048: BIG_M})}
DECODE = "decode_e2e_b1_cap_h100.json"
#: (batch, layout of int4) -> file: the default (fragment) and rows (BITSMITH_FRAGMENT=int3,nf4),
#: the second process reading the first one's tuning cache (BITSMITH_TUNE_CACHE)
DECODE_NOW = {(1, "fragment"): "decode_e2e_b1_int4_frag_h100.json", (1, "rows"): "decode_e2e_b1_int4_rows_h100.json",
              (16, "fragment"): "decode_e2e_b16_frag_h100.json"}
#: (run, layouts) -> file: the default (int4 rows, int3 fragment block-major, as before this
#: release) and every format in the fragment layout, group-major, alternating on one H100
DECODE_AB = {("1", "default"): "decode_e2e_b1_default_r1_h100.json", ("1", "fragment"): "decode_e2e_b1_fraggroup_r1_h100.json",
             ("2", "default"): "decode_e2e_b1_default_r2_h100.json", ("2", "fragment"): "decode_e2e_b1_fraggroup_r2_h100.json"}


def _rows(name: str | None) -> list[dict]:
    return json.loads((RESULTS / name).read_text())["rows"] if name else []


def _cell(rows: list[dict], kernel: str, n: int, k: int, m: int) -> str:
    hit = [r for r in rows if (r["kernel"], r["n"], r["k"], r["m"]) == (kernel, n, k, m)]
    if not hit:
        return "–"
    r = hit[0]
    graph = r.get("speedup_graph")
    return f"{r['speedup']:.2f}" + (f" ({graph:.2f})" if graph else "")


def kernel_table() -> str:
    lines = ["| shape N×K | M | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for m in (1, 16, 2048):
        for n, k in SHAPES:
            cells = [_cell(_rows(files.get(m)), kernel, n, k, m) for kernel, files in COLUMNS.values()]
            lines.append(f"| {n}×{k} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decode_table() -> str:
    doc = json.loads((RESULTS / DECODE).read_text())
    lines = ["| weights (q/k/v and gate/up stacked, LM head int8 g64) | ms per step | vs fp16 | weight-read floor |",
             "|---|---:|---:|---:|"]
    for r in doc["rows"]:
        name = "fp16 (transformers' model, unstacked)" if r["format"] == "fp16" else r["format"].replace("+fused+head8", "")
        lines.append(f"| {name} | {r['graph_ms']:.2f} | {r['speedup_vs_fp16']:.2f}× | {r['floor_ms']:.2f} ms |")
    return "\n".join(lines)


def decode_now_table() -> str:
    """The compiled step with this release's defaults: batch 1 (int4 in each layout, against the
    fp16 of the first run: the rows run timed int4 only) and batch 16."""
    lines = ["| batch | weights | layout | ms per step | vs fp16 | weight-read floor |", "|---:|---|---|---:|---:|---:|"]
    fp16 = {}
    for (batch, lay), name in DECODE_NOW.items():
        for r in _rows(name):
            fmt = r["format"].replace("+fused+head8", "")
            if fmt == "fp16":
                fp16[batch] = r["graph_ms"]
            lines.append(f"| {batch} | {fmt} | {'–' if fmt == 'fp16' else lay if fmt.startswith('int4') else 'fragment'} | {r['graph_ms']:.2f} | "
                         f"{fp16[batch] / r['graph_ms']:.2f}× | {r['floor_ms']:.2f} ms |")
    return "\n".join(lines)


def decode_ab_table() -> str:
    """int4 (and int3) in the compiled step with int4 in rows or in the fragment layout, run by run."""
    lines = ["| run | layouts | fp16 ms | int4_g64 ms (vs fp16) | int3_g64 ms (vs fp16) |", "|---|---|---:|---:|---:|"]
    for (run, lay), name in DECODE_AB.items():
        by = {r["format"].replace("+fused+head8", ""): r for r in _rows(name)}
        cells = [f"{by[f]['graph_ms']:.2f} ({by[f]['speedup_vs_fp16']:.2f}×)" for f in ("int4_g64", "int3_g64")]
        what = "int4 rows, int3 fragment (block-major)" if lay == "default" else "both fragment (group-major)"
        lines.append(f"| {run} | {what} | {by['fp16']['graph_ms']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    files = sorted({f for _, by_m in COLUMNS.values() for f in by_m.values()})
    print(f"Kernels (speed-up over fp16 F.linear, eager with the L2 flushed; CUDA graph in brackets), from {', '.join(files)}\n")
    print(kernel_table())
    print(f"\nCompiled decode step, Llama-3-8B shape, this release's defaults, from {', '.join(DECODE_NOW.values())}:\n")
    print(decode_now_table())
    print(f"\nCompiled batch-1 decode step, every format, the release before, from {DECODE}:\n")
    print(decode_table())
    print("\nint4's two layouts in the compiled step, alternating runs before the wide kernels (docs/gpu-kernels.md):\n")
    print(decode_ab_table())


if __name__ == "__main__":
    main()
