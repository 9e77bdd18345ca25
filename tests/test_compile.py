"""``torch.compile`` and the runtime modules (bitsmith.kernels.ops): under compilation the fused
path is one opaque custom op, ``bitsmith::fused_linear``, whose implementation is the module's
eager forward.

The fused path itself needs CUDA; here the modules' compile-time switch is forced on for CPU
inputs, so the op runs their torch reference path: what is checked is the wiring (a graph
without breaks, one op call per layer, the fake implementation's shapes, handles), with
``backend="aot_eager"`` (no C++ compiler). On the GPU, benchmarks/decode_e2e.py --compile runs
the real thing through Inductor and CUDA graphs.
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
def fused_on_cpu(monkeypatch):
    """Force the compile-time switch on (the op then runs the reference path on CPU) and count
    the op's calls per module class."""
    calls: dict = {}
    for cls in (QuantLinear, LowRankQuantLinear, W8A8Linear):
        monkeypatch.setattr(cls, "_fused_when_compiled", lambda self, x: True)
        orig = cls.eager_forward

        def counted(self, x, orig=orig, name=cls.__name__):
            calls[name] = calls.get(name, 0) + 1
            return orig(self, x)

        monkeypatch.setattr(cls, "eager_forward", counted)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


def test_compiled_model_calls_each_fused_layer_as_one_op(fused_on_cpu):
    model = nn.Sequential(*[m for layer in _layers() for m in (layer, nn.GELU())])
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        eager = model(x)
        fused_on_cpu.clear()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a break fails
        got = compiled(x)
        assert fused_on_cpu == {"QuantLinear": 1, "LowRankQuantLinear": 1, "W8A8Linear": 1}  # the op's real calls
        got2 = compiled(x * 2)
    assert got.shape == eager.shape == (3, 5, 48)
    assert torch.equal(got, eager)
    assert torch.equal(got2, model(x * 2))


def test_the_op_fake_gives_the_output_shape():
    """The op's fake (meta) implementation: ``[..., out_features]`` in the input's dtype and
    device, what shape propagation and Inductor see."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = QuantLinear.from_float(nn.Linear(64, 96), _int4)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 7, 64, dtype=torch.float16))
        y = torch.ops.bitsmith.fused_linear(x, layer._op_handle)
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
        ops.fused_linear(torch.randn(1, 64), h)


def test_compiled_layers_inside_a_module_with_inlined_children(fused_on_cpu):
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
        fused_on_cpu.clear()
        got = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    assert fused_on_cpu == {"QuantLinear": 1, "LowRankQuantLinear": 1, "W8A8Linear": 1}
    assert torch.equal(got, eager)


def test_without_the_switch_compile_traces_the_reference_path():
    """On CPU (no fused kernels, the switch off) compile traces QuantLinear's torch reference
    path (with graph breaks, so not ``fullgraph``); the result is the eager one."""
    torch._dynamo.reset()
    layer = QuantLinear.from_float(nn.Linear(64, 96), _int4)
    x = torch.randn(4, 64)
    with torch.no_grad():
        got = torch.compile(layer, backend="aot_eager")(x)
        assert torch.equal(got, layer(x))


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
