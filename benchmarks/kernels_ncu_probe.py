"""One launch of each small-M kernel and of the current path on 14336x4096 int4 g64 (M = 1 and 16), for
``ncu`` (Nsight Compute) to profile:

    ncu --section SpeedOfLight --section WarpStateStats -k regex:"_tc_kernel|_fma_kernel|_gemm_kernel" \
        python benchmarks/kernels_ncu_probe.py
"""
import torch

from bitsmith.kernels import qmm, small_m
from bitsmith.kernels.bench import make_qtensor
from bitsmith.kernels.layout import repack

qmm.AUTOTUNE["enabled"] = False  # default configs: the profile is of one launch each, no tuning runs
dev = torch.device("cuda")
w = (torch.randn(14336, 4096, device=dev) * 0.02).half()
rw = repack(make_qtensor("int4_g64", w))
for m in (1, 16):
    x = torch.randn(m, 4096, device=dev, dtype=torch.float16)
    qmm.quant_matmul(x, rw)
    small_m.launch(rw, x, None, {"KERNEL": "tc", "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT": 2,
                                 "num_warps": 4, "num_stages": 3})
    if m == 1:
        small_m.launch(rw, x, None, {"KERNEL": "fma", "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT": 2, "num_warps": 4})
torch.cuda.synchronize()
