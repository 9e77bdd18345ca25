"""The ``hqq`` method: the half-quadratic solver lowers its lp objective (computed here
independently, in float64, from the dequantized weights) below its own min-max start and below
RTN, on synthetic weights and on slices of SmolLM2's real linears; ``calib`` lowers the
activation-weighted error; quantized metadata and axis 0 go through a checkpoint; the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import bitsmith
from bitsmith.calibration import ChannelStats, save_stats
from bitsmith.cli.main import main as cli
from bitsmith.errors import QuantizationError, SpecError
from bitsmith.formats import QTensor
from bitsmith.io.checkpoint import Checkpoint
from bitsmith.methods import METHODS
from bitsmith.methods.hqq import hqq, lp_shrink
from bitsmith.methods.recipe import Recipe
from bitsmith.methods.rtn import rtn


def lp_error(w: torch.Tensor, qt: QTensor, p: float, d: torch.Tensor | None = None) -> float:
    """``sum_j d_j |w - deq|**p`` over the whole tensor, float64 (d per input column)."""
    e = (w.double() - qt.dequantize(torch.float32).double()).abs().pow(p)
    if d is not None:
        e = e * d.double().view(1, -1)
    return float(e.sum())


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weights like an LLM's: Student-t bulk with a few large outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((rows, cols)) * 0.02
    w += (torch.rand(rows, cols, generator=g) < 0.002) * torch.randn(rows, cols, generator=g) * 0.2
    return w.float()


#: the solver run on its lp objective alone (the defaults add a zero-mean step and stop at 2 iterations)
SOLVER = dict(iters=10, beta=10.0, zero_mean=False)


@pytest.fixture(scope="module")
def smollm2_slices(smollm2_dir):
    """Slices of real SmolLM2 linears (q/v/down of two layers): 64 rows each."""
    out = {}
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        for layer in (0, 17):
            for proj in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
                name = f"model.layers.{layer}.{proj}.weight"
                out[name] = f.get_slice(name)[:64].float()
    return out


# --- the solver's objective --------------------------------------------------------------------
@pytest.mark.parametrize("bits, gs", [(1, 64), (2, 16), (3, 64), (4, 64), (4, 128), (8, 64)])
@pytest.mark.parametrize("axis", [1, 0])
def test_solver_lowers_lp_error_synthetic(bits, gs, axis):
    torch.manual_seed(bits)
    w = heavy_tailed(96, 256, seed=bits)
    p = 0.5
    # the solver's own objective: without the final zero-mean step, at HQQ's beta and 10 iterations
    start = hqq(w, bits=bits, group_size=gs, axis=axis, iters=0, lp=p, zero_mean=False)
    solved = hqq(w, bits=bits, group_size=gs, axis=axis, lp=p, **SOLVER)
    e_start, e_solved = lp_error(w, start, p), lp_error(w, solved, p)
    assert e_solved < e_start * 0.995, (e_solved, e_start)
    if axis == 1:  # RTN has no axis 0
        for zero in ("float", "int"):
            assert e_solved < lp_error(w, rtn(w, bits=bits, group_size=gs, zero=zero), p)
    assert solved.params.axis == axis and solved.params.bits == bits


@pytest.mark.parametrize("bits, gs", [(2, 16), (3, 64), (4, 64)])
def test_solver_lowers_error_on_smollm2(smollm2_slices, bits, gs):
    p = 0.5
    for name, w in smollm2_slices.items():
        start = hqq(w, bits=bits, group_size=gs, iters=0, lp=p, zero_mean=False)
        solved = hqq(w, bits=bits, group_size=gs, lp=p, **SOLVER)
        r = rtn(w, bits=bits, group_size=gs, zero="float")
        e = lp_error(w, solved, p)
        assert e < lp_error(w, start, p) * 0.99, name
        assert e < lp_error(w, r, p) * 0.99, name
        # and the plain relative (L2) error HQQ is usually judged by
        rel = float((solved.dequantize() - w).norm() / w.norm())
        assert rel < float((r.dequantize() - w).norm() / w.norm()), name


@pytest.mark.parametrize("bits, gs", [(3, 64), (4, 64)])
def test_defaults_zero_mean_groups_and_lower_l2_error(smollm2_slices, bits, gs):
    """The defaults' last zero update leaves each group's mean error ~0 (the hqq package's groups
    have 0; without the step ours keep ~0.008 rms(w)) and the L2 error stays below RTN's."""
    def group_bias(w, qt):  # mean |per-group mean error| / rms(w), float64
        e = (w.double() - qt.dequantize(torch.float32).double()).reshape(-1, gs)
        return float(e.mean(dim=1).abs().mean() / w.double().pow(2).mean().sqrt())

    def rel(w, qt):
        return float((qt.dequantize(torch.float32).double() - w.double()).norm() / w.double().norm())

    for name, w in smollm2_slices.items():
        ours = hqq(w, bits=bits, group_size=gs)
        without = hqq(w, bits=bits, group_size=gs, zero_mean=False)
        assert group_bias(w, ours) < 0.5 * group_bias(w, without), name
        assert group_bias(w, ours) < 0.004, name
        assert rel(w, ours) < rel(w, without), name
        for zero in ("int", "float"):
            assert rel(w, ours) < 0.97 * rel(w, rtn(w, bits=bits, group_size=gs, zero=zero)), name


