"""The README's GPU summary tables, built from committed H100 results (no GPU needed), so every
number there can be traced to one JSON and the command inside it:

* kernels at M = 1 and 16: one library run with every format in its default layout
  (``kernels_reduce_new_h100.json``: int4 in rows, int3 and NF4 in the fragment layout, the
  register cap and the split-K sum of this release);
* M = 2048: the run of each format's default layout (``kernels_layout0_m2048_h100.json`` for int4,
  ``kernels_layout1_m2048_h100.json`` for int3 and NF4) and W8A8 (``kernels_h100.json``);
* the compiled batch-1 decode step (``decode_e2e_b1_cap_h100.json``).

    python benchmarks/readme_tables.py
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
#: column -> (kernel name in the JSONs, M = 2048 file)
COLUMNS = {"int4 g64": ("int4_g64", "kernels_layout0_m2048_h100.json"),
           "int3 g64": ("int3_g64", "kernels_layout1_m2048_h100.json"),
           "NF4": ("nf4_g64", "kernels_layout1_m2048_h100.json"),
           "torch tinygemm int4 g64": ("tinygemm_int4_g64", "kernels_layout0_m2048_h100.json"),
           "W8A8": ("w8a8", "kernels_h100.json")}
SMALL_M = "kernels_reduce_new_h100.json"
DECODE = "decode_e2e_b1_cap_h100.json"


def _rows(name: str) -> list[dict]:
    return json.loads((RESULTS / name).read_text())["rows"]


def _cell(rows: list[dict], kernel: str, n: int, k: int, m: int) -> str:
    hit = [r for r in rows if (r["kernel"], r["n"], r["k"], r["m"]) == (kernel, n, k, m)]
    if not hit:
        return "–"
    r = hit[0]
    graph = r.get("speedup_graph")
    return f"{r['speedup']:.2f}" + (f" ({graph:.2f})" if graph else "")


def kernel_table() -> str:
    small = _rows(SMALL_M)
    lines = ["| shape N×K | M | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for m in (1, 16, 2048):
        for n, k in SHAPES:
            cells = [_cell(small if m < 2048 else _rows(big), kernel, n, k, m) for kernel, big in COLUMNS.values()]
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


def main() -> None:
    print(f"Kernels (speed-up over fp16 F.linear, eager with the L2 flushed; CUDA graph in brackets):\n"
          f"M = 1, 16 from {SMALL_M}; M = 2048 from {', '.join(sorted({b for _, b in COLUMNS.values()}))}\n")
    print(kernel_table())
    print(f"\nCompiled batch-1 decode step, Llama-3-8B shape, from {DECODE}:\n")
    print(decode_table())


if __name__ == "__main__":
    main()
