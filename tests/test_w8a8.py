"""W8A8 (SmoothQuant): the int8 codec, W8A8Linear against a float64 reference of the same
quantization, the runtime-module checkpoint mechanism, and `quantize --method smoothquant`."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from bitsmith.calibration import ChannelStats, collect_stats, save_stats
from bitsmith.cli.main import main
from bitsmith.errors import BitsmithError, CheckpointError, QuantizationError, SpecError
from bitsmith.formats import QTensor
from bitsmith.formats.int8 import Int8Params, encode_int8
from bitsmith.io.checkpoint import Checkpoint, CheckpointWriter
from bitsmith.methods.smoothquant import int8_weight, smoothquant, static_input_scale
from bitsmith.models.loading import load_model
from bitsmith.models.saving import save_model
from bitsmith.models.smoothquant import smoothquant_model, smoothquant_recipe
from bitsmith.nn import RUNTIME_MODULES, SmoothedLinear, W8A8Linear
from bitsmith.nn.w8a8_linear import _EXACT_F32_CHUNK, int8_matmul

torch.manual_seed(0)


# --------------------------------------------------------------------------------------------
# float64 reference of the same quantization (written independently of the runtime)
# --------------------------------------------------------------------------------------------
def reference_w8a8(x, codes, wscale, bias=None, migration=None, input_scale=None):
    """(Xq * sx) @ (Wq * sw)^T + b in float64, Xq from float64 math."""
    x = x.to(torch.float64).reshape(-1, x.shape[-1])
    if migration is not None:
        x = x / migration.to(torch.float64)
    if input_scale is None:
        sx = x.abs().max(dim=1, keepdim=True).values / 127.0
        sx[sx == 0] = 1.0
    else:
        sx = torch.full((1, 1), float(input_scale), dtype=torch.float64)
    xq = torch.clamp(torch.round(x / sx), -128, 127)
    w = codes.to(torch.float64) * wscale.to(torch.float64)[:, None]
    y = (xq * sx) @ w.T
    return y if bias is None else y + bias.to(torch.float64)


def outlier_input(tokens: int, channels: int, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(tokens, channels, dtype=torch.float64)
    x[:, 3] *= 40.0  # an outlier channel, as in LLM activations
    x[5] = 0.0  # a token of zeros (scale 1, output = bias)
    return x.to(dtype)


# --------------------------------------------------------------------------------------------
# the int8 codec and the weight method
# --------------------------------------------------------------------------------------------
def test_fma_division_is_correctly_rounded():
    """The per-token quantization kernel divides on the GPU as ``q = x * y``, ``r = fma(-q, s, x)``,
    ``q + r * y`` (one FMA) with ``y = 1 / s`` correctly rounded (Markstein's correction): it must
    give the correctly rounded float32 quotient, as the torch path's division does. Emulated
    exactly in float64 (the products of float32s are exact there, the remainder too; the last
    sum is split with TwoSum and rounded once), for every finite float16 ``x`` and random float32
    ``x`` over twelve decades, against ``float32(float64(x) / float64(s))`` (float64's rounding is
    innocuous for a quotient of float32s), with ``s`` as the kernel forms it from a row's absmax
    (``absmax * float32(1/127)``) and arbitrary static scales."""
    import numpy as np

    rng = np.random.default_rng(0)
    h = np.arange(65536, dtype=np.uint16).view(np.float16)
    h = h[np.isfinite(h)]
    x = np.concatenate([h.astype(np.float32), (rng.standard_normal(50000) * 10.0 ** rng.uniform(-8, 4, 50000)).astype(np.float32)])
    amax = np.abs(h[h != 0]).astype(np.float32)
    scales = np.concatenate([rng.choice(amax, 40) * np.float32(0.007874015718698502),
                             (rng.random(20) * 10.0 ** rng.uniform(-6, 3, 20)).astype(np.float32)]).astype(np.float32)
    x64 = x.astype(np.float64)
    for s in scales:
        s64 = np.float64(s)
        y = np.float32(1.0 / s64)
        q = (x64 * np.float64(y)).astype(np.float32).astype(np.float64)
        r = (x64 - s64 * q).astype(np.float32).astype(np.float64)  # fma: x - s q is exact in float64
        ry = r * np.float64(y)
        hi = q + ry
        lo = ry - (hi - q)  # TwoSum (|q| >= |ry|): hi + lo = q + r y exactly
        got = hi.astype(np.float32)
        # float64 -> float32 rounds hi alone: wrong only where hi is a float32 midpoint and lo != 0
        up, down = np.nextafter(got, np.float32(np.inf)), np.nextafter(got, np.float32(-np.inf))
        tie = ((hi == (got.astype(np.float64) + up) / 2) | (hi == (got.astype(np.float64) + down) / 2)) & (lo != 0)
        assert not tie.any(), s
        want = (x64 / s64).astype(np.float32)
        assert np.array_equal(got, want), (s, x[got != want][:5])


def test_int8_weight_codes_and_scales_by_hand():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 1.5, 2.9, -0.01]])
    qt = int8_weight(w)
    assert qt.codec == "int8" and qt.tensors["codes"].dtype == torch.int8
    scale = qt.tensors["scale"]
    assert scale.dtype == torch.float32 and scale.shape == (3,)
    # scale = absmax / 127 rounded up to float32: never below the exact value, so nothing clips
    exact = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64) / 127
    assert torch.all(scale.double() >= exact) and torch.all(scale.double() - exact <= exact * 2**-23)
    codes = qt.tensors["codes"]
    # -0.5 / scale is just under 63.5 in magnitude (the scale was rounded up): -63; 31.75 -> 32
    assert codes[0].tolist() == [127, -63, 32, 0]
    assert codes[1].tolist() == [0, 0, 0, 0] and float(scale[1]) == 0.0
    assert codes[2, 0] == -127 and int(codes.abs().max()) == 127
    back = QTensor.from_state(*qt.to_state())
    want = codes.double() * scale.double()[:, None]  # the float32 product, rounded once
    assert torch.equal(back.dequantize(torch.float64), want.float().double())


def test_int8_codec_rejects_bad_scale_and_weight():
    w = torch.randn(4, 8)
    with pytest.raises(SpecError):
        encode_int8(w, torch.ones(4, dtype=torch.float16), Int8Params())
    with pytest.raises(QuantizationError):
        encode_int8(w, torch.full((4,), -1.0), Int8Params())
    with pytest.raises(QuantizationError):
        int8_weight(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(SpecError):
        Int8Params(scale_dtype="int8")


def test_smoothquant_method_validates_options():
    w = torch.randn(4, 8)
    assert smoothquant(w, alpha=0.0, smooth="unfused").codec == "int8"
    for bad in ({"alpha": 1.5}, {"alpha": -0.1}, {"alpha": float("nan")}, {"smooth": "half"}, {"variant": "x"}):
        with pytest.raises(SpecError):
            smoothquant(w, **bad)


def test_static_input_scale_divides_by_migration():
    absmax = torch.tensor([2.0, 127.0, 0.5])
    assert float(static_input_scale(absmax)) == pytest.approx(1.0)
    s = torch.tensor([1.0, 4.0, 0.1])  # after smoothing the channels are 2, 31.75, 5
    assert float(static_input_scale(absmax, s)) == pytest.approx(31.75 / 127)
    assert float(static_input_scale(torch.zeros(3))) == 1.0


# --------------------------------------------------------------------------------------------
# W8A8Linear numerics
# --------------------------------------------------------------------------------------------
def test_int8_matmul_is_exact_including_extremes():
    a = torch.randint(-128, 128, (37, 3000), dtype=torch.int8)
    b = torch.randint(-128, 128, (3000, 29), dtype=torch.int8)
    a[0], b[:, 0] = 127, 127  # 3000 * 127**2 > 2**24: a plain float32 matmul would not be exact
    a[1], b[:, 1] = -128, -128
    want = a.to(torch.float64) @ b.to(torch.float64)
    got = int8_matmul(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.to(torch.float64), want)
    # the chunked float32 fallback (used on devices without an int8 matmul) is exact too
    out = torch.zeros(37, 29, dtype=torch.int32)
    for k0 in range(0, 3000, _EXACT_F32_CHUNK):
        out += (a[:, k0:k0 + _EXACT_F32_CHUNK].float() @ b[k0:k0 + _EXACT_F32_CHUNK].float()).to(torch.int32)
    assert torch.equal(out.to(torch.float64), want)


@pytest.mark.parametrize("migration", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_linear_matches_float64_reference(migration, static):
    lin = nn.Linear(96, 40)
    ms = torch.rand(96, dtype=torch.float64).add_(0.25).float() if migration else None
    x = outlier_input(33, 96, torch.float64)
    input_scale = torch.tensor(0.05) if static else None
    m = W8A8Linear.from_float(lin, int8_weight, input_scale=input_scale)
    if migration:
        m = W8A8Linear(96, 40, m.qweight, m.bias.data, migration_scale=ms, input_scale=input_scale)
    # float64 input: the runtime computes in float64, so the codes and the result match exactly
    y = m(x.reshape(3, 11, 96))
    assert y.shape == (3, 11, 40) and y.dtype == torch.float64
    ref = reference_w8a8(x, m.codes, m.scale, lin.bias.detach(), ms, input_scale)
    torch.testing.assert_close(y.reshape(33, 40), ref, rtol=1e-12, atol=1e-12)
    # float32 input: float32 rounding may move a value across a .5 code boundary; each such flip
    # changes the output by at most sx * max|w|: bound the error by a few of those
    y32 = m(x.float())
    err = (y32.double() - ref).abs()
    per_code = (ref.abs().max() / 127) * 4
    assert float(err.max()) <= float(per_code) and float(err.median()) < 1e-5 * float(ref.abs().max())
    # the zero token gives exactly the bias
    torch.testing.assert_close(y32[5], lin.bias.detach(), rtol=0, atol=1e-7)


def test_w8a8_linear_close_to_float_and_half_cast_keeps_buffers():
    lin = nn.Linear(128, 64)
    m = W8A8Linear.from_float(lin, int8_weight)
    x = torch.randn(8, 128)
    rel = (m(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.02
    sm = SmoothedLinear.from_linear(lin, torch.rand(128) + 0.5)
    m2 = W8A8Linear.from_float(sm, int8_weight, input_scale=torch.tensor(0.1))
    m2.half()
    assert m2.codes.dtype == torch.int8 and m2.scale.dtype == torch.float32
    assert m2.migration_scale.dtype == torch.float32 and m2.input_scale.dtype == torch.float32
    assert m2(x.half()).dtype == torch.float16


def test_w8a8_linear_rejects_wrong_weight_and_scales():
    w = torch.randn(6, 8)
    with pytest.raises(QuantizationError, match="int8-codec"):
        W8A8Linear(8, 6, smoothquant(w).__class__("affine", None, (6, 8), torch.float32, {}))
    with pytest.raises(QuantizationError, match="shape"):
        W8A8Linear(6, 8, int8_weight(w))
    with pytest.raises(QuantizationError, match="migration_scale"):
        W8A8Linear(8, 6, int8_weight(w), migration_scale=torch.ones(7))
    with pytest.raises(QuantizationError, match="migration_scale"):
        W8A8Linear(8, 6, int8_weight(w), migration_scale=torch.zeros(8))
    with pytest.raises(QuantizationError, match="input_scale"):
        W8A8Linear(8, 6, int8_weight(w), input_scale=torch.tensor([1.0, 2.0]))


# --------------------------------------------------------------------------------------------
# the runtime-module checkpoint mechanism
# --------------------------------------------------------------------------------------------
def test_module_info_round_trip_and_validation(tmp_path):
    qt = int8_weight(torch.randn(4, 8))
    with CheckpointWriter(tmp_path / "ck") as wr:
        wr.add_qtensor("lin.weight", qt)
        wr.add_tensor("lin.migration_scale", torch.ones(8))
        wr.add_module_info("lin", {"kind": "w8a8_linear", "tensors": ["migration_scale"], "act_quant": "per_token_dynamic"})
        for bad in ({"tensors": []}, {"kind": ""}, {"kind": "x", "tensors": "a"}, {"kind": "x", "tensors": ["a.b"]},
                    {"kind": "x", "tensors": ["a", "a"]}, {"kind": "x", "v": float("nan")}):
            with pytest.raises(CheckpointError):
                wr.add_module_info("other", bad)
        with pytest.raises(CheckpointError, match="twice"):
            wr.add_module_info("lin", {"kind": "w8a8_linear"})
    with Checkpoint.open(tmp_path / "ck") as ck:
        assert ck.module_info("lin") == {"kind": "w8a8_linear", "tensors": ["migration_scale"],
                                         "act_quant": "per_token_dynamic"}
        assert ck.module_info("nothing") is None and list(ck.modules()) == ["lin"]
    # a listed tensor that is never written fails at close and leaves nothing
    with pytest.raises(CheckpointError, match="input_scale"):
        with CheckpointWriter(tmp_path / "bad") as wr:
            wr.add_qtensor("lin.weight", qt)
            wr.add_module_info("lin", {"kind": "w8a8_linear", "tensors": ["input_scale"]})
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob("bad.partial*"))


def _rewrite_document(path, fn):
    """Rewrite the bitsmith document of a one-shard checkpoint with ``fn(doc)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shard = path / "model.safetensors"
    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(meta["bitsmith"])
    fn(doc)
    meta["bitsmith"] = json.dumps(doc)
    save_file(tensors, str(shard), metadata=meta)


def test_reader_rejects_bad_modules_and_reads_old_documents(tmp_path):
    qt = int8_weight(torch.randn(4, 8))
    for name in ("ok", "quantized_extra", "missing_extra", "not_object", "no_kind", "old"):
        with CheckpointWriter(tmp_path / name) as wr:
            wr.add_qtensor("lin.weight", qt)
            wr.add_tensor("lin.migration_scale", torch.ones(8))
    cases = {
        "quantized_extra": lambda d: d.update(modules={"lin": {"kind": "w8a8_linear", "tensors": ["weight"]}}),
        "missing_extra": lambda d: d.update(modules={"lin": {"kind": "w8a8_linear", "tensors": ["input_scale"]}}),
        "not_object": lambda d: d.update(modules=["lin"]),
        "no_kind": lambda d: d.update(modules={"lin": {"tensors": []}}),
        "old": lambda d: d.pop("modules", None),
    }
    for name, fn in cases.items():
        _rewrite_document(tmp_path / name, fn)
    for name in ("quantized_extra", "missing_extra", "not_object", "no_kind"):
        with pytest.raises(CheckpointError):
            Checkpoint.open(tmp_path / name)
    with Checkpoint.open(tmp_path / "old") as ck:  # a document without "modules" still reads
        assert ck.modules() == {} and ck.is_quantized("lin.weight")
    assert "w8a8_linear" in RUNTIME_MODULES


# --------------------------------------------------------------------------------------------
# whole models: SmolLM2 (2 decoder layers of the real weights)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_slice(smollm2_dir, tmp_path_factory):
    """A 2-layer SmolLM2 (real weights), its folder, and calibration stats on real text."""
    import transformers

    from bitsmith.eval.text import lee_corpus_text

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                                                  num_hidden_layers=2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok(lee_corpus_text()[:6000], return_tensors="pt").input_ids[0]
    calib, evaluation = ids[:512].reshape(4, 128), ids[512:640][None]
    stats = collect_stats(model, [calib], modules=r"layers\.", progress=False)
    folder = tmp_path_factory.mktemp("smol") / "slice"
    model.save_pretrained(folder)
    stats_path = folder.parent / "stats.safetensors"
    save_stats(stats_path, stats)
    return {"model": model, "folder": folder, "stats": stats, "stats_path": stats_path, "ids": evaluation}


def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("smooth", ["none", "fused", "unfused"])
def test_smoothquant_model_save_load_roundtrip(smol_slice, tmp_path, smooth):
    ref_model, ids = smol_slice["model"], smol_slice["ids"]
    model = _copy(ref_model)
    recipe = smoothquant_recipe(alpha=0.5, smooth=smooth, activations="static" if smooth == "unfused" else "dynamic")
    report = smoothquant_model(model, smol_slice["stats"], recipe)
    assert len(report.rows) == 14  # 7 linears x 2 layers; lm_head (tied) stays float
    with torch.no_grad():
        ref, out = ref_model(ids).logits, model(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 0.1
    save_model(model, tmp_path / "ck", recipe=report.recipe)
    with Checkpoint.open(tmp_path / "ck") as ck:
        assert ck.recipe["method"] == "smoothquant" and ck.recipe["options"]["alpha"] == 0.5
        info = ck.module_info("model.layers.1.mlp.down_proj")
        assert info["kind"] == "w8a8_linear"
        assert ("migration_scale" in info["tensors"]) == (smooth == "unfused")
        assert "lm_head.weight" not in ck
    loaded = load_model(tmp_path / "ck")
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, W8A8Linear) and (q.migration_scale is not None) == (smooth == "unfused")
    assert (q.input_scale is not None) == (smooth == "unfused")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)  # the checkpoint alone rebuilds the same model


