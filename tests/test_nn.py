import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitsmith
from bitsmith.methods import quantize_weight
from bitsmith.nn import QuantConv2d, QuantLinear

NF4 = functools.partial(quantize_weight, method="nf", levels=16, block_size=64)
INT3 = functools.partial(quantize_weight, method="rtn", bits=3, group_size=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quantizer", [NF4, INT3], ids=["nf4", "int3"])
def test_quant_linear_forward_is_linear_with_dequantized_weight(dtype, quantizer):
    torch.manual_seed(0)
    lin = nn.Linear(96, 50, bias=True)
    q = QuantLinear.from_float(lin, quantizer)
    x = torch.randn(3, 7, 96)
    w64 = q.dequantize(torch.float64)
    ref = x.double() @ w64.T + lin.bias.double()
    y = q(x.to(dtype))
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    # and the layer is close to the float one (quantization, not garbage)
    rel = (y.double() - lin(x).double()).norm() / lin(x).double().norm()
    assert rel < 0.2


@pytest.mark.parametrize(
    "kw",
    [
        dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=1),
        dict(in_channels=8, out_channels=12, kernel_size=(3, 1), dilation=(2, 1), groups=4, bias=False),
        dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
        dict(in_channels=5, out_channels=7, kernel_size=1),
    ],
)
def test_quant_conv2d_keeps_geometry(kw):
    torch.manual_seed(1)
    conv = nn.Conv2d(**kw)
    q = QuantConv2d.from_float(conv, INT3)
    x = torch.randn(2, conv.in_channels, 9, 11)
    ref_conv = nn.Conv2d(**kw)
    with torch.no_grad():
        ref_conv.weight.copy_(q.dequantize(torch.float32))
        if conv.bias is not None:
            ref_conv.bias.copy_(conv.bias)
    assert q(x).shape == conv(x).shape
    assert torch.allclose(q(x), ref_conv(x), atol=1e-5)


def test_buffers_move_and_state_dict_holds_packed_tensors():
    lin = nn.Linear(64, 32)
    q = QuantLinear.from_float(lin, NF4)
    keys = set(q.state_dict())
    assert "codes" in keys and "bias" in keys and "weight" not in keys
    before = {n: b.dtype for n, b in q.named_buffers()}
    w_before = q.dequantize(torch.float32)
    q2 = q.to(torch.float64)  # a dtype cast must not touch packed codes, scales or absmax
    assert {n: b.dtype for n, b in q2.named_buffers()} == before
    assert torch.equal(q2.dequantize(torch.float32), w_before)
    assert q2.bias.dtype == torch.float64  # float parameters do follow the cast
    assert "bits/weight" in repr(q)


def test_quantize_model_swaps_layers_and_keeps_tied_head():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 64)
            self.proj = nn.Linear(64, 64)
            self.conv = nn.Conv2d(4, 8, 3)
            self.head = nn.Linear(64, 50, bias=False)
            self.head.weight = self.embed.weight  # tied

    m = Tiny()
    reports = bitsmith.quantize_model(m, bitsmith.Recipe(method="nf"))
    assert isinstance(m.proj, QuantLinear) and isinstance(m.conv, QuantConv2d)
    assert isinstance(m.head, nn.Linear) and m.head.weight is m.embed.weight
    assert {r.name for r in reports} == {"proj.weight", "conv.weight"}
    by_name = {r.name: r for r in reports}
    assert all(0 < r.rel_error < 0.2 for r in reports)
    assert by_name["proj.weight"].bits_per_weight == pytest.approx(4.5)  # 4-bit codes + fp32 absmax per 64
    # conv rows of 4*3*3 = 36 are padded to one block of 64: the padding is stored and counted
    assert by_name["conv.weight"].bits_per_weight == pytest.approx((64 * 4 + 32) / 36)
