"""Stored bits/weight (every metadata tensor counted) and reconstruction error for each codec
configuration the core issue names, on a 4096x4096 weight (0.02*randn, fp16) and on SmolLM2's
real linears; and NF4 next to bitsandbytes' NF4 on the same weights when bitsandbytes imports.

    python benchmarks/bits_per_weight.py
"""
from __future__ import annotations

import torch

import bitsmith
from bitsmith.cli.table import render

from _common import write_result

CONFIGS = [
    ("NF4 b64 double-quant", "nf", {"levels": 16, "block_size": 64, "double_quant": True}, 4.13),
    ("NF4 b64", "nf", {"levels": 16, "block_size": 64}, None),
    ("NF 7 levels b64 dq", "nf", {"levels": 7, "block_size": 64, "double_quant": True}, 3.05),
    ("NF 12 levels b64 dq", "nf", {"levels": 12, "block_size": 64, "double_quant": True}, 3.90),
    ("NF 24 levels b64 dq", "nf", {"levels": 24, "block_size": 64, "double_quant": True}, 5.06),
    ("NF 32 levels b64 dq", "nf", {"levels": 32, "block_size": 64, "double_quant": True}, 5.14),
    ("int8 g64 (uint8 zero, default)", "rtn", {"bits": 8, "group_size": 64}, None),
    ("int4 g64 (uint8 zero, default)", "rtn", {"bits": 4, "group_size": 64}, None),
    ("int4 g64 (fp16 scale + fp16 zero)", "rtn", {"bits": 4, "group_size": 64, "zero": "float"}, 4.51),
    ("int4 g128 (uint8 zero)", "rtn", {"bits": 4, "group_size": 128}, None),
    ("int4 g64 symmetric", "rtn", {"bits": 4, "group_size": 64, "symmetric": True}, None),
    ("int3 g64 (uint8 zero, default)", "rtn", {"bits": 3, "group_size": 64}, None),
    ("int3 g64 (fp16 scale + fp16 zero)", "rtn", {"bits": 3, "group_size": 64, "zero": "float"}, 3.51),
    ("int2 g16 (uint8 zero)", "rtn", {"bits": 2, "group_size": 16}, None),
]


def rel_err(w: torch.Tensor, qt) -> float:
    w = w.float()
    return float((w - qt.dequantize(torch.float32)).norm() / w.norm())


def bnb_nf4_error(w: torch.Tensor) -> float | None:
    try:
        import bitsandbytes.functional as bf
    except Exception:
        return None
    q, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    return float((w.float() - bf.dequantize_4bit(q, state).float()).norm() / w.float().norm())


def main() -> None:
    torch.manual_seed(0)
    w = (torch.randn(4096, 4096) * 0.02).half()
    rows, data = [], []
    for label, method, opts, target in CONFIGS:
        qt = bitsmith.quantize_tensor(w, method, **opts)
        ok = "" if target is None else ("ok" if qt.bits_per_weight <= target else "MISSED")
        rows.append((label, f"{qt.bits_per_weight:.4f}", "" if target is None else f"<= {target}", ok, f"{rel_err(w, qt):.5f}"))
        data.append({"config": label, "method": method, "options": opts, "bits_per_weight": qt.bits_per_weight,
                     "target": target, "rel_error": rel_err(w, qt)})
    print("4096x4096 fp16 weight, 0.02*randn")
    print(render(["config", "bits/weight", "target", "", "rel. error"], rows, align="lrrll"))
    w32 = w.float()  # same float32 input to both libraries
    bnb = bnb_nf4_error(w32)
    ours = rel_err(w32, bitsmith.quantize_tensor(w32, "nf", levels=16, block_size=64))
    print(f"\nNF4 b64 (no double quant, float32 input) relative error: bitsmith {ours:.6f}, bitsandbytes {bnb if bnb is None else f'{bnb:.6f}'}")
    write_result("bits_per_weight", {"weight": "4096x4096 fp16 0.02*randn seed 0", "rows": data,
                                     "nf4_vs_bitsandbytes": {"bitsmith": ours, "bitsandbytes": bnb}})


if __name__ == "__main__":
    main()
