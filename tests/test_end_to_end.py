"""quantize -> save -> load -> dequantize is bit-identical to the in-memory result, for every
codec, width, level count, odd shapes, source dtypes, Linear and Conv2d weights."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitsmith
from bitsmith.api import dequantize_file, inspect_checkpoint
from bitsmith.cli.main import main as cli
from bitsmith.io.checkpoint import Checkpoint

CASES = (
    [("rtn", {"bits": b, "group_size": 64}) for b in range(1, 9)]
    + [("rtn", {"bits": b, "group_size": 128, "symmetric": True}) for b in (1, 2, 4, 8)]
    + [("rtn", {"bits": 4, "group_size": "channel", "zero": "int"})]
    + [("nf", {"levels": L, "block_size": 64}) for L in range(3, 33)]
    + [("nf", {"levels": L, "block_size": 128, "double_quant": True}) for L in (4, 7, 12, 16, 24, 32)]
)


def make_state(dtype):
    g = torch.Generator().manual_seed(0)
    return {
        "lin.weight": (torch.randn(37, 576, generator=g) * 0.05).to(dtype),  # rows % 10 != 0, 576 % 128 != 0
        "conv.weight": (torch.randn(13, 6, 3, 3, generator=g) * 0.1).to(dtype),  # Conv2d: [out, in*kh*kw]
        "lin.bias": torch.randn(37, generator=g).to(dtype),
        "embed_tokens.weight": torch.randn(11, 8, generator=g).to(dtype),
    }


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{o}" for m, o in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_bit_identical(tmp_path, method, options, dtype):
    state = make_state(dtype)
    src = tmp_path / "src.safetensors"
    save_file(state, str(src))
    recipe = bitsmith.Recipe(method, dict(options))
    report = bitsmith.quantize_file(src, tmp_path / "ckpt", recipe)
    assert {r.name for r in report.quantized} == {"lin.weight", "conv.weight"}
    loaded = bitsmith.load_qtensors(tmp_path / "ckpt")
    plain = bitsmith.load_state(tmp_path / "ckpt")
    for name in ("lin.weight", "conv.weight"):
        in_memory = bitsmith.quantize_tensor(state[name], method, **recipe.options)
        qt = loaded[name]
        assert qt.shape == tuple(state[name].shape) and qt.dtype == dtype
        for field, t in in_memory.tensors.items():
            assert torch.equal(qt.tensors[field], t), field
        assert torch.equal(qt.dequantize(), in_memory.dequantize())
        assert torch.equal(plain[name], in_memory.dequantize())
        assert plain[name].dtype == dtype
    for name in ("lin.bias", "embed_tokens.weight"):  # kept as they were
        assert torch.equal(plain[name], state[name])


def test_sharded_checkpoint_with_config_and_cli(tmp_path, capsys):
    state = {f"layers.{i}.weight": torch.randn(64, 256) for i in range(6)}
    src = tmp_path / "model"
    src.mkdir()
    save_file(dict(list(state.items())[:3]), str(src / "model-00001-of-00002.safetensors"))
    save_file(dict(list(state.items())[3:]), str(src / "model-00002-of-00002.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 256}))
    (src / "tokenizer.json").write_text("{}")
    dst = tmp_path / "q"
    rc = cli(["quantize", str(src), "-o", str(dst), "--method", "rtn", "--bits", "3", "--group-size", "32",
              "--max-shard-size", "20KB", "--override", "layers.5=bits:8", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tensors quantized" in out and "6 of 6" in out and "bits/weight" in out
    assert json.loads((dst / "config.json").read_text())["hidden_size"] == 256
    assert (dst / "tokenizer.json").exists()
    assert len(list(dst.glob("model-*.safetensors"))) > 1
    with Checkpoint.open(dst) as ck:
        assert ck.spec("layers.5.weight")["params"]["bits"] == 8
        assert ck.spec("layers.0.weight")["params"]["bits"] == 3
        assert ck.recipe["method"] == "rtn"
    info = inspect_checkpoint(dst)
    assert info["totals"]["quantized"] == 6
    rc = cli(["inspect", str(dst)])
    assert rc == 0 and "layers.5.weight" in capsys.readouterr().out
    out_file = tmp_path / "plain.safetensors"
    assert cli(["dequantize", str(dst), "-o", str(out_file), "--dtype", "float16", "--no-progress"]) == 0
    plain = load_file(str(out_file))
    ref = bitsmith.load_state(dst, dtype=torch.float16)
    assert set(plain) == set(state) and all(torch.equal(plain[k], ref[k]) for k in plain)
    rel = (plain["layers.5.weight"].float() - state["layers.5.weight"]).norm() / state["layers.5.weight"].norm()
    assert rel < 0.01  # 8-bit override really applied


def bad_source(tmp_path):
    src = tmp_path / "s.safetensors"
    save_file({"w": torch.randn(16, 64)}, str(src))
    return src


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--bits", "9", "--method", "rtn"], "bits"),
        (["--bits", "0", "--method", "rtn"], "bits"),
        (["--method", "rtn", "--group-size", "0"], "group"),
        (["--levels", "1"], "levels"),
        (["--levels", "257"], "levels"),
        (["--method", "nf", "--group-size", "64"], "no option"),
        (["--method", "magic"], "unknown method"),
        (["--override", "w=bits"], "KEY:VALUE"),
    ],
)
def test_cli_bad_options_exit_2_and_write_nothing(tmp_path, capsys, args, needle):
    src = bad_source(tmp_path)
    dst = tmp_path / "out"
    assert cli(["quantize", str(src), "-o", str(dst), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not dst.exists() and not list(tmp_path.glob("out*"))


def test_cli_refuses_existing_output_unless_overwrite(tmp_path, capsys):
    src = bad_source(tmp_path)
    dst = tmp_path / "out"
    assert cli(["quantize", str(src), "-o", str(dst), "--no-progress", "--method", "rtn"]) == 0
    assert cli(["quantize", str(src), "-o", str(dst), "--no-progress"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert Checkpoint.open(dst).recipe["method"] == "rtn"
    assert cli(["quantize", str(src), "-o", str(dst), "--no-progress", "--overwrite"]) == 0
    assert Checkpoint.open(dst).recipe["method"] == "nf"
    # a folder that is not a checkpoint is never replaced, even with --overwrite
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_text("x")
    assert cli(["quantize", str(src), "-o", str(other), "--no-progress", "--overwrite"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err and (other / "keep.jpg").exists()


def test_cli_no_quantizable_tensor(tmp_path, capsys):
    src = tmp_path / "s.safetensors"
    save_file({"norm.weight": torch.ones(8), "ids": torch.arange(4)}, str(src))
    assert cli(["quantize", str(src), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no quantizable tensor" in err and str(src) in err
    assert not (tmp_path / "o").exists()


def test_cli_non_floating_override_and_corrupt_source(tmp_path, capsys):
    src = tmp_path / "s.safetensors"
    save_file({"w": torch.randn(8, 64), "ids": torch.arange(64).view(8, 8)}, str(src))
    assert cli(["quantize", str(src), "-o", str(tmp_path / "o"), "--override", "ids=bits:4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "non-floating" in err and "ids" in err
    data = src.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])  # truncated
    assert cli(["quantize", str(broken), "-o", str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and not (tmp_path / "o2").exists()


def test_python_module_entry_point(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "bitsmith", "inspect", str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 2 and "missing" in r.stderr