def test_round_zero_start_matches_float64_reference():
    """``round_zero`` (default): with no iterations and no zero-mean step the grid is the min-max
    scale with the zero rounded to an integer, recomputed here in float64, so w = 0 is a level;
    without it the min-max zero is fractional."""
    w = heavy_tailed(32, 256, seed=5)
    for bits in (2, 3, 4):
        m = 2**bits - 1
        g = w.double().reshape(-1, 64)
        lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
        s = (hi - lo) / m
        z = (-lo / s).round()
        qt = hqq(w, bits=bits, group_size=64, iters=0, zero_mean=False, scale_dtype="float32")
        assert torch.equal(qt.tensors["zero"].double().reshape(-1, 1), z), bits
        assert torch.allclose(qt.tensors["scale"].double().reshape(-1, 1), s, rtol=1e-6), bits
        ref = ((g / s + z).round().clamp(0, m) - z) * s
        deq = qt.dequantize(torch.float64).reshape(-1, 64)
        assert float((deq - ref).abs().gt(1e-6).double().mean()) < 1e-3, bits  # ties may round apart
        assert float(deq.eq(0).double().mean()) > 0.02, bits  # weights near 0 land on the 0 level
        frac = hqq(w, bits=bits, group_size=64, iters=0, zero_mean=False, round_zero=False,
                   scale_dtype="float32").tensors["zero"].double()
        assert float((frac - frac.round()).abs().mean()) > 0.15, bits


@pytest.mark.parametrize("bits", [3, 4])
def test_round_zero_keeps_tiny_weights(smollm2_slices, bits):
    """The lever behind the int4/int3 perplexity (module doc): starting from a grid with a level
    at 0 keeps the weights within a quarter step of 0 (SmolLM2's massive-activation input
    channels have such weights) far more accurate; measured in float64."""
    def tiny_error(w, qt):  # rms error / rms value over weights within a quarter min-max step of 0
        g = w.double().reshape(-1, 64)
        step = (g.amax(1, keepdim=True) - g.amin(1, keepdim=True)) / (2**bits - 1)
        tiny = g.abs() < step / 4
        e = qt.dequantize(torch.float32).double().reshape(-1, 64) - g
        return float(e[tiny].pow(2).mean().sqrt() / g[tiny].pow(2).mean().sqrt())

    for name, w in smollm2_slices.items():
        on, off = hqq(w, bits=bits, group_size=64), hqq(w, bits=bits, group_size=64, round_zero=False)
        assert tiny_error(w, on) < 0.85 * tiny_error(w, off), name


def test_int_zero_domain(smollm2_slices):
    w = next(iter(smollm2_slices.values()))
    qt = hqq(w, bits=3, group_size=64, zero="int")
    assert qt.tensors["zero"].dtype == torch.uint8 and int(qt.tensors["zero"].max()) <= 7
    assert lp_error(w, qt, 0.5) < lp_error(w, rtn(w, bits=3, group_size=64, zero="int"), 0.5)
    assert qt.bits_per_weight == pytest.approx(3 + 24 / 64)


