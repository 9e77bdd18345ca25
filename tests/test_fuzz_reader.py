"""Fuzz the checkpoint reader: whatever the bytes, opening, listing, reading every tensor and
dequantizing every QTensor either works or raises a BitsmithError — never another exception —
and never produces more elements than the file size implies (8 per byte)."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitsmith.errors import BitsmithError
from bitsmith.io import Checkpoint, CheckpointWriter
from bitsmith.io import safetensors_io
from bitsmith.methods import quantize_weight

# BITSMITH_FUZZ_EXAMPLES=5000 for a long hunt; the default keeps both I/O test files under 30 s
FUZZ = settings(max_examples=int(os.environ.get("BITSMITH_FUZZ_EXAMPLES", "120")), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _build() -> bytes:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 64, generator=g)
    tmp = Path(tempfile.mkdtemp())
    try:
        with CheckpointWriter(tmp / "ck", recipe={"method": "nf", "options": {"levels": 16}}) as wr:
            wr.add_tensor("f16", torch.randn(4, 8, generator=g).half())
            wr.add_qtensor("a.weight", quantize_weight(w, "rtn", bits=3, group_size=16))
            wr.add_tensor("bf16", torch.randn(6, generator=g).bfloat16())
            wr.add_qtensor("b.weight", quantize_weight(w.half(), "rtn", bits=4, group_size=32, zero="int"))
            wr.add_qtensor("c.weight", quantize_weight(w.bfloat16(), "nf", block_size=16))
            wr.add_tensor("i64", torch.arange(3))
            wr.add_qtensor("d.weight", quantize_weight(w, "nf", double_quant=True, block_size=8, dq_block=16))
            wr.add_qtensor("e.weight", quantize_weight(w[:2, :44], "nf", levels=7, block_size=11))
            wr.add_qtensor("f.weight", quantize_weight(w, "rtn", bits=2, symmetric=True, group_size=64))
            wr.add_tensor("mask", torch.tensor([True, False, True]))
        return (tmp / "ck" / "model.safetensors").read_bytes()
    finally:
        shutil.rmtree(tmp)


VALID = _build()
HEADER_LEN = int.from_bytes(VALID[:8], "little")
HEADER = json.loads(VALID[8 : 8 + HEADER_LEN])
DATA = VALID[8 + HEADER_LEN :]
DOC = json.loads(HEADER["__metadata__"]["bitsmith"])


@pytest.fixture(scope="module")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="bitsmith-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


_counter = itertools.count()


def check(workdir: Path, data: bytes, mmap_everything: bool = False) -> None:
    """Read everything; only BitsmithError may escape, outputs stay within the file's size."""
    path = workdir / f"f{next(_counter)}.safetensors"  # a new file each time: never rewrite a mapped one
    path.write_bytes(data)
    bound = 8 * len(data)
    old = safetensors_io.MMAP_MIN_BYTES
    safetensors_io.MMAP_MIN_BYTES = 1 if mmap_everything else old
    try:
        with Checkpoint.open(path) as ck:
            ck.recipe, ck.config, ck.stored_names(), ck.total_nbytes
            for name in ck.names():
                e = ck.entry(name)
                assert e.numel <= bound
                if ck.is_quantized(name):
                    ck.spec(name)
                    qt = ck.qtensor(name)
                    assert qt.numel <= bound
                    out = qt.dequantize()
                    assert out.shape == qt.shape
                    out = qt.dequantize(torch.float32)
                else:
                    out = ck.tensor(name)
                assert out.numel() <= bound, (name, out.shape, len(data))
                assert out.numel() * out.element_size() <= max(len(data), 1) * 8
    except BitsmithError:
        pass
    finally:
        safetensors_io.MMAP_MIN_BYTES = old
        path.unlink()


def with_header(header: object, data: bytes = DATA) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    return len(text).to_bytes(8, "little") + text + data


def test_valid_file_reads(workdir):
    check(workdir, VALID)
    check(workdir, VALID, mmap_everything=True)
    path = workdir / "valid.safetensors"
    path.write_bytes(VALID)
    with Checkpoint.open(path) as ck:
        assert sum(ck.is_quantized(n) for n in ck.names()) == 6


