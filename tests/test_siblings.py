"""Sibling linears stacked into one matmul (bitsmith.nn.siblings, models.siblings,
kernels.layout.repack_stacked).

* The stacked runtime weight reads back exactly the members' own dequantizations, concatenated
  (pure torch, both runtime layouts).
* The grouped forward runs under Triton's interpreter on this CPU (``TRITON_INTERPRET=1``, in a
  subprocess when pytest runs without it): a tiny Llama's logits against the float64 reference,
  the number of matmuls launched, the call-order rules, the strides ``torch.compile`` is told.
* On a CUDA device: the same model fused against unfused, and captured in a CUDA graph.
"""
from __future__ import annotations

import functools

import pytest
import torch

import bitsmith
from bitsmith.errors import QuantizationError
from bitsmith.kernels import HAVE_TRITON, dequantize_runtime
from bitsmith.kernels.layout import repack_stacked, stack_reason
from bitsmith.nn import QuantLinear
from conftest import INTERPRETED, needs_cuda, needs_interp, run_interpreter_tests

FORMATS = {
    "int4_g32": dict(method="rtn", bits=4, group_size=32),
    "int3_g64": dict(method="rtn", bits=3, group_size=64),
    "nf4_g64": dict(method="nf", bits=4, block_size=64),
    "int4_g64_sym": dict(method="rtn", bits=4, group_size=64, symmetric=True),
}


def _qt(fmt: str, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return bitsmith.quantize_tensor(torch.randn(n, k, generator=g) * 0.05, **FORMATS[fmt])


@pytest.mark.skipif(INTERPRETED, reason="pure torch: runs once, without the interpreter")
@pytest.mark.parametrize("layout", ["rows", "fragment"])
@pytest.mark.parametrize("fmt", ["int4_g32", "int3_g64", "nf4_g64", "int4_g64_sym"])
def test_stacked_weight_reads_back_the_concatenation(fmt, layout):
    if layout == "fragment" and fmt == "int4_g32":
        pytest.skip("the fragment layout takes groups of a multiple of 64")
    qts = [_qt(fmt, n, 192, seed) for n, seed in ((40, 1), (24, 2), (17, 3))]
    rw = repack_stacked(qts, layout=layout)
    expect = torch.cat([qt.dequantize(torch.float32) for qt in qts])
    assert (rw.n, rw.k, rw.layout) == (81, 192, layout)
    assert torch.equal(dequantize_runtime(rw), expect)


@pytest.mark.skipif(INTERPRETED, reason="pure torch: runs once, without the interpreter")
def test_stacking_refuses_weights_that_differ():
    a, b = _qt("int4_g32", 8, 64, 1), _qt("int3_g64", 8, 64, 2)
    assert "weight 1" in stack_reason([a, b])
    with pytest.raises(QuantizationError, match="cannot stack weight 1 under weight 0: runtime bits 3 against 4"):
        repack_stacked([a, b])
    c = _qt("int4_g32", 8, 96, 3)
    assert "in_features 96" in stack_reason([a, c])
    assert stack_reason([a, _qt("int4_g32", 16, 64, 4)]) is None
    with pytest.raises(QuantizationError, match="no weights"):
        repack_stacked([])


def _tiny_llama(fmt: str = "int4_g32", dtype=torch.float16):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=120, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    quantize = functools.partial(bitsmith.quantize_tensor, **FORMATS[fmt])
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, QuantLinear.from_float(child, quantize))
    return model.to(dtype)


def _float64_logits(model, ids):
    """The model with every QuantLinear's reference dequantization, in float64."""
    import copy

    ref = copy.deepcopy(model).double()
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None).double()
                lin.weight.data = child.qweight.dequantize(torch.float64)
                setattr(parent, name, lin)
    with torch.no_grad():
        return ref(ids).logits


def _count_matmuls(monkeypatch):
    """Count the quant_matmul calls of QuantLinear's own path and of the sibling groups'."""
    from bitsmith.nn import quant_linear as ql_mod
    from bitsmith.nn import siblings as sib_mod

    calls = {"own": 0, "group": 0}

    def counted(fn, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ql_mod, "quant_matmul", counted(ql_mod.quant_matmul, "own"))
    monkeypatch.setattr(sib_mod, "quant_matmul", counted(sib_mod.quant_matmul, "group"))
    return calls


