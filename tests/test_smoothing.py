"""Smoothing transforms: every mode is an exact rewrite (float64), GQA handled, bad input refused."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith.calibration import ChannelStats, collect_stats
from bitsmith.errors import QuantizationError
from bitsmith.models.arch import mapped_groups, smoothing_map
from bitsmith.nn import SmoothedLinear
from bitsmith.transforms.smoothing import (
    GroupScale,
    HeadLayout,
    SmoothGroup,
    apply_group,
    migration_scale,
    plan_group,
    smooth,
    weight_statistic,
)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# --------------------------------------------------------------------------------------------
# the math, against hand computations
# --------------------------------------------------------------------------------------------
def test_paper_scale_is_the_published_example():
    # SmoothQuant's figure (seed 002): max|X| per channel [2, 16, 2, 9], max|W| [2, 1, 2, 1], alpha 0.5
    w = torch.tensor([[2.0, -1.0, 0.5, 1.0], [-1.0, 0.25, -2.0, 0.5]])
    assert weight_statistic([w], "paper").tolist() == [2.0, 1.0, 2.0, 1.0]
    s = migration_scale(torch.tensor([2.0, 16.0, 2.0, 9.0]), weight_statistic([w], "paper"), 0.5)
    assert s.tolist() == [1.0, 4.0, 1.0, 3.0]
    # alpha 1: s = max|X|; alpha 0: s = 1 / max|W|; a dead channel keeps 1
    assert migration_scale(torch.tensor([2.0, 0.0]), torch.tensor([4.0, 1.0]), 1.0).tolist() == [2.0, 1.0]
    assert migration_scale(torch.tensor([2.0, 3.0]), torch.tensor([4.0, 0.0]), 0.0).tolist() == [0.25, 1.0]


def test_lmdeploy_variant_follows_its_documented_steps():
    torch.manual_seed(0)
    ws = [torch.randn(5, 6), torch.randn(3, 6)]
    act = torch.rand(6) * 10
    alpha = 0.3
    # written out element by element: each row / its absmax, mean over all 8 rows
    rows = [r for w in ws for r in w.double()]
    wstat = torch.tensor([sum(abs(float(r[j])) / float(r.abs().max()) for r in rows) / len(rows) for j in range(6)],
                         dtype=torch.float64)
    raw = [max(float(act[j]) ** alpha / float(wstat[j]) ** (1 - alpha), 1e-4) for j in range(6)]
    want = torch.tensor([v / (max(raw) * min(raw)) ** 0.5 for v in raw], dtype=torch.float64)
    got = migration_scale(act, weight_statistic(ws, "lmdeploy"), alpha, "lmdeploy")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert abs(float(got.max() * got.min()) - 1.0) < 1e-12


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "half"])
def test_alpha_outside_unit_interval_is_refused(alpha):
    with pytest.raises(QuantizationError, match=r"alpha must be .*\[0, 1\]"):
        migration_scale(torch.ones(3), torch.ones(3), alpha)
    model = nn.Sequential(nn.Linear(3, 3))
    stats = {"0": ChannelStats.from_activations(torch.randn(4, 3))}
    with pytest.raises(QuantizationError, match="alpha"):
        bitsmith.api.smooth_model(model, stats, alpha=alpha, mode="unfused", groups=[SmoothGroup(("0",))])


def test_head_layout_maps_query_channels_to_kv_channels():
    h = HeadLayout(query_heads=6, kv_heads=2, head_dim=2)  # query heads 0-2 read kv head 0, 3-5 kv head 1
    per_query = torch.arange(12.0)  # channel j = head * 2 + d
    assert h.reduce(per_query).tolist() == [4.0, 5.0, 10.0, 11.0]  # max over the 3 heads of each kv head
    assert h.expand(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [1, 2, 1, 2, 1, 2, 3, 4, 3, 4, 3, 4]
    with pytest.raises(QuantizationError, match="must divide"):
        HeadLayout(9, 4, 64)


def test_smoothed_linear_divides_then_multiplies():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    s = torch.tensor([0.5, 2.0, 4.0, 1.0], dtype=torch.float64)
    sm = SmoothedLinear.from_linear(lin, s)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(sm(x), lin(x), rtol=1e-14, atol=1e-14)
    assert torch.equal(sm.weight, lin.weight * s) and set(sm.state_dict()) == {"weight", "bias", "migration_scale"}
    twice = SmoothedLinear.from_linear(sm, s)  # composes: x / s / s, W * s * s
    assert torch.equal(twice.migration_scale, s * s)
    torch.testing.assert_close(twice(x), lin(x), rtol=1e-14, atol=1e-14)
    with pytest.raises(QuantizationError, match="finite and > 0"):
        SmoothedLinear.from_linear(lin, torch.tensor([1.0, 0.0, 1.0, 1.0]))


# --------------------------------------------------------------------------------------------
# SmolLM2 (Llama, 9 query / 3 kv heads): each mode is an exact rewrite
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_f64(smollm2_dir):
    """The first 4 decoder layers of SmolLM2 in float64, real-text stats and reference outputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitsmith.eval.text import lee_corpus_text

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    model = model.double()
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(lee_corpus_text()[:3000], return_tensors="pt").input_ids[0]
    calib = ids[:128].reshape(2, 64)
    test_ids = ids[128:224].reshape(1, 96)  # scored on other tokens than the stats came from
    stats = collect_stats(model, [{"input_ids": calib, "use_cache": False}], progress=False)
    return model, stats, test_ids, outputs(model, test_ids)