# --- raw byte mutations ---------------------------------------------------------------------
positions = st.integers(0, len(VALID) - 1)
header_positions = st.integers(0, 8 + HEADER_LEN - 1)
data_positions = st.integers(8 + HEADER_LEN, len(VALID) - 1)  # valid header, odd values: NaN scales, ...


@FUZZ
@given(flips=st.lists(st.tuples(st.one_of(positions, header_positions, data_positions), st.integers(1, 255)), min_size=1, max_size=6),
       mmap_everything=st.booleans())
def test_byte_flips(workdir, flips, mmap_everything):
    b = bytearray(VALID)
    for pos, x in flips:
        b[pos] ^= x
    check(workdir, bytes(b), mmap_everything)


@FUZZ
@given(pos=positions, ins=st.binary(min_size=1, max_size=16))
def test_byte_inserts(workdir, pos, ins):
    check(workdir, VALID[:pos] + ins + VALID[pos:])


@FUZZ
@given(pos=positions, n=st.integers(1, 64))
def test_byte_deletes(workdir, pos, n):
    check(workdir, VALID[:pos] + VALID[pos + n :])


@FUZZ
@given(cut=st.integers(0, len(VALID)))
def test_truncation(workdir, cut):
    check(workdir, VALID[:cut])


# --- header text and JSON mutations ---------------------------------------------------------
INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 9, 15, 16, 17, 64, 255, 256, 257, 2**31, 2**32 + 1, 2**53, 2**63, -(2**63), 10**30]
json_leaf = st.one_of(
    st.none(), st.booleans(), st.sampled_from(INTERESTING_INTS), st.integers(),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
    st.sampled_from(["F16", "BF16", "U8", "I64", "BOOL", "F8_E4M3", "float16", "uint8", "affine", "codebook",
                     "nf", "dense", "base", "float", "int", "none", "a.weight.codes", "f16", ""]),
)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def mutate_json(data, doc):
    """Apply 1..3 structured edits: replace a node, nudge an integer, delete or add a key."""
    doc = json.loads(json.dumps(doc))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = data.draw(st.sampled_from(paths[1:] if len(paths) > 1 else paths))
        if not path:
            doc = data.draw(json_value)
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        key, node = path[-1], parent[path[-1]]
        action = data.draw(st.sampled_from(["replace", "nudge", "delete", "add"]))
        if action == "nudge" and type(node) is int:
            parent[key] = node + data.draw(st.sampled_from([-1, 1, -8, 8, 64, node, -node, 2**40]))
        elif action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif action == "add" and isinstance(node, dict):
            node[data.draw(st.text(max_size=6))] = data.draw(json_value)
        elif action == "add" and isinstance(node, list):
            node.append(data.draw(json_value))
        else:
            parent[key] = data.draw(json_value)
    return doc


@FUZZ
@given(data=st.data())
def test_header_json_mutations(workdir, data):
    check(workdir, with_header(mutate_json(data, HEADER)))


@FUZZ
@given(data=st.data())
def test_bitsmith_document_mutations(workdir, data):
    header = json.loads(json.dumps(HEADER))
    header["__metadata__"]["bitsmith"] = json.dumps(mutate_json(data, DOC))
    check(workdir, with_header(header), mmap_everything=data.draw(st.booleans()))


@FUZZ
@given(pos=st.integers(0, HEADER_LEN - 1), n=st.integers(0, 8), text=st.text(max_size=8))
def test_header_text_edits(workdir, pos, n, text):
    raw = VALID[8 : 8 + HEADER_LEN].decode()
    check(workdir, with_header_text(raw[:pos] + text + raw[pos + n :]))


@FUZZ
@given(data=st.data())
def test_bitsmith_document_text_edits(workdir, data):
    doc_text = HEADER["__metadata__"]["bitsmith"]
    pos = data.draw(st.integers(0, len(doc_text) - 1))
    n = data.draw(st.integers(0, 8))
    text = data.draw(st.text(alphabet="0123456789-{}[]\",:.eE tfnul\\ab", max_size=6))
    header = json.loads(json.dumps(HEADER))
    header["__metadata__"]["bitsmith"] = doc_text[:pos] + text + doc_text[pos + n :]
    check(workdir, with_header(header))


def with_header_text(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(8, "little") + raw + DATA
