"""How far issue #8's small-M speed targets are from what reading the weights takes on the H100,
from committed measurements only (no GPU needed): for each shape and token count of
``fragment_pattern_probe_ending_h100.json`` (int4 g64, CUDA-graph replay, L2 flushed, fp16
``F.linear`` timed in the same run), the time the target allows (fp16's time over the target
ratio) beside

* the words' read: the faster of a plain streaming reader of the same bytes and the kernel's own
  walk over its words (no scales, no activations, no arithmetic): a floor for any 4-bit format,
  whatever its metadata;
* the format's read: the words, each group's float16 scale and zero and the activations, loaded
  as the kernel loads them (``words+meta+x``), still with no arithmetic and no split-K ending;
* the kernel of that run.

A target is out of reach on this GPU when the time it allows is below a read the kernel cannot
skip. The words' read bounds NF4 too (the same four bits a weight; its metadata is smaller than
int4 g64's). Two formats were not probed, and their rows are marked as estimates: int4 g128
(half the scales and zeros, so half of the time they added to the words' walk) and int3 (a
straight line through the streaming reader's times, ``t = t0 + bytes / bandwidth``, least squares
over the probe's M = 1 rows, at three quarters of int4's words, plus what int4's scales, zeros
and activations added).

    python benchmarks/target_bounds.py   # prints the table, writes benchmarks/results/target_bounds_h100.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402

PROBE = "fragment_pattern_probe_ending_h100.json"
#: issue #8's speed-up targets over fp16 at small M: (format, tokens) -> ratio
TARGETS = {("int4 g64", 1): 3.0, ("int4 g64", 16): 2.5, ("int4 g128", 1): 3.0, ("int4 g128", 16): 2.5,
           ("int3 g64", 1): 3.5}


def _verdict(allowed: float, words: float, fmt: float) -> str:
    if allowed < words:
        return "out of reach: below the words' read"
    if allowed < fmt:
        return "out of reach: below the format's read"
    return f"reachable in principle: {allowed - fmt:.1f} µs above the format's read"


def reader_line(rows: list[dict]) -> tuple[float, float]:
    """``(t0 us, MB per us)``: the least-squares line through the streaming reader's times against
    the words' megabytes, over the M = 1 rows."""
    pts = [(r["words_mb"], r["reader_us"]) for r in rows if r["m"] == 1]
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return my - slope * mx, 1 / slope


def bounds(rows: list[dict]) -> list[dict]:
    """One row per (format, shape, tokens) of :data:`TARGETS` the probe covers."""
    t0, mb_per_us = reader_line(rows)
    out = []
    for r in rows:
        m, fp16 = r["m"], r["fp16_us"]
        words = min(r["reader_us"], r["words_us"])
        meta = r["words+meta_us"] - r["words_us"]  # what the scales and zeros add to the words' walk
        cases = [("int4 g64", words, r["words+meta+x_us"], r["kernel_us"], False),
                 # g128: half the scales and zeros, so half their time
                 ("int4 g128", words, r["words+meta+x_us"] - meta / 2, None, True)]
        if m == 1:  # int3: three quarters of the words, the same scales and zeros, read at the reader's line
            words3 = t0 + 0.75 * r["words_mb"] / mb_per_us
            cases.append(("int3 g64", words3, words3 + (r["words+meta+x_us"] - r["words_us"]), None, True))
        for fmt, words_us, fmt_us, kernel_us, estimate in cases:
            target = TARGETS.get((fmt, m))
            if target is None:
                continue
            allowed = fp16 / target
            out.append({"format": fmt, "n": r["n"], "k": r["k"], "m": m, "fp16_us": fp16, "target": target,
                        "allowed_us": allowed, "words_read_us": words_us, "format_read_us": fmt_us,
                        "kernel_us": kernel_us, "ratio_at_words_read": fp16 / words_us,
                        "ratio_at_format_read": fp16 / fmt_us, "estimate": estimate,
                        "verdict": _verdict(allowed, words_us, fmt_us)})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| format | shape N×K | M | target | fp16 µs | allowed µs | words' read µs (× fp16) "
             "| format's read µs (× fp16) | kernel µs | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for b in rows:
        est = " (est.)" if b["estimate"] else ""
        kernel = f"{b['kernel_us']:.1f}" if b["kernel_us"] is not None else "–"
        lines.append(f"| {b['format']}{est} | {b['n']}×{b['k']} | {b['m']} | {b['target']:.1f}× | {b['fp16_us']:.1f} "
                     f"| {b['allowed_us']:.1f} | {b['words_read_us']:.1f} ({b['ratio_at_words_read']:.2f}) "
                     f"| {b['format_read_us']:.1f} ({b['ratio_at_format_read']:.2f}) | {kernel} | {b['verdict']} |")
    return "\n".join(lines)


def main() -> None:
    probe = json.loads((RESULTS / PROBE).read_text())
    rows = bounds(probe["rows"])
    print(f"from {PROBE} ({probe['command']}, {probe['device']})")
    print(table(rows))
    t0, mb_per_us = reader_line(probe["rows"])
    write_result("target_bounds_h100", {"source": PROBE, "source_command": probe["command"],
                                        "device": probe["device"], "reader_line": {"t0_us": t0, "gb_per_s": mb_per_us * 1e3},
                                        "rows": rows})


if __name__ == "__main__":
    main()
