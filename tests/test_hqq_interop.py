"""HQQ interop, checked against the hqq package's own code (HQQLinear, BitPack, Quantizer).

Reference semantics: HQQ dequantizes ``(W_q - zero) * scale`` in the layer's compute dtype.
bitsmith computes it in float32 and rounds once; with a float32 compute dtype the two are
bit-identical, and hqq's own ``Quantizer.dequantize`` run in float32 on the stored fp16/bf16
metadata is too. In float16/bfloat16 compute HQQ rounds twice (after the subtraction and after the
product), so there it may differ from bitsmith's correctly rounded result by one unit in the last
place; with an integer zero the subtraction is exact and the two agree bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bitsmith
from bitsmith.cli.main import main as cli
from bitsmith.errors import CheckpointError, SpecError
from bitsmith.exporters.hqq import (
    hqq_layer_from_qtensor,
    is_hqq_checkpoint,
    linear_tag,
    qtensor_from_hqq_layer,
    read_hqq_checkpoint,
)
from bitsmith.exporters.hqq_packing import PACKINGS, packing_for_bits
from bitsmith.formats.affine import AffineParams, MetaQuant, encode_affine, group_rows, meta_shape
from bitsmith.methods import quantize_weight

hqq_quantize = pytest.importorskip("hqq.core.quantize", reason="hqq is not installed (pip install 'bitsmith[dev]')")
HQQLinear, Quantizer, BaseQuantizeConfig = hqq_quantize.HQQLinear, hqq_quantize.Quantizer, hqq_quantize.BaseQuantizeConfig
from hqq.core.bitpack import BitPack  # noqa: E402


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def hqq_layer(out_f: int, in_f: int, nbits: int, group_size: int, axis: int, compute_dtype: torch.dtype,
              seed: int = 0) -> HQQLinear:
    """A Linear quantized by hqq itself (its optimizer on, CPU)."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = torch.randn(out_f, in_f, generator=g) * 0.05
    cfg = BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=axis)
    return HQQLinear(lin, cfg, compute_dtype=compute_dtype, device="cpu")


def hqq_dequantize_f32(layer: HQQLinear) -> torch.Tensor:
    """hqq's own Quantizer.dequantize on the layer's stored tensors, computed in float32."""
    meta = dict(layer.meta)
    meta["compute_dtype"] = torch.float32
    return Quantizer.dequantize(layer.W_q, meta)


