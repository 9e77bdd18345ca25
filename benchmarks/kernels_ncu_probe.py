"""One launch of the small-M kernels on a few int4 g64 shapes, for ``ncu`` (Nsight Compute) to
profile: the M = 1 CUDA-core kernel with the tuner's configs on the H100
(benchmarks/results/kernels_configs_m1.json) and, with ``--m16``, the M = 16 tensor-core kernel.

    ncu --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \\
        -k regex:"_tc_kernel|_fma_kernel" python benchmarks/kernels_ncu_probe.py
"""
import sys

import torch

from bitsmith.kernels import small_m
from bitsmith.kernels.bench import make_qtensor
from bitsmith.kernels.layout import repack

dev = torch.device("cuda")
CASES = [((14336, 4096), 8), ((4096, 4096), 16)]  # (N, K), the M = 1 split-K the tuner picked
for (n, k), split in CASES:
    w = (torch.randn(n, k, device=dev) * 0.02).half()
    rw = repack(make_qtensor("int4_g64", w))
    x = torch.randn(1, k, device=dev, dtype=torch.float16)
    small_m.launch(rw, x, None, {"KERNEL": "fma", "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT": split, "num_warps": 2,
                                 "num_stages": 1})
    if "--m16" in sys.argv:
        x16 = torch.randn(16, k, device=dev, dtype=torch.float16)
        small_m.launch(rw, x16, None, {"KERNEL": "tc", "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT": 2,
                                       "num_warps": 4, "num_stages": 3})
torch.cuda.synchronize()
