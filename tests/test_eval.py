"""Evaluation: perplexity against transformers' own loss, sliding windows, fidelity and per-layer
errors on models whose error is known by hand, and the `bitsmith eval` command."""
import json
import math

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith.cli.main import main as cli
from bitsmith.eval.fidelity import embedding_fidelity, split_sentences
from bitsmith.eval.layers import layer_errors
from bitsmith.eval.perplexity import _windows, perplexity, tokenize
from bitsmith.eval.text import lee_corpus_path, lee_corpus_text


def test_sliding_windows_score_every_token_once():
    for n, L, s in [(1000, 128, 64), (777, 100, 33), (300, 64, 1), (1000, 128, 127)]:
        seen = []
        for b, e, k in _windows(n, L, s):
            assert 1 <= k <= e - b - 1
            seen += list(range(e - k, e))
        assert seen == list(range(1, n))
    # stride == seq_len: a window's first token has no context inside it, as without a stride
    assert [k for _, _, k in _windows(1000, 128, 128)] == [127] * 7 + [103]


def test_identity_like_layers_have_hand_computable_errors():
    orig = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    quant = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        for m in orig:
            m.weight.copy_(torch.eye(8))
        quant[0].weight.copy_(1.1 * torch.eye(8))  # output off by exactly 10%
        quant[1].weight.copy_(torch.diag(torch.tensor([1.0] * 7 + [0.0])))  # drops one of 8 equal channels
    x = torch.ones(5, 8)
    errs = {e.name: e.rel_error for e in layer_errors(orig, quant, [x])}
    assert errs["0"] == pytest.approx(0.1, rel=1e-6)
    assert errs["1"] == pytest.approx(math.sqrt(1 / 8), rel=1e-6)  # judged on layer 0's real output


def test_fidelity_is_the_cosine_of_mean_pooled_embeddings():
    class Enc(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, input_ids, attention_mask):
            h = torch.zeros(*input_ids.shape, 2)
            h[..., 0] = 1.0
            h[..., 1] = self.scale
            return type("Out", (), {"last_hidden_state": h})()

    class Tok:
        def __call__(self, sentences, **kw):
            return {"input_ids": torch.ones(len(sentences), 3, dtype=torch.long),
                    "attention_mask": torch.ones(len(sentences), 3, dtype=torch.long)}

    sents = ["a sentence long enough to count.", "another sentence that is long enough."]
    res = embedding_fidelity(Enc(0.0), Enc(1.0), Tok(), sents)
    assert res.mean_cosine == pytest.approx(1 / math.sqrt(2)) and res.sentences == 2


def test_split_sentences():
    s = split_sentences("First sentence is here. Second one, also long!  short. Third\nline continues here?")
    assert s == ["First sentence is here.", "Second one, also long!", "Third line continues here?"]


def test_sliding_window_perplexity_matches_transformers_labels(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tokenize(tok, lee_corpus_text(), 700)
    res = perplexity(model, ids, seq_len=256, stride=128)
    # independent: the usual loop with labels = -100 on the context part
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.numel(), 128):
            end = min(begin + 256, ids.numel())
            trg = end - prev_end
            inp = ids[begin:end][None]
            labels = inp.clone()
            labels[:, :-trg] = -100
            out = model(inp, labels=labels)
            k = int((labels[:, 1:] != -100).sum())
            nll += float(out.loss) * k
            count += k
            prev_end = end
            if end == ids.numel():
                break
    assert res.predicted == count == ids.numel() - 1
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("ev") / "int4"
    bitsmith.quantize_file(smollm2_dir, dst, bitsmith.Recipe("rtn", {"bits": 4, "group_size": 64}))
    return dst