def load_into_hqq(state: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> HQQLinear:
    """hqq's reader: an empty HQQLinear filled by its own load_state_dict."""
    layer = HQQLinear(None, None, compute_dtype=compute_dtype, device="cpu")
    layer.load_state_dict(dict(state))
    return layer


def within_one_ulp(a: torch.Tensor, b: torch.Tensor) -> bool:
    """|a - b| <= one unit in the last place of a (same dtype)."""
    up = torch.nextafter(a, torch.full_like(a, float("inf")))
    down = torch.nextafter(a, torch.full_like(a, float("-inf")))
    return bool(((b >= down) & (b <= up)).all())


def axis0_qtensor(w: torch.Tensor, bits: int, gs: int, scale_dtype: str = "float16") -> "bitsmith.QTensor":
    """A min-max float-zero QTensor in HQQ's axis=0 grouping (built here, independently of any method)."""
    p = AffineParams(bits=bits, group_size=gs, zero="float", scale_dtype=scale_dtype, axis=0)
    g = group_rows(w, p).double()
    lo, hi = g.amin(1), g.amax(1)
    sdt = p.torch_scale_dtype
    scale = ((hi - lo) / (2**bits - 1)).to(sdt)
    zero = (-lo / scale.double()).to(sdt)
    ms = meta_shape(p, tuple(w.shape))
    return encode_affine(w, scale.reshape(ms), zero.reshape(ms), p)


def reference_dequant(layer_state: dict, nbits: int) -> torch.Tensor:
    """float32 ``(codes - zero) * scale`` from hqq's BitPack unpacker and the stored metadata."""
    packing = layer_state["packing"]
    name = "".join(chr(c) for c in packing.tolist())
    codes = getattr(BitPack, f"unpack_{name}")(layer_state["W_q"], dtype=torch.float32)
    shape = tuple(layer_state["shape"].tolist())
    gs, axis = int(layer_state["group_size"]), int(layer_state["axis"])
    rows = shape[0] * shape[1] // gs if axis == 1 else gs
    w = (codes[:rows] - layer_state["zero"].float()) * layer_state["scale"].float()
    return w.reshape(shape)


# --------------------------------------------------------------------------------------------
# packers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PACKINGS))
@pytest.mark.parametrize("rows", [40, 80, 23])
def test_packers_equal_hqq_bitpack(name, rows):
    p = PACKINGS[name]
    if not p.pads_rows and rows % p.chunks:
        with pytest.raises(SpecError, match="divisible"):
            p.pack(torch.zeros(rows, 8, dtype=torch.uint8))
        return
    q = torch.randint(0, 1 << p.bits, (rows, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    ours = p.pack(q)
    theirs = getattr(BitPack, f"pack_{name}")(q)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert torch.equal(p.unpack(theirs, rows), q)


def test_packers_golden_bytes():
    """Bit orders pinned by hand-computed words (independent of hqq)."""
    q4 = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]], dtype=torch.uint8)  # rows 0,1 pair with rows 2,3
    assert PACKINGS["4bit_u8"].pack(q4).tolist() == [[0x15, 0x26], [0x37, 0x48]]
    q2 = torch.tensor([[1], [2], [3], [0]], dtype=torch.uint8)
    assert PACKINGS["2bit_u8"].pack(q2).tolist() == [[0b01_10_11_00]]
    q1 = torch.tensor([[1], [0], [0], [0], [0], [0], [0], [1]], dtype=torch.uint8)
    assert PACKINGS["1bit_u8"].pack(q1).tolist() == [[0b1000_0001]]
    q3 = torch.arange(1, 8, dtype=torch.uint8).view(7, 1)  # 7 rows: padded to 10 with zeros
    word = sum(int(v) << (27 - 3 * k) for k, v in enumerate(range(1, 8)))
    assert PACKINGS["3bit_32"].pack(q3).tolist() == [[word]]
    assert PACKINGS["3bit_32"].unpack(torch.tensor([[word]], dtype=torch.int32), 7).view(-1).tolist() == list(range(1, 8))


def test_packing_for_unsupported_bits():
    with pytest.raises(SpecError, match="7-bit"):
        packing_for_bits(7)


# --------------------------------------------------------------------------------------------
# HQQ -> bitsmith, layer by layer
# --------------------------------------------------------------------------------------------
# every width x group size on axis 1; every width at group 64 and 3-bit at 32/128 on axis 0
CASES = ([(nbits, gs, 1) for nbits in (2, 3, 4, 8) for gs in (32, 64, 128)]
         + [(nbits, 64, 0) for nbits in (2, 3, 4, 8)] + [(3, 32, 0), (3, 128, 0)])


@pytest.mark.parametrize("nbits,gs,axis", CASES)
def test_hqq_quantized_layer_reads_bit_identically(nbits, gs, axis):
    # 90 output rows: not a multiple of 10 (3-bit pads its packed rows) nor of 64/128
    layer = hqq_layer(90, 256, nbits, gs, axis, torch.float16, seed=nbits * 1000 + gs + axis)
    state = layer.state_dict()
    qt = qtensor_from_hqq_layer("model.q_proj", state)
    assert qt.params.bits == nbits and qt.params.axis == axis and qt.shape == (90, 256) and qt.dtype == torch.float16
    ours32 = qt.dequantize(torch.float32)
    assert torch.equal(ours32, hqq_dequantize_f32(layer))
    assert torch.equal(ours32, reference_dequant(state, nbits))
    theirs = layer.dequantize()  # float16 arithmetic inside hqq: double rounding
    assert theirs.dtype == torch.float16 and within_one_ulp(qt.dequantize(torch.float16), theirs)


@pytest.mark.parametrize("nbits,axis", [(3, 1), (4, 0), (2, 1)])
def test_hqq_float32_layer_is_bit_identical_to_hqq_dequantize(nbits, axis):
    layer = hqq_layer(50, 128, nbits, 64, axis, torch.float32, seed=nbits)
    qt = qtensor_from_hqq_layer("l", layer.state_dict())
    assert torch.equal(qt.dequantize(torch.float32), layer.dequantize())


