"""What users import: quantize, save, load, run."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import BitsmithError, CheckpointError, QuantizationError, SpecError
from .adapters import add_adapters, load_adapters, save_adapters
from .formats import QTensor
from .formats.dtypes import dtype_from_name
from .exporters import ExportReport, get_exporter
from .io.checkpoint import Checkpoint, CheckpointWriter
from .methods import quantize_weight
from .methods.recipe import Recipe
from .models.loading import load_model
from .models.surgery import LayerReport, quantize_model, relative_error

__all__ = [
    "quantize_tensor",
    "quantize_file",
    "load_state",
    "load_qtensors",
    "quantize_model",
    "load_model",
    "Recipe",
    "QuantizeReport",
    "evaluate",
    "compare",
    "export",
    "quantize_svdquant",
    "calibrate",
    "smooth_model",
    "import_quantized",
    "quantize_smoothquant",
    "add_adapters",
    "save_adapters",
    "load_adapters",
]

#: small files copied from a model folder next to the weights (config, tokenizer, ...)
SIDE_FILE_SUFFIXES = {".json", ".txt", ".model", ".jinja", ".tiktoken", ".py"}
SIDE_FILE_MAX_BYTES = 64 * 1024 * 1024
#: written into every checkpoint by quantize_file: the summary and per-tensor rows (error, time)
REPORT_NAME = "quantize_report.json"


def quantize_tensor(weight: torch.Tensor, method: str = "nf", **options: Any) -> QTensor:
    """Quantize one floating tensor: ``quantize_tensor(w, "nf", levels=16, block_size=64)``."""
    return quantize_weight(weight, method, **options)


@dataclass
class TensorRow:
    name: str
    shape: tuple[int, ...]
    method: str | None  # None: stored as is
    bytes_before: int
    bytes_after: int
    bits_per_weight: float | None = None
    rel_error: float | None = None
    seconds: float = 0.0


@dataclass
class QuantizeReport:
    source: str
    destination: str
    recipe: dict
    rows: list[TensorRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def quantized(self) -> list[TensorRow]:
        return [r for r in self.rows if r.method is not None]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    @property
    def quantized_bits_per_weight(self) -> float:
        q = self.quantized
        n = sum(math.prod(r.shape) for r in q)
        return 8.0 * sum(r.bytes_after for r in q) / max(n, 1)

    @property
    def weights_per_second(self) -> float:
        return sum(math.prod(r.shape) for r in self.rows) / max(self.seconds, 1e-9)

    def to_json(self) -> dict:
        return {"summary": self.summary(), "tensors": [dataclasses.asdict(r) for r in self.rows]}

    def summary(self) -> dict:
        errs = [r.rel_error for r in self.quantized if r.rel_error is not None]
        worst = max(self.quantized, key=lambda r: r.rel_error or 0.0, default=None)
        return {
            "source": self.source,
            "destination": self.destination,
            "recipe": self.recipe,
            "tensors": len(self.rows),
            "tensors_quantized": len(self.quantized),
            "bits_per_weight_quantized": self.quantized_bits_per_weight,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "mean_rel_error": sum(errs) / len(errs) if errs else None,
            "worst_rel_error": worst.rel_error if worst else None,
            "worst_tensor": worst.name if worst else None,
            "seconds": self.seconds,
            "weights_per_second": self.weights_per_second,
        }


def _side_files(src: Path) -> dict[str, Path]:
    if not src.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(src.iterdir())
        if p.is_file()
        and p.suffix in SIDE_FILE_SUFFIXES
        and p.name not in ("config.json", "model.safetensors.index.json", REPORT_NAME)
        and p.stat().st_size <= SIDE_FILE_MAX_BYTES
    }


def quantize_file(
    src: str | Path,
    dst: str | Path,
    recipe: Recipe | None = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    compute_error: bool = True,
    progress: bool = False,
) -> QuantizeReport:
    """Quantize a ``.safetensors`` file, a folder of shards or a Hugging Face model folder into
    a checkpoint folder ``dst``, streaming: one tensor is read, quantized, written and freed at
    a time. Nothing is left at ``dst`` unless the whole run succeeds."""
    recipe = recipe or Recipe()
    recipe.check()
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError("output exists; pass --overwrite (overwrite=True) to replace it", file=str(dst))
    target_dtype = dtype_from_name(recipe.dtype) if recipe.dtype else None
    report = QuantizeReport(str(src), str(dst), recipe.to_json())
    t_start = time.perf_counter()
    with Checkpoint.open(src) as source:
        names = source.names()
        if any(source.is_quantized(n) for n in names):
            raise QuantizationError("is already a bitsmith checkpoint; dequantize it first", file=str(src))
        plans = {}
        for name in names:
            entry = source.entry(name)
            try:
                plans[name] = recipe.plan(name, entry.dtype, len(entry.shape))
            except BitsmithError as e:
                raise e.at(file=str(src), tensor=name) from None
        if not any(p is not None for p in plans.values()):
            raise QuantizationError(
                f"no quantizable tensor (floating 2-D/4-D weights not skipped by the recipe) among {len(names)} tensors",
                file=str(src),
            )
        calib_cache = _load_calib_files(plans, src)
        iterator: Iterable[str] = names
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(names, desc="quantize", unit="tensor")
            iterator = bar
        with CheckpointWriter(
            dst,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            recipe=recipe.to_json(),
            config=source.config,
            extra_files=_side_files(src),
        ) as writer:
            for name in iterator:
                if bar is not None:
                    bar.set_postfix_str(name[-40:], refresh=False)
                tensor = source.tensor(name)
                before = tensor.numel() * tensor.element_size()
                plan = plans[name]
                if plan is None:
                    if target_dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(target_dtype)
                    writer.add_tensor(name, tensor)
                    size = tensor.numel() * tensor.element_size()
                    report.rows.append(TensorRow(name, tuple(tensor.shape), None, before, size))
                    continue
                method, options = plan
                t0 = time.perf_counter()
                try:
                    options = _with_layer_calib(options, name, calib_cache)
                    qt = quantize_weight(tensor, method, **options)
                except BitsmithError as e:
                    raise e.at(file=str(src), tensor=name) from None
                if target_dtype is not None:
                    qt = dataclasses.replace(qt, dtype=target_dtype)
                err = relative_error(tensor, qt) if compute_error else None
                writer.add_qtensor(name, qt)
                report.rows.append(
                    TensorRow(name, qt.shape, method, before, qt.nbytes, qt.bits_per_weight, err, time.perf_counter() - t0)
                )
                del tensor, qt
            # the per-tensor report travels with the checkpoint (bitsmith inspect --plot reads it)
            report.seconds = time.perf_counter() - t_start
            (writer.partial / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=1))
    report.seconds = time.perf_counter() - t_start
    return report


def _load_calib_files(plans: dict, src: Path) -> dict[str, dict]:
    """Read every stats file a plan's ``calib`` option names (``--method hqq --calib STATS``),
    once each, before anything is written (an in-memory ``{module: stats}`` calib needs none)."""
    from .calibration import load_stats

    paths = {str(p[1]["calib"]) for p in plans.values() if p is not None and isinstance(p[1].get("calib"), (str, Path))}
    for path in paths:
        if path.startswith("<in-memory"):  # what Recipe.to_json records for in-memory stats
            raise SpecError(f"the recipe's calib {path!r} was in-memory calibration stats when it was recorded; "
                            "pass the stats again (Recipe(..., {'calib': stats}) or --calib STATS)")
    return {path: load_stats(path) for path in sorted(paths)}


def _with_layer_calib(options: dict, name: str, calib_cache: dict[str, dict]) -> dict:
    """``options`` with a ``calib`` given as a stats file or as an in-memory ``{module: stats}``
    mapping (``Recipe("hqq", {"calib": collect_stats(...)})``) replaced by the stats of the
    weight's module (``model.layers.0.mlp.down_proj.weight`` -> ``model.layers.0.mlp.down_proj``)."""
    calib = options.get("calib")
    if isinstance(calib, (str, Path)):
        stats, source = calib_cache[str(calib)], f"calibration stats {calib}"
    elif isinstance(calib, Mapping):
        stats, source = calib, "the in-memory calibration stats"
    else:
        return options
    module = name.removesuffix(".weight")
    if module not in stats:
        raise QuantizationError(
            f"{source} have no entry for layer {module!r} ({len(stats)} layers, "
            f"e.g. {sorted(stats)[:3]}); collect stats for it or skip it with --skip"
        )
    return {**options, "calib": stats[module]}


