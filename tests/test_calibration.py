"""Calibration: streamed per-channel stats vs a direct float64 computation; the calibrate CLI."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.calibration import ChannelStats, collect_stats, load_stats, save_stats, token_windows
from bitsmith.calibration.stats import stats_source
from bitsmith.cli.main import main as cli
from bitsmith.errors import CheckpointError, QuantizationError


def reference_stats(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Direct float64 statistics of ``rows`` ``[tokens, channels]`` (written out, not via the library)."""
    x = rows.to(torch.float64)
    return {"absmax": x.abs().max(0).values, "absmean": x.abs().mean(0), "sqmean": (x * x).mean(0),
            "min": x.min(0).values, "max": x.max(0).values}


def assert_stats_equal(st: ChannelStats, rows: torch.Tensor) -> None:
    ref = reference_stats(rows)
    assert st.tokens == rows.shape[0]
    for field, want in ref.items():
        got = getattr(st, field).to(torch.float64)
        # stored float32: equal to the float64 reference up to one float32 rounding
        torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-30, msg=lambda m: f"{field}: {m}")


def test_stats_of_linears_and_convs_over_uneven_batches_match_float64():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    batches = [torch.randn(2, 5, 6) * 3, torch.randn(7, 6), torch.randn(1, 1, 6) + 4]  # 10 + 7 + 1 tokens
    st = collect_stats(mlp, batches, progress=False)
    x0 = torch.cat([b.reshape(-1, 6) for b in batches])
    x2 = F.relu(F.linear(x0.double(), mlp[0].weight.double(), mlp[0].bias.double()))
    assert set(st) == {"0", "2"}
    assert_stats_equal(st["0"], x0)
    # float32 model vs float64 reference input: compare against the float32 activations the model saw
    torch.testing.assert_close(st["2"].absmax.double(), x2.abs().amax(0), rtol=1e-5, atol=1e-6)
    assert st["2"].tokens == 18

    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    imgs = [torch.randn(2, 3, 5, 4), torch.randn(3, 3, 2, 2)]
    cs = collect_stats(conv, imgs, progress=False)
    rows = torch.cat([i.permute(0, 2, 3, 1).reshape(-1, 3) for i in imgs])  # every (n, h, w) one token
    assert cs["0"].channels == 3 and cs["2"].channels == 4
    assert_stats_equal(cs["0"], rows)
    with torch.no_grad():
        mid = torch.cat([F.relu(conv[0](i)).permute(0, 2, 3, 1).reshape(-1, 4) for i in imgs])
    assert_stats_equal(cs["2"], mid)


def test_quantized_runtime_modules_are_hooked_too():
    import functools

    import bitsmith
    from bitsmith.nn import QuantLinear

    torch.manual_seed(3)
    lin = nn.Linear(64, 8)
    q = QuantLinear.from_float(lin, functools.partial(bitsmith.quantize_tensor, method="nf"))
    model = nn.Sequential(q, nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 3, 64)
    st = collect_stats(model, [x], progress=False)
    assert set(st) == {"0", "2"}
    assert_stats_equal(st["0"], x.reshape(-1, 64))


def test_merge_of_two_runs_equals_one_run():
    torch.manual_seed(1)
    lin = nn.Linear(5, 2)
    a, b = torch.randn(9, 5), torch.randn(4, 5) * 10
    both = collect_stats(lin, [a, b], progress=False)[""]
    merged = collect_stats(lin, [a], progress=False)[""].merge(collect_stats(lin, [b], progress=False)[""])
    for f in ("absmax", "absmean", "sqmean", "min", "max"):
        torch.testing.assert_close(getattr(merged, f), getattr(both, f), rtol=1e-6, atol=0)
    assert merged.tokens == both.tokens == 13


@pytest.fixture(scope="module")
def smollm2_2layers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model


