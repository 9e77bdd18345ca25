"""The GPU-only benchmark scripts import and parse their arguments on a machine without a GPU,
and say what they need instead of failing with a traceback (a broken import of a shared helper,
e.g. between ``w8a8_variants.py`` and ``w8a8_probe.py``, shows here first, not on the GPU)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                     if p.name != "_common.py" and re.search(r"^\s+require_cuda\(", p.read_text(), re.M))


def test_the_gpu_scripts_are_found():
    assert {"w8a8_probe.py", "w8a8_variants.py", "svdquant_overhead.py"} <= set(GPU_SCRIPTS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU these scripts would run their benchmarks")
@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_script_says_it_needs_a_gpu(script):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    got = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert got.returncode == 2 and "needs a CUDA GPU" in got.stderr, (got.returncode, got.stderr[-2000:])
    assert "Traceback" not in got.stderr
