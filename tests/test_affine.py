"""The ``affine`` codec and the ``rtn`` method.

The reference below is an independent float64 NumPy implementation of min-max RTN as the
``rtn`` docstring specifies it (scale rounded up to the scale dtype, float zero rounded to
nearest, codes from the stored values); ``rtn`` must agree with it code for code."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.errors import QuantizationError, SpecError
from bitsmith.formats import CODECS, Packing, QTensor
from bitsmith.formats.affine import AffineCodec, AffineParams, encode_affine
from bitsmith.methods import METHODS, quantize_weight
from bitsmith.methods.rtn import rtn

NP_DTYPES = {"float16": np.float16, "float32": np.float32}
SIGNIFICAND = {"float16": 11, "bfloat16": 8, "float32": 24}


# --- the independent reference --------------------------------------------------------------
def np_round_up(x: np.ndarray, name: str) -> np.ndarray:
    """Smallest value of the scale dtype >= x (float64 in and out)."""
    if name == "bfloat16":  # float32 ceil, then clear the low 16 bits rounding up (x >= 0 here)
        f = x.astype(np.float32)
        f = np.where(f.astype(np.float64) < x, np.nextafter(f, np.float32(np.inf)), f)
        u = f.view(np.uint32)
        up = (u & 0xFFFF) != 0
        u = np.where(up, (u & 0xFFFF0000) + 0x10000, u).astype(np.uint32)
        return u.view(np.float32).astype(np.float64)
    dt = NP_DTYPES[name]
    r = x.astype(dt)  # NumPy rounds float64 -> float16/32 once, to nearest
    r = np.where(r.astype(np.float64) < x, np.nextafter(r, dt(np.inf)), r)
    return r.astype(np.float64)


def reference_rtn(w: torch.Tensor, bits: int, group_size: int | None, zero: str, scale_dtype: str):
    """Returns (codes [rows, ng, gs], scale [rows, ng], zero [rows, ng] or None, dequant [rows, cols])
    all float64, computed from the spec with NumPy."""
    x = w.detach().to(torch.float64).numpy()
    rows = x.shape[0] if x.ndim > 1 else 1
    x = x.reshape(rows, -1)
    cols = x.shape[1]
    gs = cols if group_size is None else min(group_size, cols)
    ng = -(-cols // gs)
    x = np.concatenate([x, np.repeat(x[:, -1:], ng * gs - cols, axis=1)], axis=1).reshape(rows, ng, gs)
    lo, hi = x.min(axis=2), x.max(axis=2)
    const = lo == hi
    m = 2**bits - 1
    z = None
    if zero == "none":
        a = np.maximum(np.abs(lo), np.abs(hi))
        s = 2 * a if bits == 1 else np.where(const, a, a / (2 ** (bits - 1) - 1))
        s = np_round_up(s, scale_dtype)
        zfix = 0.5 if bits == 1 else 2.0 ** (bits - 1)
        zz = np.full_like(s, zfix)
    elif zero == "int":
        lo2 = np.where(const, lo, np.minimum(lo, 0))
        hi2 = np.where(const, hi, np.maximum(hi, 0))
        s = np_round_up(np.where(const, np.abs(lo), (hi2 - lo2) / m), scale_dtype)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(s == 0, 0.0, np.clip(np.rint(-lo2 / s), 0, m))
        zz = z
    else:
        zmax = max(m, 2 ** (SIGNIFICAND[scale_dtype] - 3))
        s = np.where(const, np.abs(lo), np.maximum((hi - lo) / m, np.abs(lo) / zmax))
        s = np_round_up(s, scale_dtype)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(s == 0, 0.0, -lo / s).astype(NP_DTYPES[scale_dtype]).astype(np.float64)
        zz = z
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(s[..., None] == 0, 0.0, x / s[..., None])
    q = np.clip(np.rint(t + zz[..., None]), 0, m)
    deq = ((q - zz[..., None]) * s[..., None]).reshape(rows, ng * gs)[:, :cols]
    return q, s, z, deq


def assert_matches_reference(w, bits, group_size, zero, scale_dtype="float16", symmetric=False):
    qt = rtn(w, bits=bits, group_size=group_size, zero=zero, symmetric=symmetric, scale_dtype=scale_dtype)
    q_ref, s_ref, z_ref, deq_ref = reference_rtn(w, bits, group_size, zero, scale_dtype)
    rows, ng, gs = q_ref.shape
    assert qt.codec == "affine" and qt.params.group_size == gs and qt.params.bits == bits
    codes = Packing.dense(bits).unpack(qt.tensors["codes"], rows * ng * gs).view(rows, ng, gs)
    assert np.array_equal(codes.numpy().astype(np.float64), q_ref)
    assert np.array_equal(qt.tensors["scale"].to(torch.float64).numpy(), s_ref)
    if zero == "none":
        assert "zero" not in qt.tensors
    else:
        assert np.array_equal(qt.tensors["zero"].to(torch.float64).numpy(), z_ref)
    deq = qt.dequantize(torch.float32)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    d = deq.to(torch.float64).numpy().reshape(deq_ref.shape)
    # float32 (q - z) * s vs the exact float64 value: two float32 roundings at most
    np.testing.assert_allclose(d, deq_ref, rtol=2**-22, atol=1e-37)
    out = qt.dequantize()
    assert out.dtype == w.dtype and torch.equal(out, deq.to(w.dtype))
    return qt, deq


def randw(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.02).to(dtype)


# --- agreement with the reference ---------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("zero", ["float", "int", "none"])
def test_rtn_matches_reference_all_bits(bits, zero):
    # 37 rows, 576 columns with group 128: 4.5 groups per row -> padding
    assert_matches_reference(randw(37, 576, seed=bits), bits, 128, zero)


@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("zero", ["float", "int", "none"])
@pytest.mark.parametrize("shape", [(13, 256), (24, 12, 3, 3), (300,), (3, 5, 70)])
def test_rtn_matches_reference_shapes(group_size, zero, shape):
    assert_matches_reference(randw(*shape, seed=len(shape)), 4, group_size, zero)


@pytest.mark.parametrize("src", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("zero", ["float", "int", "none"])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_rtn_matches_reference_dtypes(src, zero, scale_dtype):
    assert_matches_reference(randw(19, 200, dtype=src, seed=3), 3, 64, zero, scale_dtype)


@pytest.mark.parametrize("zero", ["int", "none"])
def test_rtn_bfloat16_scales_match_reference(zero):
    assert_matches_reference(randw(11, 192, seed=5), 5, 64, zero, "bfloat16")


def test_rtn_symmetric_flag_is_zero_none():
    w = randw(8, 128)
    a = rtn(w, bits=4, symmetric=True)
    b = rtn(w, bits=4, zero="none")
    assert a.params == b.params and a.params.zero == "none"
    assert_matches_reference(w, 4, 64, "none", symmetric=True)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 150),
    bits=st.integers(1, 8),
    group_size=st.sampled_from([1, 3, 16, 32, 64, None]),
    zero=st.sampled_from(["float", "int", "none"]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
)
def test_rtn_matches_reference_property(rows, cols, bits, group_size, zero, seed, scale):
    w = randw(rows, cols, seed=seed) * scale
    assert_matches_reference(w, bits, group_size, zero)


# --- properties that do not need the reference ---------------------------------------------
@pytest.mark.parametrize("zero", ["float", "int", "none"])
def test_error_decreases_with_bits(zero):
    w = randw(64, 512, seed=7)
    errs = [float(((rtn(w, bits=b, zero=zero).dequantize() - w) ** 2).mean()) for b in range(1, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # a 4-bit g64 min-max grid has step <= range/15; its RMS error is ~step/sqrt(12)
    assert errs[3] ** 0.5 < 0.02 * 6 / 15 / math.sqrt(12) * 1.5


@pytest.mark.parametrize("bits", range(1, 9))
def test_asym_error_within_half_step(bits):
    w = randw(16, 256, seed=bits)
    qt = rtn(w, bits=bits, group_size=64)
    g = w.view(16, 4, 64)
    step = ((g.amax(-1) - g.amin(-1)) / (2**bits - 1)).unsqueeze(-1)
    err = (qt.dequantize() - w).abs().view(16, 4, 64)
    # half a step, plus the float16 rounding of scale (<= 2^-11 relative) and zero (<= 1/16 step)
    assert bool((err <= step * (0.5 + 1 / 16 + (2**bits) * 2**-11) + 1e-9).all())


def test_symmetric_levels():
    w = randw(4, 64, seed=1)
    qt = rtn(w, bits=1, symmetric=True, group_size=None)
    s = qt.tensors["scale"].float().unsqueeze(-1)
    d = qt.dequantize().view(4, 1, 64)
    assert bool(((d == s / 2) | (d == -s / 2)).all())  # 1-bit symmetric: +-scale/2
    assert torch.equal(d.sign(), torch.where(w.view(4, 1, 64) > 0, 1.0, -1.0))
    qt = rtn(w, bits=4, symmetric=True, group_size=None)
    codes = AffineCodec.unpack_codes(qt.params, qt.tensors, qt.shape)
    assert int(codes.min()) >= 1 and int(codes.max()) <= 15  # level 0 unused by min-max
    s = qt.tensors["scale"].float().unsqueeze(-1)
    assert torch.allclose(qt.dequantize().view(4, 1, 64), (codes.float() - 8) * s)


def test_padding_replicates_last_element():
    w = randw(5, 100, seed=2)
    qt = rtn(w, bits=4, group_size=64)  # 100 cols -> 2 groups, 28 padded codes per row
    codes = AffineCodec.unpack_codes(qt.params, qt.tensors, qt.shape).reshape(5, 128)
    assert torch.equal(codes[:, 100:], codes[:, 99:100].expand(5, 28))


def test_encode_affine_golden_bytes():
    # 2-bit, one group of 4, scale 1, float zero 0: codes 0,1,2,3 -> byte 0b11_10_01_00
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    p = AffineParams(bits=2, group_size=4, zero="float")
    qt = encode_affine(w, torch.ones(1, 1, dtype=torch.float16), torch.zeros(1, 1, dtype=torch.float16), p)
    assert qt.tensors["codes"].tolist() == [0xE4, 0]
    assert torch.equal(qt.dequantize(), w)
    # 3 columns in a group of 4: the pad repeats the last code (2); values clamp to the grid
    w = torch.tensor([[-5.0, 1.4, 2.6]])
    qt = encode_affine(w, torch.ones(1, 1, dtype=torch.float16), torch.zeros(1, 1, dtype=torch.float16), p)
    assert qt.tensors["codes"].tolist() == [0b11_11_01_00, 0]
    assert qt.dequantize().tolist() == [[0.0, 1.0, 3.0]]


def test_encode_affine_int_zero_and_symmetric():
    w = torch.tensor([[-2.0, -1.0, 0.0, 1.0, 5.0]])
    p = AffineParams(bits=3, group_size=5, zero="int")
    qt = encode_affine(w, torch.full((1, 1), 1.0, dtype=torch.float16), torch.tensor([[2]], dtype=torch.uint8), p)
    assert qt.dequantize().tolist() == [[-2.0, -1.0, 0.0, 1.0, 5.0]]
    p = AffineParams(bits=3, group_size=5, zero="none")  # zero point 4: levels -4..3 (x 0.5)
    qt = encode_affine(w, torch.full((1, 1), 0.5, dtype=torch.float16), None, p)
    assert qt.dequantize().tolist() == [[-2.0, -1.0, 0.0, 1.0, 1.5]]


def test_encode_affine_rejects_bad_metadata():
    w = torch.zeros(4, 64)
    p = AffineParams(bits=4, group_size=32, zero="float")
    s = torch.ones(4, 2, dtype=torch.float16)
    with pytest.raises(SpecError, match=r"scale must be float16\[4, 2\]"):
        encode_affine(w, torch.ones(4, 3, dtype=torch.float16), s, p)
    with pytest.raises(SpecError, match=r"zero must be float16\[4, 2\]"):
        encode_affine(w, s, s.float(), p)
    with pytest.raises(SpecError, match="pass None"):
        encode_affine(w, s, s, AffineParams(bits=4, group_size=32, zero="none"))
    with pytest.raises(QuantizationError, match="non-finite"):
        encode_affine(w, s * float("inf"), s, p)


# --- constant groups, underflow, overflow -------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("zero", ["float", "int", "none"])
@pytest.mark.parametrize("value", [0.0, 0.375, -3.0, 1.5e-5, -1024.0])
def test_constant_groups_exact(bits, zero, value):
    # every value here is exact in float16 (1.5e-5 as the float16 nearest to it)
    v = float(torch.tensor(value, dtype=torch.float16))
    w = torch.full((3, 96), v)
    w[1] = torch.linspace(-1, 1, 96)  # one ordinary row between constant ones
    d = rtn(w, bits=bits, group_size=32, zero=zero).dequantize()
    assert bool(torch.isfinite(d).all())
    assert torch.equal(d[0], w[0]) and torch.equal(d[2], w[2])


def test_all_zero_tensor():
    for zero in ("float", "int", "none"):
        for bits in (1, 4, 8):
            qt = rtn(torch.zeros(4, 64, dtype=torch.bfloat16), bits=bits, zero=zero)
            d = qt.dequantize()
            assert d.dtype == torch.bfloat16 and bool((d == 0).all())
            assert bool(torch.isfinite(qt.tensors["scale"].float()).all())


@pytest.mark.parametrize("zero", ["float", "int", "none"])
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_tiny_scales_do_not_underflow(zero, bits):
    # fp32 weights far below the float16 subnormal range: the scale must not round to 0 or inf
    w = randw(4, 128, seed=9) * 1e-9
    w[0, :64] = 1e-30
    qt = rtn(w, bits=bits, zero=zero)
    for t in qt.tensors.values():
        if t.is_floating_point():
            assert bool(torch.isfinite(t.float()).all())
    assert bool((qt.tensors["scale"].float() > 0).all())
    d = qt.dequantize()
    assert bool(torch.isfinite(d).all())
    assert float((d - w).abs().max()) <= 2**-24  # at most one float16 subnormal step


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_one_signed_groups(scale_dtype, bits):
    # [10, 10.01]: zero = -min/scale would be -150000 at 4 bits, beyond float16
    g = torch.Generator().manual_seed(bits)
    w = 10 + torch.rand(6, 64, generator=g) * 0.01
    w[3:] = -w[3:]
    qt = rtn(w, bits=bits, scale_dtype=scale_dtype, zero="float")
    assert bool(torch.isfinite(qt.tensors["zero"].float()).all())
    err = float((qt.dequantize() - w).abs().max())
    zmax = max(2**bits - 1, 2 ** (SIGNIFICAND[scale_dtype] - 3))
    step = max(0.01 / (2**bits - 1), 10.01 / zmax)
    assert err <= step * (0.5 + 1 / 16) * 1.01
    if scale_dtype == "float32":  # float32 zero: plain min-max
        assert err <= 0.01 / (2**bits - 1)


def test_int_zero_one_signed_groups_cover_the_data():
    w = 10 + torch.linspace(0, 1, 64).repeat(2, 1)
    w[1] = -w[1]
    d = rtn(w, bits=4, zero="int").dequantize()
    assert float((d - w).abs().max()) <= 11 / 15 / 2 * 1.01  # grid [0, 11] (or [-11, 0]) in 15 steps


def test_scale_overflow_is_an_error():
    w = torch.tensor([[-1e6, 1e6] * 32])
    with pytest.raises(QuantizationError, match="float32"):
        rtn(w, bits=1, scale_dtype="float16", zero="float")
    d = rtn(w, bits=1, scale_dtype="float32", zero="float").dequantize()
    assert torch.equal(d, w)


def test_float16_extremes_saturate():
    w = torch.tensor([[-65504.0, 65504.0] * 32], dtype=torch.float16)
    for bits in (4, 8):
        d = rtn(w, bits=bits, group_size=64).dequantize()
        assert d.dtype == torch.float16 and bool(torch.isfinite(d).all())
        assert float((d.float() - w.float()).abs().max()) <= 65504 * 2 / (2**bits - 1)


def test_rejects_bad_weights():
    with pytest.raises(QuantizationError, match="int32"):
        rtn(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(QuantizationError, match="uint8"):
        quantize_weight(torch.ones(4, 64, dtype=torch.uint8), "rtn")
    with pytest.raises(QuantizationError, match="NaN"):
        rtn(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(QuantizationError, match="ndim"):
        rtn(torch.tensor(1.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=0), "bits"),
        (dict(bits=9), "bits"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=-1), "group_size"),
        (dict(group_size="row"), "group_size"),
        (dict(zero="half"), "zero domain"),
        (dict(symmetric=True, zero="float"), "symmetric"),
        (dict(scale_dtype="float64"), "scale_dtype"),
    ],
)
def test_rtn_rejects_bad_options(kwargs, match):
    with pytest.raises(SpecError, match=match):
        rtn(randw(4, 64), **kwargs)


def test_group_size_options():
    w = randw(8, 96)
    for gs in (None, "channel", 96, 500):
        assert rtn(w, group_size=gs).params.group_size == 96
    conv = randw(16, 8, 3, 3)  # per channel of a conv: in*kh*kw columns
    assert rtn(conv, group_size=None).tensors["scale"].shape == (16, 1)
    assert rtn(conv, group_size=None).params.group_size == 72


def test_registered():
    assert METHODS.get("rtn") is rtn
    assert CODECS.get("affine") is AffineCodec


def test_deterministic():
    w = randw(33, 300, seed=11)
    a, b = rtn(w, bits=3, group_size=64), rtn(w, bits=3, group_size=64)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k])
    assert torch.equal(a.dequantize(), b.dequantize())
    assert torch.equal(a.dequantize().view(torch.int32), a.dequantize().view(torch.int32))


# --- state ---------------------------------------------------------------------------------
@pytest.mark.parametrize("zero", ["float", "int", "none"])
@pytest.mark.parametrize("shape", [(20, 576), (8, 4, 3, 3), (70,)])
def test_state_round_trip(zero, shape):
    qt = rtn(randw(*shape, dtype=torch.bfloat16), bits=3, group_size=128, zero=zero)
    tensors, spec = qt.to_state()
    spec2 = json.loads(json.dumps(spec))
    assert spec2 == {
        "codec": "affine",
        "shape": list(shape),
        "dtype": "bfloat16",
        "params": {
            "bits": 3,
            "group_size": min(128, math.prod(shape[1:]) if len(shape) > 1 else shape[0]),
            "zero": zero,
            "scale_dtype": "float16",
            "packing": {"layout": "dense", "bits": 3},
        },
    }
    back = QTensor.from_state({k: v.clone() for k, v in tensors.items()}, spec2)
    assert back.params == qt.params and back.shape == qt.shape and back.dtype == qt.dtype
    for k, v in tensors.items():
        assert torch.equal(back.tensors[k], v) and back.tensors[k].dtype == v.dtype
    assert torch.equal(back.dequantize().view(torch.int16), qt.dequantize().view(torch.int16))


def test_tensor_specs():
    p = AffineParams(bits=4, group_size=16, zero="int")
    specs = AffineCodec.tensor_specs(p, (8, 3, 3, 3))  # 27 cols -> 2 groups of 16
    assert specs["codes"].dtype == torch.uint8 and specs["codes"].shape == (8 * 2 * 16 // 2,)
    assert specs["scale"].dtype == torch.float16 and specs["scale"].shape == (8, 2)
    assert specs["zero"].dtype == torch.uint8 and specs["zero"].shape == (8, 2)
    p = AffineParams(bits=3, group_size=64, zero="none", scale_dtype="bfloat16")
    specs = AffineCodec.tensor_specs(p, (10, 100))
    assert set(specs) == {"codes", "scale"}
    assert specs["codes"].shape == (10 * 128 * 3 // 8,) and specs["scale"].dtype == torch.bfloat16


def _state():
    return rtn(randw(10, 100), bits=4, group_size=64, zero="float").to_state()


def _spec_with(**params):
    _, spec = _state()
    spec = json.loads(json.dumps(spec))
    spec["params"].update(params)
    return spec


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(bits=0), "bits must be an integer in 1..8, got 0"),
        (dict(bits=9), "bits must be an integer in 1..8, got 9"),
        (dict(bits="4"), "integer"),
        (dict(bits=4.0), "integer"),
        (dict(group_size=0), "group_size must be an integer >= 1"),
        (dict(group_size=-1), "group_size"),
        (dict(zero="weird"), "unknown affine zero domain 'weird'"),
        (dict(zero=None), "string"),
        (dict(scale_dtype="float64"), "unknown affine scale_dtype"),
        (dict(packing={"layout": "dense", "bits": 3}), "need packing"),
        (dict(packing={"layout": "base", "radix": 7, "codes_per_symbol": 21, "symbol_bits": 59}), "need packing"),
        (dict(packing={"layout": "dense", "bits": 4, "order": "msb"}), "unexpected fields"),
        (dict(packing=None), "packing must be an object"),
        (dict(extra=1), r"unknown params \['extra'\]"),
    ],
)
def test_from_state_rejects_bad_params(params, match):
    tensors, _ = _state()
    with pytest.raises(SpecError, match=match):
        QTensor.from_state(tensors, _spec_with(**params))


def test_from_state_rejects_bad_tensors():
    tensors, spec = _state()
    bad = dict(tensors, codes=tensors["codes"][:-1])
    with pytest.raises(SpecError, match=r"'codes' must be uint8\[640\]"):
        QTensor.from_state(bad, spec)
    bad = dict(tensors, scale=tensors["scale"][:, :1])
    with pytest.raises(SpecError, match=r"'scale' must be float16\[10, 2\]"):
        QTensor.from_state(bad, spec)
    bad = dict(tensors, zero=tensors["zero"].float())
    with pytest.raises(SpecError, match=r"'zero' must be float16"):
        QTensor.from_state(bad, spec)
    bad = {k: v for k, v in tensors.items() if k != "zero"}
    with pytest.raises(SpecError, match=r"missing tensors \['zero'\]"):
        QTensor.from_state(bad, spec)
    with pytest.raises(SpecError, match="unexpected tensors"):
        QTensor.from_state(dict(tensors, absmax=tensors["scale"]), spec)
    spec = json.loads(json.dumps(spec))
    spec["shape"] = [10, 101]  # 101 columns still fit 2 groups: same specs, accepted
    QTensor.from_state(tensors, spec)
    spec["shape"] = [11, 100]
    with pytest.raises(SpecError, match="codes"):
        QTensor.from_state(tensors, spec)


def test_params_defaults_and_direct_construction():
    p = AffineParams(bits=5, group_size=32)
    assert p.zero == "float" and p.scale_dtype == "float16" and p.packing == Packing.dense(5)
    assert AffineParams.from_json({"bits": 5, "group_size": 32}) == p
    with pytest.raises(SpecError, match="1..8"):
        AffineParams(bits=9, group_size=32)
    with pytest.raises(SpecError, match="dense"):
        AffineParams(bits=4, group_size=32, packing=Packing.dense(8))


# --- storage cost --------------------------------------------------------------------------
def test_bits_per_weight():
    w = torch.zeros(4096, 4096, dtype=torch.float16)
    w[:, ::2] = 1  # anything; the cost depends on the layout only
    q4 = rtn(w, bits=4, group_size=64, zero="float")  # fp16 scale and fp16 zero
    assert q4.bits_per_weight <= 4.51
    assert q4.nbytes == 4096 * 4096 // 2 + 2 * 2 * 4096 * 64
    q3 = rtn(w, bits=3, group_size=64, zero="float")
    assert q3.bits_per_weight <= 3.51
    assert rtn(w, bits=4, group_size=64).bits_per_weight == pytest.approx(4 + 24 / 64)  # default: uint8 zero
    assert q3.nbytes == 4096 * 4096 * 3 // 8 + 2 * 2 * 4096 * 64
    q3s = rtn(w[:64], bits=3, group_size=64, symmetric=True)
    assert q3s.bits_per_weight == pytest.approx(3.25)
    q4i = rtn(w[:64], bits=4, group_size=128, zero="int")
    assert q4i.bits_per_weight == pytest.approx(4 + 24 / 128)


# --- the rounding helpers rtn relies on (hand-computed float16 / bfloat16 neighbours) ---------
def test_round_nearest_to_is_correctly_rounded():
    from bitsmith.methods.rtn import round_nearest_to

    u = 2.0**-10  # float16 spacing in [1, 2)
    x = torch.tensor(
        [1 + u / 2 + 2**-40, 1 + u / 2, 1 + 3 * u / 2, -(1 + u / 2 + 2**-40), 2**-25 + 2**-60, 2**-25, 0.0, 200.03],
        dtype=torch.float64,
    )
    # a float32 detour would turn the first value into the tie 1 + u/2 and round it down to 1
    want = [1 + u, 1.0, 1 + 2 * u, -(1 + u), 2**-24, 0.0, 0.0, 200.0]
    got = round_nearest_to(x, torch.float16)
    assert got.dtype == torch.float16 and got.to(torch.float64).tolist() == want
    y = torch.tensor([1 + 2**-8 + 2**-40, 1 + 2**-8, 3 + 3 * 2**-7], dtype=torch.float64)
    got = round_nearest_to(y, torch.bfloat16)  # bfloat16 spacing in [1, 2) is 2^-7, in [2, 4) 2^-6
    assert got.to(torch.float64).tolist() == [1 + 2**-7, 1.0, 3 + 2**-5]  # ties to the even neighbour


def test_round_up_to():
    from bitsmith.methods.rtn import round_up_to

    x = torch.tensor([1 + 2**-40, 2**-40, 0.375, 0.0, 1 - 2**-40], dtype=torch.float64)
    assert round_up_to(x, torch.float16).to(torch.float64).tolist() == [1 + 2**-10, 2**-24, 0.375, 0.0, 1.0]
    assert round_up_to(x, torch.bfloat16).to(torch.float64).tolist() == [1 + 2**-7, 2**-40, 0.375, 0.0, 1.0]
    assert round_up_to(x, torch.float32).to(torch.float64).tolist() == [1 + 2**-23, 2**-40, 0.375, 0.0, 1.0]


def test_rtn_float_zero_is_rounded_once():
    # float64 weight whose float zero is 1 + 2^-11 + 2^-40: the float16 nearest is 1 + 2^-10,
    # a float32 detour rounds it to the tie 1 + 2^-11 and then down to 1
    lo = -(1 + 2**-11 + 2**-40)
    w = torch.tensor([[lo, 0.0, lo + 15]], dtype=torch.float64)  # scale (hi - lo) / 15 = 1 exactly
    qt, _ = assert_matches_reference(w, 4, None, "float")
    assert qt.tensors["zero"].item() == 1 + 2**-10


def test_non_contiguous_and_grad_weights():
    w = randw(96, 40, seed=4)
    a = rtn(w.t(), bits=4, group_size=32)  # a [40, 96] view with strides (1, 40)
    b = rtn(w.t().contiguous(), bits=4, group_size=32)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    p = torch.nn.Parameter(w.clone())
    assert torch.equal(rtn(p).dequantize(), rtn(w).dequantize())


# --- axis 0 (HQQ's column groups) and quantized metadata -------------------------------------
from bitsmith.formats.affine import MetaQuant, dequantize_meta, meta_shape, quantize_meta  # noqa: E402


def np_affine_axis0(x: np.ndarray, gs: int, scale: np.ndarray, zero: np.ndarray, bits: int):
    """float64 reference of axis 0: flat -> [gs, n], column j a group; returns (codes, dequant)."""
    cols = x.reshape(gs, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(scale == 0, 0.0, cols / scale)
    q = np.clip(np.rint(t + zero), 0, 2**bits - 1)
    return q, ((q - zero) * scale).reshape(x.shape)


def np_meta_quant(v: np.ndarray, bits: int, g: int):
    """float64 reference of the metadata quantization (min-max, float32 scale rounded up,
    float32 zero, last group short) -> (codes, scale, zero, reconstructed float32)."""
    flat = v.reshape(-1).astype(np.float64)
    n, m = flat.size, 2**bits - 1
    codes, out, ss, zz = np.empty(n), np.empty(n, np.float32), [], []
    for a in range(0, n, g):  # plain loop: the reference favours obviousness over speed
        grp = flat[a : a + g]
        lo, hi = grp.min(), grp.max()
        s = abs(lo) if hi == lo else (hi - lo) / m
        s32 = np.float32(s)
        if float(s32) < s:
            s32 = np.nextafter(s32, np.float32(np.inf))
        z32 = np.float32(0.0) if s32 == 0 else np.float32(-lo / float(s32))
        q = np.zeros(grp.size) if s32 == 0 else np.clip(np.rint(grp / float(s32) + float(z32)), 0, m)
        q = np.where(s32 == 0, np.clip(np.rint(float(z32)), 0, m), q)
        codes[a : a + g] = q
        out[a : a + g] = (q.astype(np.float32) - z32) * s32
        ss.append(s32)
        zz.append(z32)
    return codes, np.array(ss, np.float32), np.array(zz, np.float32), out.reshape(v.shape)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("shape, gs", [((24, 64), 16), ((10, 36), 40), ((8, 4, 3, 3), 32), ((96,), 12)])
def test_axis0_matches_reference(bits, shape, gs):
    w = randw(*shape, seed=bits)
    x = w.double().numpy().reshape(gs, -1)
    lo, hi = x.min(axis=0, keepdims=True), x.max(axis=0, keepdims=True)
    scale = torch.from_numpy((hi - lo) / (2**bits - 1)).to(torch.float16)
    zero = torch.from_numpy(-lo / scale.double().numpy()).to(torch.float16)
    p = AffineParams(bits=bits, group_size=gs, axis=0)
    qt = encode_affine(w, scale, zero, p)
    assert meta_shape(p, shape) == (1, math.prod(shape) // gs)
    q_ref, d_ref = np_affine_axis0(w.double().numpy(), gs, scale.double().numpy(), zero.double().numpy(), bits)
    codes = AffineCodec.unpack_codes(p, qt.tensors, qt.shape)
    assert codes.shape == (gs, math.prod(shape) // gs)
    assert np.array_equal(codes.numpy().astype(np.float64), q_ref)
    # stored order: code i belongs to flat element i
    flat_codes = Packing.dense(bits).unpack(qt.tensors["codes"], math.prod(shape))
    assert np.array_equal(flat_codes.numpy().astype(np.float64), q_ref.reshape(-1))
    np.testing.assert_allclose(qt.dequantize(torch.float32).double().numpy(), d_ref, rtol=2**-22, atol=1e-37)
    tensors, spec = qt.to_state()
    spec2 = json.loads(json.dumps(spec))
    assert spec2["params"]["axis"] == 0
    back = QTensor.from_state(tensors, spec2)
    assert back.params == p and torch.equal(back.dequantize(), qt.dequantize())


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_reads_hqq_codes_and_meta(axis, bits):
    """HQQ's own Quantizer (unpacked W_q, its inverted scale, float zero) put into our tensors
    dequantizes exactly as hqq's Quantizer.dequantize: same groups, same order, same shapes."""
    quantize = pytest.importorskip("hqq.core.quantize")
    w = randw(32, 128, seed=bits)
    gs = 64
    W_q, meta = quantize.Quantizer.quantize(
        w, nbits=bits, group_size=gs, axis=axis, optimize=False, bitpack=False, device="cpu", compute_dtype=torch.float32
    )
    meta["compute_dtype"] = torch.float32
    theirs = quantize.Quantizer.dequantize(W_q, meta)
    p = AffineParams(bits=bits, group_size=gs, axis=axis, scale_dtype="float32")
    ms = meta_shape(p, tuple(w.shape))
    tensors = {
        "codes": p.packing.pack(W_q.to(torch.uint8).reshape(-1)),  # row-major, as hqq holds it
        "scale": meta["scale"].float().reshape(ms),
        "zero": meta["zero"].float().reshape(ms),
    }
    ours = QTensor.from_state(tensors, {"codec": "affine", "shape": [32, 128], "dtype": "float32", "params": p.to_json()})
    assert torch.equal(ours.dequantize(), theirs)


