"""compressed-tensors export, read back by the compressed-tensors package's own decompressor and
config schema, and by transformers' ``from_pretrained`` (CPU)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors import safe_open  # noqa: E402

from bitsmith.api import export, quantize_file  # noqa: E402
from bitsmith.calibration import collect_stats  # noqa: E402
from bitsmith.cli.main import main  # noqa: E402
from bitsmith.errors import CheckpointError  # noqa: E402
from bitsmith.exporters.compressed_tensors import SIDECAR_NAME  # noqa: E402
from bitsmith.exporters.compressed_tensors_packing import pack_int32  # noqa: E402
from bitsmith.io.checkpoint import Checkpoint  # noqa: E402
from bitsmith.methods.recipe import Recipe  # noqa: E402
from bitsmith.models.loading import load_model  # noqa: E402
from bitsmith.models.saving import save_model  # noqa: E402
from bitsmith.models.smoothquant import smoothquant_model, smoothquant_recipe  # noqa: E402


# --------------------------------------------------------------------------------------------
# the packer: golden bits, and equal to compressed-tensors' own pack_to_int32
# --------------------------------------------------------------------------------------------
def test_pack_golden_bits():
    v = torch.arange(16, dtype=torch.uint8).reshape(2, 8)  # 4-bit: element 0 is the lowest nibble
    words = pack_int32(v, 4)
    assert words.dtype == torch.int32 and words.shape == (2, 1)
    assert words[0, 0].item() == 0x76543210
    assert words[1, 0].item() == 0xFEDCBA98 - 2**32  # bit 31 set: a negative int32
    # 3-bit: 11 elements of 7 = 33 bits -> element 10 straddles words 0 and 1
    w3 = pack_int32(torch.full((1, 11), 7, dtype=torch.uint8), 3)
    assert w3.shape == (1, 2) and w3[0, 0].item() == -1 and w3[0, 1].item() == 1
    # packed along dim 0: the columns are the bit streams
    z = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
    assert pack_int32(z, 4, packed_dim=0).tolist() == [[0x31, 0x42]]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("packed_dim", [0, 1])
def test_pack_equals_compressed_tensors(bits, packed_dim):
    g = torch.Generator().manual_seed(bits)
    unsigned = torch.randint(0, 1 << bits, (13, 45), generator=g, dtype=torch.int32)
    signed = (unsigned - (1 << (bits - 1))).to(torch.int8)  # what compressed-tensors packs
    theirs = pack_to_int32(signed, bits, packed_dim=packed_dim)
    assert torch.equal(pack_int32(unsigned.to(torch.uint8), bits, packed_dim), theirs)


# --------------------------------------------------------------------------------------------
# a tiny random Llama (GQA, tied embeddings) as a HF folder
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True,
                                   max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny") / "fp"
    model.save_pretrained(folder)
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    return {"model": model, "folder": folder, "ids": ids}


def _quiet_load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def _decompress_all(out):
    """Every quantized layer's weight through compressed-tensors' own decompressor, after
    validating config.json's quantization_config with its own schema."""
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qcfg)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    weights = {}
    for scheme in config.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
        for mod in scheme.targets:
            local = {k[len(mod) + 1:]: v for k, v in tensors.items() if k.startswith(mod + ".")}
            weights[mod] = compressor.decompress(local, scheme)["weight"]
    return config, weights


@pytest.mark.parametrize("spec,symmetric", [
    ({"bits": 4, "group_size": 32}, False),
    ({"bits": 4, "group_size": 32, "symmetric": True}, True),
    ({"bits": 8, "group_size": "channel"}, False),
    ({"bits": 3, "group_size": 16}, False),
    ({"bits": 8, "group_size": "channel", "symmetric": True}, True),
])
def test_weight_only_export_loads_in_compressed_tensors_and_transformers(tiny, tmp_path, spec, symmetric):
    ck, out = tmp_path / "q", tmp_path / "ct"
    quantize_file(tiny["folder"], ck, Recipe(method="rtn", options=spec))
    rep = export(ck, out, "compressed-tensors")
    assert len(rep.rows) == 14 and all(r["format"] == "pack-quantized" for r in rep.rows)
    config, weights = _decompress_all(out)
    assert config.format == "pack-quantized" and config.quantization_status == "compressed"
    with Checkpoint.open(ck) as src:
        for mod, w in weights.items():
            ours = src.dequantized(f"{mod}.weight", w.dtype)
            assert torch.equal(w, ours), mod  # same numbers, bit for bit, in the scale's dtype
    ids = tiny["ids"]
    with torch.no_grad():
        want = load_model(ck)(ids).logits
        # compressed-tensors 0.20's transformers path builds an asymmetric zero point unpacked
        # on meta, so a packed one (what its own compressor and vLLM write) loads with dequantize
        modes = [False, True] if symmetric else [True]
        for deq in modes:
            model = _quiet_load(out, quantization_config=transformers.CompressedTensorsConfig(dequantize=deq))
            got = model(ids).logits
            torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))


