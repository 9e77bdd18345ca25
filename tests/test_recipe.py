import pytest
import torch

from bitsmith.errors import SpecError
from bitsmith.methods.recipe import Override, Recipe


def test_default_plan_quantizes_linear_and_conv_weights_only():
    r = Recipe(method="rtn", options={"bits": 4, "group": 64})
    assert r.plan("model.layers.0.mlp.down_proj.weight", torch.float16, 2) == ("rtn", {"bits": 4, "group_size": 64})
    assert r.plan("unet.conv_in.weight", torch.float32, 4) is not None
    assert r.plan("model.norm.weight", torch.float16, 1) is None  # 1-D
    assert r.plan("model.embed_tokens.weight", torch.float16, 2) is None  # embeddings stay
    assert r.plan("position_ids", torch.int64, 2) is None  # not floating


def test_skip_and_override_last_match_wins():
    r = Recipe(
        method="nf",
        options={"levels": 16},
        skip=["lm_head"],
        overrides=[Override.parse("mlp=bits:3"), Override.parse("down_proj=method:rtn,bits:8,group_size:channel")],
    )
    assert r.plan("lm_head.weight", torch.float16, 2) is None
    assert r.plan("layers.0.mlp.up_proj.weight", torch.float16, 2) == ("nf", {"levels": 16, "bits": 3})
    assert r.plan("layers.0.mlp.down_proj.weight", torch.float16, 2) == ("rtn", {"bits": 8, "group_size": "channel"})


def test_override_of_non_floating_tensor_is_an_error():
    r = Recipe(overrides=[Override.parse("ids=levels:16")])
    with pytest.raises(SpecError, match="non-floating"):
        r.plan("input_ids", torch.int64, 2)


@pytest.mark.parametrize("bad", ["nopattern", "x=", "x=bits", "(=bits:3"])
def test_bad_override_text(bad):
    with pytest.raises(SpecError):
        Override.parse(bad)


def test_unknown_option_and_method_list_valid_choices():
    with pytest.raises(SpecError, match="valid:.*block_size"):
        Recipe(method="nf", options={"group_size": 64})
    with pytest.raises(SpecError, match="valid:.*rtn"):
        Recipe(method="gptq9")
    with pytest.raises(SpecError, match="no option"):
        Recipe(method="rtn", overrides=[Override.parse("x=levels:7")])


def test_recipe_json_round_trip():
    r = Recipe(method="rtn", options={"bits": 3}, skip=["lm_head"], overrides=[Override.parse("q_proj=bits:8")], dtype="bfloat16")
    r2 = Recipe.from_json(r.to_json())
    assert r2.to_json() == r.to_json()