def test_hqq_ternary_layer_reads_as_2_bit_codes():
    layer = hqq_layer(40, 128, 1.58, 64, 1, torch.float32)
    qt = qtensor_from_hqq_layer("l", layer.state_dict())
    assert qt.params.bits == 2 and torch.equal(qt.dequantize(torch.float32), layer.dequantize())


@pytest.mark.parametrize("bits", [5, 6])
def test_5_and_6_bit_export_as_hqq_8bit_u8(bits):
    qt = quantize_weight(torch.randn(32, 128), "rtn", bits=bits, group_size=64, zero="float", scale_dtype="float32")
    layer = hqq_layer_from_qtensor("m.weight", qt)
    assert layer.packing.name == "8bit_u8" and int(layer.state()["nbits"]) == bits
    assert torch.equal(load_into_hqq(layer.state(), torch.float32).dequantize(), qt.dequantize(torch.float32))


def test_hqq_view_as_float_and_offloaded_meta():
    layer = hqq_layer(40, 128, 3, 64, 1, torch.float16)
    state = dict(layer.state_dict())
    expected = qtensor_from_hqq_layer("l", state).dequantize(torch.float32)
    viewed = {**state, "W_q": state["W_q"].view(torch.float16), "view_as_float": torch.tensor(1, dtype=torch.uint8)}
    assert torch.equal(qtensor_from_hqq_layer("l", viewed).dequantize(torch.float32), expected)
    stacked = {k: v for k, v in state.items() if k not in ("scale", "zero")}
    stacked["zero_scale"] = torch.stack((state["zero"], state["scale"]))
    assert torch.equal(qtensor_from_hqq_layer("l", stacked).dequantize(torch.float32), expected)


# --------------------------------------------------------------------------------------------
# bitsmith -> HQQ, layer by layer (loaded by HQQLinear.load_state_dict)
# --------------------------------------------------------------------------------------------
def bitsmith_qtensor(kind: str, w: torch.Tensor, bits: int, gs: int):
    if kind == "axis0":
        return axis0_qtensor(w, bits, gs)
    opts = {"int": {}, "float": {"zero": "float"}, "sym": {"symmetric": True}, "bf16": {"zero": "float", "scale_dtype": "bfloat16"}}[kind]
    return quantize_weight(w, "rtn", bits=bits, group_size=gs, **opts)


KINDS = ("int", "float", "sym", "bf16", "axis0")
EXPORT_CASES = ([(bits, 64, kind) for bits in (2, 3, 4, 8) for kind in KINDS]
                + [(bits, gs, kind) for bits in (3, 4) for gs in (32, 128) for kind in ("float", "axis0")])


@pytest.mark.parametrize("bits,gs,kind", EXPORT_CASES)
def test_export_loads_in_hqq_bit_identically(bits, gs, kind):
    w = torch.randn(90, 256, generator=torch.Generator().manual_seed(bits * 7 + gs)) * 0.05
    qt = bitsmith_qtensor(kind, w, bits, gs)
    layer = hqq_layer_from_qtensor("m.weight", qt)
    assert layer.compute_dtype == qt.params.torch_scale_dtype
    h = load_into_hqq(layer.state(), layer.compute_dtype)
    assert torch.equal(hqq_dequantize_f32(h), qt.dequantize(torch.float32))
    theirs, ours = h.dequantize(), qt.dequantize(layer.compute_dtype)
    if kind in ("int", "sym"):  # integer zero: HQQ's subtraction is exact, one rounding like ours
        assert torch.equal(theirs, ours)
    else:
        assert within_one_ulp(ours, theirs)
    # and back: the same values (an integer-valued zero comes back as zero="int")
    back = qtensor_from_hqq_layer("m", layer.state())
    assert torch.equal(back.dequantize(torch.float32), qt.dequantize(torch.float32))
    if kind in ("int", "float", "axis0", "bf16"):
        assert back.params == qt.params and all(torch.equal(back.tensors[k], qt.tensors[k]) for k in qt.tensors)


def test_export_float32_compute_equals_hqqlinear_forward():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    qt = quantize_weight(w, "rtn", bits=4, group_size=64, zero="float", scale_dtype="float32")
    h = load_into_hqq(hqq_layer_from_qtensor("m.weight", qt).state(), torch.float32)
    assert torch.equal(h.dequantize(), qt.dequantize(torch.float32))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    assert torch.equal(h(x), x @ qt.dequantize(torch.float32).t())


