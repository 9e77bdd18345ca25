"""The tuning cache on disk (:mod:`bitsmith.kernels.tune_cache`): round trip, atomic rewrite,
bad files, and the tuner reading it instead of timing (the timer replaced, so no GPU is needed)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import bitsmith
from bitsmith.kernels import qmm, repack, tune_cache

pytestmark = pytest.mark.skipif(not qmm.HAVE_TRITON, reason="the tuner needs triton installed")


def test_round_trip_and_merge_with_the_file(tmp_path):
    path = tmp_path / "sub" / "tune.json"
    a, b = tune_cache.TuneCache(path), tune_cache.TuneCache(path)
    assert a.get("k1") is None and not path.exists()
    assert a.put("k1", {"SPLIT": 8, "KERNEL": "fma", "EVEN": True})
    assert b.put("k2", {"SPLIT": 4})  # b read the file again before writing: k1 stays
    doc = json.loads(path.read_text())
    assert doc == {"version": tune_cache.VERSION, "entries": {"k1": {"SPLIT": 8, "KERNEL": "fma", "EVEN": True},
                                                              "k2": {"SPLIT": 4}}}
    assert tune_cache.TuneCache(path).get("k1") == {"SPLIT": 8, "KERNEL": "fma", "EVEN": True}
    assert [p.name for p in path.parent.iterdir()] == ["tune.json"]  # no temporary left behind
    with pytest.raises(ValueError, match="flat dict"):
        a.put("k3", {"nested": {"x": 1}})


@pytest.mark.parametrize("text,what", [("{not json", "not JSON"), ('{"version": 99, "entries": {}}', "expected")])
def test_a_bad_file_warns_names_itself_and_is_rewritten(tmp_path, text, what):
    path = tmp_path / "tune.json"
    path.write_text(text)
    cache = tune_cache.TuneCache(path)
    with pytest.warns(RuntimeWarning, match=f"tuning cache {path}: {what}"):
        assert cache.get("k") is None
    with pytest.warns(RuntimeWarning):
        assert cache.put("k", {"SPLIT": 2})
    assert json.loads(path.read_text())["entries"] == {"k": {"SPLIT": 2}}


def test_an_unwritable_place_warns_and_keeps_nothing_half(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = tune_cache.TuneCache(blocker / "tune.json")  # its folder would have to be a file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cache.put("k", {"SPLIT": 2})
    said = [str(w.message) for w in caught]
    assert any("cannot write it" in m and str(blocker) in m for m in said), said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and blocker.read_text() == "x"


def test_entry_keys_name_the_gpu_triton_and_kernels():
    key = ("m1", 1, 4096, 4096, ("rows", "affine", 4, 64, True, torch.float16))
    k = tune_cache.entry_key("NVIDIA H100 80GB HBM3", "3.6.0", key)
    assert k.startswith("NVIDIA H100 80GB HBM3 | triton 3.6.0 | kernels ")
    assert tune_cache.kernels_fingerprint() in k and "torch.float16" in k
    assert k != tune_cache.entry_key("NVIDIA H200", "3.6.0", key)


def _weight():
    qt = bitsmith.quantize_tensor(torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02,
                                  "rtn", bits=4, group_size=64)
    return repack(qt, layout="rows")


def test_the_tuner_reads_the_cache_instead_of_timing(tmp_path, monkeypatch):
    """First process: every candidate timed (the fake timer prefers one), the winner written to
    the file. A later process (empty in-memory table): the cached winner, nothing timed. A cached
    config that is no longer a candidate is ignored and tuned over."""
    rw = _weight()
    x = torch.randn(1, 512)
    key = ("m1", 1, rw.n, rw.k, qmm._layout_key(rw, x.dtype))
    cands = qmm._configs(rw, 1, x.dtype)
    assert len(cands) > 2
    want = cands[len(cands) // 2]
    timed = []

    def fake_time(fn, calls=20):  # the config under test is the one _tune is timing
        cfg = cands[len(timed)]
        timed.append(cfg)
        return 1.0 if cfg == want else 2.0

    monkeypatch.setattr(qmm, "gpu_time", fake_time)
    monkeypatch.setattr(qmm, "TUNED", {})
    path = tmp_path / "tune.json"
    tune_cache.set_path(path)
    try:
        assert qmm._tune(key, rw, x, None) == want and len(timed) == len(cands)
        assert list(json.loads(path.read_text())["entries"].values()) == [want]

        monkeypatch.setattr(qmm, "TUNED", {})
        monkeypatch.setattr(qmm, "TUNE_SECONDS", {})
        tune_cache.set_path(path)  # a fresh process: the file is read anew
        monkeypatch.setattr(qmm, "gpu_time", lambda fn, calls=20: pytest.fail("timed although cached"))
        assert qmm._tune(key, rw, x, None) == want and qmm.TUNED[key] == want
        assert qmm.TUNE_SECONDS == {}  # nothing tuned: no tuning time recorded

        entries = json.loads(path.read_text())["entries"]
        stale = {k: {**v, "BLOCK_N": 999} for k, v in entries.items()}
        path.write_text(json.dumps({"version": tune_cache.VERSION, "entries": stale}))
        tune_cache.set_path(path)
        timed.clear()
        monkeypatch.setattr(qmm, "gpu_time", fake_time)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert qmm._tune(key, rw, x, None) == want and len(timed) == len(cands)
        assert list(json.loads(path.read_text())["entries"].values()) == [want]
    finally:
        tune_cache.set_path(None)


def test_no_cache_file_unless_asked(tmp_path, monkeypatch):
    tune_cache.set_path(None)
    assert tune_cache.active() is None
    rw = _weight()
    x = torch.randn(1, 512)
    monkeypatch.setattr(qmm, "gpu_time", lambda fn, calls=20: 1.0)
    monkeypatch.setattr(qmm, "TUNED", {})
    monkeypatch.chdir(tmp_path)
    qmm._tune(("m1", 1, rw.n, rw.k, qmm._layout_key(rw, x.dtype)), rw, x, None)
    assert list(tmp_path.iterdir()) == []


def test_w8a8_tuning_is_cached_and_reported(tmp_path, monkeypatch):
    """W8A8's GEMM tuner goes through the same routine: the fastest candidate (a fake timer's
    pick) is kept in the cache file under ``("w8a8", M bucket, N, K)`` and its cost recorded in
    ``TUNE_SECONDS``; a later process takes it from the file without timing anything; a config
    that raises is skipped."""
    from bitsmith.kernels import w8a8

    xq, wq = torch.zeros(64, 256, dtype=torch.int8), torch.zeros(128, 256, dtype=torch.int8)
    sx, sw, out = torch.ones(64), torch.ones(128), torch.empty(64, 128, dtype=torch.float16)
    cands = w8a8.gemm_candidates(xq, wq)
    want, broken = cands[2], cands[0]
    launched = []

    def fake_launch(xq_, wq_, sx_, sw_, bias_, out_, cfg):
        launched.append(cfg)
        if cfg == broken:
            raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(w8a8, "_launch_gemm", fake_launch)
    monkeypatch.setattr(qmm, "gpu_time", lambda fn, calls=20: (fn(), 1.0 if launched[-1] == want else 2.0)[1])
    monkeypatch.setattr(qmm, "TUNE_SECONDS", {})
    monkeypatch.setattr(w8a8, "W8A8_CONFIG", {})
    key = (w8a8._m_bucket(64), 128, 256)
    path = tmp_path / "tune.json"
    tune_cache.set_path(path)
    try:
        assert w8a8._tune_gemm(key, xq, wq, sx, sw, None, out) == want and w8a8.W8A8_CONFIG[key] == want
        assert launched == cands
        assert qmm.TUNE_SECONDS[("w8a8",) + key]["candidates"] == len(cands)
        assert list(json.loads(path.read_text())["entries"].values()) == [want]
        assert "'w8a8'" in next(iter(json.loads(path.read_text())["entries"]))

        monkeypatch.setattr(w8a8, "W8A8_CONFIG", {})
        monkeypatch.setattr(qmm, "TUNE_SECONDS", {})
        tune_cache.set_path(path)  # a fresh process
        monkeypatch.setattr(qmm, "gpu_time", lambda fn, calls=20: pytest.fail("timed although cached"))
        assert w8a8._tune_gemm(key, xq, wq, sx, sw, None, out) == want and qmm.TUNE_SECONDS == {}
    finally:
        tune_cache.set_path(None)
