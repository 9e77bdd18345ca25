"""Nunchaku export: an independent unpacker (index arithmetic, float64) rebuilds each exported
layer's output from the file alone and must match bitsmith's runtime."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
safetensors = pytest.importorskip("safetensors")

from bitsmith.api import export  # noqa: E402
from bitsmith.calibration.collect import collect_stats  # noqa: E402
from bitsmith.errors import BitsmithError  # noqa: E402
from bitsmith.exporters.nunchaku import pack_lane_vector  # noqa: E402
from bitsmith.models.saving import save_model  # noqa: E402
from bitsmith.models.svdquant import model_config, svdquant_model  # noqa: E402
from bitsmith.nn.low_rank import LowRankQuantLinear, low_rank_linear  # noqa: E402

SHIFT = 0.171875


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                                   num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                                   axes_dims_rope=(8, 12, 12)).eval()
    g = torch.Generator().manual_seed(1)
    s, t = 64, 8
    inputs = dict(hidden_states=torch.randn(2, s, 16, generator=g), encoder_hidden_states=torch.randn(2, t, 64, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.5, 0.7]),
                  img_ids=torch.randn(s, 3, generator=g), txt_ids=torch.zeros(t, 3), return_dict=False)
    return model, inputs


@pytest.fixture(scope="module")
def flux_and_stats():
    model, inputs = tiny_flux()
    return model, inputs, collect_stats(model, [inputs], progress=False)


def _quantized_checkpoint(tmp_path, flux_and_stats, *, shift=SHIFT, symmetric=True, low_rank_input="unshifted",
                          name="ckpt", only_ff=False):
    import copy

    from bitsmith.models.svdquant import DEFAULT_SKIP

    base, inputs, stats = flux_and_stats
    model = copy.deepcopy(base)
    captured = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: captured.__setitem__(n, args[0].detach().clone()))
             for n, m in model.named_modules() if n.endswith(("ff.net.2", "attn.to_q", "proj_mlp"))]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    skip = DEFAULT_SKIP + ((r"attn", r"proj_mlp", r"proj_out") if only_ff else ())
    svdquant_model(model, stats, rank=16, symmetric=symmetric, shift=shift, act_bits=4, low_rank_input=low_rank_input,
                   skip=skip)
    dst = tmp_path / name
    save_model(model, dst, recipe={"method": "svdquant"}, config=model_config(model))
    return model, dst, captured


# ---- the independent unpacker: index arithmetic from the layout facts, no reshape/permute reuse ----
def _digits(count: int, radices: list[int]) -> list[torch.Tensor]:
    """Mixed-radix digits (most significant first) of 0..count-1."""
    idx = torch.arange(count)
    out = []
    for r in reversed(radices):
        out.append(idx % r)
        idx = idx // r
    return out[::-1]


def unpack_qweight(q: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """int8 [N', K'/2] -> int64 codes [N', K'] (two's complement nibbles)."""
    words = q.contiguous().view(torch.int32).reshape(-1).to(torch.int64) & 0xFFFFFFFF
    nt, kt, p, b, d, a, c = _digits(words.numel(), [n // 128, k // 64, 8, 8, 4, 2, 2])
    rows = nt * 128 + p * 16 + a * 8 + b
    out = torch.empty(n, k, dtype=torch.int64)
    for e in range(8):
        nib = (words >> (4 * e)) & 0xF
        out[rows, kt * 64 + c * 32 + d * 8 + e] = torch.where(nib >= 8, nib - 16, nib)
    return out


def unpack_lane(v: torch.Tensor) -> torch.Tensor:
    """[G, N'] (or [N']) in (t, g, a, c, b, d) order -> natural [N', G] (or [N'])."""
    flat = v.reshape(-1).to(torch.float64)
    g_count = 1 if v.dim() == 1 else v.shape[0]
    n = flat.numel() // g_count
    t, g, a, c, b, d = _digits(flat.numel(), [n // 128, g_count, 8, 4, 2, 2])
    out = torch.empty(n, g_count, dtype=torch.float64)
    out[t * 128 + a * 16 + b * 8 + c * 2 + d, g] = flat
    return out[:, 0] if v.dim() == 1 else out


def unpack_low_rank(w: torch.Tensor, down: bool) -> torch.Tensor:
    """lora_down [K', R'] -> [R', K']; lora_up [N', R'] -> [N', R'] (16x16 tiles, (b, d, a, c, e))."""
    flat = w.reshape(-1).to(torch.float64)
    if down:
        k, r = w.shape
        tc, tr, b, d, a, c, e = _digits(flat.numel(), [k // 16, r // 16, 8, 4, 2, 2, 2])
        out = torch.empty(r, k, dtype=torch.float64)
    else:
        n, r = w.shape
        tr, tc, b, d, a, c, e = _digits(flat.numel(), [n // 16, r // 16, 8, 4, 2, 2, 2])
        out = torch.empty(n, r, dtype=torch.float64)
    out[tr * 16 + a * 8 + b, tc * 16 + c * 8 + d * 2 + e] = flat
    return out


def nunchaku_forward(f, name: str, x: torch.Tensor, shifted: bool, n: int, k: int) -> torch.Tensor:
    """What Nunchaku computes (16-bit activations): Q.(x + shift)/smooth + up.(down.x) + bias, float64."""
    q = f.get_tensor(f"{name}.qweight")
    np_, kp = q.shape[0], q.shape[1] * 2
    codes = unpack_qweight(q, np_, kp).to(torch.float64)
    scales = unpack_lane(f.get_tensor(f"{name}.wscales"))  # [N', G]
    w = codes * scales.repeat_interleave(64, dim=1)
    smooth = unpack_lane(f.get_tensor(f"{name}.smooth"))
    bias = unpack_lane(f.get_tensor(f"{name}.bias"))
    xp = torch.zeros(*x.shape[:-1], kp, dtype=torch.float64)
    xp[..., :k] = x.double()
    xq = (xp + (SHIFT if shifted else 0.0)) / smooth
    xq[..., k:] = 0  # padded input channels carry nothing
    y = xq @ w.T + bias
    if f"{name}.lora_down" in f.keys():
        down = unpack_low_rank(f.get_tensor(f"{name}.lora_down"), down=True)
        up = unpack_low_rank(f.get_tensor(f"{name}.lora_up"), down=False)
        y = y + (xp @ down.T) @ up.T
    return y[..., :n]


def test_lane_order_matches_published_example():
    """Nunchaku's wscales store order for warp_n=128 begins 0 1 8 9 | 2 3 10 11 | ... | 16 17 24 25."""
    order = pack_lane_vector(torch.arange(128, dtype=torch.float32)).tolist()
    assert order[:20] == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, 16, 17, 24, 25]
    assert order[-4:] == [118, 119, 126, 127]


@pytest.mark.parametrize("low_rank_input", ["unshifted", "shifted"])
def test_export_round_trips_through_independent_unpacker(tmp_path, flux_and_stats, low_rank_input):
    model, ckpt, captured = _quantized_checkpoint(tmp_path, flux_and_stats, low_rank_input=low_rank_input)
    out = tmp_path / "model.safetensors"
    report = export(ckpt, out, "nunchaku")
    assert out.is_file() and report.rows
    with safetensors.safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        qcfg = json.loads(meta["quantization_config"])
        assert qcfg["method"] == "svdquant" and qcfg["weight"] == {"dtype": "int4", "scale_dtype": None, "group_size": 64}
        assert qcfg["rank"] == 16 and json.loads(meta["config"])["num_layers"] == 1
        assert json.loads(meta["bitsmith"])["shift"] == SHIFT
        names = {r["name"] for r in report.rows}
        assert "transformer_blocks.0.norm1.linear" not in names and "x_embedder" not in names  # kept 16-bit
        assert f.get_tensor("x_embedder.weight").dtype == torch.float32  # copied as stored
        for name, x in captured.items():
            mod = model.get_submodule(name)
            assert isinstance(mod, LowRankQuantLinear)
            shifted = mod.shift is not None
            assert shifted == name.endswith("ff.net.2")
            shapes = {leaf: tuple(f.get_slice(f"{name}.{leaf}").get_shape())
                      for leaf in ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up")}
            np_, kp = shapes["qweight"][0], 2 * shapes["qweight"][1]
            assert np_ % 128 == 0 and kp % 128 == 0 and np_ >= mod.out_features and kp >= mod.in_features
            assert shapes["wscales"] == (kp // 64, np_) and shapes["bias"] == (np_,) and shapes["smooth"] == (kp,)
            assert shapes["lora_down"] == (kp, 16) and shapes["lora_up"] == (np_, 16)
            y_file = nunchaku_forward(f, name, x, shifted, mod.out_features, mod.in_features)
            # bitsmith's runtime, 16-bit activations, float64
            r = mod.dequantize(torch.float64)
            y_ours = low_rank_linear(x.double(), r, mod.lora_down.double(), mod.lora_up.double(), mod.bias.double(),
                                     smooth=mod.smooth.double(), shift=None if mod.shift is None else mod.shift.double(),
                                     low_rank_input=mod.low_rank_input)
            # the file differs only by 16-bit roundings of the bias and of the unsmoothed lora_down
            x64 = x.double() / mod.smooth.double()
            bound = 2 ** -10 * (mod.bias.double().abs() + (x.double().abs() @ (mod.lora_down.double() / mod.smooth.double()).abs().T)
                                @ mod.lora_up.double().abs().T) + 1e-6
            if low_rank_input == "shifted" and shifted:
                bound = bound + 2 ** -10 * ((x64.abs() + SHIFT / mod.smooth.double()) @ mod.lora_down.double().abs().T) @ mod.lora_up.double().abs().T
            err = (y_file - y_ours).abs()
            assert bool((err <= bound).all()), (name, float((err / bound).max()))
            assert (y_file - y_ours).norm() / y_ours.norm() < 2e-3


def test_export_refuses_what_nunchaku_cannot_run(tmp_path, flux_and_stats):
    _, ckpt, _ = _quantized_checkpoint(tmp_path, flux_and_stats, shift=0.25, name="badshift", only_ff=True)
    out = tmp_path / "x.safetensors"
    with pytest.raises(BitsmithError, match="0.171875"):
        export(ckpt, out, "nunchaku")
    from bitsmith.cli.main import main

    assert main(["export", str(ckpt), "--to", "nunchaku", "-o", str(out), "--no-progress"]) == 2
    assert not out.exists()
    _, ckpt, _ = _quantized_checkpoint(tmp_path, flux_and_stats, shift=None, name="noshift", only_ff=True)
    with pytest.raises(BitsmithError, match="GELU -> fc2"):
        export(ckpt, out, "nunchaku")
    _, ckpt, _ = _quantized_checkpoint(tmp_path, flux_and_stats, symmetric=False, name="asym", only_ff=True)
    with pytest.raises(BitsmithError, match="symmetric int4"):
        export(ckpt, out, "nunchaku")
    assert not out.exists() and not list(tmp_path.glob("*.safetensors*"))


def test_diffusers_walk_quantizes_attention_and_ffn_and_reloads(tmp_path, flux_and_stats):
    """SVDQuant on a diffusers transformer: attention and FFN linears become LowRankQuantLinear,
    norms / embeddings / in-out projections stay float, the GELU -> fc2 input is shifted; the
    checkpoint reloads (load_model) to the same outputs, close to the float model's."""
    from bitsmith.models.loading import load_model

    base, inputs, _ = flux_and_stats
    model, ckpt, _ = _quantized_checkpoint(tmp_path, flux_and_stats, name="walk")
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, LowRankQuantLinear))}
    for n, kind in kinds.items():
        float_expected = "norm" in n or "embed" in n or n == "proj_out"
        assert kind == ("Linear" if float_expected else "LowRankQuantLinear"), (n, kind)
    shifted = sorted(n for n, m in model.named_modules() if isinstance(m, LowRankQuantLinear) and m.shift is not None)
    assert shifted == ["transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2"]
    loaded = load_model(ckpt)
    assert type(loaded).__name__ == "FluxTransformer2DModel"
    with torch.no_grad():
        y_loaded = loaded(**inputs)[0]
        y_mem = model(**inputs)[0]
        y_float = base(**inputs)[0]
    assert torch.equal(y_loaded, y_mem)
    assert (y_mem - y_float).norm() / y_float.norm() < 0.25  # W4A4 with rank 16 on a random tiny model


def test_export_of_a_fused_smoothing_llama_divides_by_nothing(tmp_path):
    """``--smooth fused`` folds the scales into the norms: the file's ``smooth`` is all ones, the
    rescaled norms are copied with the rest, and each layer computes what bitsmith's does from the
    input the fused model gives it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    stats = collect_stats(model, [ids], progress=False)
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    svdquant_model(model, stats, rank=8, symmetric=True, smooth="fused")
    names = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")
    captured = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: captured.__setitem__(n, args[0].detach().clone())) for n in names]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    dst, out = tmp_path / "ckpt", tmp_path / "model.safetensors"
    save_model(model, dst, recipe={"method": "svdquant"}, config=model_config(model))
    export(dst, out, "nunchaku")
    with safetensors.safe_open(str(out), framework="pt") as f:
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
        assert torch.equal(norm, model.model.layers[0].input_layernorm.weight.detach())
        assert not torch.allclose(norm, norm_before)  # the scale is in the copied norm
        for name in names:
            mod = model.get_submodule(name)
            assert mod.smooth is None and bool((unpack_lane(f.get_tensor(f"{name}.smooth")) == 1).all())
            x = captured[name]
            y_file = nunchaku_forward(f, name, x, False, mod.out_features, mod.in_features)
            y_ours = low_rank_linear(x.double(), mod.dequantize(torch.float64), mod.lora_down.double(),
                                     mod.lora_up.double(), None)
            assert float((y_file - y_ours).norm() / y_ours.norm()) < 2e-3, name
