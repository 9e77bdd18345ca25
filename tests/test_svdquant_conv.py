"""SVDQuant on Conv2d: LowRankQuantConv2d against float64 references that do not share its code
(F.unfold patches times the 2-D weight, an element-wise fake-quant loop), the checkpoint round
trip on a diffusers UNet, grouped convs refused, and real CRAFT convs against RTN."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.errors import CheckpointError, QuantizationError
from bitsmith.methods.rtn import rtn
from bitsmith.methods.svdquant import svdquant
from bitsmith.nn import RUNTIME_MODULES, LowRankQuantConv2d
from bitsmith.nn.low_rank_conv import low_rank_conv2d
from bitsmith.transforms.shift import fold_shift_bias

# kernel, stride, padding, dilation, padding_mode
GEOMETRIES = [
    ((1, 1), (1, 1), (0, 0), (1, 1), "zeros"),
    ((1, 1), (2, 2), (1, 1), (1, 1), "zeros"),
    ((3, 3), (2, 2), (1, 1), (1, 1), "zeros"),
    ((3, 3), (1, 1), (2, 2), (2, 2), "zeros"),
    ((3, 3), (1, 1), (1, 1), (1, 1), "reflect"),
    ((3, 1), (2, 1), (1, 0), (1, 1), "zeros"),
]
GEOMETRY_IDS = ["1x1", "1x1-s2-p1", "3x3-s2-p1", "3x3-d2-p2", "3x3-reflect", "3x1-s2"]
N, C, RANK = 24, 16, 5


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the many small float64 SVDs of a walk run 10-40x slower when LAPACK's
    threads compete with other processes on a loaded 2-core machine (numerics do not change)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _patches_reference(x, w2d, bias, kernel, stride, padding, dilation, padding_mode="zeros"):
    """conv2d as patches times the 2-D weight [N, C*kh*kw] (F.unfold orders a patch channel-major,
    kh*kw taps per channel, as the method's reshape does), float64 [B, N, Ho, Wo]."""
    if padding_mode != "zeros":
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)], mode=padding_mode)
        padding = (0, 0)
    h, w = x.shape[2:]
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C*kh*kw, L]
    y = torch.einsum("nk,bkl->bnl", w2d, cols).reshape(x.shape[0], -1, ho, wo)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def _float_conv(seed: int, kernel):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, C, *kernel, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64)
    s = torch.rand(C, generator=g, dtype=torch.float64) * 3 + 0.2
    x = torch.randn(2, C, 11, 9, generator=g, dtype=torch.float64)
    ws = (w * s.view(1, C, 1, 1)).reshape(N, -1)  # smoothing: every tap of channel c times s[c]
    u, sv, vh = torch.linalg.svd(ws, full_matrices=False)
    l1, l2 = u[:, :RANK] * sv[:RANK], vh[:RANK]
    return w, b, s, x, l1, l2, (ws - l1 @ l2).reshape(w.shape)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_exact_without_quantization(geometry):
    """Unquantized residual R = W diag(s) - L1 L2 (float64): the module's two-branch formula is
    F.conv2d(x, W) + b (1e-10 relative) for every geometry, and equals the patch product too."""
    kernel, stride, padding, dilation, mode = geometry
    w, b, s, x, l1, l2, r = _float_conv(1, kernel)
    y = low_rank_conv2d(x, r, l2, l1, b, stride=stride, padding=padding, dilation=dilation, padding_mode=mode, smooth=s)
    if mode == "zeros":
        ref = F.conv2d(x, w, b, stride, padding, dilation)
    else:
        ref = F.conv2d(F.pad(x, [p for p in reversed(padding) for _ in range(2)], mode=mode), w, b, stride, 0, dilation)
    assert y.dtype == torch.float64 and y.shape == ref.shape
    assert (y - ref).norm() / ref.norm() < 1e-10
    patches = _patches_reference(x, w.reshape(N, -1), b, kernel, stride, padding, dilation, mode)
    assert (y - patches).norm() / ref.norm() < 1e-10
    # the low-rank factors transposed (a [C*kh*kw] column order other than channel-major) is wrong
    if kernel != (1, 1):
        l2_wrong = l2.reshape(RANK, C, -1).transpose(1, 2).reshape(RANK, -1)
        y_bad = low_rank_conv2d(x, r, l2_wrong, l1, b, stride=stride, padding=padding, dilation=dilation,
                                padding_mode=mode, smooth=s)
        assert (y_bad - ref).norm() / ref.norm() > 1e-3


