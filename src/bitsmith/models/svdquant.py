"""Walk a model with SVDQuant: every selected Linear becomes a LowRankQuantLinear and every
selected Conv2d a LowRankQuantConv2d (written by :func:`bitsmith.models.saving.save_model` as the
``modules`` kinds ``low_rank_linear`` / ``low_rank_conv2d``, which ``load_model`` rebuilds).

Which layers: every ``nn.Linear`` whose name does not match ``skip`` (default: ``lm_head``,
embeddings, a Linear tied to an embedding) -- attention and FFN projections of an LLM, of a
diffusers transformer / UNet -- and, with ``convs=True`` (the default; a model without Conv2d is
unaffected), every ``nn.Conv2d`` whose name does not match ``skip``, except

* grouped convs (``groups > 1``, e.g. depthwise): the low-rank factors and the smoothing span all
  input channels, so they stay as they are;
* convs whose rank-``r`` factors would hold at least as many numbers as the weight itself
  (``r (N + C kh kw) >= N C kh kw``: image stems and heads with a few channels -- RGB or latent in,
  a few maps out): SVDQuant cannot save anything there, they stay 16/32-bit.

Norms and embeddings stay as they are. Conv statistics are per input channel
(:mod:`bitsmith.calibration.collect` hooks Conv2d). Which layers are shifted: those matching
``shift_pattern`` (default: the second FFN projection after a GELU -- diffusers' ``ff.net.2``,
``fc2``, ``dense_4h_to_h``); a shift is exact only on a Linear or an unpadded 1x1 conv (a shifted
``k x k`` conv is an error naming it).
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from ..calibration.stats import ChannelStats
from ..errors import QuantizationError
from ..methods.svdquant import auto_shift, svdquant
from ..nn.low_rank import LowRankQuantLinear
from ..nn.low_rank_conv import LowRankQuantConv2d
from .surgery import set_submodule

#: LM heads, embeddings (also diffusers' *_embedder / time_text_embed), norm modulation linears
#: (AdaLayerNorm's ``norm1.linear``, ``norm_out.linear``) and the top-level in/out projections stay 16-bit
DEFAULT_SKIP = (r"lm_head", r"embed", r"(^|\.)(wte|wpe)(\.|$)", r"(^|\.)norm[^.]*\.", r"^proj_(in|out)$")
#: the GELU -> fc2 inputs (diffusers FeedForward, OPT/Phi, BLOOM)
DEFAULT_SHIFT_PATTERN = r"(\.net\.2|(^|\.)fc2|dense_4h_to_h)$"


@dataclass
class SVDQuantLayer:
    name: str
    shape: tuple[int, ...]
    rank: int
    bits_per_weight: float  # residual + factors
    rel_error: float  # ||W - W_eff|| / ||W||, W_eff = (Q(R) + L1 L2) / s
    shifted: bool
    seconds: float


def parse_shift(value: Any) -> str | float | None:
    """``--shift`` value: ``"auto"``, ``"none"``/None, or a number."""
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise QuantizationError(f"--shift must be auto, none or a number, got {value!r}") from None


def svdquant_model(
    model: nn.Module,
    stats: Mapping[str, ChannelStats],
    *,
    rank: int = 32,
    bits: int = 4,
    group_size: int = 64,
    symmetric: bool = False,
    alpha: float | None = 0.5,
    act_bits: int = 16,
    act_group_size: int | None = 64,
    shift: str | float | None = None,
    shift_pattern: str = DEFAULT_SHIFT_PATTERN,
    low_rank_input: str = "unshifted",
    skip: tuple[str, ...] = DEFAULT_SKIP,
    convs: bool = True,
    progress: bool = False,
) -> list[SVDQuantLayer]:
    """Replace every selected Linear of ``model`` (in place) by a LowRankQuantLinear and, with
    ``convs``, every selected Conv2d by a LowRankQuantConv2d (see the module docstring);
    ``stats`` maps module names to their input statistics (a missing one is an error naming the
    layer, raised before any layer is touched)."""
    shift = parse_shift(shift)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets = [(n, m) for n, m in model.named_modules()
               if (type(m) is nn.Linear and id(m.weight) not in embedding_weights or convs and is_conv_target(m, rank))
               and not any(re.search(p, n) for p in skip)]
    if not targets:
        raise QuantizationError(f"no Linear{' or Conv2d' if convs else ''} layer to quantize in {type(model).__name__}")
    need_stats = alpha is not None or shift == "auto"
    missing = [n for n, _ in targets if need_stats and n not in stats]
    if missing:
        raise QuantizationError(f"calibration stats missing for {len(missing)} layer(s): {', '.join(missing[:8])}"
                                f"{' ...' if len(missing) > 8 else ''} (collect them with bitsmith calibrate)")
    if rank == 0 and act_bits == 4:
        warnings.warn("svdquant with rank 0 and 4-bit activations is plain (smoothed) W4A4", stacklevel=2)
    iterator = targets
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(targets, desc="svdquant", unit="layer")
    out: list[SVDQuantLayer] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rank-0 W4A4 warning was given once above
        for name, mod in iterator:
            st = stats.get(name)
            layer_shift = None
            if shift is not None and re.search(shift_pattern, name):
                layer_shift = auto_shift(st.min) if shift == "auto" else shift
            t0 = time.perf_counter()
            res = svdquant(mod.weight.detach(), act_absmax=None if st is None else st.absmax,
                           bias=None if mod.bias is None else mod.bias.detach(), rank=rank,
                           bits=bits, group_size=group_size, symmetric=symmetric, alpha=alpha, act_bits=act_bits, act_group_size=act_group_size,
                           shift=layer_shift, low_rank_input=low_rank_input, name=name)
            options = dict(smooth=res.smooth, shift=res.shift, low_rank_input=low_rank_input, act_bits=act_bits,
                           act_group_size=act_group_size, act_unsigned=res.act_unsigned)
            # contiguous factors (the SVD's are transposed views): the same layout as a reloaded
            # checkpoint's, so in-memory and reloaded layers sum their products in the same order
            down, up = (None, None) if res.lora_down is None else (res.lora_down.contiguous(), res.lora_up.contiguous())
            try:
                if isinstance(mod, nn.Conv2d):
                    new = LowRankQuantConv2d.like(mod, res.residual, down, up, res.bias, **options)
                else:
                    new = LowRankQuantLinear(mod.in_features, mod.out_features, res.residual, down, up, res.bias, **options)
            except QuantizationError as e:
                raise QuantizationError(f"layer {name}: {e.message}") from None
            w = mod.weight.detach().double()
            err = float((res.effective_weight() - w).norm() / w.norm().clamp_min(1e-30))
            out.append(SVDQuantLayer(name, tuple(w.shape), res.rank, res.bits_per_weight, err,
                                     layer_shift is not None, time.perf_counter() - t0))
            set_submodule(model, name, new.to(mod.weight.device))
    return out


def is_conv_target(module: nn.Module, rank: int) -> bool:
    """Whether the walker quantizes ``module`` as a Conv2d: a plain ``nn.Conv2d`` with
    ``groups == 1`` whose rank-``rank`` factors ``r (N + C kh kw)`` hold fewer numbers than its
    weight ``N C kh kw`` (module docstring)."""
    if type(module) is not nn.Conv2d or module.groups != 1:
        return False
    n, cols = module.out_channels, module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    return rank * (n + cols) < n * cols


def model_config(model: nn.Module) -> dict | None:
    """The config a checkpoint needs to rebuild ``model``: a transformers config's ``to_dict()``,
    or a diffusers config with its ``_class_name``; ``None`` for a plain module."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items()}
    out.setdefault("_class_name", type(model).__name__)
    return out


__all__ = ["svdquant_model", "is_conv_target", "model_config", "SVDQuantLayer", "parse_shift", "DEFAULT_SHIFT_PATTERN", "DEFAULT_SKIP"]
