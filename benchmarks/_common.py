"""Shared bits of the benchmark scripts: machine description and JSON results with the command."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    # the switches that change which kernels run belong to the command
    env = " ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("BITSMITH_"))
    doc = {
        "command": (env + " " if env else "") + "python "
        + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine(),
        **data,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return out


#: the issue's four Llama-3-8B-shaped matmuls, ``N x K``
SHAPES = "4096x4096,14336x4096,4096x14336,28672x8192"


def add_shape_args(ap, name: str, reps: int, shapes: str | None = SHAPES) -> None:
    """The arguments every kernel benchmark takes: ``--shapes`` (unless ``shapes`` is None),
    ``--reps`` and ``--name`` (results/NAME.json)."""
    if shapes is not None:
        ap.add_argument("--shapes", default=shapes, help="N x K, comma-separated")
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--name", default=name, help="results file (benchmarks/results/NAME.json)")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x4096,14336x4096"`` -> ``[(4096, 4096), (14336, 4096)]``, naming a malformed entry."""
    out = []
    for item in text.split(","):
        try:
            n, k = (int(v) for v in item.split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not N x K (e.g. 4096x4096)") from None
        out.append((n, k))
    return out


def require_cuda(script: str, why: str = "") -> None:
    """Exit with status 2 and a message when no CUDA GPU is visible."""
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA GPU{' ' + why if why else ''}", file=sys.stderr)
        raise SystemExit(2)
