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


SESSION = ROOT / "benchmarks" / "kernels_gpu_session.sh"
SESSION_MODES = re.findall(r"^([a-z0-9_]+)\)", SESSION.read_text(), re.M)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A PATH whose python3, nvidia-smi, ncu, compute-sanitizer and timeout only write their arguments to a log:
    the session script runs every mode on a machine without a GPU, in a second (``STAND_IN_TESTS_FAIL``: pytest fails)."""
    bin_dir = tmp_path_factory.mktemp("stand_ins")
    for tool in ("python3", "nvidia-smi", "ncu", "compute-sanitizer"):
        (bin_dir / tool).write_text(f'#!/bin/bash\nprintf "%s\\0" {tool} "$@" >> "$STAND_IN_LOG"; printf "\\n" >> "$STAND_IN_LOG"\n'
                                    '[ -n "${STAND_IN_TESTS_FAIL:-}" ] && [ "$2" = pytest ] && exit 1\nexit 0\n')
    (bin_dir / "timeout").write_text('#!/bin/bash\nshift\n"$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _session_calls(stand_ins, tmp_path, mode, **env_extra):
    log = tmp_path / "calls.log"
    log.touch()
    env = {**os.environ, "PATH": f"{stand_ins}{os.pathsep}{os.environ['PATH']}", "STAND_IN_LOG": str(log),
           "OUT": str(tmp_path / "out"), **env_extra}
    got = subprocess.run(["bash", str(SESSION), mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    calls = [line.split("\0")[:-1] for line in log.read_text().splitlines() if line]
    return got, calls


def test_session_modes_are_documented():
    header = SESSION.read_text().split("\nset -u", 1)[0]
    documented = set(re.findall(r"kernels_gpu_session\.sh (\w+)", header))
    assert len(SESSION_MODES) >= 30 and set(SESSION_MODES) - {"bench", "sanitize"} <= documented, \
        sorted(set(SESSION_MODES) - documented)


@pytest.mark.parametrize("mode", SESSION_MODES)
def test_session_mode_runs_scripts_that_exist(stand_ins, tmp_path, mode):
    """Each mode of the GPU session script runs to its end and only names benchmark scripts and test files that exist
    (a renamed script, a typo in a path or a shell error shows here, not in a device call that costs minutes)."""
    got, calls = _session_calls(stand_ins, tmp_path, mode)
    assert got.returncode == 0, got.stderr[-2000:]
    assert "command not found" not in got.stderr and "syntax error" not in got.stderr, got.stderr[-2000:]
    # what Nsight Compute runs counts as a python call of its own
    calls += [c[c.index("python3"):] for c in calls if c[0] == "ncu" and "python3" in c]
    python_calls = [c for c in calls if c[0] == "python3" and c[1:2] != ["-c"]
                    and c[1:3] != ["-m", "pip"]]
    assert python_calls, f"mode {mode} ran no python"
    for call in python_calls:
        if call[1:3] == ["-m", "pytest"]:
            test_files = [a for a in call if a.startswith("tests/")]
            assert test_files and all((ROOT / f).is_file() for f in test_files), call
        else:
            assert call[1].startswith("benchmarks/") and (ROOT / call[1]).is_file(), call


@pytest.mark.parametrize("mode", ["gluon", "cvt", "w8a8_check", "overlap"])
def test_session_stops_when_its_tests_fail(stand_ins, tmp_path, mode):
    """Modes that benchmark a kernel after its CUDA tests end there when a test fails: no numbers of a wrong kernel."""
    got, calls = _session_calls(stand_ins, tmp_path, mode, STAND_IN_TESTS_FAIL="1")
    assert got.returncode == 1 and "CUDA tests failed" in got.stdout, (got.returncode, got.stdout[-2000:])
    assert any(c[1:3] == ["-m", "pytest"] for c in calls)
    assert not [c for c in calls if any(a.startswith("benchmarks/") for a in c)], calls


def test_session_rejects_an_unknown_mode(stand_ins, tmp_path):
    got, calls = _session_calls(stand_ins, tmp_path, "no_such_mode")
    assert got.returncode == 2 and "unknown mode 'no_such_mode'" in got.stderr and not calls


def test_session_step_keeps_the_command_line_and_the_result(stand_ins, tmp_path):
    """The command is recorded as it can be typed again (quoted where the shell needs it), warnings are dropped
    and the result JSON it names is copied out."""
    got, calls = _session_calls(stand_ins, tmp_path, "k256")
    out = tmp_path / "out"
    text = (out / "k256.txt").read_text()
    assert ("== python3 benchmarks/w8a8_variants.py --shapes 4096x4096 --warps 8 --no-wgmma "
            "--tma 'x256 w,128x256x128 w8 s4 g8 persistent' --reps 20 --name w8a8_variants_k256") in text
    assert ["python3", "benchmarks/w8a8_variants.py", "--shapes", "4096x4096", "--warps", "8", "--no-wgmma", "--tma",
            "x256 w,128x256x128 w8 s4 g8 persistent", "--reps", "20", "--name", "w8a8_variants_k256"] in calls
