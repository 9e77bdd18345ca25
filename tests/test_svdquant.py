"""SVDQuant: the bias fold as a tested identity (seed 000), the runtime module against a float64
fake-quant simulation, the decomposition, and the model walk."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from bitsmith.errors import QuantizationError
from bitsmith.methods.svdquant import auto_shift, low_rank_factors, svdquant
from bitsmith.nn.low_rank import LowRankQuantLinear, low_rank_linear
from bitsmith.transforms.shift import fold_shift_bias

N, K, RANK = 48, 96, 8


def _float_layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64)
    s = torch.rand(K, generator=g, dtype=torch.float64) * 3 + 0.2
    x = torch.randn(5, 7, K, generator=g, dtype=torch.float64)
    ws = w * s
    u, sv, vh = torch.linalg.svd(ws, full_matrices=False)
    l1, l2 = u[:, :RANK] * sv[:RANK], vh[:RANK]
    return w, b, s, x, l1, l2, ws - l1 @ l2


SHIFTS = {"none": None, "scalar": 0.171875, "per-channel": "vec"}


@pytest.mark.parametrize(
    "shift_kind,with_bias,fused,lr_input,rank0",
    [(*c, False) for c in itertools.product(SHIFTS, [True, False], [True, False], ["unshifted", "shifted"])]
    + [("per-channel", True, False, "unshifted", True), ("scalar", False, True, "shifted", True)],
)
def test_fold_matrix_exact(shift_kind, with_bias, fused, lr_input, rank0):
    """Every combination: with quantization disabled, y = Q(R)(x/s + d) + L1 L2 (x/s + [shifted] d) + b'
    equals x W^T + b (float64, 1e-10 relative)."""
    w, b, s, x, l1, l2, r = _float_layer(1)
    if rank0:
        l1 = l2 = None
        r = w * s
    shift = SHIFTS[shift_kind]
    if shift == "vec":
        shift = torch.linspace(-0.3, 0.5, K, dtype=torch.float64)
    bias = b if with_bias else None
    folded = fold_shift_bias(bias, shift=shift, smooth=s, residual=r, lora_down=l2, lora_up=l1,
                             smooth_fused=fused, low_rank_input=lr_input)
    module_input = x / s if fused else x  # fused: the previous op already outputs x / s
    shift_t = None if shift is None else torch.as_tensor(shift, dtype=torch.float64).reshape(-1)
    y = low_rank_linear(module_input, r, l2, l1, folded, smooth=s, shift=shift_t, smooth_fused=fused,
                        low_rank_input=lr_input)
    ref = x @ w.T + (b if with_bias else 0)
    assert y.dtype == torch.float64
    rel = (y - ref).norm() / ref.norm()
    assert rel < 1e-10, rel
    if shift is not None and shift_kind != "none" and not rank0:
        # the other branch layout's bias is wrong here: the identity is not vacuous
        other = "shifted" if lr_input == "unshifted" else "unshifted"
        wrong = fold_shift_bias(bias, shift=shift, smooth=s, residual=r, lora_down=l2, lora_up=l1,
                                smooth_fused=fused, low_rank_input=other)
        y_wrong = low_rank_linear(module_input, r, l2, l1, wrong, smooth=s, shift=shift_t, smooth_fused=fused,
                                  low_rank_input=lr_input)
        assert (y_wrong - ref).norm() / ref.norm() > 1e-4


@pytest.mark.parametrize("scalar", [True, False])
def test_fold_matches_deepcompressor_convention(scalar):
    """Seed 000: deepcompressor stores b - shift.W (the 'shifted linear'), then its convert.py adds
    lora_up @ (lora_down / s) @ shift. With the low-rank branch reading the unshifted input that is
    exactly our b' = b - R.(shift/s): the shift.s^-1.R term is not missing. Adding it again breaks y."""
    w, b, s, x, l1, l2, r = _float_layer(2)
    shift = torch.tensor(0.171875, dtype=torch.float64) if scalar else torch.rand(K, dtype=torch.float64)
    shift_vec = shift.expand(K) if scalar else shift
    b_dc = b - w @ shift_vec  # the quantization run's shifted linear
    b_dc = b_dc + (l1 @ (l2 / s) @ shift_vec.view(-1, 1)).view(-1)  # the seed's convert.py lines
    ours = fold_shift_bias(b, shift=shift, smooth=s, residual=r, lora_down=l2, lora_up=l1, low_rank_input="unshifted")
    assert torch.allclose(ours, b_dc, rtol=0, atol=1e-10 * b.abs().max().item() * K)
    y = low_rank_linear(x, r, l2, l1, b_dc, smooth=s, shift=shift.reshape(-1), low_rank_input="unshifted")
    ref = x @ w.T + b
    assert (y - ref).norm() / ref.norm() < 1e-10
    b_double = b_dc - r @ (shift_vec / s)  # "adding the missing term" double-counts it
    y_bad = low_rank_linear(x, r, l2, l1, b_double, smooth=s, shift=shift.reshape(-1), low_rank_input="unshifted")
    assert (y_bad - ref).norm() / ref.norm() > 1e-3