def test_cli_eval_with_reference_and_layers(smollm2_dir, smollm2_int4, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli(["eval", str(smollm2_int4), "--data", str(lee_corpus_path()), "--reference", str(smollm2_dir),
              "--seq-len", "128", "--max-tokens", "512", "--layers", "--json", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "4 non-overlapping windows of 128 tokens" in text and "per-layer output error" in text
    res = json.loads(out.read_text())
    assert res["reference_perplexity"]["perplexity"] < res["perplexity"]["perplexity"]
    layers = res["layers"]
    assert len(layers) == 30 * 7 and all(l["kind"] == "QuantLinear" for l in layers)
    assert layers[0]["rel_error"] >= layers[-1]["rel_error"] > 0


def test_cli_eval_encoder_fidelity(tmp_path, capsys):
    from bitsmith.models.zoo import minilm_path

    q = tmp_path / "minilm-nf4"
    bitsmith.quantize_file(minilm_path(), q, bitsmith.Recipe("nf", {"levels": 16}))
    rc = cli(["eval", str(q), "--data", str(lee_corpus_path()), "--reference", str(minilm_path()), "--no-progress",
              "--json", str(tmp_path / "f.json")])
    assert rc == 0
    f = json.loads((tmp_path / "f.json").read_text())["fidelity"]
    assert 0.9 < f["worst_cosine"] <= f["mean_cosine"] < 1.0 and f["sentences"] > 100


@pytest.mark.parametrize("case", ["empty", "short", "no-ref-layers", "no-tokenizer", "missing-data"])
def test_cli_eval_bad_input(case, smollm2_dir, smollm2_int4, tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text("" if case == "empty" else ("hello world. " * (3 if case == "short" else 200)))
    model = smollm2_int4
    args = []
    if case == "no-tokenizer":
        model = tmp_path / "notok"
        bitsmith.quantize_file(smollm2_dir / "model.safetensors", model, bitsmith.Recipe("nf"))
        (model / "config.json").write_text((smollm2_dir / "config.json").read_text())
    if case == "no-ref-layers":
        args = ["--layers"]
    if case == "missing-data":
        data = tmp_path / "nope.txt"
    rc = cli(["eval", str(model), "--data", str(data), "--seq-len", "128", "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert {"empty": "empty", "short": "fewer than one window", "no-ref-layers": "--reference",
            "no-tokenizer": "tokenizer", "missing-data": "nope.txt"}[case] in err


def test_recipe_text_specs():
    r = bitsmith.Recipe.parse("nf4")
    assert (r.method, r.options) == ("nf", {"levels": 16, "block_size": 64, "double_quant": True})
    r = bitsmith.Recipe.parse("rtn:bits=3,group=64")
    assert (r.method, r.options) == ("rtn", {"bits": 3, "group_size": 64})
    assert bitsmith.Recipe.parse("int4:group=128").options == {"bits": 4, "group_size": 128}
    assert bitsmith.Recipe.parse("hqq:bits=3").options == {"bits": 3}
    with pytest.raises(bitsmith.SpecError, match="aliases"):
        bitsmith.Recipe.parse("gptq:bits=3")  # not a method (yet): the error lists methods and aliases
    with pytest.raises(bitsmith.SpecError, match="KEY=VALUE"):
        bitsmith.Recipe.parse("rtn:bits")


def test_cli_compare_table_json_and_plot(smollm2_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    rc = cli(["compare", str(smollm2_dir), "--data", str(lee_corpus_path()), "--max-tokens", "256", "--seq-len", "128",
              "--recipe", "int8", "--recipe", "rtn:bits=3,group=64", "--layers-for", "rtn:bits=3,group=64",
              "--json", str(out), "--plot", str(png), "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "original" in text and "rtn:bits=3,group=64" in text and "worst layers" in text
    res = json.loads(out.read_text())
    orig, int8, int3 = res["rows"]
    assert int8["bits_per_weight"] == pytest.approx(8.375) and int3["bits_per_weight"] == pytest.approx(3.375)
    assert abs(int8["delta"]) < 0.02 < int3["delta"]  # 8 bits is near lossless, 3 bits is not
    assert len(res["layers"]) == 30 * 7 and png.stat().st_size > 10_000
    assert (tmp_path / "cache").is_dir() and len(list((tmp_path / "cache").iterdir())) == 2


def test_inspect_plot_and_missing_matplotlib(smollm2_int4, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    png = tmp_path / "i.png"
    assert cli(["inspect", str(smollm2_int4), "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000
    info = bitsmith.api.inspect_checkpoint(smollm2_int4)
    q = [t for t in info["tensors"] if t["codec"]]
    assert all(0 < t["rel_error"] < 0.2 for t in q)  # from the quantize report in the checkpoint
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert cli(["inspect", str(smollm2_int4), "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_cli_eval_gguf_backed_folder(tmp_path, capsys):
    pytest.importorskip("gguf")
    from bitsmith.models.zoo import smollm2_gguf

    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / smollm2_gguf().name).symlink_to(smollm2_gguf())
    rc = cli(["eval", str(folder), "--data", str(lee_corpus_path()), "--seq-len", "128", "--max-tokens", "256", "--no-progress"])
    assert rc == 0
    assert "2 non-overlapping windows of 128 tokens" in capsys.readouterr().out


def test_checkpoint_whose_config_does_not_match(smollm2_int4, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(smollm2_int4, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 31
    (bad / "config.json").write_text(json.dumps(cfg))
    rc = cli(["eval", str(bad), "--data", str(lee_corpus_path()), "--seq-len", "128", "--max-tokens", "256", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match" in err and "model.layers.30" in err


def test_compare_encoder_fidelity(tmp_path):
    from bitsmith.models.zoo import minilm_path

    res = bitsmith.compare(minilm_path(), lee_corpus_path(), ["int8", "int3"], cache=tmp_path, layers_for="int3")
    orig, int8, int3 = res["rows"]
    assert res["metric"] == "mean_cosine" and orig["mean_cosine"] == pytest.approx(1.0)
    assert int8["mean_cosine"] > 0.999 > 0.95 > int3["mean_cosine"]
    assert int3["delta"] == pytest.approx(int3["mean_cosine"] - 1.0)
    assert res["layers"][0]["rel_error"] > 0.1  # int3 layers err by more than 10% on real activations
