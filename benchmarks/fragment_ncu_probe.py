"""One launch of the fragment kernel at M = 1 per format, with its best config on the H100
(benchmarks/results/gluon_fragment_probe_ahead_cap_h100.json), and one launch of the read-only
kernel over the same words (:mod:`bitsmith.kernels.read_ceiling`), for ``ncu`` (Nsight Compute)
to say where the matmul's time goes that the reader does not spend.

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        --section SchedulerStats --section Occupancy --section LaunchStats \\
        -k regex:"_frag_kernel|_read_kernel" python benchmarks/fragment_ncu_probe.py
"""
import json
from pathlib import Path

import torch

from bitsmith.kernels import qmm, read_ceiling
from bitsmith.kernels.bench import make_qtensor
from bitsmith.kernels.layout import repack

RESULTS = Path(__file__).resolve().parent / "results" / "gluon_fragment_probe_ahead_cap_h100.json"
SHAPES = [(28672, 8192), (14336, 4096)]
FORMATS = ["int4_g64", "int3_g64", "nf4_g64"]

dev = torch.device("cuda")
best = {(r["n"], r["k"], r["format"]): r["fragment_cfg"] for r in json.loads(RESULTS.read_text())["rows"] if r["m"] == 1}
for n, k in SHAPES:
    w16 = (torch.randn(n, k, device=dev) * 0.02).half()
    for fmt in FORMATS:
        rw = repack(make_qtensor(fmt, w16), layout="fragment")
        qmm.reserve_workspace(rw)
        cfg = {"KERNEL": "fragment", "num_warps": 4, **best[(n, k, fmt)]}
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        qmm._launch(rw, x, None, cfg)
        torch.cuda.synchronize()
        print(f"{n}x{k} {fmt} {cfg}: words {rw.words.numel() * 4 / 1e6:.1f} MB, scales {rw.scale.numel() * 2 / 1e6:.1f} MB",
              flush=True)
        read_ceiling.read_words(rw.words.reshape(-1))
torch.cuda.synchronize()