def _w8a8_checkpoint(tiny, tmp_path, smooth, activations="dynamic"):
    model = transformers.LlamaForCausalLM.from_pretrained(tiny["folder"], dtype=torch.float32).eval()
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    stats = collect_stats(model, [calib], modules=r"layers\.", progress=False)
    report = smoothquant_model(model, stats, smoothquant_recipe(smooth=smooth, activations=activations))
    ck = tmp_path / f"w8a8-{smooth}-{activations}"
    save_model(model, ck, recipe=report.recipe)
    return ck


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_w8a8_fused_export_loads_in_compressed_tensors_and_transformers(tiny, tmp_path, activations):
    ck, out = _w8a8_checkpoint(tiny, tmp_path, "fused", activations), tmp_path / "ct"
    rep = export(ck, out, "compressed-tensors")
    assert {r["format"] for r in rep.rows} == {"int-quantized"}
    config, weights = _decompress_all(out)
    scheme = next(iter(config.config_groups.values()))
    assert scheme.input_activations.strategy == ("token" if activations == "dynamic" else "tensor")
    assert scheme.input_activations.dynamic == (activations == "dynamic")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        assert w.dtype == torch.int8 and s.shape == (64, 1)
        assert ("model.layers.0.self_attn.q_proj.input_scale" in f.keys()) == (activations == "static")
    with Checkpoint.open(ck) as src:
        for mod, w in weights.items():
            assert torch.equal(w, src.dequantized(f"{mod}.weight", torch.float32)), mod
    ids = tiny["ids"]
    with torch.no_grad():
        ours = load_model(ck)(ids).logits
        fp = tiny["model"](ids).logits
        theirs = _quiet_load(out)(ids).logits
    # transformers fake-quantizes the activations with compressed-tensors' scale absmax/127.5
    # (ours and vLLM's: absmax/127), so the two differ by int8 rounding: far less than either
    # differs from the float model
    diff = float((theirs - ours).abs().max())
    assert diff < 0.05 * float(fp.abs().max())
    if activations == "static":
        assert diff < 1e-4  # one static scale: the very same activation codes


def test_unfused_scales_refused_or_sidecar(tiny, tmp_path, capsys):
    ck = _w8a8_checkpoint(tiny, tmp_path, "unfused")
    out = tmp_path / "ct"
    with pytest.raises(CheckpointError, match="migration scale"):
        export(ck, out, "compressed-tensors")
    assert not out.exists() and not list(tmp_path.glob("ct.partial*"))
    assert main(["export", str(ck), "--to", "compressed-tensors", "-o", str(out), "--no-progress"]) == 2
    assert "--smooth fused" in capsys.readouterr().err
    assert main(["export", str(ck), "--to", "compressed-tensors", "-o", str(out), "--unfused-scales", "sidecar",
                 "--no-progress"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not any("migration_scale" in k for k in index["weight_map"])
    with safe_open(str(out / SIDECAR_NAME), "pt") as f, Checkpoint.open(ck) as src:
        names = list(f.keys())
        assert len(names) == 14
        for n in names:
            assert torch.equal(f.get_tensor(n), src.tensor(n))
    _decompress_all(out)  # the rest is a valid compressed-tensors folder


def test_unexpressible_layers_are_refused(tiny, tmp_path):
    for name, recipe, match in [
        ("nf4", Recipe(method="nf"), "codec 'codebook'"),
        ("floatzero", Recipe(method="rtn", options={"bits": 4, "group_size": 32, "zero": "float"}), "float zero"),
        ("g48", Recipe(method="rtn", options={"bits": 4, "group_size": 48}), "does not divide"),
    ]:
        ck = tmp_path / name
        quantize_file(tiny["folder"], ck, recipe)
        with pytest.raises(CheckpointError, match=match):
            export(ck, tmp_path / f"{name}-ct", "compressed-tensors")
        assert not (tmp_path / f"{name}-ct").exists()