def load_qtensors(path: str | Path) -> dict[str, QTensor | torch.Tensor]:
    """Every tensor of a checkpoint: QTensors for the quantized ones, plain tensors otherwise.
    An HQQ-saved model (``quant_method: hqq``, or ``P.W_q`` layers) reads as ``P.weight``
    affine QTensors holding HQQ's codes, scales and zeros exactly."""
    from .exporters.hqq import is_hqq_checkpoint, read_hqq_checkpoint

    if is_hqq_checkpoint(path):
        return read_hqq_checkpoint(path)
    with Checkpoint.open(path) as ckpt:
        return {n: (ckpt.qtensor(n) if ckpt.is_quantized(n) else ckpt.tensor(n)) for n in ckpt.names()}


def load_state(path: str | Path, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A plain state dict: quantized tensors dequantized (to ``dtype``, default their original
    dtype), other tensors as stored (floating ones cast to ``dtype`` when given)."""
    with Checkpoint.open(path) as ckpt:
        return {n: ckpt.dequantized(n, dtype) for n in ckpt.names()}


def inspect_checkpoint(path: str | Path) -> dict:
    """Per tensor: codec (or dtype), shape, bits/weight, bytes on disk; and totals."""
    with Checkpoint.open(path) as ckpt:
        tensors = []
        for n in ckpt.names():
            e = ckpt.entry(n)
            tensors.append({
                "name": n,
                "codec": e.codec,
                "dtype": str(e.dtype).removeprefix("torch."),
                "shape": list(e.shape),
                "bytes": e.nbytes,
                "bits_per_weight": 8.0 * e.nbytes / max(e.numel, 1) if e.quantized else None,
                "params": ckpt.spec(n)["params"] if e.quantized else None,
            })
        report_path = Path(path) / REPORT_NAME
        if report_path.is_file():
            try:
                errors = {r["name"]: r.get("rel_error") for r in json.loads(report_path.read_text())["tensors"]}
            except (ValueError, KeyError, TypeError):
                raise CheckpointError("quantize report is not valid JSON of the expected shape", file=str(report_path)) from None
            for t in tensors:
                t["rel_error"] = errors.get(t["name"])
        file_bytes = sum(p.stat().st_size for p in ckpt.shard_files)
        tensor_bytes = sum(t["bytes"] for t in tensors)
        q = [t for t in tensors if t["codec"]]
        q_weights = sum(math.prod(t["shape"]) for t in q)
        weights = sum(math.prod(t["shape"]) for t in tensors)
        recipe = ckpt.recipe
    return {
        "path": str(path),
        "recipe": recipe,
        "recipe_text": Recipe.from_json(recipe).describe() if recipe else "(none: not a bitsmith checkpoint)",
        "tensors": tensors,
        "totals": {
            "tensors": len(tensors),
            "quantized": len(q),
            "weights": weights,
            "quantized_weights": q_weights,
            "bytes": tensor_bytes,
            "bits_per_weight_quantized": 8.0 * sum(t["bytes"] for t in q) / max(q_weights, 1),
            "bits_per_weight": 8.0 * tensor_bytes / max(weights, 1),
            "header_bytes": file_bytes - tensor_bytes,
            "file_bytes": file_bytes,
        },
    }


def dequantize_file(
    path: str | Path, out: str | Path, *, dtype: str | torch.dtype | None = None, overwrite: bool = False, progress: bool = False
) -> dict:
    """Write a plain ``.safetensors`` state dict: every quantized tensor dequantized (to
    ``dtype``, default its original dtype), the rest as stored. Streams tensor by tensor; the
    file appears only when complete."""
    from .io.safetensors_io import PlannedFileWriter

    out = Path(out)
    if isinstance(dtype, str):
        dtype = dtype_from_name(dtype)
    if out.exists() and not overwrite:
        raise CheckpointError("output exists; pass --overwrite (overwrite=True) to replace it", file=str(out))
    if out.suffix != ".safetensors":
        raise CheckpointError("output must be a .safetensors file", file=str(out))
    info = {"tensors": 0, "dequantized": 0, "weights": 0, "bytes": 0}
    with Checkpoint.open(path) as ckpt:
        names = ckpt.names()
        plan = []
        for n in names:
            e = ckpt.entry(n)
            out_dtype = dtype if dtype is not None and (e.quantized or e.dtype.is_floating_point) else e.dtype
            plan.append((n, out_dtype, e.shape))
        iterator: Iterable[str] = names
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(names, desc="dequantize", unit="tensor")
        with PlannedFileWriter(out, plan, metadata={"format": "pt"}) as writer:
            for n in iterator:
                t = ckpt.dequantized(n, dtype)
                writer.write(n, t)
                info["tensors"] += 1
                info["dequantized"] += int(ckpt.is_quantized(n))
                info["weights"] += t.numel()
                info["bytes"] += t.numel() * t.element_size()
                del t
    return info


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def is_bitsmith_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    if not (path.is_dir() and any(path.glob("*.safetensors"))):
        return False
    with Checkpoint.open(path) as ckpt:
        return ckpt.recipe is not None or any(ckpt.is_quantized(n) for n in ckpt.names())


def load_for_eval(path: str | Path) -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer, kind)`` for a bitsmith checkpoint, a Hugging Face model folder or a
    GGUF-backed folder; ``kind`` is ``"causal-lm"`` or ``"encoder"``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("is not a model folder (a bitsmith checkpoint, a HF folder or a folder with a .gguf)", file=str(path))
    try:
        import transformers
    except ImportError:
        raise BitsmithError("evaluation needs transformers: pip install 'bitsmith[hf]'") from None
    ggufs = sorted(path.glob("*.gguf"))
    tok_kw: dict[str, Any] = {}
    if is_bitsmith_checkpoint(path):
        model = load_model(path)
    elif (path / "config.json").exists():
        cfg = transformers.AutoConfig.from_pretrained(path)
        causal = any(a.endswith("ForCausalLM") for a in (cfg.architectures or []))
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = auto.from_pretrained(path, dtype=torch.float32).eval()
    elif ggufs:
        tok_kw = {"gguf_file": ggufs[0].name}
        model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=ggufs[0].name, dtype=torch.float32).eval()
    else:
        raise CheckpointError("has no config.json, no safetensors checkpoint and no .gguf file", file=str(path))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **tok_kw)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"no usable tokenizer ({type(e).__name__}); expected tokenizer.json or tokenizer_config.json "
            "(+ vocab files) in the folder", file=str(path)
        ) from None
    archs = getattr(model.config, "architectures", None) or []
    kind = "causal-lm" if any(a.endswith("ForCausalLM") for a in archs) or hasattr(model, "lm_head") else "encoder"
    return model, tokenizer, kind


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BitsmithError("no such text file", file=str(path)) from None
    except UnicodeDecodeError as e:
        raise BitsmithError(f"is not UTF-8 text ({e.reason} at byte {e.start})", file=str(path)) from None
    if not text.strip():
        raise BitsmithError("text file is empty", file=str(path))
    return text


def _layer_batches(kind: str, tokenizer, ids: torch.Tensor | None, sentences: list[str] | None,
                   seq_len: int, layer_windows: int) -> tuple[list, str]:
    """Inputs for per-layer errors: the first windows of the text (causal LMs) or the first 64
    sentences in batches of 16 (encoders), and the protocol line that says so."""
    if kind == "causal-lm":
        n = max(1, min(layer_windows, ids.numel() // seq_len))
        return ([ids[i * seq_len : (i + 1) * seq_len][None] for i in range(n)],
                f"{n} windows of {seq_len} tokens of the text through the reference")
    first = sentences[:64]
    batches = [dict(tokenizer(first[i : i + 16], padding=True, truncation=True, max_length=256, return_tensors="pt"))
               for i in range(0, len(first), 16)]
    return batches, f"the first {len(first)} sentences of the text through the reference"


def evaluate(
    model_path: str | Path,
    data: str | Path,
    *,
    reference: str | Path | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    layers: bool = False,
    layer_windows: int = 4,
    max_sentences: int = 256,
    batch_size: int = 4,
    progress: bool = False,
) -> dict:
    """Perplexity (causal LMs) or embedding fidelity vs ``reference`` (encoders) on a text file,
    and with ``layers`` the per-layer output error vs ``reference`` on the model's own
    activations. Returns a JSON-able dict with the protocol."""
    from .eval.fidelity import embedding_fidelity, split_sentences
    from .eval.layers import layer_errors
    from .eval.perplexity import perplexity, tokenize

    text = read_text(data)
    model, tokenizer, kind = load_for_eval(model_path)
    ref = None
    if reference is not None:
        ref, _, ref_kind = load_for_eval(reference)
        if ref_kind != kind:
            raise BitsmithError(f"reference is a {ref_kind} model, {model_path} is a {kind}", file=str(reference))
    elif layers or kind == "encoder":
        what = "--layers compares each layer with the original's" if layers else "fidelity of an encoder is measured against the original"
        raise BitsmithError(f"{what}: pass --reference ORIGINAL_MODEL")
    out: dict[str, Any] = {"model": str(model_path), "reference": None if reference is None else str(reference),
                           "data": str(data), "kind": kind}
    if kind == "causal-lm":
        ids = tokenize(tokenizer, text, max_tokens)
        res = perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size, progress=progress)
        out["perplexity"] = res.to_json()
        if ref is not None:
            r = perplexity(ref, ids, seq_len=seq_len, stride=stride, batch_size=batch_size, progress=progress)
            out["reference_perplexity"] = r.to_json()
            out["delta"] = res.perplexity / r.perplexity - 1
        if layers:
            batches, out["layers_protocol"] = _layer_batches(kind, tokenizer, ids, None, seq_len, layer_windows)
            out["layers"] = [e.__dict__ for e in layer_errors(ref, model, batches)]
    else:
        sentences = split_sentences(text, max_sentences=max_sentences)
        fid = embedding_fidelity(ref, model, tokenizer, sentences)
        out["fidelity"] = fid.to_json()
        out["fidelity_protocol"] = (f"cosine of mean-pooled last hidden states, original vs quantized, over the first "
                                    f"{fid.sentences} sentences of the text (split after . ! ?, >= 20 characters)")
        if layers:
            batches, out["layers_protocol"] = _layer_batches(kind, tokenizer, None, sentences, seq_len, layer_windows)
            out["layers"] = [e.__dict__ for e in layer_errors(ref, model, batches)]
    return out


def compare(
    model_path: str | Path,
    data: str | Path,
    recipes: list[str],
    *,
    cache: str | Path | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    max_sentences: int = 256,
    layers_for: str | None = None,
    layer_windows: int = 4,
    batch_size: int = 4,
    progress: bool = False,
) -> dict:
    """Quantize ``model_path`` with each recipe (checkpoints under ``cache``, a temporary folder
    by default), load each from its checkpoint alone, evaluate all on the same tokens (or
    sentences), and return one row per recipe plus the original; with ``layers_for`` also the
    per-layer output error of that recipe on the original's activations."""
    import tempfile

    from .eval.fidelity import embedding_fidelity, split_sentences
    from .eval.layers import layer_errors
    from .eval.perplexity import perplexity, tokenize

    if not recipes:
        raise BitsmithError("give at least one --recipe (e.g. nf4, int4, 'rtn:bits=3,group=64')")
    parsed = [(text, Recipe.parse(text)) for text in recipes]  # all recipe errors before any work
    if layers_for is not None and layers_for not in recipes:
        raise BitsmithError(f"--layers-for {layers_for!r} is not one of the recipes {recipes}")
    text = read_text(data)
    if is_bitsmith_checkpoint(model_path):
        raise BitsmithError("compare starts from the original model, not a quantized checkpoint", file=str(model_path))
    original, tokenizer, kind = load_for_eval(model_path)
    workdir = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="bitsmith-compare-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "causal-lm":
        ids = tokenize(tokenizer, text, max_tokens)

        def score(model: nn.Module) -> dict:
            r = perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size)
            return {"perplexity": r.perplexity, "protocol": r.protocol}

        metric = "perplexity"
        layer_batches, _ = _layer_batches(kind, tokenizer, ids, None, seq_len, layer_windows)
    else:
        sentences = split_sentences(text, max_sentences=max_sentences)

        def score(model: nn.Module) -> dict:
            f = embedding_fidelity(original, model, tokenizer, sentences)
            return {"mean_cosine": f.mean_cosine, "worst_cosine": f.worst_cosine,
                    "protocol": f"cosine of mean-pooled embeddings vs the original over {f.sentences} sentences"}

        metric = "mean_cosine"
        layer_batches, _ = _layer_batches(kind, tokenizer, None, sentences, seq_len, layer_windows)
    base = score(original)
    src_bytes = sum(p.stat().st_size for p in Path(model_path).glob("*.safetensors"))
    rows = [{"recipe": "original", "bits_per_weight": None, "bytes": src_bytes, **base, "delta": 0.0,
             "quantize_seconds": None, "load_seconds": None}]
    layers = None
    for i, (label, recipe) in enumerate(parsed):
        if progress:
            print(f"[{i + 1}/{len(parsed)}] {label}: quantize, load, evaluate", flush=True)
        dst = workdir / f"{i:02d}-{''.join(c if c.isalnum() or c in '-_=.' else '_' for c in label)}"
        report = quantize_file(model_path, dst, recipe, overwrite=dst.exists(), compute_error=False)
        t0 = time.perf_counter()
        model = load_model(dst)
        load_s = time.perf_counter() - t0
        sc = score(model)
        if metric == "perplexity":
            delta = sc["perplexity"] / base["perplexity"] - 1
        else:
            delta = sc["mean_cosine"] - base["mean_cosine"]
        rows.append({"recipe": label, "method": recipe.describe(), "bits_per_weight": report.quantized_bits_per_weight,
                     "bytes": sum(p.stat().st_size for p in dst.glob("*.safetensors")), **sc, "delta": delta,
                     "quantize_seconds": report.seconds, "load_seconds": load_s, "checkpoint": str(dst)})
        if label == layers_for:
            layers = [e.__dict__ for e in layer_errors(original, model, layer_batches)]
        del model
    return {"model": str(model_path), "data": str(data), "kind": kind, "metric": metric, "rows": rows,
            "layers_for": layers_for, "layers": layers, "cache": str(workdir)}


