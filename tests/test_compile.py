"""``torch.compile`` and the runtime modules (bitsmith.kernels.ops): under compilation each
quantized linear layer is one opaque custom op, ``bitsmith::quant_linear``, whose implementation
is the module's eager forward (the fused kernels on CUDA, the torch reference path here).

On CPU this checks the wiring: a graph without breaks (``fullgraph=True``), one op call per layer,
results equal to eager, the fake implementation's shapes, handles, and the traced fallback when
the input needs a gradient. Most use ``backend="aot_eager"`` (no C++ compiler needed); one runs
Inductor itself. On the GPU, the CUDA test and benchmarks/decode_e2e.py --compile run the kernels
through Inductor and CUDA graphs.
"""
from __future__ import annotations

import copy
import functools
import gc

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith.kernels import ops
from bitsmith.nn import LowRankQuantLinear, QuantLinear, W8A8Linear


def _int4(w):
    return bitsmith.quantize_tensor(w, "rtn", bits=4, group_size=32)


def _layers():
    from bitsmith.methods.smoothquant import int8_weight
    from bitsmith.methods.svdquant import svdquant

    torch.manual_seed(0)
    lin = [nn.Linear(64, 96), nn.Linear(96, 80), nn.Linear(80, 48)]
    res = svdquant(lin[1].weight.detach(), act_absmax=torch.rand(96) + 0.5, bias=lin[1].bias.detach(), rank=8,
                   group_size=32)
    return [QuantLinear.from_float(lin[0], _int4),
            LowRankQuantLinear(96, 80, res.residual, res.lora_down, res.lora_up, res.bias, smooth=res.smooth),
            W8A8Linear.from_float(lin[2], int8_weight)]


@pytest.fixture
def op_calls(monkeypatch):
    """Count the op's real calls (its implementation runs each module's ``eager_forward``)."""
    calls: dict = {}
    for cls in (QuantLinear, LowRankQuantLinear, W8A8Linear):
        orig = cls.eager_forward

        def counted(self, x, orig=orig, name=cls.__name__):
            calls[name] = calls.get(name, 0) + 1
            return orig(self, x)

        monkeypatch.setattr(cls, "eager_forward", counted)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


def _model():
    return nn.Sequential(*[m for layer in _layers() for m in (layer, nn.GELU())])


ONE_EACH = {"QuantLinear": 1, "LowRankQuantLinear": 1, "W8A8Linear": 1}


def test_compiled_model_calls_each_layer_as_one_op(op_calls):
    model = _model()
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        eager = model(x)
        op_calls.clear()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a break fails
        got = compiled(x)
        assert op_calls == ONE_EACH  # the op's real calls, once per layer
        got2 = compiled(x * 2)
    assert got.shape == eager.shape == (3, 5, 48)
    assert torch.equal(got, eager)
    assert torch.equal(got2, model(x * 2))


def test_inductor_compiles_around_the_op(op_calls):
    """Inductor itself (C++ code for the GELUs on CPU) with the op as an external call."""
    model = _model()
    x = torch.randn(2, 64)
    with torch.no_grad():
        eager = model(x)
        op_calls.clear()
        got = torch.compile(model, fullgraph=True)(x)
    assert op_calls == ONE_EACH
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)  # Inductor's GELU may round differently


def test_an_input_that_needs_a_gradient_is_traced_instead():
    """The op has no backward: with a gradient flowing to the input the layer is traced, with
    only the weight's dequantization as an op (no graph break), and the gradient equals
    eager's. Without a gradient the captured graph holds the whole layer as one op."""
    layer = _layers()[0]
    targets: list = []

    def recording(gm, example_inputs):  # a backend that keeps what each captured graph calls
        targets.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    x = torch.randn(4, 64, requires_grad=True)
    layer(x).square().sum().backward()
    want = x.grad.clone()
    x.grad = None
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True, backend=recording)(x).square().sum().backward()  # no break either
    torch.testing.assert_close(x.grad, want)
    assert torch.ops.bitsmith.quant_linear.default not in targets
    assert torch.ops.bitsmith.dequantize.default in targets  # the weight alone is the op
    with torch.no_grad():
        torch.compile(layer, backend=recording)(x)
    assert torch.ops.bitsmith.quant_linear.default in targets
    torch._dynamo.reset()