def test_optimize_scale_helps_and_zero_only_matches_hqq_scale():
    w = heavy_tailed(64, 512, seed=3)
    zero_only = hqq(w, bits=3, group_size=64, optimize_scale=False)
    both = hqq(w, bits=3, group_size=64)
    assert lp_error(w, both, 0.5) < lp_error(w, zero_only, 0.5)
    # without scale optimisation the stored scale is the min-max one (rounded to float16)
    start = hqq(w, bits=3, group_size=64, iters=0)
    assert torch.equal(zero_only.tensors["scale"], start.tensors["scale"])


@pytest.mark.parametrize("p", [0.5, 0.7, 1.0])
def test_lp_shrink_matches_hqq_package(p):
    """Our shrinkage is HQQ's generalised soft threshold (checked against the hqq package)."""
    optimize = pytest.importorskip("hqq.core.optimize")
    r = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.6
    r[:5] = torch.tensor([0.0, 1e-7, -1e-7, 0.5, -0.5])
    ours = lp_shrink(r, 4.0, p)
    theirs = optimize.shrink_lp_op(r[5:], 4.0, p)
    assert torch.allclose(ours[5:], theirs, rtol=1e-6, atol=1e-7)
    assert bool((ours.abs() <= r.abs()).all()) and bool((ours * r >= 0).all())
    assert ours[0] == 0 and ours[1] == 0 and ours[2] == 0


# --- calibration weighting -----------------------------------------------------------------------
def test_calib_lowers_activation_weighted_error():
    """Inputs with a few loud channels (as in LLMs): weighting by E[x^2] must lower the output
    error on fresh samples of the same inputs, against both calib-free hqq and RTN."""
    g = torch.Generator().manual_seed(0)
    w = heavy_tailed(128, 256, seed=5)
    loud = torch.ones(256)
    loud[torch.randperm(256, generator=g)[:8]] = 30.0
    x_cal = torch.randn(2048, 256, generator=g) * loud
    x_test = torch.randn(2048, 256, generator=g) * loud
    stats = ChannelStats.from_activations(x_cal)
    with_calib = hqq(w, bits=3, group_size=64, calib=stats)
    plain = hqq(w, bits=3, group_size=64)
    r = rtn(w, bits=3, group_size=64)

    def out_err(qt):
        return float((x_test.double() @ (w.double() - qt.dequantize().double()).t()).pow(2).mean())

    assert out_err(with_calib) < 0.8 * out_err(plain)
    assert out_err(with_calib) < 0.8 * out_err(r)
    # a bare 1-D tensor works the same as the stats object (its sqmean)
    same = hqq(w, bits=3, group_size=64, calib=stats.sqmean)
    assert all(torch.equal(same.tensors[k], with_calib.tensors[k]) for k in same.tensors)


def test_calib_conv_and_axis0():
    w = torch.randn(16, 8, 3, 3) * 0.1
    d = torch.rand(8) + 0.1
    qt = hqq(w, bits=4, group_size=24, calib=d)  # in_channels values, repeated over 3x3
    assert qt.shape == (16, 8, 3, 3)
    qt0 = hqq(torch.randn(32, 64), bits=4, group_size=32, axis=0, calib=torch.rand(64))
    assert qt0.params.axis == 0
    with pytest.raises(QuantizationError, match="calib has 7 channels"):
        hqq(torch.randn(32, 64), calib=torch.rand(7))
    with pytest.raises(QuantizationError, match=">= 0"):
        hqq(torch.randn(32, 64), calib=-torch.rand(64))


# --- storage ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [1, 0])
def test_quantized_metadata_saves_bits_and_round_trips(axis):
    w = heavy_tailed(256, 512, seed=7)
    plain = hqq(w, bits=4, group_size=64, axis=axis)
    both = hqq(w, bits=4, group_size=64, axis=axis, quant_scale=True, quant_zero=True)
    assert plain.bits_per_weight == pytest.approx(4.5)
    assert both.bits_per_weight == pytest.approx(4 + 2 * (8 + 64 / 128) / 64)
    e_plain = float((plain.dequantize() - w).norm() / w.norm())
    e_both = float((both.dequantize() - w).norm() / w.norm())
    assert e_both < e_plain * 1.05
    tensors, spec = both.to_state()
    assert spec["params"]["scale_quant"] == {"bits": 8, "group_size": 128}
    back = QTensor.from_state(tensors, json.loads(json.dumps(spec)))
    assert torch.equal(back.dequantize(), both.dequantize())
    with pytest.raises(SpecError, match="zero_quant quantizes a float zero"):
        hqq(w, quant_zero=True, zero="int")


