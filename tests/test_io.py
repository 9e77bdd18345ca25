"""Checkpoint I/O: safetensors reader/writers and the checkpoint schema."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bitsmith.errors import CheckpointError
from bitsmith.io import (
    Checkpoint,
    CheckpointWriter,
    SafetensorsFile,
    ShardWriter,
    shard_name,
    write_safetensors,
)
from bitsmith.io import safetensors_io
from bitsmith.methods import quantize_weight

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def plain_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f16": torch.randn(7, 5, generator=g).half(),
        "bf16": torch.randn(3, 33, generator=g).bfloat16(),
        "f32": torch.randn(11, generator=g),
        "f64": torch.randn(2, 3, 4, generator=g).double(),
        "u8": torch.randint(0, 256, (13,), dtype=torch.uint8, generator=g),  # odd size: next tensor misaligned
        "i8": torch.randint(-128, 128, (5, 3), dtype=torch.int8, generator=g),
        "i16": torch.randint(-(2**15), 2**15, (9,), dtype=torch.int16, generator=g),
        "i32": torch.randint(-(2**31), 2**31, (4, 2), dtype=torch.int32, generator=g),
        "i64": torch.randint(-(2**62), 2**62, (6,), dtype=torch.int64, generator=g),
        "bool": torch.rand(17, generator=g) > 0.5,
        "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 4),
        "noncontig": torch.randn(8, 6, generator=g).t(),
        "big_bf16": torch.randn(300, 1024, generator=g).bfloat16(),  # >= MMAP_MIN_BYTES: mapped
        "odd": torch.randint(0, 256, (1001,), dtype=torch.uint8, generator=g),
        "big_misaligned_f32": torch.randn(70000, generator=g),  # starts at an odd offset: copied
    }


def quantized_tensors() -> dict:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 192, generator=g).bfloat16()
    return {
        "a.weight": quantize_weight(w, "rtn", bits=4, group_size=64),
        "b.weight": quantize_weight(w.float(), "rtn", bits=3, group_size=50),
        "c.weight": quantize_weight(w, "nf"),
        "d.weight": quantize_weight(w.half(), "nf", double_quant=True),
        "conv.weight": quantize_weight(torch.randn(8, 4, 3, 3, generator=g), "nf", levels=7, block_size=36),
    }


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_same_q(a, b) -> None:
    assert a.codec == b.codec and a.shape == b.shape and a.dtype == b.dtype and a.params == b.params
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert_same(a.tensors[k], b.tensors[k])
    assert_same(a.dequantize(), b.dequantize())


def write_ckpt(dst: Path, **kw) -> tuple[dict, dict]:
    plain, quant = plain_tensors(), quantized_tensors()
    with CheckpointWriter(dst, recipe={"method": "nf"}, config={"model_type": "toy"}, **kw) as w:
        for i, (n, t) in enumerate(plain.items()):
            w.add_tensor(n, t)
            qn = list(quant)[i % len(quant)]
            if i < len(quant):
                w.add_qtensor(qn, quant[qn])
    return plain, quant


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(path: Path, header: dict, data: bytes, *, pad: bool = True) -> None:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * ((-len(text)) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def rewrite(path: Path, fn) -> None:
    header, data = read_header(path)
    fn(header)
    write_header(path, header, data)


def rewrite_doc(path: Path, fn) -> None:
    def apply(header):
        doc = json.loads(header["__metadata__"]["bitsmith"])
        fn(doc)
        header["__metadata__"]["bitsmith"] = json.dumps(doc)

    rewrite(path, apply)


def expect_error(path: Path, *, tensor: str | None = None, read_all: bool = True, match: str | None = None):
    with pytest.raises(CheckpointError) as info:
        with Checkpoint.open(path) as ck:
            if read_all:
                for n in ck.names():
                    ck.qtensor(n).dequantize() if ck.is_quantized(n) else ck.tensor(n)
    msg = str(info.value)
    assert "\n" not in msg
    file = path if path.is_file() else None
    assert str(file or path) in msg or (info.value.file and Path(info.value.file).parent == path), msg
    if tensor is not None:
        assert tensor in msg, msg
    if match is not None:
        assert match in msg, msg
    return info.value


# --------------------------------------------------------------------------------------------
# safetensors layer
# --------------------------------------------------------------------------------------------


def test_write_read_safetensors_round_trip(tmp_path):
    tensors = plain_tensors()
    path = write_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v"})
    with SafetensorsFile.open(path) as f:
        assert f.keys() == list(tensors)
        assert f.metadata == {"k": "v"}
        for n, t in tensors.items():
            e = f.entry(n)
            assert (e.dtype, e.shape, e.nbytes) == (t.dtype, tuple(t.shape), t.numel() * t.element_size())
            assert_same(f.get(n), t)
    # the reference reader agrees
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert sorted(f.keys()) == sorted(tensors)
        for n, t in tensors.items():
            assert_same(f.get_tensor(n), t)
    assert os.listdir(tmp_path) == ["x.safetensors"]
    raw = path.read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0  # data starts 8-byte aligned


def test_reads_files_written_by_safetensors(tmp_path):
    tensors = {k: v.contiguous() for k, v in plain_tensors().items()}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    with SafetensorsFile.open(tmp_path / "ref.safetensors") as f:
        assert f.metadata == {"format": "pt"}
        for n, t in tensors.items():
            assert_same(f.get(n), t)
    with Checkpoint.open(tmp_path / "ref.safetensors") as ck:  # a bare state dict
        assert sorted(ck.names()) == sorted(tensors)
        assert ck.config is None and ck.recipe is None
        assert not any(ck.is_quantized(n) for n in ck.names())


def test_mapped_tensors_are_private_writable_and_outlive_close(tmp_path):
    t = torch.arange(200_000, dtype=torch.float32)
    path = write_safetensors(tmp_path / "m.safetensors", {"t": t})
    before = path.read_bytes()
    f = SafetensorsFile.open(path)
    a, b = f.get("t"), f.get("t")
    f.close()
    a.add_(1)  # writable, private copy-on-write: neither the file nor the other read changes
    assert torch.equal(b, t) and torch.equal(a, t + 1)
    assert path.read_bytes() == before
    with pytest.raises(CheckpointError, match="closed"):
        f.get("t")


def test_shard_writer_streams_and_cleans_up(tmp_path):
    tensors = plain_tensors()
    with ShardWriter(tmp_path / "s.safetensors", {"a": "b"}) as w:
        for n, t in tensors.items():
            w.add(n, t)
            assert not (tmp_path / "s.safetensors").exists()  # data goes to a hidden temporary
        assert w.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert os.listdir(tmp_path) == ["s.safetensors"]
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        for n, t in tensors.items():
            assert_same(f.get_tensor(n), t)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "t.safetensors") as w:
            w.add("x", torch.ones(3))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["s.safetensors"]
    with ShardWriter(tmp_path / "d.safetensors") as w:
        w.add("x", torch.ones(3))
        with pytest.raises(CheckpointError, match="duplicate"):
            w.add("x", torch.ones(3))
        w.abort()
    assert os.listdir(tmp_path) == ["s.safetensors"]


def test_write_safetensors_is_atomic(tmp_path):
    with pytest.raises(CheckpointError, match="complex"):
        write_safetensors(tmp_path / "x.safetensors", {"a": torch.ones(2), "b": torch.ones(2, dtype=torch.complex64)})
    assert os.listdir(tmp_path) == []
    with pytest.raises(CheckpointError, match="metadata"):
        write_safetensors(tmp_path / "x.safetensors", {"a": torch.ones(2)}, {"k": 1})  # type: ignore[dict-item]
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# checkpoint round trips
# --------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    dst = tmp_path / "ck"
    plain, quant = write_ckpt(dst)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors", "model.safetensors.index.json"]
    with Checkpoint.open(dst) as ck:
        assert ck.config == {"model_type": "toy"}
        assert ck.recipe == {"method": "nf"}
        assert set(ck.names()) == set(plain) | set(quant)
        # file order: the order they were added
        assert ck.names()[:4] == ["f16", "a.weight", "bf16", "b.weight"]
        for n, t in plain.items():
            assert not ck.is_quantized(n)
            assert_same(ck.tensor(n), t)
            assert ck.entry(n).nbytes == t.numel() * t.element_size()
        for n, q in quant.items():
            assert ck.is_quantized(n)
            assert_same_q(ck.qtensor(n), q)
            e = ck.entry(n)
            assert (e.codec, e.shape, e.dtype, e.nbytes) == (q.codec, q.shape, q.dtype, q.nbytes)
            spec = ck.spec(n)
            assert spec["tensors"] == {k: f"{n}.{k}" for k in q.tensors}
            assert {k: spec[k] for k in ("codec", "shape", "dtype", "params")} == q.spec()
            assert_same(ck.dequantized(n), q.dequantize())
        with pytest.raises(CheckpointError, match="quantized"):
            ck.tensor("a.weight")
        with pytest.raises(CheckpointError, match="not quantized"):
            ck.qtensor("f16")
        with pytest.raises(CheckpointError, match="no tensor named"):
            ck.tensor("nope")
    # transformers-style readers: safe_open sees the stored tensors and the metadata
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "pt"
        doc = json.loads(meta["bitsmith"])
        assert doc["format"] == "bitsmith.checkpoint" and doc["version"] == 1
        assert set(doc["quantized"]) == set(quant)
        for n, q in quant.items():
            for k, t in q.tensors.items():
                assert_same(f.get_tensor(f"{n}.{k}"), t)
        for n, t in plain.items():
            assert_same(f.get_tensor(n), t)


def test_sharding_and_index(tmp_path):
    dst = tmp_path / "ck"
    plain, quant = write_ckpt(dst, max_shard_bytes=40_000)
    files = sorted(p.name for p in dst.glob("*.safetensors"))
    n = len(files)
    assert n >= 4
    assert files == [shard_name(i, n) for i in range(1, n + 1)]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    total = 0
    stored = {}
    for name in files:
        with safe_open(str(dst / name), "pt") as f:
            doc = json.loads(f.metadata()["bitsmith"])
            assert doc["recipe"] == {"method": "nf"}
            for k in f.keys():
                stored[k] = name
                total += f.get_slice(k).get_shape() and 0 or 0
            for qn, spec in doc["quantized"].items():  # every field of a qtensor in its shard
                assert all(s in f.keys() for s in spec["tensors"].values())
        header, data = read_header(dst / name)
        total += len(data)
        # a shard only exceeds the limit when a single tensor (or qtensor) does
        assert len(data) <= 40_000 or len([k for k in header if k != "__metadata__"]) <= 3
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == total
    with Checkpoint.open(dst) as ck:
        assert ck.shard_files == [dst / f for f in files]
        assert ck.total_nbytes == total
        for name, t in plain.items():
            assert_same(ck.tensor(name), t)
        for name, q in quant.items():
            assert_same_q(ck.qtensor(name), q)
            assert ck.shard_of(name).name in files
    # a plain folder of shards without index reads the same
    (dst / "model.safetensors.index.json").unlink()
    with Checkpoint.open(dst) as ck:
        assert set(ck.names()) == set(plain) | set(quant)
        assert_same_q(ck.qtensor("c.weight"), quant["c.weight"])
    # and a single shard opens on its own (a shard with only plain tensors is a bare state dict)
    with Checkpoint.open(dst / files[0]) as ck:
        assert ck.names()


def test_extra_files_and_config_path(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"a": 1}')
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    with CheckpointWriter(tmp_path / "ck", config=tmp_path / "src" / "config.json",
                          extra_files={"tokenizer.json": tmp_path / "src" / "tokenizer.json"}) as w:
        w.add_tensor("x", torch.ones(2))
    assert (tmp_path / "ck" / "tokenizer.json").read_text() == "{}"
    with Checkpoint.open(tmp_path / "ck") as ck:
        assert ck.config == {"a": 1}
    for bad in ("../evil", "model.safetensors.index.json", "x.safetensors"):
        with pytest.raises(CheckpointError, match="extra file name"):
            CheckpointWriter(tmp_path / "ck2", extra_files={bad: tmp_path / "src" / "tokenizer.json"})
    assert sorted(os.listdir(tmp_path)) == ["ck", "src"]


def test_empty_checkpoint(tmp_path):
    with CheckpointWriter(tmp_path / "ck"):
        pass
    with Checkpoint.open(tmp_path / "ck") as ck:
        assert ck.names() == []


# --------------------------------------------------------------------------------------------
# atomicity
# --------------------------------------------------------------------------------------------


def test_existing_dst_refused_then_replaced_with_overwrite(tmp_path):
    dst = tmp_path / "ck"
    with CheckpointWriter(dst) as w:
        w.add_tensor("old", torch.ones(3))
    with pytest.raises(CheckpointError, match="already exists") as info:
        CheckpointWriter(dst)
    assert str(dst) in str(info.value)
    with CheckpointWriter(dst, overwrite=True) as w:
        w.add_tensor("new", torch.zeros(3))
        with Checkpoint.open(dst) as ck:  # the old one is intact until the new one is complete
            assert ck.names() == ["old"]
    with Checkpoint.open(dst) as ck:
        assert ck.names() == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    # a failed overwrite keeps the old checkpoint
    with pytest.raises(ValueError):
        with CheckpointWriter(dst, overwrite=True) as w:
            w.add_tensor("newer", torch.zeros(3))
            raise ValueError("boom")
    with Checkpoint.open(dst) as ck:
        assert ck.names() == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        CheckpointWriter(tmp_path / "home", overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"


def test_exception_inside_writer_leaves_nothing(tmp_path):
    dst = tmp_path / "ck"
    with pytest.raises(KeyError):
        with CheckpointWriter(dst, max_shard_bytes=100) as w:
            for i in range(5):
                w.add_tensor(f"t{i}", torch.randn(40))
            w.add_qtensor("q.weight", quantize_weight(torch.randn(64, 64), "nf"))
            assert len(list(w.partial.iterdir())) >= 2
            raise KeyError("boom")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "action",
    [
        lambda w: (w.add_tensor("x", torch.ones(2)), w.add_tensor("x", torch.ones(2))),
        lambda w: (w.add_qtensor("q", quantize_weight(torch.randn(8, 64), "nf")), w.add_tensor("q.codes", torch.ones(1))),
        lambda w: (w.add_tensor("q.codes", torch.ones(1)), w.add_qtensor("q", quantize_weight(torch.randn(8, 64), "nf"))),
        lambda w: w.add_tensor("c", torch.ones(2, dtype=torch.complex64)),
        lambda w: w.add_tensor("c", [1, 2]),
        lambda w: w.add_qtensor("c", torch.ones(2)),
    ],
)
def test_writer_errors_are_checkpoint_errors_and_leave_nothing(tmp_path, action):
    with pytest.raises(CheckpointError) as info:
        with CheckpointWriter(tmp_path / "ck") as w:
            action(w)
    assert str(tmp_path / "ck") in str(info.value)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# corrupt files: one CheckpointError line naming the file (and the tensor)
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def single(tmp_path) -> Path:
    """A one-shard checkpoint's shard file (plain + quantized tensors)."""
    write_ckpt(tmp_path / "ck")
    return tmp_path / "ck" / "model.safetensors"