@pytest.mark.parametrize("shift_kind,lr_input", [("scalar", "unshifted"), ("vector", "unshifted"), ("vector", "shifted")])
def test_shift_on_1x1_conv_is_exact(shift_kind, lr_input):
    """A 1x1 unpadded conv is a Linear per pixel: the folded bias absorbs the shift exactly."""
    w, b, s, x, l1, l2, r = _float_conv(2, (1, 1))
    shift = torch.tensor([0.171875], dtype=torch.float64) if shift_kind == "scalar" else torch.linspace(-0.3, 0.5, C, dtype=torch.float64)
    folded = fold_shift_bias(b, shift=shift, smooth=s, residual=r.reshape(N, C), lora_down=l2, lora_up=l1,
                             low_rank_input=lr_input)
    y = low_rank_conv2d(x, r, l2, l1, folded, smooth=s, shift=shift, low_rank_input=lr_input)
    ref = F.conv2d(x, w, b)
    assert (y - ref).norm() / ref.norm() < 1e-10
    y_unfolded = low_rank_conv2d(x, r, l2, l1, b, smooth=s, shift=shift, low_rank_input=lr_input)
    assert (y_unfolded - ref).norm() / ref.norm() > 1e-4  # the fold is what makes it exact


def _module_from(res, conv: nn.Conv2d, **options) -> LowRankQuantConv2d:
    return LowRankQuantConv2d.like(conv, res.residual, res.lora_down, res.lora_up, res.bias, smooth=res.smooth,
                                   shift=res.shift, act_unsigned=res.act_unsigned, **options)


def _conv_layer(kernel, stride, padding, seed=3):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(32, 40, kernel, stride=stride, padding=padding)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
        conv.weight[:, 5] *= 8  # an input channel with large weights
        conv.bias.copy_(torch.randn(40, generator=g) * 0.1)
    x = torch.randn(2, 32, 10, 12, generator=g)
    x[:, 7] *= 20  # an activation outlier channel
    return conv, x


@pytest.mark.parametrize("kernel,stride,padding", [((1, 1), 1, 0), ((3, 3), 2, 1)], ids=["1x1", "3x3-s2-p1"])
def test_module_int8_residual_equals_dequantized_reference(kernel, stride, padding):
    """The module built from svdquant (int8 residual, 16-bit activations) on float64 input equals
    conv(x, (Q(R) + L1 L2) / s) + b, the effective weight assembled here from the stored tensors
    (1e-10), and is close to the float conv (8-bit residual)."""
    conv, x = _conv_layer(kernel, stride, padding)
    absmax = x.abs().amax(dim=(0, 2, 3))
    res = svdquant(conv.weight.detach(), act_absmax=absmax, bias=conv.bias.detach(), rank=6, bits=8, group_size=32)
    mod = _module_from(res, conv)
    x64 = x.double()
    y = mod(x64)
    q_r = res.residual.dequantize(torch.float64).reshape(40, -1)
    w_eff = (q_r + res.lora_up.double() @ res.lora_down.double()) / res.smooth.double().repeat_interleave(kernel[0] * kernel[1])
    ref = F.conv2d(x64, w_eff.reshape(conv.weight.shape), res.bias.double(), stride, padding)
    assert y.dtype == torch.float64
    assert (y - ref).norm() / ref.norm() < 1e-10
    exact = F.conv2d(x64, conv.weight.double(), conv.bias.double(), stride, padding)
    assert (y - exact).norm() / exact.norm() < 0.01
    y32 = mod(x)  # float32 input: the same within float32 rounding
    assert y32.dtype == torch.float32 and (y32.double() - ref).norm() / ref.norm() < 1e-5


def _sim_act_quant_pixels(x: torch.Tensor, bits: int, group: int | None, unsigned: bool) -> torch.Tensor:
    """Independent float64 fake quantization of [B, C, H, W] per pixel, groups of ``group``
    consecutive channels (loops over groups; round half to even, clamp)."""
    c = x.shape[1]
    g = c if group is None else group
    out = torch.empty_like(x)
    for start in range(0, c, g):
        xg = x[:, start:start + g]
        if unsigned:
            lo, hi = 0, 2**bits - 1
            sc = xg.amax(1, keepdim=True).clamp_min(0) / hi
        else:
            hi = 2 ** (bits - 1) - 1
            lo = -hi
            sc = xg.abs().amax(1, keepdim=True) / hi
        safe = torch.where(sc > 0, sc, torch.ones_like(sc))
        out[:, start:start + g] = torch.round(xg / safe).clamp(lo, hi) * sc
    return out