#: foreign quantized layouts ``quantize --from`` converts without requantizing
IMPORT_FORMATS = ("hqq",)


def import_quantized(src: str | Path, dst: str | Path, source_format: str, *, overwrite: bool = False,
                     progress: bool = False) -> dict:
    """Convert a model quantized by another project (``source_format``: ``hqq``) into a bitsmith
    checkpoint at ``dst`` without requantizing (same codes, scales and zeros). Returns a summary."""
    if source_format != "hqq":
        raise BitsmithError(f"unknown source format {source_format!r}; valid: {', '.join(IMPORT_FORMATS)}")
    from .exporters.hqq import import_hqq

    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError("output exists; pass --overwrite (overwrite=True) to replace it", file=str(dst))
    t0 = time.perf_counter()
    summary = import_hqq(src, dst, overwrite=overwrite, progress=progress)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def export(ckpt: str | Path, dst: str | Path, to: str, *, overwrite: bool = False, progress: bool = False,
           **options: Any) -> ExportReport:
    """Write the bitsmith checkpoint ``ckpt`` in another project's layout (``to``: ``hqq``,
    ``compressed-tensors``, ``nunchaku``; see :mod:`bitsmith.exporters`). ``options`` are the
    target's own (compressed-tensors: ``unfused="refuse" | "sidecar"``)."""
    exporter = get_exporter(to)
    t0 = time.perf_counter()
    with Checkpoint.open(ckpt) as source:
        report = exporter(source, Path(dst), overwrite=overwrite, progress=progress, **options)
    report.seconds = time.perf_counter() - t0
    return report