def test_smoothquant_cli_and_bad_input(smol_slice, tmp_path, capsys):
    folder, stats_path = smol_slice["folder"], smol_slice["stats_path"]
    out = tmp_path / "sq"
    assert main(["quantize", str(folder), "-o", str(out), "--method", "smoothquant", "--calib", str(stats_path),
                 "--alpha", "0.6", "--smooth", "unfused", "--no-progress"]) == 0
    with Checkpoint.open(out) as ck:
        assert ck.recipe["options"] == {"alpha": 0.6, "smooth": "unfused", "variant": "paper", "activations": "dynamic"}
    assert isinstance(load_model(out).model.layers[1].mlp.up_proj, W8A8Linear)
    assert main(["inspect", str(out)]) == 0
    capsys.readouterr()

    def fails(args, match):
        dst = tmp_path / "bad"
        assert main(["quantize", str(folder), "-o", str(dst), "--method", "smoothquant", *args, "--no-progress"]) == 2
        assert match in capsys.readouterr().err
        assert not dst.exists() and not list(tmp_path.glob("bad.partial*"))

    fails(["--calib", str(stats_path), "--alpha", "1.5"], "alpha must be a number in [0, 1]")
    fails([], "needs --calib")
    # stats from another model: a missing layer and a wrong channel count
    stats = dict(smol_slice["stats"])
    stats.pop("model.layers.1.mlp.down_proj")
    q = stats["model.layers.0.self_attn.q_proj"]
    stats["model.layers.0.self_attn.q_proj"] = ChannelStats(q.absmax[:100], q.absmean[:100], q.sqmean[:100],
                                                            q.min[:100], q.max[:100], q.tokens)
    save_stats(tmp_path / "wrong.safetensors", stats)
    fails(["--calib", str(tmp_path / "wrong.safetensors")], "do not match the model")


def test_arch_without_smoothing_map(tmp_path):
    """A causal LM with no smoothing map: unfused falls back to generic per-linear smoothing with
    a warning; fused is an error."""
    import transformers

    cfg = transformers.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32)
    model = transformers.OPTForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 16))
    stats = collect_stats(model, [ids], modules=r"layers\.", progress=False)
    with pytest.raises(QuantizationError, match="no smoothing map"):
        smoothquant_model(_copy(model), stats, smoothquant_recipe(smooth="fused"))
    m = _copy(model)
    with pytest.warns(UserWarning, match="generic"):
        rep = smoothquant_model(m, stats, smoothquant_recipe(smooth="unfused"))
    assert len(rep.rows) == 6 and all(r["migration_scale"] for r in rep.rows)
    with torch.no_grad():
        ref, out = model(ids).logits, m(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 0.05
    with pytest.raises(BitsmithError):
        smoothquant_model(_copy(model), None, smoothquant_recipe(smooth="unfused"))