@pytest.fixture
def cpu_kernels(monkeypatch):
    """The fused kernels on this CPU under the interpreter: QuantLinear takes float16 CPU inputs
    and sibling groups stack their weights on the CPU."""
    from bitsmith.nn.siblings import SiblingGroup, sibling_group

    def kernel_input(self, x):
        return self.use_kernels and x.dtype in (torch.float16, torch.bfloat16) and not (
            x.requires_grad and torch.is_grad_enabled())

    monkeypatch.setattr(QuantLinear, "_kernel_input", kernel_input)
    monkeypatch.setattr(SiblingGroup, "device_types", ("cuda", "cpu"))

    def own_weight(self, x):  # the members' own runtime weight, as on CUDA (prepare_kernels needs CUDA)
        if not self._kernel_input(x) or sibling_group(self) is not None:
            return None
        if self.__dict__.get("_runtime") is None:
            self.__dict__["_runtime"] = bitsmith.kernels.repack(self.qweight)
        return self.__dict__["_runtime"]

    monkeypatch.setattr(QuantLinear, "_kernel_weight", own_weight)


def test_interpreter_suite():
    """Run this file's interpreter tests in a subprocess with TRITON_INTERPRET=1."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    if INTERPRETED:
        pytest.skip("already under the interpreter")
    run_interpreter_tests(__file__)


@needs_interp
def test_interp_fused_llama_matches_reference_with_fewer_matmuls(cpu_kernels, monkeypatch):
    from bitsmith.models.siblings import fuse_siblings, unfuse_siblings

    model = _tiny_llama()
    ids = torch.randint(0, 120, (1, 5), generator=torch.Generator().manual_seed(1))
    ref = _float64_logits(model, ids)
    keys = sorted(model.state_dict())
    calls = _count_matmuls(monkeypatch)
    with torch.no_grad():
        unfused = model(ids).logits
    assert calls == {"own": 14, "group": 0}  # 7 linears a layer
    reports = fuse_siblings(model)
    assert [r.fused for r in reports] == [True] * 4, reports
    assert reports[0].names == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                "model.layers.0.self_attn.v_proj")
    assert sorted(model.state_dict()) == keys  # names and checkpoint unchanged
    assert model.model.layers[0].self_attn.q_proj.__dict__.get("_runtime") is None  # no second copy
    calls.update(own=0, group=0)
    with torch.no_grad():
        fused = model(ids).logits
    assert calls == {"own": 4, "group": 4}  # o and down alone; q/k/v and gate/up stacked, per layer
    scale = ref.abs().max()
    assert float((fused.double() - ref).abs().max() / scale) < 5e-3
    assert float((fused.double() - unfused.double()).abs().max() / scale) < 5e-3
    assert unfuse_siblings(model) == 4
    calls.update(own=0, group=0)
    with torch.no_grad():
        model(ids)
    assert calls == {"own": 14, "group": 0}


@needs_interp
def test_interp_call_order_and_stale_inputs(cpu_kernels, monkeypatch):
    from bitsmith.nn.siblings import fuse

    g = torch.Generator().manual_seed(3)
    members = [QuantLinear(48, n, _qt("int4_g32", n, 48, i), torch.randn(n, generator=g) if i == 1 else None)
               for i, n in enumerate((32, 16, 24))]
    x = torch.randn(3, 48, generator=g).half()

    def reference(i, inp):
        m = members[i]
        out = inp.double() @ m.qweight.dequantize(torch.float64).t()
        return out if m.bias is None else out + m.bias.double()

    group = fuse(members, ["a", "b", "c"])
    calls = _count_matmuls(monkeypatch)
    outs = [members[i](x) for i in (1, 0, 2)]  # any order: the first call computes all three
    assert calls["group"] == 1
    for i, out in zip((1, 0, 2), outs):
        expect = reference(i, x)
        assert out.shape == (3, members[i].out_features)
        assert float((out.double() - expect).abs().max() / expect.abs().max()) < 5e-3
        assert out.stride() == (group.out_features, 1)
    members[0](x)  # a second call of the same member computes again
    assert calls["group"] == 2
    members[1](x.clone())  # another tensor: computed, not taken from the pending slices
    assert calls["group"] == 3
    x.mul_(2)  # modified in place: the version changes, nothing stale is returned
    out = members[2](x)
    assert calls["group"] == 4
    expect = reference(2, x)
    assert float((out.double() - expect).abs().max() / expect.abs().max()) < 5e-3
    # what torch.compile is told matches what the call returns
    fake = members[2].fake_output(x)
    assert (fake.shape, fake.stride(), fake.storage_offset()) == (out.shape, out.stride(), out.storage_offset())
    # an input the kernels do not take runs the member's own reference path
    out32 = members[0](x.float())
    assert out32.is_contiguous() and calls["group"] == 4


@needs_interp
def test_interp_fused_llama_compiles(cpu_kernels):
    """Under torch.compile the members are opaque ops whose outputs are strided slices: the
    compiled model must give the eager logits."""
    from bitsmith.models.siblings import fuse_siblings

    model = _tiny_llama()
    fuse_siblings(model)
    ids = torch.randint(0, 120, (1, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=False)(ids).logits
    assert float((compiled - eager).abs().max() / eager.abs().max()) < 1e-3


@pytest.mark.skipif(INTERPRETED, reason="pure torch: runs once, without the interpreter")
def test_fuse_errors_name_the_member():
    from bitsmith.nn import LowRankQuantLinear
    from bitsmith.nn.siblings import fuse

    a = QuantLinear(64, 8, _qt("int4_g32", 8, 64, 1))
    b = QuantLinear(64, 8, _qt("int3_g64", 8, 64, 2))
    with pytest.raises(QuantizationError, match=r"fusing \['q', 'k'\]: weight 1 is"):
        fuse([a, b], ["q", "k"])
    with pytest.raises(QuantizationError, match="at least two"):
        fuse([a], ["q"])
    with pytest.raises(QuantizationError, match="k is a Linear, not a QuantLinear"):
        fuse([a, torch.nn.Linear(64, 8)], ["q", "k"])
    assert LowRankQuantLinear is not QuantLinear
    c = QuantLinear(64, 8, _qt("int4_g32", 8, 64, 3))
    fuse([a, c], ["q", "v"])
    with pytest.raises(QuantizationError, match="q is already in a sibling group"):
        fuse([a, QuantLinear(64, 8, _qt("int4_g32", 8, 64, 4))], ["q", "k"])


@pytest.mark.skipif(INTERPRETED, reason="pure torch: runs once, without the interpreter")
def test_fuse_siblings_reports_what_stays_apart():
    from bitsmith.models.siblings import fuse_siblings

    model = _tiny_llama()
    mlp = model.model.layers[1].mlp
    mlp.up_proj = QuantLinear(64, 96, _qt("int3_g64", 96, 64, 5))  # gate is int4: cannot stack
    reports = fuse_siblings(model)
    assert [r.fused for r in reports] == [True, True, True, False]
    assert reports[3].names[1] == "model.layers.1.mlp.up_proj" and "weight 1" in reports[3].reason
    with pytest.raises(QuantizationError, match="no layer map for Sequential"):
        fuse_siblings(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    # on the CPU the model still runs its reference path, member by member
    ids = torch.randint(0, 120, (1, 3))
    with torch.no_grad():
        assert torch.isfinite(model.float()(ids).logits).all()


@needs_cuda
@pytest.mark.parametrize("fmt", ["int4_g32", "nf4_g64", "int3_g64"])
def test_cuda_fused_llama_equals_unfused_and_captures(fmt):
    from bitsmith.models.siblings import fuse_siblings

    model = _tiny_llama(fmt).cuda()
    ids = torch.randint(0, 120, (1, 1), device="cuda")
    with torch.no_grad():
        unfused = model(ids).logits
        fuse_siblings(model)
        assert model.model.layers[0].mlp.up_proj.__dict__.get("_runtime") is None
        fused = model(ids).logits
        assert float((fused - unfused).abs().max() / unfused.abs().max()) < 2e-3
        static = ids.clone()
        graph = torch.cuda.CUDAGraph()
        model(static)  # warm: tuned launch plans before the capture
        with torch.cuda.graph(graph):
            out = model(static).logits
        static.copy_(torch.randint(0, 120, (1, 1), device="cuda"))
        graph.replay()
        expect = model(static).logits
        assert float((out - expect).abs().max() / expect.abs().max()) < 2e-3


@needs_interp
def test_interp_load_state_dict_restacks(cpu_kernels):
    """New buffers through load_state_dict: the group drops its stacked copy and the next call
    computes with the loaded weights."""
    from bitsmith.nn.siblings import fuse

    members = [QuantLinear(64, 16, _qt("int4_g32", 16, 64, i)) for i in range(2)]
    group = fuse(members, ["a", "b"])
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4)).half()
    before = members[1](x)
    members[1].load_state_dict(QuantLinear(64, 16, _qt("int4_g32", 16, 64, 9)).state_dict())
    assert group.runtime is None
    after = members[1](x)
    expect = x.double() @ members[1].qweight.dequantize(torch.float64).t()
    assert float((after.double() - expect).abs().max() / expect.abs().max()) < 5e-3
    assert not torch.allclose(before, after)
