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


def test_target_bounds_table_is_in_the_docs_and_follows_from_the_probe():
    """``benchmarks/target_bounds.py``: the table in docs/gpu-kernels.md is the one it builds from
    the committed pattern probe; each row's allowed time is fp16's over the target, a row is out
    of reach exactly when that time is below a read the kernel cannot skip, and the reader's line
    (used for the int3 estimates) passes within a microsecond of every M = 1 reader time."""
    import json

    import target_bounds

    probe = json.loads((ROOT / "benchmarks" / "results" / target_bounds.PROBE).read_text())
    rows = target_bounds.bounds(probe["rows"])
    assert target_bounds.table(rows) in (ROOT / "docs" / "gpu-kernels.md").read_text()
    assert {(b["format"], b["m"]) for b in rows} == set(target_bounds.TARGETS)
    for b in rows:
        assert abs(b["allowed_us"] * b["target"] - b["fp16_us"]) < 1e-9
        assert b["words_read_us"] <= b["format_read_us"]
        assert b["verdict"].startswith("out of reach") == (b["allowed_us"] < b["format_read_us"])
        assert ("words' read" in b["verdict"]) == (b["allowed_us"] < b["words_read_us"])
    t0, mb_per_us = target_bounds.reader_line(probe["rows"])
    for r in probe["rows"]:
        if r["m"] == 1:
            assert abs(t0 + r["words_mb"] / mb_per_us - r["reader_us"]) < 1.0