@pytest.mark.parametrize("bits, g", [(8, 128), (8, 9), (4, 7), (1, 5), (8, 1000)])
def test_quantize_meta_matches_reference(bits, g):
    g_ = torch.Generator().manual_seed(g)
    v = torch.rand(23, 17, generator=g_, dtype=torch.float64) * 0.01 + 1e-4
    v[3, :] = 0.005  # a constant stretch
    mq = MetaQuant(bits=bits, group_size=g)
    got = quantize_meta(v, mq)
    codes, s, z, rec = np_meta_quant(v.numpy(), bits, g)
    assert np.array_equal(mq.packing.unpack(got["codes"], v.numel()).numpy().astype(np.float64), codes)
    assert np.array_equal(got["scale"].numpy(), s) and np.array_equal(got["zero"].numpy(), z)
    assert np.array_equal(dequantize_meta(got, mq, tuple(v.shape)).numpy(), rec)
    step = (v.max() - v.min()).item() / (2**bits - 1)
    assert float((torch.from_numpy(rec).double() - v).abs().max()) <= step * 0.5 * 1.001 + 1e-7


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("which", ["scale", "zero", "both"])
def test_quantized_metadata_round_trip(axis, which):
    w = randw(48, 256, seed=3)
    gs = 64
    p0 = AffineParams(bits=4, group_size=gs, axis=axis, scale_dtype="float32")
    x = w.double()
    groups = x.reshape(gs, -1).t() if axis == 0 else x.reshape(48, -1, gs).reshape(-1, gs)
    lo, hi = groups.amin(1), groups.amax(1)
    ms = meta_shape(p0, tuple(w.shape))
    scale = ((hi - lo) / 15).reshape(ms)
    zero = (-lo.reshape(ms) / scale)
    mq = MetaQuant(bits=8, group_size=32)
    p = AffineParams(
        bits=4, group_size=gs, axis=axis,
        scale_quant=mq if which != "zero" else None, zero_quant=mq if which != "scale" else None,
    )
    qt = encode_affine(w, scale if which != "zero" else scale.half(), zero if which != "scale" else zero.half(), p)
    # what the reader sees, computed independently from the reference metadata quantization
    s_seen = torch.from_numpy(np_meta_quant(scale.numpy(), 8, 32)[3]).double() if which != "zero" else scale.half().double()
    z_seen = torch.from_numpy(np_meta_quant(zero.numpy(), 8, 32)[3]).double() if which != "scale" else zero.half().double()
    xs = x.numpy()
    if axis == 0:
        q_ref, d_ref = np_affine_axis0(xs, gs, s_seen.numpy(), z_seen.numpy(), 4)
    else:
        g3 = xs.reshape(48, -1, gs)
        q_ref = np.clip(np.rint(g3 / s_seen.numpy()[..., None] + z_seen.numpy()[..., None]), 0, 15)
        d_ref = ((q_ref - z_seen.numpy()[..., None]) * s_seen.numpy()[..., None]).reshape(48, 256)
    codes = AffineCodec.unpack_codes(p, qt.tensors, qt.shape).numpy().astype(np.float64)
    assert np.array_equal(codes, q_ref)
    d = qt.dequantize(torch.float32).double().numpy()
    np.testing.assert_allclose(d, d_ref, rtol=2**-21, atol=1e-12)
    tensors, spec = qt.to_state()
    assert "scale" not in tensors if which != "zero" else "scale" in tensors
    spec2 = json.loads(json.dumps(spec))
    back = QTensor.from_state({k: v.clone() for k, v in tensors.items()}, spec2)
    assert back.params == p and torch.equal(back.dequantize(), qt.dequantize())
    # 8-bit scale and zero cost less than float32 ones, and the error barely moves
    plain = encode_affine(w, scale.float(), zero.float(), p0)
    assert qt.nbytes < plain.nbytes
    e_q = float((qt.dequantize() - w).pow(2).mean())
    e_p = float((plain.dequantize() - w).pow(2).mean())
    assert e_q < e_p * 1.15


