"""A diffusers UNet (Conv2d + attention Linears) quantized to a checkpoint and rebuilt from it
alone, with diffusers' own config-driven class (no real diffusion weights install offline, so
the model is small and randomly initialised)."""
import copy

import pytest
import torch

import bitsmith

diffusers = pytest.importorskip("diffusers")


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def test_unet_checkpoint_loads_without_the_original(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    recipe = bitsmith.Recipe("nf", {"levels": 32, "block_size": 64}, skip=["conv_in", "conv_out"])
    report = bitsmith.quantize_file(tmp_path / "unet", tmp_path / "q", recipe)
    q = bitsmith.load_model(tmp_path / "q")
    n_conv = sum(isinstance(m, bitsmith.QuantConv2d) for m in q.modules())
    n_lin = sum(isinstance(m, bitsmith.QuantLinear) for m in q.modules())
    assert type(q).__name__ == "UNet2DConditionModel" and n_conv > 10 and n_lin > 10
    assert n_conv + n_lin == report.summary()["tensors_quantized"]
    assert not isinstance(q.conv_in, bitsmith.QuantConv2d)  # skipped by the recipe
    # the same quantization done in memory on the original gives the same outputs
    ref = copy.deepcopy(unet)
    bitsmith.quantize_model(ref, recipe)
    x, t, enc = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(q(x, t, enc).sample, ref(x, t, enc).sample, rtol=1e-5, atol=1e-6)
