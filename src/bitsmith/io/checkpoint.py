"""The checkpoint schema: a folder of safetensors shards that says how to read itself.

Layout of a checkpoint folder::

    config.json                          the source model's config (when given)
    model.safetensors                    one shard, or
    model-00001-of-00003.safetensors     several (default at most 2 GiB of tensor data each)
    model.safetensors.index.json         always: {"metadata": {"total_size": N, ...},
                                                   "weight_map": {stored_name: shard_file}}
    tokenizer.json, ...                  extra small files, copied as given

Every shard's ``__metadata__`` holds ``"format": "pt"`` (what transformers expects) and
``"bitsmith"``: one versioned JSON document describing the quantized tensors *of that shard*::

    {"format": "bitsmith.checkpoint", "version": 1, "recipe": {...} | null,
     "quantized": {"X.weight": {"codec": "codebook", "shape": [out, in], "dtype": "bfloat16",
                                "params": {...},
                                "tensors": {"codes": "X.weight.codes", "absmax": "X.weight.absmax"}}},
     "modules": {"X": {"kind": "w8a8_linear", "tensors": ["migration_scale"], ...}}}   # optional

``modules`` (optional; absent in older checkpoints) says which *runtime module* a layer is rebuilt
as when it is not the default ``QuantLinear`` / ``QuantConv2d``: ``kind`` names an entry of
``bitsmith.nn.RUNTIME_MODULES``; ``tensors`` lists the leaf names of plain tensors stored as
``X.<leaf>`` that belong to that module (extra buffers: a migration scale, a static input scale,
a low-rank branch); every other key is a JSON attribute the runtime class validates itself.

A quantized tensor ``X.weight`` is stored as the tensors ``X.weight.<field>`` (all in one shard);
the ``tensors`` map says which stored tensor holds which codec field, so a reader never guesses.
Plain tensors are stored under their own name. The document is validated on read by a schema that
rejects unknown fields, unknown versions and every spec ``QTensor.from_state`` would reject —
before any tensor data is read.

:class:`Checkpoint` also reads a plain folder of safetensors shards (with or without an index) and a
single ``.safetensors`` file (a bare state dict). Never ``torch.load``, never pickle.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..errors import BitsmithError, CheckpointError
from ..formats.dtypes import dtype_name
from ..formats.qtensor import QTensor, parse_spec
from .safetensors_io import SafetensorsFile, ShardWriter, check_storable, parse_json_strict

FORMAT = "bitsmith.checkpoint"
VERSION = 1
METADATA_KEY = "bitsmith"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
SINGLE_SHARD_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
MAX_SIDE_JSON_BYTES = 64 * 1024 * 1024
MIN_BITS_PER_ELEMENT = 1
"""A quantized tensor must store at least this many bits per original element (every codec we
know stores >= 1). It bounds what dequantizing can allocate by what the file holds: a spec whose
shape claims more elements than ``8 * stored bytes`` is rejected when the checkpoint is opened."""

_DOC_KEYS = {"format", "version", "recipe", "quantized"}
_OPTIONAL_DOC_KEYS = {"modules"}
_SPEC_KEYS = {"codec", "shape", "dtype", "params", "tensors"}
# exceptions codec code may raise on hostile-but-parsable input; turned into CheckpointError
_CODEC_ERRORS = (ValueError, TypeError, IndexError, KeyError, OverflowError, ZeroDivisionError, RuntimeError)


def shard_name(i: int, n: int) -> str:
    """``model.safetensors`` for one shard, else ``model-0000i-of-0000n.safetensors`` (1-based)."""
    return SINGLE_SHARD_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"


def _as_checkpoint_error(err: BaseException, file: str, tensor: str | None) -> CheckpointError:
    if isinstance(err, BitsmithError):
        return CheckpointError(err.message, file=err.file or file, tensor=err.tensor or tensor)
    return CheckpointError(f"{type(err).__name__}: {err}", file=file, tensor=tensor)


# --------------------------------------------------------------------------------------------
# the metadata document
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QSpec:
    """One quantized tensor's entry in a shard's document, validated."""

    name: str
    spec: dict  # {"codec", "shape", "dtype", "params"}: what QTensor.from_state takes
    tensors: dict[str, str]  # codec field -> stored tensor name

    def to_json(self) -> dict:
        return {**self.spec, "tensors": dict(self.tensors)}


def make_document(recipe: Any, quantized: Mapping[str, QSpec], modules: Mapping[str, dict] | None = None) -> str:
    doc = {"format": FORMAT, "version": VERSION, "recipe": recipe,
           "quantized": {n: q.to_json() for n, q in quantized.items()}}
    if modules:
        doc["modules"] = {n: dict(info) for n, info in modules.items()}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


_LEAF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_module_info(name: Any, info: Any) -> str | None:
    """Why ``info`` is not a valid ``modules`` entry for module ``name`` (``None`` if it is):
    an object with a non-empty string ``kind``, an optional ``tensors`` list of distinct leaf
    names (Python identifiers: the buffers ``name.<leaf>``), any other keys JSON attributes."""
    if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
        return f"module name must be a dotted module path, got {name!r}"
    if not isinstance(info, dict):
        return f"module info must be an object, got {type(info).__name__}"
    kind = info.get("kind")
    if not isinstance(kind, str) or not kind:
        return f"module info needs a non-empty string 'kind', got {kind!r}"
    leaves = info.get("tensors", [])
    if (not isinstance(leaves, list) or not all(isinstance(t, str) and _LEAF.match(t) for t in leaves)
            or len(set(leaves)) != len(leaves)):
        return f"module info 'tensors' must be a list of distinct leaf names (identifiers), got {leaves!r}"
    return None


def parse_document(text: str, file: str) -> tuple[Any, dict[str, QSpec]]:
    """Validate a shard's ``bitsmith`` document (structure only; the specs are checked against
    the codec by :class:`Checkpoint`). Raises CheckpointError naming file and tensor.
    The ``modules`` object is read by :func:`parse_modules`."""
    def fail(msg: str, tensor: str | None = None) -> CheckpointError:
        return CheckpointError(f"bitsmith metadata: {msg}", file=file, tensor=tensor)

    try:
        doc = parse_json_strict(text)
    except RecursionError:
        raise fail("JSON is nested too deeply") from None
    except ValueError as e:
        raise fail(f"not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise fail(f"must be a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise fail(f"format must be {FORMAT!r}, got {doc.get('format')!r}")
    if type(doc.get("version")) is not int or doc["version"] != VERSION:
        raise fail(f"unsupported version {doc.get('version')!r}; this bitsmith reads version {VERSION} "
                   "(upgrade bitsmith to read newer checkpoints)")
    unknown, missing = sorted(set(doc) - _DOC_KEYS - _OPTIONAL_DOC_KEYS), sorted(_DOC_KEYS - set(doc))
    if unknown or missing:
        raise fail(f"unknown fields {unknown} / missing fields {missing}")
    recipe = doc["recipe"]
    if recipe is not None and not isinstance(recipe, dict):
        raise fail(f"recipe must be an object or null, got {type(recipe).__name__}")
    quantized = doc["quantized"]
    if not isinstance(quantized, dict):
        raise fail(f"quantized must be an object, got {type(quantized).__name__}")
    out: dict[str, QSpec] = {}
    for name, entry in quantized.items():
        if not name:
            raise fail("quantized tensor name is empty")
        if not isinstance(entry, dict):
            raise fail(f"spec must be an object, got {type(entry).__name__}", name)
        unknown, missing = sorted(set(entry) - _SPEC_KEYS), sorted(_SPEC_KEYS - set(entry))
        if unknown or missing:
            raise fail(f"spec has unknown fields {unknown} / missing fields {missing}", name)
        fields = entry["tensors"]
        if (not isinstance(fields, dict) or not fields
                or not all(isinstance(v, str) and v for v in fields.values())):
            raise fail("tensors must be a non-empty object mapping codec fields to stored tensor names", name)
        if len(set(fields.values())) != len(fields):
            raise fail(f"tensors maps two fields to one stored tensor: {fields}", name)
        spec = {k: entry[k] for k in ("codec", "shape", "dtype", "params")}
        out[name] = QSpec(name, spec, dict(fields))
    return recipe, out


def parse_modules(text: str, file: str) -> dict[str, dict]:
    """The ``modules`` object of a shard's document (``{}`` when absent), each entry checked by
    :func:`check_module_info`. Call after :func:`parse_document` accepted ``text``."""
    doc = parse_json_strict(text)
    modules = doc.get("modules", {})
    if not isinstance(modules, dict):
        raise CheckpointError(f"bitsmith metadata: modules must be an object, got {type(modules).__name__}", file=file)
    for name, info in modules.items():
        why = check_module_info(name, info)
        if why is not None:
            raise CheckpointError(f"bitsmith metadata: {why}", file=file, tensor=name or None)
    return modules


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointEntry:
    """A logical tensor of a checkpoint: a plain one, or a quantized one (``codec`` set).
    ``shape``/``dtype`` are the logical tensor's (the original's for a quantized one);
    ``nbytes`` is what it occupies on disk (every stored field counted)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    file: Path
    codec: str | None = None
    stored: dict[str, str] = field(default_factory=dict)  # field (or "" for plain) -> stored name

    @property
    def quantized(self) -> bool:
        return self.codec is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Item:
    shard: int
    entry: CheckpointEntry
    qspec: QSpec | None = None
    params: Any = None  # the codec params parsed and checked at open (not parsed again per read)