def outputs(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and the residual stream entering the final norm. (Llama's RMSNorm computes in
    float32 even in a float64 model, so logits alone would hide differences below ~1e-7.)"""
    seen = {}
    hook = model.model.norm.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    hook.remove()
    return logits, seen["x"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode,variant", [("fused", "paper"), ("unfused", "paper"), ("fused", "lmdeploy"),
                                          ("unfused", "lmdeploy")])
def test_smoothing_smollm2_is_exact(smollm2_f64, mode, variant):
    base, stats, ids, (ref_logits, ref_resid) = smollm2_f64
    model = copy.deepcopy(base)
    report = bitsmith.api.smooth_model(model, stats, alpha=0.5, mode=mode, variant=variant)
    logits, resid = outputs(model, ids)
    print(f"{mode}/{variant}: logits rel {rel(logits, ref_logits):.2e}, residual rel {rel(resid, ref_resid):.2e}")
    assert rel(logits, ref_logits) < 1e-5
    assert rel(resid, ref_resid) < 1e-10  # before the float32 norm: the rewrite is exact to float64 rounding
    scales = report.scales()
    assert len(scales) == 4 * 7
    assert min(float(s.min()) for s in scales.values()) < 0.5 and max(float(s.max()) for s in scales.values()) > 2
    layer = model.model.layers[2]
    orig = base.model.layers[2]
    if mode == "unfused":
        for name in LINEARS:  # each linear holds its own scale; norms untouched
            lin = layer.get_submodule(name)
            assert isinstance(lin, SmoothedLinear)
            assert torch.equal(lin.migration_scale, scales[f"model.layers.2.{name}"])
        assert not torch.equal(scales["model.layers.2.self_attn.q_proj"], scales["model.layers.2.self_attn.k_proj"])
        assert torch.equal(layer.input_layernorm.weight, orig.input_layernorm.weight)
    else:
        assert not any(isinstance(m, SmoothedLinear) for m in model.modules())
        torch.testing.assert_close(layer.input_layernorm.weight,
                                   orig.input_layernorm.weight / scales["model.layers.2.self_attn.q_proj"])
        # GQA: o_proj's 576 input scales are the 192 v-channel scales, repeated for the 3 query heads of a kv head
        so = scales["model.layers.2.self_attn.o_proj"].reshape(3, 3, 64)
        assert torch.equal(so, so[:, :1].expand(3, 3, 64)) and not torch.equal(so[0], so[1])
        torch.testing.assert_close(layer.self_attn.v_proj.weight,
                                   orig.self_attn.v_proj.weight * scales["model.layers.2.self_attn.v_proj"]
                                   / so[:, 0].reshape(-1, 1))


def test_wrong_gqa_head_mapping_breaks_the_rewrite(smollm2_f64):
    """The control for the test above: repeating the v scales in kv-minor order (query head h
    reading kv head h % 3 instead of h // 3) must not be exact."""
    base, stats, ids, (ref_logits, _) = smollm2_f64
    model = copy.deepcopy(base)
    groups = [g for g in mapped_groups(model, smoothing_map(model)) if g.heads is not None]
    assert len(groups) == 4 and groups[0].heads == HeadLayout(9, 3, 64)
    for g in groups:
        plan = plan_group(model, g, stats, alpha=0.5)
        wrong = plan.scale.reshape(3, 64).repeat(3, 1).reshape(-1)
        apply_group(model, GroupScale(g, True, plan.scale, wrong))
    assert rel(outputs(model, ids)[0], ref_logits) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_mapped_architectures_tiny_random(arch):
    """Each mapped family, with random weights and norms (Qwen2: q/k/v biases), fused and unfused."""
    import transformers

    cfg_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }[arch]
    cfg = getattr(transformers, cfg_cls)(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] in (8, 48) else 0.0))
    ids = torch.randint(0, 101, (2, 12))
    stats = collect_stats(model, [ids], progress=False)
    ref_logits, ref_resid = outputs(model, ids)
    for mode in ("fused", "unfused"):
        m = copy.deepcopy(model)
        bitsmith.api.smooth_model(m, stats, alpha=0.6, mode=mode)
        logits, resid = outputs(m, ids)
        assert rel(logits, ref_logits) < 1e-5 and rel(resid, ref_resid) < 1e-10, mode
        assert not torch.equal(m.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.v_proj.bias is not None


# --------------------------------------------------------------------------------------------
# bad input, fallbacks
# --------------------------------------------------------------------------------------------
def test_stats_that_do_not_match_the_model(smollm2_f64, tmp_path):
    base, stats, _, _ = smollm2_f64
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = {k: v for k, v in stats.items() if k != "model.layers.3.mlp.down_proj"}
    with pytest.raises(QuantizationError, match="no entry for 'model.layers.3.mlp.down_proj'"):
        bitsmith.api.smooth_model(model, missing)
    wrong = dict(stats)
    wrong["model.layers.1.self_attn.o_proj"] = ChannelStats.from_activations(torch.randn(4, 192))
    path = bitsmith.calibration.save_stats(tmp_path / "wrong.safetensors", wrong)
    with pytest.raises(QuantizationError, match=r"wrong.safetensors: .*o_proj' have 192 channels, the layer has 576"):
        bitsmith.api.smooth_model(model, path, mode="unfused")
    # nothing was changed by the failed calls (every group is planned before any is applied)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_unmapped_architecture_falls_back_to_generic_unfused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64) * 4
    stats = collect_stats(model, [x], progress=False)
    ref = model(x)
    with pytest.raises(QuantizationError, match="no smoothing map for Sequential.*unfused"):
        bitsmith.api.smooth_model(model, stats, mode="fused")
    with pytest.warns(UserWarning, match="generic mode"):
        report = bitsmith.api.smooth_model(model, stats, mode="unfused")
    assert isinstance(model[0], SmoothedLinear) and isinstance(model[2], SmoothedLinear)
    assert report.notes and "generic" in report.notes[0]
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


def test_tied_head_cannot_be_fused_but_can_be_unfused():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"norm": nn.LayerNorm(4), "emb": emb, "head": head}).double()
    stats = {"head": ChannelStats.from_activations(torch.randn(5, 4))}
    group = SmoothGroup(("head",), "norm", "norm")
    with pytest.raises(QuantizationError, match="head.weight is the same tensor as emb.weight"):
        smooth(model, [group], stats)
    before = emb.weight.detach().clone()
    smooth(model, [group], stats, mode="unfused")
    assert torch.equal(emb.weight, before) and isinstance(model["head"], SmoothedLinear)


def test_fused_needs_a_producer_and_unknown_choices_are_refused():
    model = nn.Sequential(nn.Linear(3, 3))
    stats = {"0": ChannelStats.from_activations(torch.randn(4, 3))}
    with pytest.raises(QuantizationError, match="no preceding norm or linear"):
        smooth(model, [SmoothGroup(("0",))], stats, mode="fused")
    with pytest.raises(QuantizationError, match="unknown smoothing mode 'half'"):
        smooth(model, [SmoothGroup(("0",))], stats, mode="half")
    with pytest.raises(QuantizationError, match="unknown smoothing variant"):
        smooth(model, [SmoothGroup(("0",))], stats, mode="unfused", variant="awq")