def test_smollm2_stats_equal_direct_float64_computation(smollm2_2layers):
    model = smollm2_2layers
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    batches = [{"input_ids": ids[:2], "use_cache": False}, {"input_ids": ids[2:], "use_cache": False}]
    full = collect_stats(model, batches, progress=False)
    stopped = collect_stats(model, batches, progress=False, stop_at="lm_head")
    assert len(full) == 2 * 7 + 1
    for name in full:  # cutting the forward at lm_head's input changes nothing
        for f in ("absmax", "absmean", "sqmean", "min", "max"):
            assert torch.equal(getattr(full[name], f), getattr(stopped[name], f)), (name, f)
    layer0, layer1 = model.model.layers
    x_q0, x_q1, x_head = [], [], []
    with torch.no_grad():  # the same batches as above (float32 matmuls round differently per batch shape)
        for b in batches:
            out = model(**b, output_hidden_states=True)
            x_q0.append(layer0.input_layernorm(model.model.embed_tokens(b["input_ids"])).reshape(-1, 576))
            x_q1.append(layer1.input_layernorm(out.hidden_states[1]).reshape(-1, 576))
            x_head.append(out.hidden_states[-1].reshape(-1, 576))  # after the final norm
    x_q0, x_q1, x_head = torch.cat(x_q0), torch.cat(x_q1), torch.cat(x_head)
    assert_stats_equal(full["model.layers.0.self_attn.q_proj"], x_q0)
    assert_stats_equal(full["model.layers.1.self_attn.q_proj"], x_q1)
    assert_stats_equal(full["lm_head"], x_head)
    # q/k/v (and gate/up) read one tensor: reduced once, the same stats for each
    for a, b in [("self_attn.q_proj", "self_attn.v_proj"), ("self_attn.k_proj", "self_attn.v_proj"),
                 ("mlp.gate_proj", "mlp.up_proj")]:
        assert torch.equal(full[f"model.layers.1.{a}"].sqmean, full[f"model.layers.1.{b}"].sqmean)
    assert full["model.layers.0.mlp.down_proj"].channels == 1536


def test_collect_bad_input():
    lin = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(QuantizationError, match="not a Linear/Conv2d module.*nope"):
        collect_stats(lin, [torch.randn(2, 4)], modules=["0", "nope"], progress=False)
    with pytest.raises(QuantizationError, match="no Linear/Conv2d module name matches"):
        collect_stats(lin, [torch.randn(2, 4)], modules="attn", progress=False)
    with pytest.raises(QuantizationError, match="never ran"):
        collect_stats(lin, [], progress=False)
    with pytest.raises(QuantizationError, match="stop_at"):
        collect_stats(lin, [torch.randn(2, 4)], stop_at="lm_head", progress=False)
    assert not lin[0]._forward_pre_hooks  # hooks removed after an error too
    with pytest.raises(QuantizationError, match="fewer than one sequence of 8"):
        token_windows(torch.arange(7), 8)
    w = token_windows(torch.arange(20), 6, samples=10)  # 3 complete windows, the rest dropped
    assert w.tolist() == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18))]
    assert token_windows(torch.arange(20), 6, samples=2).shape == (2, 6)


def test_stats_file_round_trip(tmp_path):
    torch.manual_seed(2)
    st = collect_stats(nn.Sequential(nn.Linear(3, 2)), [torch.randn(5, 3)], progress=False)
    path = save_stats(tmp_path / "s.safetensors", st, {"model": "m"})
    back = load_stats(path)
    assert back.keys() == st.keys() == {"0"} and back["0"].tokens == 5
    assert torch.equal(back["0"].sqmean, st["0"].sqmean)
    assert stats_source(path) == {"model": "m"}
    with pytest.raises(CheckpointError, match="non-empty name"):
        save_stats(tmp_path / "t.safetensors", {"": st["0"]})


def test_cli_calibrate_short_text(smollm2_dir, tmp_path, capsys):
    from bitsmith.eval.text import lee_corpus_text

    text = tmp_path / "calib.txt"
    text.write_text(lee_corpus_text()[:2000])
    out = tmp_path / "stats.safetensors"
    rc = cli(["calibrate", str(smollm2_dir), "--data", str(text), "-o", str(out), "--samples", "3", "--seq-len", "32",
              "--batch-size", "2", "--no-progress", "--json", str(tmp_path / "cal.json")])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "peak RSS" in printed and "3 x 32 tokens = 96 tokens" in printed
    stats = load_stats(out)
    assert len(stats) == 30 * 7 + 1  # every Linear, lm_head included
    assert {s.tokens for s in stats.values()} == {96}
    assert stats["model.layers.3.mlp.down_proj"].channels == 1536
    src = stats_source(out)
    assert src["samples"] == 3 and src["seq_len"] == 32
    summary = json.loads((tmp_path / "cal.json").read_text())
    assert summary["modules"] == 211 and summary["tokens"] == 96 and summary["peak_rss_bytes"] > 0
    # an existing output is not replaced without --overwrite
    assert cli(["calibrate", str(smollm2_dir), "--data", str(text), "-o", str(out), "--seq-len", "32", "--no-progress"]) == 2
    assert "output exists" in capsys.readouterr().err


def test_cli_calibrate_text_shorter_than_one_sequence(smollm2_dir, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("Only a handful of tokens here.")
    out = tmp_path / "stats.safetensors"
    rc = cli(["calibrate", str(smollm2_dir), "--data", str(text), "-o", str(out), "--seq-len", "64", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "fewer than one sequence of 64" in err and "short.txt" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [text]  # nothing written, no temp file left
