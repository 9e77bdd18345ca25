"""LoRA / DoRA on packed bases: the float64 formulas, merge, grads, dtypes, save/load, PEFT."""
import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.adapters import (
    DoraAdapter,
    LoraAdapter,
    adapter_state_dict,
    add_adapters,
    load_adapters,
    merged_weights,
    read_adapter_metadata,
    save_adapters,
)
from bitsmith.errors import CheckpointError, QuantizationError
from bitsmith.methods import quantize_weight
from bitsmith.nn import QuantConv2d, QuantLinear

QUANTIZERS = {
    "int4-g32": functools.partial(quantize_weight, method="rtn", bits=4, group_size=32),
    "int3-g64": functools.partial(quantize_weight, method="rtn", bits=3, group_size=64),
    "nf4-dq": functools.partial(quantize_weight, method="nf", levels=16, block_size=64, double_quant=True),
    "nf12": functools.partial(quantize_weight, method="nf", levels=12, block_size=32),
}


def quant_linear(in_f=96, out_f=40, bias=True, codec="int4-g32", seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_float(nn.Linear(in_f, out_f, bias=bias), QUANTIZERS[codec])


def randomise(adapter: LoraAdapter, seed=1) -> None:
    """Move the adapter away from its identity init (B = 0, m = ||W||)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (adapter.lora_A.weight, adapter.lora_B.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if isinstance(adapter, DoraAdapter):
            adapter.magnitude.mul_(1 + 0.2 * torch.rand(adapter.magnitude.shape, generator=g))


def reference_weight64(adapter: LoraAdapter) -> torch.Tensor:
    """The adapted weight in float64 from its definition, as an [out, k] matrix:
    LoRA W + s B A; DoRA m / ||W + s B A||_row * (W + s B A)."""
    w = adapter.base.dequantize(torch.float32).double().flatten(1)
    migration = getattr(adapter.base, "migration_scale", None)
    if migration is not None:  # an unfused SmoothQuant layer computes W' (x / s)
        w = w / migration.double()
    a = adapter.lora_A.weight.double().flatten(1)
    b = adapter.lora_B.weight.double().flatten(1)
    v = w + adapter.scaling * (b @ a)
    if isinstance(adapter, DoraAdapter):
        v = (adapter.magnitude.double() / v.norm(dim=1))[:, None] * v
    return v


def close(y, ref, tol):
    return torch.allclose(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


# --- the formulas --------------------------------------------------------------------------
@pytest.mark.parametrize("codec", list(QUANTIZERS))
@pytest.mark.parametrize("cls", [LoraAdapter, DoraAdapter], ids=["lora", "dora"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_adapter_equals_float64_formula(codec, cls, bias):
    base = quant_linear(bias=bias, codec=codec)
    ad = cls(base, r=4, alpha=8)
    randomise(ad)
    x = torch.randn(2, 5, 96)
    ref = x.double() @ reference_weight64(ad).T
    if bias:
        ref = ref + base.bias.double()
    y = ad(x)  # training mode: DoRA's norm rides along in the base call
    assert y.shape == (2, 5, 40)
    assert close(y, ref, 1e-5), (y.double() - ref).abs().max()
    ad.eval()  # evaluation: the norm directly from the dequantized weight, cached
    assert close(ad(x), ref, 1e-5)
    assert close(ad(x), ref, 1e-5)
    # not trivially the base: the adapter changed the output
    assert not close(base(x), ref, 1e-2)


@pytest.mark.parametrize("cls", [LoraAdapter, DoraAdapter], ids=["lora", "dora"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_adapter_equals_float64_formula(cls, padding_mode):
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, padding_mode=padding_mode)
    base = QuantConv2d.from_float(conv, QUANTIZERS["nf4-dq"])
    ad = cls(base, r=3, alpha=6)
    randomise(ad)
    x = torch.randn(2, 6, 9, 11)
    w64 = reference_weight64(ad).reshape(10, 6, 3, 3)
    xp = F.pad(x.double(), (1, 1, 1, 1), mode="reflect") if padding_mode == "reflect" else x.double()
    ref = F.conv2d(xp, w64, conv.bias.double(), stride=2, padding=0 if padding_mode == "reflect" else 1)
    assert close(ad(x), ref, 1e-5)


@pytest.mark.parametrize("cls", [LoraAdapter, DoraAdapter], ids=["lora", "dora"])
def test_w8a8_base_with_migration_scale(cls):
    """W8A8Linear: the adapter's W is dequantize() / migration_scale; the base output is its own
    (int8 activations), the rest of the formula is exact."""
    from bitsmith.methods.smoothquant import int8_weight
    from bitsmith.nn import W8A8Linear

    torch.manual_seed(3)
    lin = nn.Linear(96, 40)
    plain = W8A8Linear.from_float(lin, int8_weight)
    migration = torch.rand(96).add_(0.5)
    base = W8A8Linear(96, 40, plain.qweight, lin.bias.detach().clone(), migration_scale=migration)
    ad = cls(base, r=4, alpha=8)
    randomise(ad)
    x = torch.randn(6, 96)
    w64 = base.dequantize(torch.float32).double() / migration.double()
    # the base's weight really is W' / s: its output matches it up to int8 activation rounding
    assert (base(x).double() - (x.double() @ w64.T + lin.bias.double())).abs().max() < 0.05
    a, b = ad.lora_A.weight.double(), ad.lora_B.weight.double()
    v = w64 + ad.scaling * b @ a
    low = ad.scaling * x.double() @ (b @ a).T
    base_out = base(x).double() - lin.bias.double()
    if cls is DoraAdapter:
        scale = ad.magnitude.double() / v.norm(dim=1)
        ref = scale * (base_out + low) + lin.bias.double()
    else:
        ref = base_out + low + lin.bias.double()
    assert close(ad(x), ref, 1e-5)
    assert torch.allclose(ad.merge().double(), reference_weight64(ad), rtol=1e-5, atol=1e-6)


def test_svdquant_layer_is_refused():
    from bitsmith.nn.low_rank import LowRankQuantLinear

    residual = QUANTIZERS["int4-g32"](torch.randn(40, 96))
    layer = LowRankQuantLinear(96, 40, residual, torch.randn(4, 96), torch.randn(40, 4))
    with pytest.raises(QuantizationError, match="more than W x"):
        DoraAdapter(layer)


def test_fresh_adapter_computes_the_base():
    base = quant_linear()
    x = torch.randn(4, 96)
    for cls in (LoraAdapter, DoraAdapter):
        assert torch.allclose(cls(base, r=8)(x), base(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [LoraAdapter, DoraAdapter], ids=["lora", "dora"])
def test_merge_equals_forward(cls):
    base = quant_linear(codec="nf4-dq")
    ad = cls(base, r=4, alpha=16)
    randomise(ad)
    x = torch.randn(7, 96)
    merged = ad.merge()
    assert merged.shape == (40, 96) and merged.dtype == torch.float32 and not merged.requires_grad
    assert torch.allclose(F.linear(x, merged, base.bias), ad(x), rtol=1e-5, atol=1e-5)
    assert torch.allclose(merged.double(), reference_weight64(ad), rtol=1e-5, atol=1e-6)
    # conv
    qc = QuantConv2d.from_float(nn.Conv2d(4, 8, 3, padding=1), QUANTIZERS["int3-g64"])
    adc = cls(qc, r=2)
    randomise(adc)
    xi = torch.randn(2, 4, 6, 6)
    assert adc.merge().shape == (8, 4, 3, 3)
    assert torch.allclose(F.conv2d(xi, adc.merge(), qc.bias, padding=1), adc(xi), rtol=1e-5, atol=1e-5)


# --- training ------------------------------------------------------------------------------
class Tiny(nn.Module):
    """Two packed projections, a float norm and a float head: only adapters may train."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.LayerNorm(64)
        self.q_proj = QuantLinear.from_float(nn.Linear(64, 64), QUANTIZERS["int4-g32"])
        self.up_proj = QuantLinear.from_float(nn.Linear(64, 128, bias=False), QUANTIZERS["nf4-dq"])
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(F.gelu(self.up_proj(self.q_proj(self.norm(x)))))


def test_only_adapter_params_train_and_grads_reach_the_input():
    model = Tiny()
    names = add_adapters(model, "dora", r=4, alpha=8, targets=r"proj$")
    assert names == ["q_proj", "up_proj"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"{m}.{p}" for m in names for p in ("lora_A.weight", "lora_B.weight", "magnitude")
    )
    x = torch.randn(3, 64, requires_grad=True)
    model(x).pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert model.up_proj.lora_B.weight.grad.abs().sum() > 0  # B gets a gradient at B = 0
    assert all(not b.requires_grad and b.grad is None for b in model.buffers())


def test_dora_norm_follows_training_steps():
    """The cached ||W + sBA|| must be recomputed after every optimizer step."""
    ad = DoraAdapter(quant_linear(codec="int3-g64"), r=4, alpha=8)
    opt = torch.optim.AdamW([p for p in ad.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(16, 96)
    target = torch.randn(16, 40)
    losses = []
    for _ in range(4):
        loss = (ad(x) - target).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert close(ad(x), x.double() @ reference_weight64(ad).T + ad.base.bias.double(), 1e-5)
    ad.eval()
    ad(x)  # caches the norm
    with torch.no_grad():
        ad.lora_B.weight.add_(0.1)  # an in-place change in eval mode must invalidate it
    assert close(ad(x), x.double() @ reference_weight64(ad).T + ad.base.bias.double(), 1e-5)


@pytest.mark.parametrize("cls", [LoraAdapter, DoraAdapter], ids=["lora", "dora"])
def test_kept_base_weight_gives_the_same_training(cls):
    """keep_base_weights: the base is dequantized once, yet outputs, grads and the DoRA norm
    follow the float64 formula through optimizer steps, and a changed base is dequantized again."""
    from bitsmith.adapters import keep_base_weights

    model = Tiny()
    add_adapters(model, cls.kind, r=4, alpha=8, targets=r"proj$")
    kept = copy.deepcopy(model)
    assert keep_base_weights(kept) == 2
    calls = []
    q = kept.q_proj.base
    q.dequantize = lambda dtype=None, _f=q.dequantize: calls.append(dtype) or _f(dtype)
    x = torch.randn(5, 64)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (model, kept)]
    for _ in range(3):
        for m, opt in zip((model, kept), opts):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    assert len(calls) == 1  # one dequantization for three training steps
    ad = kept.q_proj
    ref = F.layer_norm(x, (64,), kept.norm.weight, kept.norm.bias).double() @ reference_weight64(ad).T
    assert close(ad(kept.norm(x)), ref + ad.base.bias.double(), 1e-5)
    for (n, p), (n2, p2) in zip(model.named_parameters(), kept.named_parameters()):
        assert n == n2 and torch.allclose(p, p2, rtol=1e-5, atol=1e-6), n
    kept.eval()
    assert torch.allclose(kept(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        q.scale.mul_(2)  # the base's buffers change: the kept copy must be dropped
    ref2 = F.layer_norm(x, (64,), kept.norm.weight, kept.norm.bias).double() @ reference_weight64(ad).T
    assert close(ad(kept.norm(x)), ref2 + ad.base.bias.double(), 1e-5)
    assert len(calls) >= 2


def test_dropout_applies_to_the_low_rank_path_only():
    base = quant_linear()
    ad = LoraAdapter(base, r=4, dropout=0.5)
    randomise(ad)
    x = torch.randn(8, 96)
    ad.eval()
    assert close(ad(x), x.double() @ reference_weight64(ad).T + base.bias.double(), 1e-5)
    ad.train()
    torch.manual_seed(0)
    y1 = ad(x)
    torch.manual_seed(1)
    assert not torch.allclose(y1, ad(x))


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("cls", [LoraAdapter, DoraAdapter], ids=["lora", "dora"])
def test_half_precision_forward_backward(compute, adapter_dtype, cls):
    dtype = compute if adapter_dtype == "same" else adapter_dtype
    base = quant_linear(codec="nf4-dq")
    base.bias.data = base.bias.data.to(compute)
    ad = cls(base, r=4, alpha=8, dtype=dtype)
    randomise(ad)
    x = torch.randn(6, 96, dtype=compute, requires_grad=True)
    y = ad(x)
    assert y.dtype == compute
    y.float().pow(2).mean().backward()
    grads = [x.grad] + [p.grad for p in ad.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    ref = x.detach().double() @ reference_weight64(ad).T + base.bias.double()
    assert close(y, ref, 2e-2 if compute == torch.bfloat16 else 4e-3)


# --- save / load ---------------------------------------------------------------------------
def test_save_load_reproduces_outputs(tmp_path):
    model = Tiny()
    fresh = copy.deepcopy(model)  # the same quantized base, no adapters yet
    add_adapters(model, "dora", r=4, alpha=8, targets="q_proj")
    add_adapters(model, "lora", r=2, alpha=4, targets="up_proj", dtype=torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(5, 64)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    path = save_adapters(model, tmp_path / "ckpt")
    assert path.name == "adapters.safetensors"
    meta = read_adapter_metadata(path)
    assert meta["targets"] == ["q_proj", "up_proj"]
    assert meta["modules"]["q_proj"] == {"kind": "dora", "r": 4, "alpha": 8.0, "dropout": 0.0}
    assert meta["modules"]["up_proj"]["kind"] == "lora"
    # a plain safetensors file: the reference reader sees exactly the adapter tensors
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(adapter_state_dict(model))
        assert f.get_tensor("up_proj.lora_A.weight").dtype == torch.bfloat16
        assert json.loads(f.metadata()["bitsmith.adapters"]) == meta
    loaded = load_adapters(fresh, tmp_path / "ckpt")
    assert loaded == ["q_proj", "up_proj"]
    assert isinstance(fresh.q_proj, DoraAdapter) and isinstance(fresh.up_proj, LoraAdapter)
    assert torch.equal(fresh(x), model(x))
    assert not torch.allclose(Tiny()(x), model(x))
    # loading again into the now-wrapped model works too
    load_adapters(fresh, path)
    assert torch.equal(fresh(x), model(x))
    m1, m2 = merged_weights(model), merged_weights(fresh)
    assert m1.keys() == {"q_proj.weight", "up_proj.weight"} and all(torch.equal(m1[k], m2[k]) for k in m1)


def test_bad_adapter_files_and_targets(tmp_path):
    model = Tiny()
    with pytest.raises(QuantizationError, match="no packed module matches"):
        add_adapters(model, targets="nothing_like_this")
    with pytest.raises(QuantizationError, match="unknown adapter kind"):
        add_adapters(model, "ia3")
    with pytest.raises(QuantizationError, match="packed weight"):
        LoraAdapter(nn.Linear(4, 4))
    with pytest.raises(QuantizationError, match="no adapters"):
        save_adapters(model, tmp_path / "a.safetensors")
    add_adapters(model, "dora", r=4)
    path = save_adapters(model, tmp_path / "a.safetensors")
    other = Tiny()
    add_adapters(other, "dora", r=2)
    with pytest.raises(CheckpointError, match="rank 2.*rank 4"):
        load_adapters(other, path)
    # a file whose tensors do not match its metadata
    from bitsmith.io import write_safetensors

    meta = {"bitsmith.adapters": json.dumps(read_adapter_metadata(path))}
    write_safetensors(tmp_path / "b.safetensors", {"q_proj.lora_A.weight": torch.zeros(4, 64)}, meta)
    with pytest.raises(CheckpointError, match="missing"):
        load_adapters(Tiny(), tmp_path / "b.safetensors")
    write_safetensors(tmp_path / "c.safetensors", {"x": torch.zeros(1)}, {"format": "pt"})
    with pytest.raises(CheckpointError, match="not a bitsmith adapter file"):
        load_adapters(Tiny(), tmp_path / "c.safetensors")


def test_real_weights_smollm2_q_proj(smollm2_dir):
    """DoRA on SmolLM2's real layer-0 q_proj (NF4): float64 formula and merge."""
    from bitsmith.io import SafetensorsFile

    with SafetensorsFile.open(smollm2_dir / "model.safetensors") as f:
        w = f.get("model.layers.0.self_attn.q_proj.weight").float().clone()
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w
    ad = DoraAdapter(QuantLinear.from_float(lin, QUANTIZERS["nf4-dq"]), r=8, alpha=16)
    randomise(ad)
    with torch.no_grad():
        ad.lora_B.weight.mul_(0.05)
    x = torch.randn(4, w.shape[1])
    ref = x.double() @ reference_weight64(ad).T
    assert close(ad(x), ref, 1e-5)
    assert torch.allclose(F.linear(x, ad.merge()), ad(x), rtol=1e-4, atol=1e-4)


# --- PEFT ----------------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_trains_on_quant_linear(use_dora, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model

    from bitsmith.adapters.peft_support import QuantLinearLora, register_with_peft

    base = Tiny()
    x = torch.randn(6, 64)
    y_base = base(x)
    config = register_with_peft(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=use_dora))
    model = get_peft_model(copy.deepcopy(base), config)
    inner = model.base_model.model
    assert isinstance(inner.q_proj, QuantLinearLora) and isinstance(inner.q_proj.base_layer, QuantLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expect = {"lora_A.default.weight", "lora_B.default.weight"} | ({"lora_magnitude_vector.default.weight"} if use_dora else set())
    assert trainable == {f"base_model.model.{m}.{p}" for m in ("q_proj", "up_proj") for p in expect}
    assert torch.allclose(model(x), y_base, atol=1e-6)  # PEFT's init: B = 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    target = torch.randn(6, 10)
    losses = []
    for _ in range(5):
        loss = (model(x) - target).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert all(not b.requires_grad for b in model.buffers())
    # each wrapped layer equals the float64 formula with PEFT's parameters
    layer = inner.q_proj
    a = layer.lora_A["default"].weight.double()
    b = layer.lora_B["default"].weight.double()
    s = layer.scaling["default"]
    assert s == 2.0
    w = layer.base_layer.dequantize(torch.float32).double()
    v = w + s * b @ a
    if use_dora:
        m = layer.lora_magnitude_vector["default"].weight.double()
        v = (m / v.norm(dim=1))[:, None] * v
    h = torch.randn(5, 64)
    ref = h.double() @ v.T + layer.base_layer.bias.double()
    assert close(layer(h), ref, 1e-5)
    # PEFT's own save / load round trip (the loaded config needs the registration again)
    model.save_pretrained(tmp_path)
    config2 = register_with_peft(LoraConfig.from_pretrained(tmp_path))
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=config2)
    assert torch.equal(reloaded(x), model(x))
    with pytest.raises(QuantizationError, match="cannot merge"):
        model.merge_and_unload()
