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

Smoothing (``smooth``): ``unfused`` (the default) gives every layer its own migration scale, which
the layer divides its input by; ``fused`` (architectures with a smoothing map,
:mod:`bitsmith.models.arch`: the Llama family) first smooths the float model as SmoothQuant's fused
mode does -- one scale per group of layers that read the same activation, folded into the norm or
the linear before them (:func:`bitsmith.transforms.smoothing.smooth`) -- then decomposes the
smoothed weights without a smoothing of their own (``alpha=None``), so no layer divides at run
time: the low-rank branch then costs what ``benchmarks/svdquant_overhead.py --smoothing fused``
measures; ``none`` skips smoothing. A shifted layer cannot be in a fused group (its shift is in
the unsmoothed input's domain): that is an error naming it.

Norms and embeddings stay as they are (``fused`` smoothing rescales the norms it folds into). Conv statistics are per input channel
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
from ..transforms.smoothing import smooth as smooth_groups
from .arch import smoothing_groups
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
    smoothing: str = "unfused"  # "unfused" (its own scale, divided in the layer), "fused" (folded upstream), "none"

#: ``smooth`` choices of :func:`svdquant_model`
SMOOTH_MODES = ("unfused", "fused", "none")


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
    smooth: str = "unfused",
    progress: bool = False,
) -> list[SVDQuantLayer]:
    """Replace every selected Linear of ``model`` (in place) by a LowRankQuantLinear and, with
    ``convs``, every selected Conv2d by a LowRankQuantConv2d (see the module docstring);
    ``stats`` maps module names to their input statistics (a missing one is an error naming the
    layer, raised before any layer is touched). ``smooth``: ``unfused``, ``fused`` or ``none``
    (the module docstring; ``none`` is ``alpha=None``)."""
    shift = parse_shift(shift)
    if smooth not in SMOOTH_MODES:
        raise QuantizationError(f"smooth must be one of {', '.join(SMOOTH_MODES)}, got {smooth!r}")
    if smooth == "none":
        alpha = None
    elif alpha is None:
        raise QuantizationError(f"smooth={smooth!r} needs a migration strength alpha (smooth='none' skips smoothing)")
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
    shifted = {n for n, _ in targets if shift is not None and re.search(shift_pattern, n)}
    fused = set() if smooth != "fused" else fuse_smoothing(model, [n for n, _ in targets], stats, alpha=alpha,
                                                            shifted=shifted)
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
            if name in shifted:
                layer_shift = auto_shift(st.min) if shift == "auto" else shift
            t0 = time.perf_counter()
            res = svdquant(mod.weight.detach(), act_absmax=None if st is None else st.absmax,
                           bias=None if mod.bias is None else mod.bias.detach(), rank=rank, bits=bits, group_size=group_size,
                           symmetric=symmetric, alpha=None if name in fused else alpha, act_bits=act_bits, act_group_size=act_group_size,
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
            out.append(SVDQuantLayer(name, tuple(w.shape), res.rank, res.bits_per_weight, err, layer_shift is not None,
                                     time.perf_counter() - t0,
                                     "fused" if name in fused else "none" if alpha is None else "unfused"))
            set_submodule(model, name, new.to(mod.weight.device))
    return out


def fuse_smoothing(model: nn.Module, targets: list[str], stats: Mapping[str, ChannelStats], *, alpha: float,
                   shifted: set[str]) -> set[str]:
    """Smooth the float ``model`` in place, fused (the architecture's map; an error without one),
    over the groups whose consumers are all in ``targets``; returns those consumers' names (a
    target outside them, e.g. q_proj when k_proj is skipped, keeps a scale of its own). A
    consumer in ``shifted`` is an error (checked before anything changes)."""
    groups, _ = smoothing_groups(model, fused=True)
    wanted = set(targets)
    groups = [g for g in groups if all(c in wanted for c in g.consumers)]
    fused = {c for g in groups for c in g.consumers}
    clash = [n for n in shifted if n in fused]
    if clash:
        raise QuantizationError(f"{', '.join(clash[:4])}: a shifted layer cannot take a fused smoothing (its shift is "
                                "in the unsmoothed input's domain); use smooth='unfused' or no shift")
    smooth_groups(model, groups, stats, alpha=alpha, mode="fused")
    return fused


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


__all__ = ["svdquant_model", "fuse_smoothing", "SMOOTH_MODES", "is_conv_target", "model_config", "SVDQuantLayer", "parse_shift", "DEFAULT_SHIFT_PATTERN", "DEFAULT_SKIP"]
