"""The README's GPU tables (and the decode A/B table of docs/gpu-kernels.md) are the ones
``benchmarks/readme_tables.py`` builds from the committed H100 results: a number edited by hand,
or a result file changed without the docs, fails here."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme_tables  # noqa: E402


def test_readme_gpu_tables_come_from_the_results():
    readme = (ROOT / "README.md").read_text()
    kernels, decode, now = readme_tables.kernel_table(), readme_tables.decode_table(), readme_tables.decode_now_table()
    assert kernels.count("\n") == 13 and "| 28672×8192 | 2048 |" in kernels  # 12 rows: 4 shapes x M = 1, 16, 2048
    assert kernels in readme
    assert decode in readme
    assert now.count("\n") == 7 and now in readme  # batch 1: fp16, int4 in each layout; batch 16: fp16, int4, NF4


def test_gpu_doc_ab_table_comes_from_the_results():
    ab = readme_tables.decode_ab_table()
    assert ab.count("\n") == 5 and ab in (ROOT / "docs" / "gpu-kernels.md").read_text()