def test_export_quantized_meta_as_dequantized_float32():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    p = AffineParams(bits=4, group_size=64, zero="float", scale_quant=MetaQuant(8, 32), zero_quant=MetaQuant(8, 32))
    groups = group_rows(w, p).double()
    lo, hi = groups.amin(1), groups.amax(1)
    scale = ((hi - lo) / 15).float().view(64, 4)
    qt = encode_affine(w, scale, (-lo.float().view(64, 4) / scale), p)
    layer = hqq_layer_from_qtensor("m.weight", qt)
    assert layer.compute_dtype == torch.float32
    h = load_into_hqq(layer.state(), torch.float32)
    assert torch.equal(h.dequantize(), qt.dequantize(torch.float32))


# --------------------------------------------------------------------------------------------
# what HQQ cannot express, and bad HQQ files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,needle", [
    (lambda: quantize_weight(torch.randn(64, 128), "nf", levels=16, block_size=64), "codebook"),
    (lambda: quantize_weight(torch.randn(64, 128), "rtn", bits=7, group_size=64), "7-bit"),
    (lambda: quantize_weight(torch.randn(64, 100), "rtn", bits=4, group_size=64), "do not divide the 100 columns"),
    (lambda: quantize_weight(torch.randn(3, 64), "rtn", bits=4, group_size=64), "divisible by 2"),
    (lambda: quantize_weight(torch.randn(8, 4, 3, 3), "rtn", bits=4, group_size=36), "2-D"),
])
def test_export_refuses_what_hqq_cannot_express(make, needle):
    with pytest.raises(SpecError, match=needle) as e:
        hqq_layer_from_qtensor("m.weight", make())
    assert e.value.tensor == "m.weight"


def _good_state():
    return dict(hqq_layer(40, 128, 4, 64, 1, torch.float16).state_dict())


@pytest.mark.parametrize("mutate,needle,key", [
    (lambda s: s.pop("W_q"), "missing tensors", None),
    (lambda s: s.pop("scale"), "missing tensors", None),
    (lambda s: s.__setitem__("W_q", s["W_q"][:-1]), "needs uint8", "W_q"),
    (lambda s: s.__setitem__("packing", torch.tensor(list(b"5bit_u8"), dtype=torch.uint8)), "unknown HQQ packing", "packing"),
    (lambda s: s.__setitem__("compute_dtype", torch.tensor(list(b"torch.float64"), dtype=torch.uint8)), "unknown dtype", "compute_dtype"),
    (lambda s: s.__setitem__("compute_dtype", torch.tensor(list(b"__import__('os')"), dtype=torch.uint8)), "unknown dtype", "compute_dtype"),
    (lambda s: s.__setitem__("shape", torch.tensor([40, 100])), "does not divide", "group_size"),
    (lambda s: s.__setitem__("zero", s["zero"][:5]), "one per group", "zero"),
    (lambda s: s.__setitem__("quant_scale", torch.tensor(1, dtype=torch.uint8)), "quantized scale/zero", "quant_scale"),
    (lambda s: s.__setitem__("nbits", torch.tensor(5, dtype=torch.int32)), "does not fit packing", "nbits"),
])
def test_bad_hqq_layer_names_layer_and_tensor(mutate, needle, key):
    state = _good_state()
    mutate(state)
    with pytest.raises(CheckpointError, match=needle) as e:
        qtensor_from_hqq_layer("model.layers.0.mlp.up_proj", state)
    assert "model.layers.0.mlp.up_proj" in str(e.value)
    if key:
        assert e.value.tensor == f"model.layers.0.mlp.up_proj.{key}"


def test_linear_tag():
    assert linear_tag("model.layers.31.self_attn.k_proj") == "self_attn.k_proj"
    assert linear_tag("lm_head") == "lm_head"


