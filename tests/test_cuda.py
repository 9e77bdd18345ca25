"""The same codecs and runtime modules on a CUDA device (skipped without one; CI has none —
run on the lent GPU, results in benchmarks/results/cuda_check.txt)."""
import functools

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith.nn import QuantConv2d, QuantLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = [("nf", {"levels": 16, "block_size": 64, "double_quant": True}), ("nf", {"levels": 7}),
         ("rtn", {"bits": 4, "group_size": 64}), ("rtn", {"bits": 3, "group_size": 128}), ("rtn", {"bits": 8, "group_size": 32})]


@pytest.mark.parametrize("method,options", CASES)
def test_quantize_on_cuda_gives_the_cpu_codes(method, options):
    w = torch.randn(200, 576) * 0.05
    cpu = bitsmith.quantize_tensor(w, method, **options)
    gpu = bitsmith.quantize_tensor(w.cuda(), method, **options)
    assert gpu.device.type == "cuda"
    for name, t in cpu.tensors.items():
        assert torch.equal(gpu.tensors[name].cpu(), t), name
    # same codes and metadata; the float arithmetic of dequantization may differ by an ulp
    assert torch.allclose(gpu.dequantize().cpu(), cpu.dequantize(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_modules_run_on_cuda(dtype):
    q = functools.partial(bitsmith.quantize_tensor, method="nf", levels=16, double_quant=True)
    lin = QuantLinear.from_float(nn.Linear(576, 300), q)
    conv = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), q)
    x, img = torch.randn(4, 576), torch.randn(2, 8, 12, 12)
    ref_lin, ref_conv = lin(x).double(), conv(img).double()
    lin, conv = lin.cuda(), conv.cuda()
    assert lin.codes.is_cuda and lin.codes.dtype == torch.uint8
    y = lin(x.cuda().to(dtype)).double().cpu()
    z = conv(img.cuda().to(dtype)).double().cpu()
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert (y - ref_lin).norm() / ref_lin.norm() < tol
    assert (z - ref_conv).norm() / ref_conv.norm() < tol