class Checkpoint:
    """A validated, lazily read checkpoint. ``Checkpoint.open(path)`` takes a checkpoint folder,
    a plain folder of safetensors shards (with or without index) or a single ``.safetensors``
    file. Every shard header and bitsmith document is validated when opening; tensor data is
    read only by :meth:`tensor` / :meth:`qtensor`."""

    def __init__(self) -> None:  # use Checkpoint.open
        self.path: Path = Path()
        self.root: Path | None = None
        self.shard_files: list[Path] = []
        self.config: dict | None = None
        self.recipe: dict | None = None
        self.index: dict | None = None
        self._files: list[SafetensorsFile] = []
        self._items: dict[str, _Item] = {}
        self._modules: dict[str, dict] = {}  # module name -> runtime module info
        self._mapping = "tensor"

    # --- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, mapping: str = "tensor") -> "Checkpoint":
        """``mapping="tensor"`` (default) maps or copies each tensor on its own, for streaming;
        ``mapping="file"`` maps each shard once and reads views of it, for loading a whole
        model (see :attr:`SafetensorsFile.mapping`)."""
        if mapping not in ("tensor", "file"):
            raise ValueError(f"mapping must be 'tensor' or 'file', got {mapping!r}")
        self = cls()
        self.path = Path(path)
        self._mapping = mapping
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        path = self.path
        if path.is_file():
            self.shard_files = [path]
        elif path.is_dir():
            self.root = path
            self.shard_files = self._find_shards(path)
            cfg = path / CONFIG_NAME
            if cfg.is_file():
                config = _read_json_file(cfg)
                if not isinstance(config, dict):
                    raise CheckpointError(f"must be a JSON object, got {type(config).__name__}", file=str(cfg))
                self.config = config
        elif not path.exists():
            raise CheckpointError("no such file or folder", file=str(path))
        else:
            raise CheckpointError("is neither a file nor a folder", file=str(path))

        recipes: list[tuple[str, Any]] = []
        stored_owner: dict[str, str] = {}  # stored name -> file, across shards
        for i, shard in enumerate(self.shard_files):
            f = SafetensorsFile.open(shard)
            f.mapping = self._mapping
            self._files.append(f)
            file = str(shard)
            for stored in f.keys():
                if stored in stored_owner:
                    raise CheckpointError(f"tensor is also stored in {stored_owner[stored]}", file=file, tensor=stored)
                stored_owner[stored] = file
            quantized: dict[str, QSpec] = {}
            if METADATA_KEY in f.metadata:
                recipe, quantized = parse_document(f.metadata[METADATA_KEY], file)
                recipes.append((file, recipe))
                for mod, info in parse_modules(f.metadata[METADATA_KEY], file).items():
                    if mod in self._modules:
                        raise CheckpointError("bitsmith metadata: module info is given by two shards", file=file, tensor=mod)
                    self._modules[mod] = info
            self._add_shard(i, f, quantized)
        if recipes:
            first_file, first = recipes[0]
            for file, r in recipes[1:]:
                if r != first:
                    raise CheckpointError(f"bitsmith metadata: recipe differs from the one in {first_file}", file=file)
            self.recipe = first
        if self.index is not None:
            self._check_index(stored_owner)
        self._check_modules()

    def _check_modules(self) -> None:
        """Every tensor a module's info lists is a plain tensor of the checkpoint."""
        for mod, info in self._modules.items():
            for leaf in info.get("tensors", []):
                name = f"{mod}.{leaf}"
                item = self._items.get(name)
                if item is None or item.qspec is not None:
                    what = "is quantized" if item is not None else "is not in the checkpoint"
                    raise CheckpointError(f"module {mod!r} ({info['kind']}) lists tensor {leaf!r}, which {what} "
                                          "(expected a plain tensor)", file=str(self.path), tensor=name)

    def _find_shards(self, folder: Path) -> list[Path]:
        indexes = sorted(p for p in folder.glob("*.safetensors.index.json") if not p.name.startswith("."))
        index_path = folder / INDEX_NAME
        if not index_path.is_file():
            if len(indexes) > 1:
                raise CheckpointError(f"several index files ({', '.join(p.name for p in indexes)}); open one shard "
                                      "or remove the extra index", file=str(folder))
            index_path = indexes[0] if indexes else None  # type: ignore[assignment]
        if index_path is not None:
            index = _read_json_file(index_path)
            file = str(index_path)
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise CheckpointError('index must be an object with a "weight_map" object', file=file)
            meta = index.get("metadata", {})
            if meta is not None and not isinstance(meta, dict):
                raise CheckpointError('index "metadata" must be an object', file=file)
            names: list[str] = []
            for tensor, shard in index["weight_map"].items():
                if not isinstance(shard, str) or not _is_plain_name(shard) or not shard.endswith(".safetensors"):
                    raise CheckpointError(f"weight_map entry must name a .safetensors file in this folder, got {shard!r}",
                                          file=file, tensor=tensor)
                if shard not in names:
                    names.append(shard)
            for shard in names:
                if not (folder / shard).is_file():
                    raise CheckpointError(f"shard {shard} named by the index is missing", file=file)
            self.index = {"path": index_path, "weight_map": dict(index["weight_map"]), "metadata": meta or {}}
            return [folder / s for s in sorted(names)]
        shards = sorted(p for p in folder.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))
        if not shards:
            raise CheckpointError("folder holds no .safetensors file", file=str(folder))
        return shards

    def _check_index(self, stored_owner: dict[str, str]) -> None:
        assert self.index is not None
        file = str(self.index["path"])
        wmap: dict[str, str] = self.index["weight_map"]
        shard_names: dict[str, str] = {}  # shard path -> file name (one Path parse per shard)
        for tensor, shard in wmap.items():
            where = stored_owner.get(tensor)
            if where is None:
                raise CheckpointError(f"index names a tensor that {shard} does not hold", file=file, tensor=tensor)
            name = shard_names.get(where) or shard_names.setdefault(where, Path(where).name)
            if name != shard:
                raise CheckpointError(f"index says {shard}, but the tensor is in {name}", file=file, tensor=tensor)
        extra = sorted(set(stored_owner) - set(wmap))
        if extra:
            raise CheckpointError(f"{len(extra)} stored tensors are missing from the index's weight_map", file=file,
                                  tensor=extra[0])

    def _add_shard(self, i: int, f: SafetensorsFile, quantized: dict[str, QSpec]) -> None:
        file = str(f.path)
        claimed: dict[str, str] = {}  # stored name -> logical name
        checked: dict[str, CheckpointEntry] = {}
        parsed: dict[str, Any] = {}
        for name, q in quantized.items():
            try:
                codec_cls, params, shape, dtype = parse_spec(q.spec)
                expected = codec_cls.tensor_specs(params, shape)
            except (BitsmithError, *_CODEC_ERRORS) as err:
                raise _as_checkpoint_error(err, file, name) from None
            if set(expected) != set(q.tensors):
                raise CheckpointError(
                    f"codec {codec_cls.name} stores fields {sorted(expected)}, the spec lists {sorted(q.tensors)}",
                    file=file, tensor=name)
            nbytes = 0
            for fld, stored in q.tensors.items():
                if stored not in f:
                    raise CheckpointError(f"field {fld!r} is stored as {stored!r}, which this shard does not hold",
                                          file=file, tensor=name)
                if stored in claimed:
                    raise CheckpointError(f"stored tensor {stored!r} is also a field of {claimed[stored]!r}",
                                          file=file, tensor=name)
                claimed[stored] = name
                e, want = f.entry(stored), expected[fld]
                if e.dtype != want.dtype or tuple(e.shape) != tuple(want.shape):
                    raise CheckpointError(
                        f"field {fld!r} ({stored}) must be {dtype_name(want.dtype)}{list(want.shape)} for "
                        f"{codec_cls.name} {list(shape)}, the file holds {dtype_name(e.dtype)}{list(e.shape)}",
                        file=file, tensor=name)
                nbytes += e.nbytes
            if math.prod(shape) * MIN_BITS_PER_ELEMENT > 8 * nbytes:
                raise CheckpointError(
                    f"shape {list(shape)} claims {math.prod(shape)} elements but only {nbytes} bytes are stored "
                    f"(at least {MIN_BITS_PER_ELEMENT} bit per element expected)", file=file, tensor=name)
            checked[name] = CheckpointEntry(name, shape, dtype, nbytes, f.path, codec_cls.name, dict(q.tensors))
            parsed[name] = params
        # logical names in file order: a quantized tensor sits where its first stored field is
        placed: set[str] = set()
        for stored in f.keys():
            owner = claimed.get(stored)
            if owner is None:
                e = f.entry(stored)
                item = _Item(i, CheckpointEntry(stored, e.shape, e.dtype, e.nbytes, f.path, None, {"": stored}))
                name = stored
            elif owner in placed:
                continue
            else:
                item = _Item(i, checked[owner], quantized[owner], parsed[owner])
                name = owner
                placed.add(owner)
            if name in self._items:
                other = self._items[name].entry.file
                raise CheckpointError(f"logical tensor name is defined twice (also in {other})", file=file, tensor=name)
            self._items[name] = item

    # --- what users call ------------------------------------------------------------------
    def names(self) -> list[str]:
        """Logical tensor names (plain and quantized) in file order."""
        return list(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def _item(self, name: str) -> _Item:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise CheckpointError(f"no tensor named {name!r} ({len(self._items)} tensors)", file=str(self.path)) from None

    def is_quantized(self, name: str) -> bool:
        return self._item(name).qspec is not None

    def module_info(self, name: str) -> dict | None:
        """The runtime module info of module ``name`` (``{"kind": ..., "tensors": [...], ...}``, a
        copy), or ``None`` when the checkpoint does not name one (the default runtime module)."""
        info = self._modules.get(name)
        return None if info is None else json.loads(json.dumps(info))

    def modules(self) -> dict[str, dict]:
        """Every module's runtime module info (copies), by module name."""
        return json.loads(json.dumps(self._modules))

    def entry(self, name: str) -> CheckpointEntry:
        """Shape, dtype, bytes on disk, shard file and codec of a logical tensor (no data read)."""
        return self._item(name).entry

    def entry_nbytes(self, name: str) -> int:
        return self._item(name).entry.nbytes

    @property
    def total_nbytes(self) -> int:
        """Tensor data bytes over all shards."""
        return sum(f.data_nbytes for f in self._files)

    def shard_of(self, name: str) -> Path:
        return self._item(name).entry.file

    def stored_names(self) -> list[str]:
        """The names in the safetensors files (``X.weight.codes``, ...), in file order."""
        return [k for f in self._files for k in f.keys()]

    def spec(self, name: str) -> dict:
        """The stored spec of a quantized tensor: ``{"codec", "shape", "dtype", "params", "tensors"}``."""
        item = self._item(name)
        if item.qspec is None:
            raise CheckpointError("is not quantized (it has no spec); use .tensor()", file=str(item.entry.file), tensor=name)
        return json.loads(json.dumps(item.qspec.to_json()))

    def tensor(self, name: str) -> torch.Tensor:
        """A plain tensor as stored (zero-copy where possible; see ``safetensors_io``)."""
        item = self._item(name)
        if item.qspec is not None:
            raise CheckpointError("is quantized; use .qtensor() (or .dequantized())", file=str(item.entry.file), tensor=name)
        return self._files[item.shard].get(name)

    def qtensor(self, name: str) -> QTensor:
        """A quantized tensor, validated by ``QTensor.from_state``."""
        item = self._item(name)
        q = item.qspec
        if q is None:
            raise CheckpointError("is not quantized; use .tensor()", file=str(item.entry.file), tensor=name)
        f = self._files[item.shard]
        tensors = {fld: f.get(stored) for fld, stored in q.tensors.items()}
        e = item.entry
        # spec, params and every field's dtype/shape were validated at open and reads are checked
        # against the header, so the QTensor is built without parsing the spec again
        try:
            return QTensor(e.codec, item.params, e.shape, e.dtype, tensors)
        except (BitsmithError, *_CODEC_ERRORS) as err:
            raise _as_checkpoint_error(err, str(f.path), name) from None

    def dequantized(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float tensor: a quantized one dequantized (to ``dtype``, default its original
        dtype), a plain one as stored (cast to ``dtype`` when given and floating)."""
        if not self.is_quantized(name):
            t = self.tensor(name)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        qt = self.qtensor(name)
        try:
            return qt.dequantize(dtype)
        except (BitsmithError, *_CODEC_ERRORS) as err:
            raise _as_checkpoint_error(err, str(self.shard_of(name)), name) from None

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        q = sum(1 for it in self._items.values() if it.qspec is not None)
        return f"Checkpoint({str(self.path)!r}, {len(self._items)} tensors, {q} quantized, {len(self._files)} shards)"


def _read_json_file(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_SIDE_JSON_BYTES:
            raise CheckpointError(f"is {size} bytes, over the {MAX_SIDE_JSON_BYTES}-byte limit for a JSON file", file=str(path))
        return parse_json_strict(path.read_bytes())
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError("JSON is nested too deeply", file=str(path)) from None
    except ValueError as e:
        raise CheckpointError(f"is not valid JSON ({e})", file=str(path)) from None
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=str(path)) from None


_BAD_NAME = re.compile(r"[/\\\x00]")


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not _BAD_NAME.search(name)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _looks_replaceable(path: Path) -> bool:
    """overwrite=True replaces only what could be a checkpoint: a .safetensors file, an empty
    folder, or a folder holding safetensors shards / an index (never, say, a home folder)."""
    if path.is_symlink() or path.is_file():
        return path.is_symlink() or path.suffix == ".safetensors"
    if path.is_dir():
        names = [p.name for p in path.iterdir()]
        return not names or any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names)
    return False


class CheckpointWriter:
    """Write a checkpoint folder tensor by tensor; peak memory is about one tensor.

    Everything goes into a sibling ``<dst>.partial-<random>`` folder; shards get their final
    names (``model-0000i-of-0000N.safetensors`` or ``model.safetensors``) once ``N`` is known at
    :meth:`close`, and the folder is renamed to ``dst`` last (an existing ``dst`` is replaced only
    with ``overwrite=True``, and only after the new checkpoint is complete). An exception inside
    the ``with`` block, or any error, removes the partial folder.

    ``config``: the model's config as a dict (written as ``config.json``) or the path of a
    ``config.json`` to copy. ``extra_files``: ``{name in the checkpoint: source path}`` of small
    files to copy (tokenizer files, ...). ``recipe``: a JSON-able dict stored in every shard.
    """

    def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, recipe: dict | None = None,
                 config: dict | str | os.PathLike | None = None,
                 extra_files: Mapping[str, str | os.PathLike] | None = None):
        self.dst = Path(dst)
        file = str(self.dst)
        if self.dst.name in ("", ".", ".."):
            raise CheckpointError("the destination must name a folder to create, not '.' or '/'", file=file)
        if type(max_shard_bytes) is not int or max_shard_bytes < 1:
            raise CheckpointError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}", file=file)
        if os.path.lexists(self.dst):
            if not overwrite:
                raise CheckpointError("already exists; pass overwrite=True to replace it", file=file)
            if not _looks_replaceable(self.dst):
                raise CheckpointError("exists and is not a checkpoint (no .safetensors inside); refusing to replace it",
                                      file=file)
        if recipe is not None and not isinstance(recipe, dict):
            raise CheckpointError(f"recipe must be a dict or None, got {type(recipe).__name__}", file=file)
        try:
            json.dumps(recipe, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"recipe is not JSON-serialisable: {e}", file=file) from None
        self._config_text: str | None = None
        self._config_src: Path | None = None
        if isinstance(config, dict):
            try:
                self._config_text = json.dumps(config, indent=2, allow_nan=False) + "\n"
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"config is not JSON-serialisable: {e}", file=file) from None
        elif config is not None:
            self._config_src = Path(config)
            if not self._config_src.is_file():
                raise CheckpointError("config file does not exist", file=str(self._config_src))
        self._extra: dict[str, Path] = {}
        reserved = {INDEX_NAME} | ({CONFIG_NAME} if config is not None else set())
        for name, src in (extra_files or {}).items():
            if not isinstance(name, str) or not _is_plain_name(name) or name in reserved or name.endswith(".safetensors"):
                raise CheckpointError(f"extra file name {name!r} must be a plain file name other than "
                                      f"{sorted(reserved)} and *.safetensors", file=file)
            if not Path(src).is_file():
                raise CheckpointError("extra file does not exist", file=str(src))
            self._extra[name] = Path(src)

        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.recipe = recipe
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.dst.with_name(f"{self.dst.name}.partial-{secrets.token_hex(4)}")
        self.partial.mkdir()
        self._shards: list[tuple[Path, list[str]]] = []  # finished: (temp path, stored names)
        self._current: ShardWriter | None = None
        self._current_q: dict[str, QSpec] = {}
        self._current_modules: dict[str, dict] = {}
        self._modules: dict[str, dict] = {}  # every module info added (checked at close)
        self._quantized_names: set[str] = set()
        self._logical: set[str] = set()
        self._stored: set[str] = set()
        self._total = 0
        self._done = False

    # --- adding ---------------------------------------------------------------------------
    def _fail(self, msg: str, tensor: str | None) -> CheckpointError:
        return CheckpointError(msg, file=str(self.dst), tensor=tensor)

    def _check_open(self, name: str) -> None:
        if self._done:
            raise self._fail("writer is closed", name)
        if not isinstance(name, str) or not name:
            raise self._fail(f"tensor names must be non-empty strings, got {name!r}", None)
        if name in self._logical or name in self._stored:
            raise self._fail("duplicate tensor name", name)

    def _shard_for(self, nbytes: int) -> ShardWriter:
        cur = self._current
        if cur is not None and len(cur) and cur.nbytes + nbytes > self.max_shard_bytes:
            self._finish_shard()
            cur = None
        if cur is None:
            path = self.partial / f"shard-{len(self._shards) + 1:05d}.safetensors"
            cur = self._current = ShardWriter(path)
            self._current_q, self._current_modules = {}, {}
        return cur

    def _finish_shard(self) -> None:
        cur = self._current
        if cur is None:
            return
        cur.metadata = {"format": "pt", METADATA_KEY: make_document(self.recipe, self._current_q, self._current_modules)}
        cur.close()
        self._shards.append((cur.path, cur.names()))
        self._current, self._current_q, self._current_modules = None, {}, {}

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Store a plain tensor under its own name (written to disk now)."""
        self._check_open(name)
        check_storable(name, tensor, str(self.dst))
        self._guarded(self._add_plain, name, tensor)

    def _add_plain(self, name: str, tensor: torch.Tensor) -> None:
        shard = self._shard_for(tensor.numel() * tensor.element_size())
        shard.add(name, tensor)
        self._logical.add(name)
        self._stored.add(name)
        self._total += tensor.numel() * tensor.element_size()

    def add_qtensor(self, name: str, qtensor: QTensor) -> None:
        """Store a quantized tensor as ``name.<field>`` tensors, all in one shard."""
        self._check_open(name)
        if not isinstance(qtensor, QTensor):
            raise self._fail(f"expected a QTensor, got {type(qtensor).__name__}", name)
        try:
            tensors, spec = qtensor.to_state()
            QTensor.from_state(tensors, spec)  # never write what we could not read back
            json.dumps(spec, allow_nan=False)
        except (BitsmithError, *_CODEC_ERRORS) as err:
            raise _as_checkpoint_error(err, str(self.dst), name) from None
        stored = {fld: f"{name}.{fld}" for fld in tensors}
        for s in stored.values():
            if s in self._stored or s in self._logical:
                raise self._fail(f"stored name {s!r} is already used", name)
        self._guarded(self._add_quantized, name, tensors, spec, stored)

    def _add_quantized(self, name: str, tensors: dict, spec: dict, stored: dict[str, str]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        shard = self._shard_for(nbytes)
        for fld, t in tensors.items():
            shard.add(stored[fld], t)
            self._stored.add(stored[fld])
        self._current_q[name] = QSpec(name, spec, stored)
        self._quantized_names.add(name)
        self._logical.add(name)
        self._total += nbytes

    def add_module_info(self, name: str, info: Mapping[str, Any]) -> None:
        """Say that module ``name`` is rebuilt as the runtime module ``info["kind"]`` (a key of
        ``bitsmith.nn.RUNTIME_MODULES``) instead of the default. ``info["tensors"]`` (optional)
        lists leaf names of plain tensors ``name.<leaf>`` that belong to the module (added with
        :meth:`add_tensor`, before or after this call; :meth:`close` checks they were); other keys
        are JSON attributes for the runtime class. Stored in the shard being written."""
        if self._done:
            raise self._fail("writer is closed", name)
        info = dict(info) if isinstance(info, Mapping) else info
        why = check_module_info(name, info)
        if why is None and name in self._modules:
            why = "module info given twice"
        if why is None:
            try:
                info = json.loads(json.dumps(info, allow_nan=False))
            except (TypeError, ValueError) as e:
                why = f"module info is not JSON-serialisable: {e}"
        if why is not None:
            raise self._fail(why, name if isinstance(name, str) else None)
        self._guarded(self._shard_for, 0)
        self._current_modules[name] = info
        self._modules[name] = info

    def _check_module_tensors(self) -> None:
        for mod, info in self._modules.items():
            for leaf in info.get("tensors", []):
                name = f"{mod}.{leaf}"
                if name not in self._logical or name in self._quantized_names:
                    raise self._fail(f"module {mod!r} ({info['kind']}) lists tensor {leaf!r}, which was not added "
                                     "as a plain tensor (add_tensor)", name)

    def _guarded(self, fn, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException:
            self.abort()
            raise

    # --- finishing ------------------------------------------------------------------------
    def close(self) -> Path:
        """Finish the last shard, name the shards, write index/config/extra files and move the
        folder to ``dst``. Returns ``dst``."""
        if self._done:
            raise self._fail("writer is already closed", None)
        try:
            self._check_module_tensors()
            if self._current is None and not self._shards:
                self._shard_for(0)  # an empty checkpoint is one empty shard
            self._finish_shard()
            n = len(self._shards)
            weight_map: dict[str, str] = {}
            for i, (tmp, names) in enumerate(self._shards, 1):
                final = shard_name(i, n)
                os.replace(tmp, self.partial / final)
                weight_map.update((s, final) for s in names)
            index = {"metadata": {"total_size": self._total, "format": FORMAT, "version": VERSION},
                     "weight_map": weight_map}
            (self.partial / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            if self._config_text is not None:
                (self.partial / CONFIG_NAME).write_text(self._config_text, encoding="utf-8")
            elif self._config_src is not None:
                shutil.copyfile(self._config_src, self.partial / CONFIG_NAME)
            for name, src in self._extra.items():
                shutil.copyfile(src, self.partial / name)
            self._move_into_place()
        except BaseException as err:
            self.abort()
            if isinstance(err, OSError):
                raise CheckpointError(f"cannot write: {err.strerror or err}", file=str(self.dst)) from None
            raise
        self._done = True
        return self.dst

    def _move_into_place(self) -> None:
        dst = self.dst
        if not os.path.lexists(dst):
            os.rename(self.partial, dst)
            return
        if not self.overwrite:
            raise self._fail("appeared while writing; pass overwrite=True to replace it", None)
        if not _looks_replaceable(dst):
            raise self._fail("exists and is not a checkpoint (no .safetensors inside); refusing to replace it", None)
        old = dst.with_name(f"{dst.name}.partial-{secrets.token_hex(4)}-old")
        os.rename(dst, old)
        try:
            os.rename(self.partial, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()

    def abort(self) -> None:
        """Remove everything written so far. Safe to call twice."""
        self._done = True
        if self._current is not None:
            self._current.abort()
            self._current = None
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if not self._done:
                self.abort()
        elif not self._done:
            self.close()


__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "CheckpointEntry",
    "CheckpointWriter",
    "QSpec",
    "check_module_info",
    "make_document",
    "parse_document",
    "parse_modules",
    "shard_name",
]