# --------------------------------------------------------------------------------------------
# folders: hqq's own save formats, a real model end to end through the CLI
# --------------------------------------------------------------------------------------------
def save_hqq_folder(path: Path, layers: dict[str, HQQLinear], plain: dict[str, torch.Tensor], config: dict) -> None:
    """The layout transformers' save_pretrained / hqq's save_to_safetensors write: each layer's
    HQQLinear.state_dict() under its module prefix, next to the plain tensors."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    tensors = dict(plain)
    for name, layer in layers.items():
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in layer.state_dict().items()})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))


def test_read_hqq_saved_folder_and_qmodel_pt(tmp_path):
    layers = {"blocks.0.proj": hqq_layer(90, 128, 3, 64, 1, torch.float16, 1),
              "blocks.1.proj": hqq_layer(64, 128, 4, 32, 0, torch.bfloat16, 2)}
    plain = {"blocks.0.proj.bias": torch.randn(90), "norm.weight": torch.ones(128)}
    cfg = {"quantization_config": {"quant_method": "hqq", "quant_config": {}, "skip_modules": ["lm_head"]}}
    save_hqq_folder(tmp_path / "st", layers, plain, cfg)
    assert is_hqq_checkpoint(tmp_path / "st")
    got = bitsmith.load_qtensors(tmp_path / "st")
    assert set(got) == {"blocks.0.proj.weight", "blocks.1.proj.weight", "blocks.0.proj.bias", "norm.weight"}
    for name, layer in layers.items():
        assert torch.equal(got[f"{name}.weight"].dequantize(torch.float32), hqq_dequantize_f32(layer))
    assert torch.equal(got["blocks.0.proj.bias"], plain["blocks.0.proj.bias"])
    # hqq's save_quantized: {module: raw state dict} in qmodel.pt (read with weights_only=True)
    raw = {}
    for name, layer in layers.items():
        layer.encoded_state_dict = False
        raw[name] = layer.state_dict()
    raw["norm"] = {"weight": plain["norm.weight"]}
    (tmp_path / "pt").mkdir()
    torch.save(raw, tmp_path / "pt" / "qmodel.pt")
    got_pt = read_hqq_checkpoint(tmp_path / "pt")
    for name, layer in layers.items():
        assert torch.equal(got_pt[f"{name}.weight"].dequantize(torch.float32), hqq_dequantize_f32(layer))
    assert torch.equal(got_pt["norm.weight"], plain["norm.weight"])


def test_bad_hqq_folder_exit_2_and_nothing_written(tmp_path, capsys):
    layer = hqq_layer(40, 128, 4, 64, 1, torch.float16)
    save_hqq_folder(tmp_path / "src", {"a.proj": layer}, {}, {"quantization_config": {"quant_method": "hqq"}})
    from safetensors.torch import load_file, save_file

    t = load_file(tmp_path / "src" / "model.safetensors")
    t["a.proj.packing"] = torch.tensor(list(b"9bit_u8"), dtype=torch.uint8)
    save_file(t, str(tmp_path / "src" / "model.safetensors"))
    rc = cli(["quantize", str(tmp_path / "src"), "--from", "hqq", "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "a.proj.packing" in err and "unknown HQQ packing" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))


VOCAB = 4096


@pytest.fixture(scope="module")
def smollm2_two_layers(smollm2_dir, tmp_path_factory):
    """SmolLM2-135M cut to its first two decoder layers and the first 4096 tokens of its (tied)
    embedding: real weights and config, a tenth of the bytes."""
    from safetensors.torch import load_file, save_file

    dst = tmp_path_factory.mktemp("smol") / "smollm2-2l"
    dst.mkdir()
    sd = load_file(Path(smollm2_dir) / "model.safetensors")
    keep = {k: v for k, v in sd.items() if ".layers." not in k or k.split(".layers.")[1].split(".")[0] in ("0", "1")}
    keep["model.embed_tokens.weight"] = keep["model.embed_tokens.weight"][:VOCAB].clone()
    save_file(keep, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(smollm2_dir) / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    cfg["vocab_size"] = VOCAB
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in Path(smollm2_dir).iterdir():
        if f.name.startswith("tokenizer"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_smollm2_cli_export_then_import(smollm2_two_layers, tmp_path, capsys):
    src, ck, hq, back = smollm2_two_layers, tmp_path / "ck", tmp_path / "hqq", tmp_path / "back"
    assert cli(["quantize", str(src), "--method", "rtn", "--bits", "3", "--group-size", "64", "-o", str(ck), "--no-progress"]) == 0
    assert cli(["export", str(ck), "--to", "hqq", "-o", str(hq), "--no-progress"]) == 0
    cfg = json.loads((hq / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "hqq" and qc["quant_config"]["weight_quant_params"]["nbits"] == 3
    assert (hq / "tokenizer.json").is_file()
    ours = bitsmith.load_qtensors(ck)
    from safetensors.torch import load_file

    stored = load_file(hq / "model.safetensors")
    for name in [n for n in ours if isinstance(ours[n], bitsmith.QTensor)]:
        p = name[: -len("weight")]
        state = {k[len(p):]: v for k, v in stored.items() if k.startswith(p) and k[len(p):] != "bias"}
        h = load_into_hqq(state, torch.float16)
        assert torch.equal(h.dequantize(), ours[name].dequantize(torch.float16)), name  # integer zeros: exact even in fp16
    # v_proj [192, 576] in groups of 64: 1728 code rows, not a multiple of 10 -> 173 packed int32 rows
    assert stored["model.layers.1.self_attn.v_proj.W_q"].shape == (173, 64)
    # back: quantize --from hqq gives the same tensors, the same model outputs
    assert cli(["quantize", str(hq), "--from", "hqq", "-o", str(back), "--no-progress"]) == 0
    assert "no requantization" in capsys.readouterr().out
    again = bitsmith.load_qtensors(back)
    assert set(again) == set(ours)
    for name, t in ours.items():
        if isinstance(t, bitsmith.QTensor):
            assert again[name].params == t.params and all(torch.equal(again[name].tensors[k], t.tensors[k]) for k in t.tensors)
        else:
            assert torch.equal(again[name], t)
    assert "quantization_config" not in json.loads((back / "config.json").read_text())  # loads as bitsmith's


def test_smollm2_quantized_by_hqq_read_by_bitsmith(smollm2_two_layers, tmp_path):
    """hqq quantizes the real layers itself; `quantize --from hqq` + load_model computes what the
    float model with hqq's dequantized weights (float32) computes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sd = load_file(smollm2_two_layers / "model.safetensors")
    cfg = json.loads((smollm2_two_layers / "config.json").read_text())
    layers, plain = {}, {}
    for name, t in sd.items():
        if ".layers." in name and name.endswith("_proj.weight"):
            lin = torch.nn.Linear(t.shape[1], t.shape[0], bias=False)
            lin.weight.data = t.float()
            qcfg = BaseQuantizeConfig(nbits=3 if "mlp" in name else 4, group_size=64, axis=1)  # 4-bit: round_zero
            # hqq's optimizer takes seconds per layer on CPU: run it on one layer, min-max elsewhere
            qcfg["weight_quant_params"]["optimize"] = name == "model.layers.0.self_attn.v_proj.weight"
            layers[name[: -len(".weight")]] = HQQLinear(lin, qcfg, compute_dtype=torch.float32, device="cpu")
        else:
            plain[name] = t
    save_hqq_folder(tmp_path / "hqq", layers, plain, {**cfg, "quantization_config": {
        "quant_method": "hqq", "quant_config": BaseQuantizeConfig(nbits=4, group_size=64), "skip_modules": ["lm_head"]}})
    assert cli(["quantize", str(tmp_path / "hqq"), "--from", "hqq", "-o", str(tmp_path / "ck"), "--no-progress"]) == 0
    model = bitsmith.load_model(tmp_path / "ck")
    ref = AutoModelForCausalLM.from_pretrained(smollm2_two_layers, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, layer in layers.items():
            ref.get_submodule(name).weight.copy_(layer.dequantize())
        ids = torch.tensor([[1, 504, 3458, 282, 649, 314, 5, 2114]])
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_cli_export_refusal_exit_2_nothing_written(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"a.weight": torch.randn(64, 128), "b.weight": torch.randn(64, 128)}, str(tmp_path / "m.safetensors"))
    assert cli(["quantize", str(tmp_path / "m.safetensors"), "--method", "nf", "-o", str(tmp_path / "ck"), "--no-progress"]) == 0
    capsys.readouterr()
    rc = cli(["export", str(tmp_path / "ck"), "--to", "hqq", "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "a.weight" in err and "codebook" in err
    assert not list(tmp_path.glob("out*"))