# --------------------------------------------------------------------------------------------
# calibration and smoothing
# --------------------------------------------------------------------------------------------
@dataclass
class CalibrationReport:
    model: str
    data: str
    out: str
    modules: int  # modules with stats
    windows: int  # sequences run
    seq_len: int
    tokens: int  # tokens run through the model (windows x seq_len)
    text_tokens: int  # tokens in the whole text
    batch_size: int
    seconds: float  # collection only (not loading)
    load_seconds: float
    peak_rss_bytes: int | None  # the process's peak resident memory (loading included)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (``getrusage``; psutil's current RSS where
    that is unavailable), or None."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024
    except (ImportError, OSError):
        pass
    try:
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    except ImportError:
        return None


def calibrate(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    samples: int | None = 128,
    seq_len: int = 512,
    batch_size: int = 4,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> CalibrationReport:
    """Per-input-channel statistics of every Linear/Conv2d input of the model at ``model_path``
    (a HF folder or a bitsmith checkpoint) over the text file ``data``: the text is tokenized
    once with the model's tokenizer and cut into ``samples`` non-overlapping windows of
    ``seq_len`` tokens (fewer if the text is shorter; less than one window is an error), run in
    batches of ``batch_size``. Written atomically to ``out`` (``.safetensors``, see
    :mod:`bitsmith.calibration.stats`)."""
    from .calibration import collect_stats, save_stats, token_windows
    from .eval.perplexity import tokenize

    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError("the stats file must end in .safetensors", file=str(out))
    if out.exists() and not overwrite:
        raise CheckpointError("output exists; pass --overwrite (overwrite=True) to replace it", file=str(out))
    if batch_size < 1:
        raise BitsmithError(f"batch size must be >= 1, got {batch_size}")
    text = read_text(data)
    t0 = time.perf_counter()
    model, tokenizer, kind = load_for_eval(model_path)
    load_s = time.perf_counter() - t0
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise BitsmithError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {limit}")
    ids = tokenize(tokenizer, text)
    try:
        windows = token_windows(ids, seq_len, samples)
    except QuantizationError as e:
        raise e.at(file=str(data)) from None
    model.to(device)
    extra = {"use_cache": False} if kind == "causal-lm" else {}
    batches = [{"input_ids": w.to(device), **extra} for w in windows.split(batch_size)]
    head = getattr(model, "lm_head", None)
    stop_at = "lm_head" if kind == "causal-lm" and isinstance(head, nn.Linear) else None
    t0 = time.perf_counter()
    stats = collect_stats(model, batches, progress=progress, stop_at=stop_at, total=len(batches))
    seconds = time.perf_counter() - t0
    source = {"model": str(model_path), "data": str(data), "samples": int(windows.shape[0]), "seq_len": seq_len,
              "text_tokens": int(ids.numel()), "batch_size": batch_size, "tokenizer": type(tokenizer).__name__}
    save_stats(out, stats, source)
    return CalibrationReport(str(model_path), str(data), str(out), len(stats), int(windows.shape[0]), seq_len,
                             int(windows.numel()), int(ids.numel()), batch_size, seconds, load_s, peak_rss_bytes())


def smooth_model(
    model: nn.Module,
    stats: "str | Path | dict",
    *,
    alpha: float = 0.5,
    mode: str = "fused",
    variant: str = "paper",
    groups: list | None = None,
):
    """SmoothQuant-smooth the float ``model`` in place with calibration ``stats`` (a stats file
    or ``{module: ChannelStats}``): ``mode`` ``fused`` (into the preceding norms and v/up
    projections) or ``unfused`` (every smoothed Linear becomes a SmoothedLinear with its own
    ``migration_scale``); ``variant`` ``paper`` or ``lmdeploy``. ``groups`` defaults to the
    architecture's map (:mod:`bitsmith.models.arch`; generic per-Linear unfused groups with a
    warning where there is none). Returns a :class:`~bitsmith.transforms.SmoothReport`."""
    from .calibration import load_stats
    from .models.arch import smoothing_groups
    from .transforms.smoothing import MODES, check_alpha, check_choice, smooth

    check_alpha(alpha)
    check_choice(mode, MODES, "mode")
    stats_file = None
    if isinstance(stats, (str, Path)):
        stats_file = str(stats)
        stats = load_stats(stats)
    notes: list[str] = []
    if groups is None:
        groups, notes = smoothing_groups(model, fused=mode == "fused")
    try:
        report = smooth(model, groups, stats, alpha=alpha, mode=mode, variant=variant)
    except BitsmithError as e:
        raise e.at(file=stats_file) from None
    report.notes.extend(notes)
    return report


# --------------------------------------------------------------------------------------------
# SVDQuant (needs calibration: works on the loaded model)
# --------------------------------------------------------------------------------------------
def quantize_svdquant(
    src: str | Path,
    dst: str | Path,
    calib: "str | Path | dict",
    *,
    rank: int = 32,
    bits: int = 4,
    group_size: int = 64,
    symmetric: bool = False,
    alpha: float | None = 0.5,
    act_bits: int = 16,
    act_group_size: int | None = 64,
    shift: str | float | None = None,
    convs: bool = True,
    smooth: str = "unfused",
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """SVDQuant the model at ``src`` (a HF folder) with calibration stats ``calib`` (a stats file
    from ``bitsmith calibrate`` or ``{module: ChannelStats}``) and write a checkpoint to ``dst``
    that :func:`load_model` rebuilds with LowRankQuantLinear layers (and LowRankQuantConv2d
    layers unless ``convs=False``, which keeps every Conv2d as it is). ``smooth``: ``unfused`` (each
    layer divides by its own migration scale), ``fused`` (one scale per group of layers reading the
    same activation, folded into the norm or linear before them: nothing to divide at run time;
    Llama-family models) or ``none`` (see :mod:`bitsmith.models.svdquant`). Returns a JSON-able
    report (one row per layer: rank, bits/weight with the 16-bit factors counted, weight error,
    how it was smoothed)."""
    from .calibration import load_stats
    from .models.saving import save_model
    from .models.svdquant import model_config, parse_shift, svdquant_model

    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError("output exists; pass --overwrite (overwrite=True) to replace it", file=str(dst))
    stats_file = None
    if isinstance(calib, (str, Path)):
        stats_file = str(calib)
        calib = load_stats(calib)
    t0 = time.perf_counter()
    model, _, _ = load_for_eval(src)
    if smooth == "none":
        alpha = None
    options = {"rank": rank, "bits": bits, "group_size": group_size, "symmetric": symmetric, "alpha": alpha, "act_bits": act_bits,
               "act_group_size": act_group_size, "shift": parse_shift(shift), "smooth": smooth}
    kept_convs = [] if convs else [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        layers = svdquant_model(model, calib, progress=progress, convs=convs, **options)
    except BitsmithError as e:
        raise e.at(file=stats_file) from None
    recipe = {"method": "svdquant", "options": {k: v for k, v in options.items() if v is not None}}
    if kept_convs:  # recorded as what they are: weights kept as they were
        recipe["skip"] = [f"^{re.escape(n)}\\.weight$" for n in kept_convs]
    save_model(model, dst, recipe=recipe, config=model_config(model), overwrite=overwrite, extra_files=_side_files(Path(src)))
    n = sum(math.prod(r.shape) for r in layers)
    return {"source": str(src), "destination": str(dst), "recipe": recipe, "layers": [dataclasses.asdict(r) for r in layers],
            "bits_per_weight": sum(r.bits_per_weight * math.prod(r.shape) for r in layers) / max(n, 1),
            "mean_rel_error": sum(r.rel_error for r in layers) / max(len(layers), 1), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# SmoothQuant W8A8 (works on the loaded model: smoothing needs it)
# --------------------------------------------------------------------------------------------
def quantize_smoothquant(src: str | Path, dst: str | Path, calib: str | Path | None, *, alpha: float = 0.5,
                         smooth: str = "fused", variant: str = "paper", activations: str = "dynamic",
                         skip: list[str] | None = None, dtype: str | None = None, overwrite: bool = False,
                         progress: bool = False):
    """SmoothQuant W8A8 of the HF model at ``src`` with the stats file ``calib`` (``smooth``:
    ``fused``, ``unfused`` or ``none``; ``none`` with dynamic activations needs no stats): a
    checkpoint at ``dst`` that :func:`load_model` rebuilds with W8A8Linear layers. Returns a
    :class:`~bitsmith.models.smoothquant.SmoothQuantReport`."""
    from .models.smoothquant import quantize_smoothquant as run

    return run(src, dst, calib, alpha=alpha, smooth=smooth, variant=variant, activations=activations, skip=skip,
               dtype=dtype, extra_files=_side_files(Path(src)), overwrite=overwrite, progress=progress)