def test_old_spec_without_new_fields_loads_and_is_unchanged():
    qt = rtn(randw(10, 100), bits=4, group_size=64, zero="float")
    tensors, spec = qt.to_state()
    assert set(spec["params"]) == {"bits", "group_size", "zero", "scale_dtype", "packing"}
    back = QTensor.from_state(tensors, json.loads(json.dumps(spec)))
    assert back.params.axis == 1 and back.params.scale_quant is None and back.params.zero_quant is None
    explicit = dict(spec["params"], axis=1, scale_quant=None, zero_quant=None)
    assert AffineParams.from_json(explicit) == back.params
    assert AffineParams.from_json(explicit).to_json() == spec["params"]


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(axis=2), "axis must be 0 or 1, got 2"),
        (dict(axis="0"), "integer"),
        (dict(axis=True), "integer"),
        (dict(axis=0, group_size=48), "axis=0 needs group_size dividing"),
        (dict(scale_quant={"bits": 9, "group_size": 128}), "scale_quant: metadata quantization bits"),
        (dict(scale_quant={"bits": 8, "group_size": 0}), "group_size must be an integer >= 1"),
        (dict(scale_quant={"bits": 8, "group": 128}), r"unknown params \['group'\]"),
        (dict(scale_quant=8), "params must be an object"),
        (dict(zero_quant={"bits": 8, "group_size": 128}, zero="int"), "zero_quant quantizes a float zero"),
    ],
)
def test_from_state_rejects_bad_axis_and_meta(params, match):
    tensors, _ = _state()
    with pytest.raises(SpecError, match=match):
        QTensor.from_state(tensors, _spec_with(**params))


def test_quantized_metadata_tensor_checks():
    w = randw(8, 128, seed=1)
    p = AffineParams(bits=4, group_size=64, scale_quant=MetaQuant(8, 4))
    qt = encode_affine(w, torch.full((8, 2), 0.01), torch.full((8, 2), 7.5, dtype=torch.float16), p)
    tensors, spec = qt.to_state()
    assert tensors["scale_codes"].shape == (16,) and tensors["scale_scale"].shape == (4,)
    with pytest.raises(SpecError, match=r"'scale_scale' must be float32\[4\]"):
        QTensor.from_state(dict(tensors, scale_scale=tensors["scale_scale"][:3]), spec)
    with pytest.raises(SpecError, match=r"missing tensors \['scale_codes'\]"):
        QTensor.from_state({k: v for k, v in tensors.items() if k != "scale_codes"}, spec)
    with pytest.raises(SpecError, match=r"scale must be a float tensor \[8, 2\]"):
        encode_affine(w, torch.ones(8, 3), torch.zeros(8, 2, dtype=torch.float16), p)