def test_truncated_files(single):
    raw = single.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    for cut in (0, 3, 8, 20, 8 + n - 1, 8 + n, 8 + n + 100, len(raw) - 1):
        single.write_bytes(raw[:cut])
        expect_error(single)
    single.write_bytes(raw + b"\0")  # trailing bytes are not covered by any tensor
    expect_error(single, match="cover")


def test_truncated_shard_in_folder_names_the_shard(single):
    raw = single.read_bytes()
    single.write_bytes(raw[:-10])
    err = expect_error(single.parent)
    assert str(single) in str(err)


@pytest.mark.parametrize(
    "mutate, tensor, match",
    [
        (lambda h: h["f16"].update(shape=[7, 6]), "f16", "needs"),
        (lambda h: h["f16"].update(shape=[7, -5]), "f16", "shape"),
        (lambda h: h["f16"].update(shape=[7.0, 5]), "f16", "shape"),
        (lambda h: h["f16"].update(shape="7x5"), "f16", "shape"),
        (lambda h: h["f16"].update(dtype="F8_E4M3"), "f16", "dtype"),
        (lambda h: h["f16"].update(dtype=1), "f16", "dtype"),
        (lambda h: h["f16"].update(data_offsets=[0, 10**30]), "f16", "data_offsets"),
        (lambda h: h["f16"].update(data_offsets=[-2, 68]), "f16", "data_offsets"),
        (lambda h: h["f16"].update(data_offsets=[1]), "f16", "data_offsets"),
        (lambda h: h["f16"].update(extra=1), "f16", "fields"),
        (lambda h: h.update(f16=[1, 2]), "f16", "object"),
        (lambda h: h["__metadata__"].update(x=1), None, "__metadata__"),
        (lambda h: h.update(__metadata__="x"), None, "__metadata__"),
        (lambda h: h.update({"": h.pop("f16")}), None, "empty"),
    ],
)
def test_lying_headers(single, mutate, tensor, match):
    rewrite(single, mutate)
    expect_error(single, tensor=tensor, match=match)