@pytest.mark.parametrize("kernel,stride,padding,act_bits,act_group,shift", [
    ((3, 3), 2, 1, 4, 16, None),
    ((3, 3), 1, 1, 8, None, None),
    ((1, 1), 1, 0, 4, 16, 0.171875),
], ids=["3x3-s2-a4g16", "3x3-a8", "1x1-a4-shift"])
def test_module_matches_fake_quant_simulation(kernel, stride, padding, act_bits, act_group, shift):
    """int4 g32 residual, 4/8-bit activations: the module equals a float64 simulation (patches
    times the dequantized weights, activations quantized by an element-wise loop)."""
    conv, x = _conv_layer(kernel, stride, padding, seed=4)
    if shift is not None:
        x = F.gelu(x)
    absmax = x.abs().amax(dim=(0, 2, 3))
    res = svdquant(conv.weight.detach(), act_absmax=absmax, bias=conv.bias.detach(), rank=6, group_size=32,
                   act_bits=act_bits, act_group_size=act_group, shift=shift)
    mod = _module_from(res, conv, act_bits=act_bits, act_group_size=act_group)
    x64 = x.double()
    y = mod(x64)
    s = res.smooth.double().view(1, -1, 1, 1)
    xs = x64 / s
    xm = xs if res.shift is None else xs + res.shift.double().view(1, -1, 1, 1) / s
    xm = _sim_act_quant_pixels(xm, act_bits, act_group, res.act_unsigned)
    q_r = res.residual.dequantize(torch.float64).reshape(40, -1)
    l1l2 = res.lora_up.double() @ res.lora_down.double()
    geo = (kernel, (stride, stride), (padding, padding), (1, 1))
    ref = _patches_reference(xm, q_r, res.bias.double(), *geo) + _patches_reference(xs, l1l2, None, *geo)
    assert (y - ref).norm() / ref.norm() < 1e-10
    exact = F.conv2d(x64, conv.weight.double(), conv.bias.double(), stride, padding)
    assert (y - exact).norm() / exact.norm() < (0.3 if act_bits == 4 else 0.1)
    assert (mod(x).double() - ref).norm() / ref.norm() < 1e-2  # float32 input (a code may round the other way)


def test_refusals():
    conv = nn.Conv2d(16, 24, 3, padding=1, groups=4)
    qt = rtn(conv.weight.detach(), bits=4, group_size=36)
    with pytest.raises(QuantizationError, match="groups=4 is not supported"):
        LowRankQuantConv2d.like(conv, qt, None, None, None)
    padded = nn.Conv2d(16, 24, 1, padding=1)
    res = svdquant(padded.weight.detach(), act_absmax=torch.ones(16), rank=2, shift=0.1)  # the method allows a 1x1 shift
    with pytest.raises(QuantizationError, match="unpadded 1x1"):
        _module_from(res, padded)
    conv3 = nn.Conv2d(16, 24, 3, padding=1)
    res3 = svdquant(conv3.weight.detach(), act_absmax=torch.ones(16), rank=2)
    with pytest.raises(QuantizationError, match="unpadded 1x1"):
        LowRankQuantConv2d.like(conv3, res3.residual, res3.lora_down, res3.lora_up, None, shift=0.1)
    with pytest.raises(QuantizationError, match=r"lora_down must be \[r, 144\]"):
        LowRankQuantConv2d.like(conv3, res3.residual, res3.lora_down[:, :16], res3.lora_up, None)
    mod = LowRankQuantConv2d.like(conv3, res3.residual, res3.lora_down, res3.lora_up, None)
    info, tensors = mod.checkpoint_info()
    assert RUNTIME_MODULES.get("low_rank_conv2d") is LowRankQuantConv2d and info["kind"] == "low_rank_conv2d"
    with pytest.raises(CheckpointError, match="replaces a Conv2d"):
        LowRankQuantConv2d.from_checkpoint(nn.Linear(144, 24), res3.residual, None, info, tensors)
    with pytest.raises(CheckpointError, match="unknown attributes"):
        LowRankQuantConv2d.from_checkpoint(conv3, res3.residual, None, {**info, "stride": 2}, tensors)


