"""SmoothQuant W8A8 on a whole model: smooth (fused, unfused or not at all), then swap every
selected Linear for a :class:`~bitsmith.nn.W8A8Linear`, then write a checkpoint that
:func:`~bitsmith.models.loading.load_model` rebuilds with the same modules."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..calibration.stats import ChannelStats, load_stats
from ..errors import BitsmithError, CheckpointError, QuantizationError, SpecError
from ..methods.recipe import Recipe
from ..methods.smoothquant import check_options, int8_weight, static_input_scale
from ..nn import W8A8Linear
from ..transforms.smoothing import smooth as apply_smoothing
from .arch import smoothing_groups
from .saving import save_model
from .surgery import relative_error, set_submodule

#: never quantized by default: the output head (SmoothQuant, lmdeploy and llm-compressor keep it in
#: float) — on top of the recipe's default skip of embeddings
DEFAULT_SMOOTHQUANT_SKIP = ("lm_head",)


@dataclass
class SmoothQuantReport:
    """What :func:`smoothquant_model` did: the recipe, smoothing summary and one row per layer."""

    recipe: dict
    smoothing: dict | None
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        errs = [r["rel_error"] for r in self.rows]
        worst = max(self.rows, key=lambda r: r["rel_error"], default=None)
        return {"recipe": self.recipe, "layers_quantized": len(self.rows),
                "smoothing": None if self.smoothing is None else {k: v for k, v in self.smoothing.items() if k != "rows"},
                "mean_rel_error": sum(errs) / len(errs) if errs else None,
                "worst_rel_error": worst["rel_error"] if worst else None,
                "worst_tensor": worst["name"] if worst else None,
                "notes": self.notes, "seconds": self.seconds}

    def to_json(self) -> dict:
        return {"summary": self.summary(), "tensors": self.rows, "smoothing": self.smoothing}


def smoothquant_recipe(*, alpha: float = 0.5, smooth: str = "fused", variant: str = "paper",
                       activations: str = "dynamic", skip: tuple[str, ...] | list[str] = DEFAULT_SMOOTHQUANT_SKIP,
                       dtype: str | None = None) -> Recipe:
    """The recipe a SmoothQuant checkpoint records (options validated)."""
    check_options(alpha, smooth, variant, activations)
    return Recipe(method="smoothquant", options={"alpha": alpha, "smooth": smooth, "variant": variant,
                                                 "activations": activations}, skip=list(skip), dtype=dtype)


def target_linears(model: nn.Module, recipe: Recipe) -> dict[str, nn.Linear]:
    """The float Linears the recipe selects (a Linear sharing its weight with an embedding —
    a tied ``lm_head`` — stays float)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) not in embedding_weights:
            if recipe.plan(f"{name}.weight", mod.weight.dtype, 2) is not None:
                out[name] = mod
    return out