# ----------------------------------------------------------------------------------------------
# quantization enabled: module vs an independent float64 fake-quant simulation
# ----------------------------------------------------------------------------------------------
def _sim_act_quant(x: torch.Tensor, bits: int, group: int | None, unsigned: bool) -> torch.Tensor:
    """Independent float64 fake quantization: split the last dim into groups (the last one may be
    short), scale from the group's range, round half to even, clamp."""
    k = x.shape[-1]
    g = k if group is None else group
    pieces = []
    for start in range(0, k, g):  # a loop over groups is fine in a reference
        xg = x[..., start:start + g]
        if unsigned:
            qmax, qmin = 2**bits - 1, 0
            sc = xg.amax(-1, keepdim=True).clamp_min(0) / qmax
        else:
            qmax = 2 ** (bits - 1) - 1
            qmin = -qmax
            sc = xg.abs().amax(-1, keepdim=True) / qmax
        q = torch.where(sc > 0, xg / torch.where(sc > 0, sc, torch.ones_like(sc)), torch.zeros_like(xg))
        pieces.append(torch.round(q).clamp(qmin, qmax) * sc)
    return torch.cat(pieces, -1)


def _layer_inputs(dtype, seed=3, gelu=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w[:, 5] *= 8  # a weight outlier column
    x = torch.randn(4, 9, K, generator=g)
    x[..., 7] *= 20  # an activation outlier channel
    if gelu:
        x = torch.nn.functional.gelu(x)
    b = torch.randn(N, generator=g) * 0.1
    absmax = x.abs().reshape(-1, K).amax(0)
    return w, b, x.to(dtype), absmax


CASES = [
    # act_bits, act_group, shift, low_rank_input
    (16, None, None, "unshifted"),
    (8, None, None, "unshifted"),
    (4, 16, None, "unshifted"),
    (4, 16, 0.171875, "unshifted"),
    (4, None, 0.171875, "shifted"),
    (8, 32, "vec", "unshifted"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act_bits,act_group,shift,lr_input", CASES)
def test_module_matches_fake_quant_simulation(dtype, act_bits, act_group, shift, lr_input):
    _module_vs_simulation(dtype, act_bits, act_group, shift, lr_input, "cpu")


#: 16-bit activations with a shift: the fused branch's shift handling (kernels.low_rank), on CUDA
CASES_FUSED = [(16, None, 0.171875, "unshifted"), (16, None, "vec", "shifted"), (16, None, 0.171875, "shifted")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused kernels run the residual)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act_bits,act_group,shift,lr_input", CASES + CASES_FUSED)
def test_cuda_module_on_kernels_matches_fake_quant_simulation(dtype, act_bits, act_group, shift, lr_input):
    mod = _module_vs_simulation(dtype, act_bits, act_group, shift, lr_input, "cuda")
    assert mod.__dict__.get("_runtime") is not None, mod.__dict__.get("kernel_skip_reason")
    assert (dtype in mod.__dict__.get("_low_rank_rt", {})) == (act_bits == 16)  # 16-bit: the fused branch ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused kernels run the residual)")
def test_cuda_module_keeps_the_rows_layout_when_the_fragment_layout_is_on(monkeypatch):
    """Its low-rank epilogue lives in the rows layout's kernels, so BITSMITH_FRAGMENT does not move it."""
    from bitsmith.kernels import layout

    monkeypatch.setitem(layout.FRAGMENT, "formats", frozenset({"int4", "nf4", "int3"}))
    w, b, x, absmax = _layer_inputs(torch.float16)
    res = svdquant(w, act_absmax=absmax, bias=b, rank=RANK, group_size=64)
    mod = LowRankQuantLinear(K, N, res.residual, res.lora_down, res.lora_up, res.bias, smooth=res.smooth).cuda()
    assert mod.__dict__["_runtime"].layout == "rows"


def test_module_says_why_its_kernels_do_not_run_on_cpu():
    w, b, x, absmax = _layer_inputs(torch.float32)
    res = svdquant(w, act_absmax=absmax, bias=b, rank=RANK, group_size=32)
    mod = LowRankQuantLinear(K, N, res.residual, res.lora_down, res.lora_up, res.bias, smooth=res.smooth)
    assert mod.prepare_kernels() is None and "cpu" in mod.kernel_skip_reason


def _module_vs_simulation(dtype, act_bits, act_group, shift, lr_input, device):
    gelu = shift == 0.171875
    w, b, x, absmax = _layer_inputs(dtype, gelu=gelu)
    if shift == "vec":  # --shift auto: per channel, makes every calibration value non-negative
        shift = auto_shift(x.float().reshape(-1, K).amin(0))
    res = svdquant(w, act_absmax=absmax, bias=b, rank=RANK, group_size=32, act_bits=act_bits,
                   act_group_size=act_group, shift=shift, low_rank_input=lr_input)
    mod = LowRankQuantLinear(K, N, res.residual, res.lora_down, res.lora_up, res.bias, smooth=res.smooth,
                             shift=res.shift, low_rank_input=lr_input, act_bits=act_bits,
                             act_group_size=act_group, act_unsigned=res.act_unsigned).to(device)
    y = mod(x.to(device)).cpu()
    assert y.dtype == dtype
    # independent float64 simulation from the stored tensors
    x64 = x.double()
    s = res.smooth.double()
    q_r = res.residual.dequantize(torch.float64)
    l1, l2 = res.lora_up.double(), res.lora_down.double()
    xs = x64 / s
    d = torch.zeros(K, dtype=torch.float64) if res.shift is None else (res.shift.double() / s)
    xm = xs + d
    xl = xm if lr_input == "shifted" else xs
    if act_bits < 16:
        xm = _sim_act_quant(xm, act_bits, act_group, res.act_unsigned)
    ref = xm @ q_r.T + (xl @ l2.T) @ l1.T + res.bias.double()
    eps = torch.finfo(dtype).eps
    scale_terms = xm.abs() @ q_r.abs().T + (xl.abs() @ l2.abs().T) @ l1.abs().T + res.bias.double().abs()
    err = (y.double() - ref).abs()
    assert bool((err <= 4 * eps * scale_terms + 1e-6).all()), (err / scale_terms).max()
    # the quantized layer still computes the float layer approximately (the decomposition is right)
    exact = x64 @ w.double().T + b.double()
    assert (y.double() - exact).norm() / exact.norm() < {16: 0.05, 8: 0.06, 4: 0.3}[act_bits]
    return mod


def test_shift_costs_nothing_with_16bit_activations():
    """The bias uses the dequantized residual, so with quantized weights and 16-bit activations a
    shifted layer computes what the unshifted one does (float64, 1e-10)."""
    w, b, x, absmax = _layer_inputs(torch.float64, gelu=True)
    plain = svdquant(w, act_absmax=absmax, bias=b, rank=RANK)
    for lr in ("unshifted", "shifted"):
        shifted = svdquant(w, act_absmax=absmax, bias=b, rank=RANK, shift=0.171875, low_rank_input=lr)
        assert torch.equal(plain.residual.tensors["codes"], shifted.residual.tensors["codes"])
        outs = []
        for r in (plain, shifted):
            outs.append(low_rank_linear(x, r.residual.dequantize(torch.float64), r.lora_down.double(), r.lora_up.double(),
                                        r.bias.double(), smooth=r.smooth.double(),
                                        shift=None if r.shift is None else r.shift.double(), low_rank_input=lr))
        assert (outs[0] - outs[1]).norm() / outs[0].norm() < 1e-7  # b' stored as float32


# ----------------------------------------------------------------------------------------------
# decomposition
# ----------------------------------------------------------------------------------------------
def test_randomized_svd_accuracy_vs_full():
    g = torch.Generator().manual_seed(4)
    n, k, r = 768, 1024, 32
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, n, generator=g, dtype=torch.float64))
    spectrum = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 0.7  # a slowly decaying, weight-like spectrum
    w = (u * spectrum) @ v.T
    full = low_rank_factors(w, r, solver="full")
    rand = low_rank_factors(w, r, solver="randomized")
    auto = low_rank_factors(w, r, solver="auto")
    assert torch.equal(auto[0], rand[0]) and torch.equal(auto[1], rand[1])  # auto picks it at this size
    err_full = (w - full[0] @ full[1]).norm()
    err_rand = (w - rand[0] @ rand[1]).norm()
    optimum = spectrum[r:].square().sum().sqrt()
    assert abs(err_full / optimum - 1) < 1e-10
    assert err_rand / optimum < 1.01
    small = torch.randn(64, 96, generator=g, dtype=torch.float64)
    a, f = low_rank_factors(small, 8), low_rank_factors(small, 8, solver="full")
    assert torch.equal(a[0], f[0]) and torch.equal(a[1], f[1])  # and the full SVD on a small matrix


def test_svdquant_beats_rtn_at_same_residual_bits():
    from bitsmith.methods.rtn import rtn

    w, b, x, absmax = _layer_inputs(torch.float32)
    x64 = x.double()
    exact = x64 @ w.double().T
    rtn_w = rtn(w, bits=4, group_size=32).dequantize(torch.float64)
    err_rtn = (x64 @ rtn_w.T - exact).norm()
    res = svdquant(w, act_absmax=absmax, rank=RANK, group_size=32)
    err_svd = (x64 @ res.effective_weight().T - exact).norm()
    assert err_svd < 0.7 * err_rtn


def test_conv_weight_per_channel_smoothing():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 8, 3, 3, generator=g)
    x = torch.randn(2, 8, 10, 10, generator=g)
    x[:, 2] *= 10
    absmax = x.abs().amax(dim=(0, 2, 3))
    res = svdquant(w, act_absmax=absmax, rank=4, group_size=24)
    assert res.residual.shape == (16, 8, 3, 3) and res.lora_down.shape == (4, 72)
    eff = res.effective_weight(torch.float32)
    y = torch.nn.functional.conv2d(x, eff, padding=1)
    ref = torch.nn.functional.conv2d(x, w, padding=1)
    assert (y - ref).norm() / ref.norm() < 0.1
    with pytest.raises(QuantizationError, match="3x3 conv"):
        svdquant(w, act_absmax=absmax, rank=4, shift=0.1)