def test_dtypes_shapes_and_determinism():
    w = heavy_tailed(37, 100, seed=1)  # 100 columns: padded groups
    a = hqq(w.to(torch.bfloat16), bits=3, group_size=64)
    b = hqq(w.to(torch.bfloat16), bits=3, group_size=64)
    assert a.dtype == torch.bfloat16 and a.dequantize().dtype == torch.bfloat16
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    for shape in [(300,), (7, 5, 3, 3)]:
        qt = hqq(torch.randn(shape) * 0.1, bits=2, group_size=16)
        assert qt.dequantize().shape == shape
    z = hqq(torch.zeros(4, 64), bits=4)
    assert bool((z.dequantize() == 0).all())
    c = torch.full((4, 64), 0.375)
    assert torch.equal(hqq(c, bits=2).dequantize(), c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_objective():
    w = heavy_tailed(256, 512, seed=2)
    cpu = hqq(w, bits=3, group_size=64)
    gpu = hqq(w.cuda(), bits=3, group_size=64)
    assert gpu.device.type == "cuda"
    assert lp_error(w, gpu.to("cpu"), 0.5) == pytest.approx(lp_error(w, cpu, 0.5), rel=0.01)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=9), "bits"),
        (dict(group_size=0), "group_size"),
        (dict(axis=2), "axis"),
        (dict(axis=0, group_size=48), "axis=0 needs group_size dividing"),
        (dict(iters=-1), "iters"),
        (dict(lp=1.5), "lp"),
        (dict(beta=0), "beta"),
        (dict(kappa=0.5), "kappa"),
        (dict(zero="none"), "'float' or 'int'"),
        (dict(quant_scale="yes"), "true/false"),
        (dict(round_zero=1), "round_zero must be true/false"),
        (dict(meta_bits=9, quant_scale=True), "metadata quantization bits"),
    ],
)
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(SpecError, match=match):
        hqq(torch.randn(16, 64), **kwargs)


def test_registered_and_recipe():
    assert METHODS.get("hqq") is hqq
    r = Recipe("hqq", {"bits": "3", "group": "64", "quant_scale": "true", "calib": "stats.safetensors"})
    r.check()  # the stats-file calib is left out of the probe
    assert r.options == {"bits": 3, "group_size": 64, "quant_scale": True, "calib": "stats.safetensors"}


# --- CLI --------------------------------------------------------------------------------------------
def _toy_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 128, generator=g) * 0.05,
        "model.layers.0.mlp.down_proj.weight": torch.randn(128, 256, generator=g) * 0.05,
        "model.norm.weight": torch.ones(128),
    }
    src = tmp_path / "model.safetensors"
    save_file(state, str(src))
    stats = {
        "model.layers.0.self_attn.q_proj": ChannelStats.from_activations(torch.randn(64, 128, generator=g)),
        "model.layers.0.mlp.down_proj": ChannelStats.from_activations(torch.randn(64, 256, generator=g) * 3),
    }
    stats_path = save_stats(tmp_path / "stats.safetensors", stats)
    return state, src, stats, stats_path