def check_stats(stats: Mapping[str, ChannelStats], targets: Mapping[str, nn.Linear], source: str) -> None:
    """Every target has stats with its input channel count, else one error listing them."""
    missing = sorted(n for n in targets if n not in stats)
    wrong = sorted(f"{n} ({stats[n].channels} channels, the layer has {m.in_features})"
                   for n, m in targets.items() if n in stats and stats[n].channels != m.in_features)
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"no stats for {len(missing)} layers: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if wrong:
            parts.append(f"wrong channel count for {len(wrong)} layers: {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
        raise CheckpointError("calibration stats do not match the model: " + "; ".join(parts)
                              + " (were they collected on this model with `bitsmith calibrate`?)", file=source)


@torch.no_grad()
def smoothquant_model(
    model: nn.Module,
    stats: Mapping[str, ChannelStats] | None,
    recipe: Recipe,
    *,
    stats_source: str = "calibration stats",
    progress: bool = False,
) -> SmoothQuantReport:
    """In place: smooth ``model`` as ``recipe.options["smooth"]`` says (``fused``: into the
    preceding norms / linears by the architecture's map; ``unfused``: every linear keeps its own
    ``migration_scale``; ``none``), then replace every selected Linear by a W8A8Linear (static
    per-tensor input scales from ``stats`` when ``activations="static"``). Checks everything
    (options, stats against every layer, the smoothing plan) before changing the model."""
    t0 = time.perf_counter()
    opts = {"alpha": 0.5, "smooth": "fused", "variant": "paper", "activations": "dynamic", **recipe.options}
    if recipe.method != "smoothquant":
        raise SpecError(f"smoothquant_model needs a smoothquant recipe, got method {recipe.method!r}")
    if opts["smooth"] is None:
        opts["smooth"] = "none"  # the recipe's option parser reads "none" as null
    check_options(opts["alpha"], opts["smooth"], opts["variant"], opts["activations"])
    targets = target_linears(model, recipe)
    if not targets:
        raise QuantizationError(f"{type(model).__name__} has no Linear layer the recipe selects")
    needs_stats = opts["smooth"] != "none" or opts["activations"] == "static"
    if needs_stats:
        if stats is None:
            raise SpecError(f"smooth={opts['smooth']!r} / activations={opts['activations']!r} needs calibration "
                            "statistics (bitsmith calibrate MODEL --data TEXT -o STATS, then --calib STATS)")
        check_stats(stats, targets, stats_source)
    notes: list[str] = []
    smoothing = None
    input_div: dict[str, torch.Tensor] = {}
    if opts["smooth"] != "none":
        groups, notes_arch = smoothing_groups(model, fused=opts["smooth"] == "fused")  # warns for generic mode
        notes += notes_arch
        groups = [g for g in groups if all(c in targets for c in g.consumers)]
        report = apply_smoothing(model, groups, stats, alpha=float(opts["alpha"]),
                                 mode=opts["smooth"], variant=opts["variant"])
        report.notes.extend(notes_arch)
        smoothing = report.to_json()
        input_div = report.scales()
        targets = {n: model.get_submodule(n) for n in targets}  # unfused: now SmoothedLinears

    rows: list[dict] = []
    items: Any = list(targets.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="w8a8", unit="layer")
    for name, mod in items:
        t = time.perf_counter()
        input_scale = None
        if opts["activations"] == "static":
            input_scale = static_input_scale(stats[name].absmax, input_div.get(name))
        new = W8A8Linear.from_float(mod, int8_weight, input_scale=input_scale)
        err = relative_error(mod.weight, new.qweight)
        set_submodule(model, name, new)
        rows.append({"name": f"{name}.weight", "shape": list(new.weight_shape), "method": "smoothquant",
                     "bits_per_weight": new.qweight.bits_per_weight, "rel_error": err,
                     "migration_scale": new.migration_scale is not None,
                     "input_scale": None if new.input_scale is None else float(new.input_scale),
                     "seconds": time.perf_counter() - t})
    return SmoothQuantReport(recipe.to_json(), smoothing, rows, notes, time.perf_counter() - t0)


REPORT_NAME = "quantize_report.json"


def quantize_smoothquant(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calib: str | os.PathLike | None,
    *,
    alpha: float = 0.5,
    smooth: str = "fused",
    variant: str = "paper",
    activations: str = "dynamic",
    skip: list[str] | None = None,
    dtype: str | None = None,
    extra_files: Mapping[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> SmoothQuantReport:
    """Load the Hugging Face causal LM at ``src`` (float32), run :func:`smoothquant_model` with
    the stats file ``calib``, and write the checkpoint ``dst`` (float tensors in ``dtype``, default
    float32; the recipe and a ``quantize_report.json`` inside). Options and the stats are checked
    before the model is loaded; nothing is left at ``dst`` unless everything succeeds."""
    src, dst = Path(src), Path(dst)
    recipe = smoothquant_recipe(alpha=alpha, smooth=smooth, variant=variant, activations=activations,
                                skip=list(DEFAULT_SMOOTHQUANT_SKIP) + list(skip or []), dtype=dtype)
    if dst.exists() and not overwrite:
        raise CheckpointError("output exists; pass --overwrite (overwrite=True) to replace it", file=str(dst))
    stats = load_stats(calib) if calib is not None else None
    if not (src / "config.json").is_file():
        raise CheckpointError("smoothquant needs a Hugging Face model folder (config.json + weights)", file=str(src))
    try:
        import transformers
    except ImportError:
        raise BitsmithError("smoothquant needs transformers: pip install 'bitsmith[hf]'") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the model with transformers: {e}", file=str(src)) from None
    report = smoothquant_model(model, stats, recipe, stats_source=str(calib), progress=progress)
    if dtype is not None:
        from ..formats.dtypes import dtype_from_name

        model.to(dtype_from_name(dtype))  # float layers only: W8A8Linear keeps its codes and scales
    config = model.config.to_dict()
    if dtype is not None:
        config["dtype"] = dtype
    save_model(model, dst, recipe=recipe.to_json(), config=config, extra_files=extra_files, overwrite=overwrite,
               side_texts={REPORT_NAME: json.dumps(report.to_json(), indent=1)}, progress=progress)
    return report


__all__ = ["smoothquant_model", "quantize_smoothquant", "smoothquant_recipe", "target_linears", "check_stats",
           "SmoothQuantReport", "DEFAULT_SMOOTHQUANT_SKIP"]
