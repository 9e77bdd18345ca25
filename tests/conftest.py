import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2 HF folder (converted once, cached under $BITSMITH_CACHE)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from bitsmith.models.zoo import smollm2_path

    return smollm2_path()


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