def test_cli_hqq_with_calib_and_quant_meta(tmp_path, capsys):
    state, src, stats, stats_path = _toy_model(tmp_path)
    dst = tmp_path / "q"
    rc = cli(["quantize", str(src), "-o", str(dst), "--method", "hqq", "--bits", "3", "--group-size", "32",
              "--iters", "6", "--quant-scale", "--quant-zero", "--calib", str(stats_path), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    with Checkpoint.open(dst) as ck:
        assert ck.recipe["method"] == "hqq"
        assert ck.recipe["options"] == {"bits": 3, "group_size": 32, "iters": 6, "quant_scale": True,
                                        "quant_zero": True, "calib": str(stats_path)}
        spec = ck.spec("model.layers.0.mlp.down_proj.weight")
        assert spec["params"]["scale_quant"] == {"bits": 8, "group_size": 128}
    loaded = bitsmith.load_qtensors(dst)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        module = name.removesuffix(".weight")
        want = hqq(state[name], bits=3, group_size=32, iters=6, quant_scale=True, quant_zero=True, calib=stats[module])
        assert torch.equal(loaded[name].dequantize(), want.dequantize())
    assert torch.equal(loaded["model.norm.weight"], state["model.norm.weight"])


def test_cli_hqq_axis0_and_int_zero(tmp_path):
    _, src, _, _ = _toy_model(tmp_path)
    dst = tmp_path / "q0"
    assert cli(["quantize", str(src), "-o", str(dst), "--method", "hqq", "--bits", "4", "--group-size", "64",
                "--axis", "0", "--zero", "int", "--no-progress"]) == 0
    with Checkpoint.open(dst) as ck:
        p = ck.spec("model.layers.0.self_attn.q_proj.weight")["params"]
        assert p["axis"] == 0 and p["zero"] == "int"


def test_cli_no_round_zero(tmp_path):
    state, src, _, _ = _toy_model(tmp_path)
    dst = tmp_path / "qf"
    assert cli(["quantize", str(src), "-o", str(dst), "--method", "hqq", "--no-round-zero", "--no-progress"]) == 0
    with Checkpoint.open(dst) as ck:
        assert ck.recipe["options"] == {"round_zero": False}
    name = "model.layers.0.mlp.down_proj.weight"
    got = bitsmith.load_qtensors(dst)[name].dequantize()
    assert torch.equal(got, hqq(state[name], round_zero=False).dequantize())
    assert not torch.equal(got, hqq(state[name]).dequantize())


def test_in_memory_calib_recipe(tmp_path):
    """``Recipe(calib={module: stats})`` quantizes each layer with its own stats, like a stats
    file does; the checkpoint's recipe notes the in-memory stats; a missing layer is an error."""
    state, src, stats, _ = _toy_model(tmp_path)
    recipe = Recipe("hqq", {"bits": 3, "group_size": 32, "calib": stats})
    bitsmith.quantize_file(src, tmp_path / "q", recipe)
    with Checkpoint.open(tmp_path / "q") as ck:
        assert ck.recipe["options"] == {"bits": 3, "group_size": 32, "calib": "<in-memory: 2 layers>"}
    loaded = bitsmith.load_qtensors(tmp_path / "q")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        want = hqq(state[name], bits=3, group_size=32, calib=stats[name.removesuffix(".weight")])
        assert torch.equal(loaded[name].dequantize(), want.dequantize())
        assert not torch.equal(loaded[name].dequantize(), hqq(state[name], bits=3, group_size=32).dequantize())
    partial = {"model.layers.0.self_attn.q_proj": stats["model.layers.0.self_attn.q_proj"]}
    with pytest.raises(QuantizationError, match="in-memory calibration stats have no entry for layer"):
        bitsmith.quantize_file(src, tmp_path / "q2", Recipe("hqq", {"calib": partial}))
    assert not (tmp_path / "q2").exists()
    # the recorded recipe cannot re-run without the stats: a clear error, not a missing file
    with Checkpoint.open(tmp_path / "q") as ck:
        recorded = ck.recipe["options"]
    with pytest.raises(SpecError, match="in-memory calibration stats when it was recorded"):
        bitsmith.quantize_file(src, tmp_path / "q3", Recipe("hqq", recorded))
    assert not (tmp_path / "q3").exists()


def test_cli_calib_missing_layer_is_exit_2(tmp_path, capsys):
    state, src, stats, _ = _toy_model(tmp_path)
    partial = save_stats(tmp_path / "partial.safetensors", {"model.layers.0.self_attn.q_proj": stats["model.layers.0.self_attn.q_proj"]})
    dst = tmp_path / "out"
    rc = cli(["quantize", str(src), "-o", str(dst), "--method", "hqq", "--calib", str(partial), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.down_proj" in err and "no entry for layer" in err
    assert not dst.exists() and not list(tmp_path.glob("out*"))
    # --calib with a method that takes none is a clear error too
    assert cli(["quantize", str(src), "-o", str(dst), "--method", "rtn", "--calib", str(partial), "--no-progress"]) == 2
    assert "no option 'calib'" in capsys.readouterr().err