@pytest.mark.parametrize("which", ["bias", "factor"])
def test_a_module_tensor_that_needs_a_gradient_is_traced_instead(which):
    """An unfrozen bias (a parameter) or SVDQuant's up factor being fine-tuned (a buffer): the
    op would hide it from autograd, so the layer is traced and its gradient equals eager's."""
    layers = _layers()
    layer, name = (layers[0], "bias") if which == "bias" else (layers[1], "lora_up")
    tensor = getattr(layer, name)
    tensor.requires_grad_(True)
    x = torch.randn(4, layer.in_features)
    layer(x).square().sum().backward()
    want = tensor.grad.clone()
    tensor.grad = None
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    torch.testing.assert_close(tensor.grad, want)
    torch._dynamo.reset()


def test_quantized_convolutions_compile_without_a_break():
    """QuantConv2d and LowRankQuantConv2d (diffusion U-Nets): the packed weight's
    dequantization is one op and the convolution around it is traced, so a model of them
    compiles with ``fullgraph=True`` and gives the eager result, with and without a gradient
    to the input."""
    from bitsmith.nn import LowRankQuantConv2d, QuantConv2d

    torch.manual_seed(1)
    conv_a, conv_b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 12, 3, stride=2, padding=1, padding_mode="reflect")
    quant = functools.partial(bitsmith.quantize_tensor, method="rtn", bits=4, group_size=24)
    model = nn.Sequential(QuantConv2d.from_float(conv_a, quant), nn.SiLU(),
                          LowRankQuantConv2d.like(conv_b, quant(conv_b.weight.detach()), None, None, conv_b.bias.detach()))
    x = torch.randn(2, 8, 10, 10)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))
    xg = x.clone().requires_grad_(True)
    model(xg).sum().backward()
    want = xg.grad.clone()
    xg.grad = None
    torch.compile(model, fullgraph=True, backend="aot_eager")(xg).sum().backward()
    torch.testing.assert_close(xg.grad, want)
    torch._dynamo.reset()


def test_the_op_fake_gives_the_output_shape():
    """The op's fake (meta) implementation: ``[..., out_features]`` in the input's dtype and
    device, what shape propagation and Inductor see."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = QuantLinear.from_float(nn.Linear(64, 96), _int4)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 7, 64, dtype=torch.float16))
        y = torch.ops.bitsmith.quant_linear(x, layer._op_handle)
    assert y.shape == (2, 7, 96) and y.dtype == torch.float16


@pytest.mark.parametrize("clone", ["deepcopy", "pickle"])
def test_handles_follow_modules(clone):
    """One handle per module from construction: a copy or an unpickled module gets its own
    (with the original's it would run the original's weights), and a deleted module leaves the
    registry."""
    import io

    layers = _layers()
    for layer in layers:
        h = layer._op_handle
        assert ops._MODULES[h] is layer
        if clone == "deepcopy":
            twin = copy.deepcopy(layer)
        else:
            buf = io.BytesIO()
            torch.save(layer, buf)
            buf.seek(0)
            twin = torch.load(buf, weights_only=False)
        assert twin._op_handle != h and ops._MODULES[twin._op_handle] is twin and ops._MODULES[h] is layer
    h = layers[0]._op_handle
    del layers, layer
    gc.collect()
    assert h not in ops._MODULES
    with pytest.raises(RuntimeError, match=f"handle {h} is gone"):
        ops.quant_linear(torch.randn(1, 64), h)


def test_compiled_layers_inside_a_module_with_inlined_children(op_calls):
    """The modules as Dynamo meets them in a real model (attributes of a parent module whose
    forward is traced, the way transformers' decoder layers hold their projections): each
    projection is one op call and the graph has no break."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = _layers()

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x))))) + x[..., :48]

    block = Block()
    x = torch.randn(2, 64)
    with torch.no_grad():
        eager = block(x)
        op_calls.clear()
        got = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    assert op_calls == ONE_EACH
    assert torch.equal(got, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the fused kernels)")
def test_cuda_inductor_runs_the_kernels_and_captures_in_a_graph():
    """On CUDA, Inductor compiles a model of the three runtime modules in one graph around the
    op, the result equals the eager model's (the same kernels run), and the compiled model can
    be captured in a CUDA graph."""
    from bitsmith.kernels import HAVE_TRITON

    if not HAVE_TRITON:
        pytest.skip("needs triton")
    torch._dynamo.reset()
    layers = [layer.to("cuda", torch.float16) for layer in _layers()]
    for layer in layers[:2]:
        assert layer.__dict__.get("_runtime") is not None, layer.kernel_skip_reason
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.GELU())])
    x = torch.randn(1, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        got = compiled(x)
        torch.testing.assert_close(got, eager, rtol=2e-3, atol=2e-3)  # Inductor's GELU may round differently
        compiled(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = compiled(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, compiled(x))