# ----------------------------------------------------------------------------------------------
# the walker on a diffusers UNet, checkpoint round trip
# ----------------------------------------------------------------------------------------------
def test_unet_walk_checkpoint_round_trip(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from bitsmith.calibration.collect import collect_stats
    from bitsmith.models.loading import load_model
    from bitsmith.models.saving import save_model
    from bitsmith.models.svdquant import model_config, svdquant_model
    from bitsmith.nn import LowRankQuantLinear

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    g = torch.Generator().manual_seed(1)
    x, t, enc = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)
    base = copy.deepcopy(unet)
    stats = collect_stats(unet, [(x, t, enc)], progress=False)
    layers = svdquant_model(unet, stats, rank=8, act_bits=8)
    convs = {n: m for n, m in unet.named_modules() if isinstance(m, LowRankQuantConv2d)}
    # every groups=1 conv except conv_out (32 -> 4: rank-8 factors 8 * (4 + 288) >= 4 * 288 weights)
    assert len(convs) == 32 and isinstance(unet.conv_out, nn.Conv2d) and "conv_in" in convs
    assert convs["down_blocks.0.downsamplers.0.conv"].stride == (2, 2)
    assert sum(isinstance(m, LowRankQuantLinear) for m in unet.modules()) > 10
    assert {r.name for r in layers} >= set(convs)

    save_model(unet, tmp_path / "q", config=model_config(unet))
    loaded = load_model(tmp_path / "q")
    assert sum(isinstance(m, LowRankQuantConv2d) for m in loaded.modules()) == 32
    assert all(loaded.get_submodule(n).options() == m.options() and loaded.get_submodule(n).rank == 8 for n, m in convs.items())
    with torch.no_grad():
        y_loaded, y_mem, y_float = loaded(x, t, enc).sample, unet(x, t, enc).sample, base(x, t, enc).sample
    assert torch.equal(y_loaded, y_mem)
    assert (y_mem - y_float).norm() / y_float.norm() < 0.3  # W4A8 rank 8 on random (full-rank) tiny weights


def test_walker_leaves_grouped_convs():
    from bitsmith.calibration.stats import ChannelStats
    from bitsmith.models.svdquant import svdquant_model

    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 64, 1))
    x = torch.randn(1, 16, 8, 8)
    stats = {"0": ChannelStats.from_activations(x.movedim(1, -1)), "2": ChannelStats.from_activations(torch.randn(64, 32))}
    layers = svdquant_model(model, stats, rank=4)
    assert [r.name for r in layers] == ["0", "2"]
    assert isinstance(model[0], LowRankQuantConv2d) and type(model[1]) is nn.Conv2d and isinstance(model[2], LowRankQuantConv2d)
    plain = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Linear(8, 8))
    stats_lin = {"0": stats["0"], "1": ChannelStats.from_activations(torch.randn(4, 8))}
    assert [r.name for r in svdquant_model(plain, stats_lin, rank=2, convs=False)] == ["1"]  # convs=False: Linears only
    assert type(plain[0]) is nn.Conv2d
    with pytest.raises(QuantizationError, match=r"layer 0: LowRankQuantConv2d.*a shift is exact only on an unpadded 1x1"):
        svdquant_model(nn.Sequential(nn.Conv2d(16, 32, 1, padding=1)), stats, rank=4, shift=0.1, shift_pattern="0")


