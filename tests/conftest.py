import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# markers of the kernel tests (test_kernels, test_fragment, test_siblings)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()


def _have_triton() -> bool:
    from bitsmith.kernels import HAVE_TRITON

    return HAVE_TRITON


needs_interp = pytest.mark.skipif(
    not (_have_triton() and INTERPRETED),
    reason="Triton interpreter tests run in a subprocess with TRITON_INTERPRET=1 (test_interpreter_suite)"
    if _have_triton() else "triton is not installed",
)
needs_cuda = pytest.mark.skipif(not (CUDA and _have_triton() and not INTERPRETED), reason="needs a CUDA device and triton")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2 HF folder (converted once, cached under $BITSMITH_CACHE)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from bitsmith.models.zoo import smollm2_path

    return smollm2_path()


#: the SmolLM2-135M weights the GPU kernel tests multiply (attention, MLP down and gate projections)
SMOLLM2_KERNEL_WEIGHTS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight",
                          "model.layers.7.mlp.gate_proj.weight")


@pytest.fixture
def smollm2_kernel_weights(request):
    """:data:`SMOLLM2_KERNEL_WEIGHTS` by name. On the GPU machine (no model cache) from a slice file
    carried with the run (.cache/kernels_gpu/smollm2_slice.safetensors, written from the cached
    model), else from the cached model."""
    from safetensors.torch import load_file

    slice_file = Path(__file__).resolve().parents[1] / ".cache" / "kernels_gpu" / "smollm2_slice.safetensors"
    if slice_file.exists():
        sd = load_file(str(slice_file))
    else:
        sd = load_file(str(sorted(Path(request.getfixturevalue("smollm2_dir")).glob("*.safetensors"))[0]))
    return {key: sd[key] for key in SMOLLM2_KERNEL_WEIGHTS}


def run_interpreter_tests(test_file: str, k_expr: str = "interp_") -> None:
    """Run ``test_file``'s tests matching ``k_expr`` in a subprocess with ``TRITON_INTERPRET=1``
    (the interpreter must be on before Triton is imported), and require that they all ran and passed."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k", k_expr],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