def test_bad_input():
    w = torch.randn(32, 64)
    absmax = torch.ones(64)
    with pytest.raises(QuantizationError, match=r"layer fc: rank must be .* 0\.\.32"):
        svdquant(w, act_absmax=absmax, rank=33, name="fc")
    with pytest.raises(QuantizationError, match="no stats"):
        svdquant(w, act_absmax=None, rank=4)
    with pytest.raises(QuantizationError, match="channels"):
        svdquant(w, act_absmax=torch.ones(63), rank=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svdquant(w, act_absmax=absmax, rank=0, act_bits=4, name="fc")
    assert any("plain (smoothed) W4A4" in str(c.message) for c in caught)


# ----------------------------------------------------------------------------------------------
# model walk, checkpoint, CLI
# ----------------------------------------------------------------------------------------------
def _tiny_llama_folder(tmp_path, smollm2_dir):
    import shutil

    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    for f in smollm2_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            shutil.copy(f, folder / f.name)
    return folder, model


def test_cli_svdquant_checkpoint_loads_and_matches(tmp_path, smollm2_dir):
    from bitsmith.io.checkpoint import Checkpoint
    from bitsmith.calibration.collect import collect_stats
    from bitsmith.calibration.stats import save_stats
    from bitsmith.cli.main import main
    from bitsmith.models.loading import load_model
    from bitsmith.models.svdquant import svdquant_model

    folder, model = _tiny_llama_folder(tmp_path, smollm2_dir)
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(model, [ids], progress=False)
    calib = save_stats(tmp_path / "calib.safetensors", stats)
    dst = tmp_path / "q"
    assert main(["quantize", str(folder), "-o", str(dst), "--method", "svdquant", "--no-progress"]) == 2  # no --calib
    assert not dst.exists()
    rc = main(["quantize", str(folder), "-o", str(dst), "--method", "svdquant", "--rank", "8", "--calib", str(calib),
               "--act-bits", "8", "--no-convs", "--no-progress"])
    assert rc == 0
    assert main(["inspect", str(dst)]) == 0  # the recipe (method svdquant) reads back
    with Checkpoint.open(dst) as ck:
        assert ck.recipe["options"]["rank"] == 8 and not ck.recipe.get("skip")  # no Conv2d to keep here
    loaded = load_model(dst)
    lr = [m for m in loaded.modules() if isinstance(m, LowRankQuantLinear)]
    assert len(lr) == 2 * 7 and all(m.rank == 8 and m.act_bits == 8 for m in lr)
    svdquant_model(model, stats, rank=8, act_bits=8)  # the same in memory
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # a missing layer in the stats: error naming it, nothing written
    del stats["model.layers.1.mlp.down_proj"]
    save_stats(tmp_path / "partial.safetensors", stats)
    bad = tmp_path / "bad"
    rc = main(["quantize", str(folder), "-o", str(bad), "--method", "svdquant", "--rank", "8",
               "--calib", str(tmp_path / "partial.safetensors"), "--no-progress"])
    assert rc == 2 and not bad.exists()
    rc = main(["quantize", str(folder), "-o", str(bad), "--method", "svdquant", "--rank", "65", "--calib", str(calib),
               "--no-progress"])
    assert rc == 2 and not bad.exists()


def _group_scale(model, stats, names: list[str], alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's shared scale of the layers ``names`` (the same input), from first principles
    in float64: max over the layers of the calibration absmax and of |W| per input channel."""
    act = torch.stack([stats[n].absmax.double() for n in names]).amax(0)
    w = torch.cat([model.get_submodule(n).weight.detach().double().abs() for n in names]).amax(0)
    return act.pow(alpha) / w.pow(1 - alpha)


def test_fused_smoothing_folds_one_scale_per_group_and_no_layer_divides(tmp_path, smollm2_dir):
    import copy

    from bitsmith.calibration.collect import collect_stats
    from bitsmith.calibration.stats import save_stats
    from bitsmith.cli.main import main
    from bitsmith.models.loading import load_model
    from bitsmith.models.svdquant import svdquant_model

    folder, model = _tiny_llama_folder(tmp_path, smollm2_dir)
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(model, [ids], progress=False)
    fused, unfused = copy.deepcopy(model), copy.deepcopy(model)
    layers = svdquant_model(fused, stats, rank=8, smooth="fused")
    svdquant_model(unfused, stats, rank=8)
    assert len(layers) == 2 * 7 and {r.smoothing for r in layers} == {"fused"}
    lr = [m for m in fused.modules() if isinstance(m, LowRankQuantLinear)]
    assert len(lr) == 14 and all(m.smooth is None for m in lr)  # nothing divided at run time
    assert all(m.smooth is not None for m in unfused.modules() if isinstance(m, LowRankQuantLinear))
    # the norms before q/k/v and gate/up hold the original weight / the group's scale
    for norm, group in (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                        ("post_attention_layernorm", ("gate_proj", "up_proj"))):
        part = "self_attn" if norm == "input_layernorm" else "mlp"
        names = [f"model.layers.1.{part}.{g}" for g in group]
        s = _group_scale(model, stats, names)
        want = model.get_submodule(f"model.layers.1.{norm}").weight.double() / s
        got = fused.get_submodule(f"model.layers.1.{norm}").weight.double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # up_proj: its columns times the gate/up scale (a consumer), its rows divided by down_proj's
    # (the producer of down's input): the residual + branch approximate exactly that weight
    s_in = _group_scale(model, stats, ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"])
    s_out = _group_scale(model, stats, ["model.layers.0.mlp.down_proj"])
    up = fused.get_submodule("model.layers.0.mlp.up_proj")
    want = model.get_submodule("model.layers.0.mlp.up_proj").weight.detach().double() * s_in / s_out[:, None]
    eff = up.qweight.dequantize(torch.float64) + up.lora_up.double() @ up.lora_down.double()
    assert float((eff - want).norm() / want.norm()) < 0.1
    with torch.no_grad():
        ref = model(ids).logits.double()
        err = {name: float((m(ids).logits.double() - ref).norm() / ref.norm()) for name, m in
               (("fused", fused), ("unfused", unfused))}
    # rank 8 of 64 on random weights: int4 error, not a wrong fold's (an unscaled norm is off by O(1))
    assert err["fused"] < 0.15 and err["unfused"] < 0.15, err
    # the CLI writes the same model, and it loads back bit for bit
    calib = save_stats(tmp_path / "calib.safetensors", stats)
    dst = tmp_path / "q"
    assert main(["quantize", str(folder), "-o", str(dst), "--method", "svdquant", "--rank", "8", "--calib", str(calib),
                 "--smooth", "fused", "--no-progress"]) == 0
    loaded = load_model(dst)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fused(ids).logits)


def test_fused_smoothing_refuses_what_it_cannot_fold(tmp_path, smollm2_dir):
    from bitsmith.calibration.collect import collect_stats
    from bitsmith.models.svdquant import svdquant_model

    folder, model = _tiny_llama_folder(tmp_path, smollm2_dir)
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(2))
    stats = collect_stats(model, [ids], progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.mlp\.down_proj.*shifted layer cannot"):
        svdquant_model(model, stats, rank=4, smooth="fused", shift=1.0, shift_pattern=r"down_proj$")
    with pytest.raises(QuantizationError, match="smooth must be one of unfused, fused, none"):
        svdquant_model(model, stats, rank=4, smooth="folded")
    with pytest.raises(QuantizationError, match="needs a migration strength"):
        svdquant_model(model, stats, rank=4, smooth="fused", alpha=None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed
    # a group with a skipped member is not fused: its other layers keep (and report) a scale of their own
    from bitsmith.models.svdquant import DEFAULT_SKIP

    layers = {r.name: r for r in svdquant_model(model, stats, rank=4, smooth="fused", skip=DEFAULT_SKIP + (r"k_proj",))}
    q = "model.layers.0.self_attn.q_proj"
    assert layers[q].smoothing == "unfused" and model.get_submodule(q).smooth is not None
    assert layers["model.layers.0.mlp.up_proj"].smoothing == "fused"
    seq = torch.nn.Sequential(torch.nn.Linear(16, 8))
    seq_stats = collect_stats(seq, [torch.randn(4, 16)], progress=False)
    with pytest.raises(QuantizationError, match="no smoothing map for Sequential"):
        svdquant_model(seq, seq_stats, rank=2, smooth="fused")