# ----------------------------------------------------------------------------------------------
# real CRAFT convs: SVDQuant r16 beats RTN int4 g64 at the same residual bits
# ----------------------------------------------------------------------------------------------
def _text_image(text: str, size=(192, 96)) -> torch.Tensor:
    """A rendered text image, ImageNet-normalised as CRAFT's pipeline does, [1, 3, H, W]."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (235, 230, 220))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(text.split("\n")):
        draw.text((6, 6 + 20 * i), line, fill=(20, 20, 30))
    x = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255  # [3, H, W]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((x - mean) / std)[None]


class _CraftPrefix(nn.Module):
    """CRAFT's VGG16-BN slice1 (features[0:12]: conv-BN-ReLU x2, max-pool, conv-BN-ReLU x2, with its
    real weights) and its U-Net's last 1x1 conv ``upconv4.conv.0`` (192 -> 64), fed with the slice1
    output (128 channels, real) next to 64 stand-in channels for the upsampled U-Net path (a fixed
    1x1 projection of it, BN-scaled and ReLU'd: the real path needs the whole network)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in (64, 64, "M", 128, 128):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            c_in = v
        self.slice1 = nn.Sequential(*layers)
        self.up = nn.Conv2d(192, 64, 1)
        sub = {f"slice1.{k.removeprefix('basenet.slice1.')}": v for k, v in state.items() if k.startswith("basenet.slice1.")}
        sub.update({f"up.{k.removeprefix('upconv4.conv.0.')}": v for k, v in state.items() if k.startswith("upconv4.conv.0.")})
        missing, unexpected = self.load_state_dict({k: v for k, v in sub.items() if "num_batches" not in k}, strict=False)
        assert not unexpected and all("num_batches" in k for k in missing)
        self.register_buffer("mix", torch.randn(64, 128, 1, 1, generator=torch.Generator().manual_seed(0)) / 128**0.5)
        self.eval()

    def forward(self, x):
        h1 = self.slice1(x)
        y = F.relu(F.conv2d(h1, self.mix))
        y = y / y.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        return self.up(torch.cat([y, h1], 1))


def test_craft_convs_svdquant_beats_rtn():
    from bitsmith.calibration.collect import collect_stats
    from bitsmith.models.svdquant import svdquant_model
    from bitsmith.models.zoo import craft_state_dict

    model = _CraftPrefix(craft_state_dict())
    names = ["slice1.0", "slice1.3", "slice1.7", "slice1.10", "up"]
    calib = _text_image("Lee corpus calibration\nhello world 0123\nCRAFT detects text")
    probe = _text_image("The quick brown fox\njumps over 13 lazy dogs\nSVDQuant vs RTN")
    stats = collect_stats(model, [calib], modules=names, progress=False)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n in names]
    with torch.no_grad():
        model(probe)
    for h in hooks:
        h.remove()
    floats = {n: copy.deepcopy(model.get_submodule(n)) for n in names}
    quantized = copy.deepcopy(model)
    layers = svdquant_model(quantized, stats, rank=16, bits=4, group_size=64)
    assert sorted(r.name for r in layers) == sorted(names)
    errors = {}
    with torch.no_grad():
        for n in names:
            conv, x = floats[n], inputs[n]
            ref = conv(x).double()
            y_svd = quantized.get_submodule(n)(x).double()
            w_rtn = rtn(conv.weight.detach(), bits=4, group_size=64).dequantize(torch.float32)
            y_rtn = F.conv2d(x, w_rtn, conv.bias, conv.stride, conv.padding).double()
            errors[n] = (float((y_svd - ref).norm() / ref.norm()), float((y_rtn - ref).norm() / ref.norm()))
    assert all(svd < rtn_err for svd, rtn_err in errors.values()), errors
    mean_svd = sum(e[0] for e in errors.values()) / len(errors)
    mean_rtn = sum(e[1] for e in errors.values()) / len(errors)
    assert mean_svd < 0.8 * mean_rtn, errors


def test_quantize_svdquant_no_convs_records_the_kept_convs(tmp_path, monkeypatch):
    """``quantize_svdquant(convs=False)`` (CLI ``--no-convs``) quantizes the Linear layers only and
    records every kept Conv2d weight as a skip pattern of the checkpoint's recipe."""
    import bitsmith.api as api
    from bitsmith.calibration.stats import ChannelStats
    from bitsmith.io.checkpoint import Checkpoint
    from bitsmith.nn import LowRankQuantLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 4 * 4, 24))
    monkeypatch.setattr(api, "load_for_eval", lambda src: (model, None, None))
    stats = {"0": ChannelStats.from_activations(torch.randn(64, 16)), "2": ChannelStats.from_activations(torch.randn(8, 512))}
    rep = api.quantize_svdquant(tmp_path, tmp_path / "q", stats, rank=4, convs=False)
    assert [r["name"] for r in rep["layers"]] == ["2"]
    assert type(model[0]) is nn.Conv2d and isinstance(model[2], LowRankQuantLinear)
    with Checkpoint.open(tmp_path / "q") as ck:
        assert ck.recipe["skip"] == [r"^0\.weight$"]
    from safetensors.torch import load_file

    saved = {}
    for shard in (tmp_path / "q").glob("*.safetensors"):
        saved.update(load_file(str(shard)))
    assert torch.equal(saved["0.weight"], model[0].weight.detach())  # the conv stayed float, unchanged