def test_overlapping_and_holey_offsets(single):
    header, data = read_header(single)
    a, b = header["f16"]["data_offsets"]
    header2 = json.loads(json.dumps(header))
    header2["extra"] = {"dtype": "U8", "shape": [b - a], "data_offsets": [a, b]}  # aliases f16's bytes
    write_header(single, header2, data)
    expect_error(single, match="overlap")
    header3 = json.loads(json.dumps(header))
    header3["f16"] = {"dtype": "F16", "shape": [7, 4], "data_offsets": [a, b - 10]}  # leaves a hole
    write_header(single, header3, data)
    expect_error(single, match="hole")


def test_bad_header_bytes(tmp_path):
    p = tmp_path / "x.safetensors"
    for text in (b"[1, 2]", b"{", b"\xff\xfe{}", b'{"a": 1, "a": 2}', b"{}" + b"\0" * 6, b"[" * 100_000 + b"]" * 100_000,
                 b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'):
        p.write_bytes(len(text).to_bytes(8, "little") + text)
        expect_error(p)
    p.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    expect_error(p, match="exceeds")
    p.write_bytes((200 * 1024 * 1024).to_bytes(8, "little") + b" " * 16)
    expect_error(p, match="exceeds")
    p.write_bytes(b"")
    expect_error(p, match="too short")
    expect_error(tmp_path / "missing.safetensors", match="no such")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", match="no .safetensors")


def _spec_edit(name, fn):
    return lambda doc: fn(doc["quantized"][name])


@pytest.mark.parametrize(
    "mutate, tensor, match",
    [
        (_spec_edit("a.weight", lambda s: s.update(codec="zstd")), "a.weight", "unknown codec"),
        (_spec_edit("a.weight", lambda s: s["params"].update(bits=0)), "a.weight", "bits"),
        (_spec_edit("a.weight", lambda s: s["params"].update(bits=9)), "a.weight", "bits"),
        (_spec_edit("a.weight", lambda s: s["params"].update(group_size=0)), "a.weight", "group_size"),
        (_spec_edit("a.weight", lambda s: s["params"].update(bits=True)), "a.weight", "bits"),
        (_spec_edit("a.weight", lambda s: s["params"].update(group_size=32)), "a.weight", "must be"),
        (_spec_edit("c.weight", lambda s: s["params"].update(levels=1)), "c.weight", "levels"),
        (_spec_edit("c.weight", lambda s: s["params"].update(levels=257)), "c.weight", "levels"),
        (_spec_edit("c.weight", lambda s: s["params"].update(block_size=0)), "c.weight", "block_size"),
        (_spec_edit("c.weight", lambda s: s["params"].update(surprise=1)), "c.weight", "unknown"),
        (_spec_edit("c.weight", lambda s: s.update(shape=[96, 193])), "c.weight", "codes"),  # codes too short
        (_spec_edit("c.weight", lambda s: s.update(shape=[96, 0])), "c.weight", "shape"),
        (_spec_edit("c.weight", lambda s: s.update(dtype="int8")), "c.weight", "floating"),
        (_spec_edit("c.weight", lambda s: s.update(extra=1)), "c.weight", "unknown fields"),
        (_spec_edit("c.weight", lambda s: s["tensors"].update(codes="nope")), "c.weight", "does not hold"),
        (_spec_edit("c.weight", lambda s: s["tensors"].pop("codes")), "c.weight", "fields"),
        (_spec_edit("c.weight", lambda s: s["tensors"].update(codes="a.weight.codes")), "c.weight", "also a field"),
        (_spec_edit("c.weight", lambda s: s["tensors"].update(codes="f16")), "c.weight", "must be"),
        (_spec_edit("c.weight", lambda s: s.update(tensors={})), "c.weight", "tensors"),
        (lambda d: d.update(version=2), None, "version"),
        (lambda d: d.update(version="1"), None, "version"),
        (lambda d: d.update(format="other"), None, "format"),
        (lambda d: d.update(extra=1), None, "unknown fields"),
        (lambda d: d.pop("recipe"), None, "missing fields"),
        (lambda d: d.update(recipe=[1]), None, "recipe"),
        (lambda d: d.update(quantized=[]), None, "quantized"),
        (lambda d: d["quantized"].update(f16=d["quantized"]["c.weight"]), None, "also a field"),
    ],
)
def test_bad_bitsmith_metadata(single, mutate, tensor, match):
    rewrite_doc(single, mutate)
    expect_error(single, tensor=tensor, match=match)


def test_bitsmith_metadata_not_json(single):
    rewrite(single, lambda h: h["__metadata__"].update(bitsmith="{not json"))
    expect_error(single, match="bitsmith metadata")


def test_logical_name_collision(single):
    # the logical name of a quantized tensor is free (its fields are listed explicitly) ...
    rewrite_doc(single, lambda d: d["quantized"].update({"renamed": d["quantized"].pop("a.weight")}))
    with Checkpoint.open(single) as ck:
        assert ck.is_quantized("renamed") and "a.weight" not in ck
    # ... but may not collide with a plain tensor
    rewrite_doc(single, lambda d: d["quantized"].update({"f16": d["quantized"].pop("renamed")}))
    expect_error(single, tensor="f16", match="defined twice")


def test_index_mismatches(tmp_path):
    dst = tmp_path / "ck"
    write_ckpt(dst, max_shard_bytes=40_000)
    index_path = dst / "model.safetensors.index.json"
    good = json.loads(index_path.read_text())
    cases = [
        lambda ix: ix["weight_map"].pop("f16"),
        lambda ix: ix["weight_map"].update(ghost=ix["weight_map"]["f16"]),
        lambda ix: ix["weight_map"].update(f16="../model.safetensors"),
        lambda ix: ix["weight_map"].update(f16="model-00099-of-00099.safetensors"),
        lambda ix: ix["weight_map"].update(f16=sorted(set(ix["weight_map"].values()))[-1]),
        lambda ix: ix.pop("weight_map"),
    ]
    for fn in cases:
        ix = json.loads(json.dumps(good))
        fn(ix)
        index_path.write_text(json.dumps(ix))
        err = expect_error(dst, read_all=False)
        assert "index" in str(err)
    index_path.write_text("{")
    expect_error(dst, read_all=False, match="JSON")


def test_duplicate_tensor_across_shards(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": torch.ones(2)})
    write_safetensors(tmp_path / "b.safetensors", {"x": torch.ones(2)})
    err = expect_error(tmp_path, tensor="x", match="also stored")
    assert "b.safetensors" in str(err)


def test_quantized_reader_never_allocates_beyond_the_file(single):
    # a spec whose shape claims far more elements than its stored bytes hold is refused at open,
    # before any dequantization could allocate it
    def claim(doc):
        s = doc["quantized"]["c.weight"]
        s["shape"] = [96 * 64, 192 * 64]
    rewrite_doc(single, claim)
    expect_error(single, tensor="c.weight", read_all=False)


def test_min_bits_guard_with_a_test_codec(single, monkeypatch):
    """A codec whose stored tensors do not grow with the shape cannot make the reader allocate
    more than the file implies: the spec is refused at open."""
    from bitsmith.formats.codec import CODECS, Codec, Params, TensorSpec
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class TinyParams(Params):
        pass

    class Tiny(Codec):
        name = "test_tiny"
        params_type = TinyParams

        @classmethod
        def tensor_specs(cls, params, shape):
            return {"codes": TensorSpec(torch.uint8, (1,))}

        @classmethod
        def dequantize(cls, params, tensors, shape, dtype):
            return tensors["codes"].to(dtype).expand(shape).clone()

    monkeypatch.setitem(CODECS._items, "test_tiny", Tiny)
    header, data = read_header(single)
    header["t.codes"] = header.pop("u8")
    header["t.codes"]["shape"], header["t.codes"]["data_offsets"][1] = [1], header["t.codes"]["data_offsets"][0] + 1
    header["u8"] = {"dtype": "U8", "shape": [12], "data_offsets": [header["t.codes"]["data_offsets"][1],
                                                                   header["t.codes"]["data_offsets"][1] + 12]}
    doc = json.loads(header["__metadata__"]["bitsmith"])
    spec = {"codec": "test_tiny", "shape": [2, 4], "dtype": "float32", "params": {}, "tensors": {"codes": "t.codes"}}
    doc["quantized"]["t"] = spec
    header["__metadata__"]["bitsmith"] = json.dumps(doc)
    write_header(single, header, data)
    with Checkpoint.open(single) as ck:  # 8 elements from 1 byte: allowed (1 bit each)
        assert ck.dequantized("t").shape == (2, 4)
    spec["shape"] = [3, 3]
    header["__metadata__"]["bitsmith"] = json.dumps(doc)
    write_header(single, header, data)
    expect_error(single, tensor="t", match="claims 9 elements")


def test_file_truncated_after_open(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", {"small": torch.ones(10), "big": torch.ones(300_000)})
    for name in ("small", "big"):
        f = SafetensorsFile.open(path)
        with open(path, "r+b") as fh:  # in place: same inode
            fh.truncate(100)
        with pytest.raises(CheckpointError) as info:
            f.get(name)
        assert str(path) in str(info.value) and name in str(info.value)
        f.close()
        path = write_safetensors(tmp_path / "x.safetensors", {"small": torch.ones(10), "big": torch.ones(300_000)})


def test_huge_codes_per_symbol_fails_fast(tmp_path):
    """A spec claiming 2**40 codes per symbol must be refused at once, not hang computing 7**(2**40)."""
    import subprocess
    import sys

    path = tmp_path / "m.safetensors"
    w = torch.randn(2, 44)
    with CheckpointWriter(tmp_path / "ck") as wr:
        wr.add_qtensor("e.weight", quantize_weight(w, "nf", levels=7, block_size=11))
    (tmp_path / "ck" / "model.safetensors").rename(path)
    rewrite_doc(path, _spec_edit("e.weight", lambda s: s["params"]["packing"].update(codes_per_symbol=2**40)))
    code = ("import sys; from bitsmith.io import Checkpoint; from bitsmith.errors import CheckpointError\n"
            "try:\n    Checkpoint.open(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=10, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("opening hangs")
    assert "e.weight" in out.stdout, out.stderr


def test_rejected_tensor_leaves_the_writer_usable(tmp_path):
    """Validation errors (duplicate name, bad dtype) are raised before anything is written, so a
    caller that catches them can go on; only I/O failures abort the writer."""
    with CheckpointWriter(tmp_path / "ck") as w:
        w.add_tensor("x", torch.ones(2))
        for bad in (lambda: w.add_tensor("x", torch.ones(2)), lambda: w.add_tensor("c", torch.ones(2, dtype=torch.complex64))):
            with pytest.raises(CheckpointError):
                bad()
        w.add_tensor("y", torch.zeros(2))
    with Checkpoint.open(tmp_path / "ck") as ck:
        assert ck.names() == ["x", "y"]
    with pytest.raises(CheckpointError, match="must name a folder"):
        CheckpointWriter(tmp_path / "..")


def test_planned_file_writer_writes_in_place_and_refuses_surprises(tmp_path):
    from safetensors.torch import load_file

    from bitsmith.io.safetensors_io import PlannedFileWriter

    a, b = torch.randn(3, 5), torch.arange(7, dtype=torch.int32)
    path = tmp_path / "p.safetensors"
    with PlannedFileWriter(path, [("a", torch.float32, (3, 5)), ("b", torch.int32, (7,))], {"k": "v"}) as w:
        w.write("a", a)
        w.write("b", b)
    got = load_file(str(path))
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    # wrong order / dtype / shape: error naming the tensor, and no file left behind
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(CheckpointError, match="expected tensor 'a'"):
        with PlannedFileWriter(bad, [("a", torch.float32, (3, 5)), ("b", torch.int32, (7,))]) as w:
            w.write("b", b)
    with pytest.raises(CheckpointError, match="never written"):
        with PlannedFileWriter(bad, [("a", torch.float32, (3, 5)), ("b", torch.int32, (7,))]) as w:
            w.write("a", a)
    assert not bad.exists() and not list(tmp_path.glob(".bad*"))


def test_whole_file_mapping_reads_the_same_tensors_copy_on_write(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {"big": torch.randn(300, 512, generator=g), "small": torch.arange(10, dtype=torch.int64),
               "half": torch.randn(7, 3, generator=g).half()}
    path = write_safetensors(tmp_path / "m.safetensors", tensors)
    before = path.read_bytes()
    with SafetensorsFile.open(path) as per_tensor, SafetensorsFile.open(path) as whole:
        whole.mapping = "file"
        for name, t in tensors.items():
            a, b = per_tensor.get(name), whole.get(name)
            assert torch.equal(a, t) and torch.equal(b, t) and b.dtype == t.dtype
        view = whole.get("big")
    view.mul_(0)  # private mapping: writable, and the file is untouched; valid after close
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="mapping"):
        Checkpoint.open(path, mapping="everything")
    with Checkpoint.open(path, mapping="file") as ck:
        assert torch.equal(ck.tensor("half"), tensors["half"])
