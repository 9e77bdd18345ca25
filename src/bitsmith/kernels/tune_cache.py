"""Tuned launch configs kept on disk, so that a later process on the same GPU picks the same
configs without timing the candidates again (:func:`bitsmith.kernels.qmm.quant_matmul` tunes
each (kernel, M bucket, shape, layout) once per process otherwise: seconds per shape at load, and
a pick that can differ from run to run where candidates time within noise of each other).

Off unless asked for: ``BITSMITH_TUNE_CACHE=/path/file.json`` in the environment, or
:func:`set_path`. An entry is keyed by the GPU's name, Triton's version, a fingerprint of the
kernels' source files and the tuner's own key, so a different GPU, Triton or kernel version
never reuses it; the tuner also ignores a cached config that is no longer among its
candidates. The file is JSON (``{"version": 1, "entries": {key: config}}``), rewritten whole
under a temporary name and renamed, so a reader never sees half a file. A file that cannot be
read or written costs a warning, not the matmul: the tuner then times as if there were none.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

VERSION = 1
ENV = "BITSMITH_TUNE_CACHE"
#: the kernel sources whose text the fingerprint covers (this folder)
SOURCES = ("qmm.py", "small_m.py", "fragment_mma.py", "fragment_wgmma.py", "fragment_ra_gemm.py", "fragment_gemm.py",
           "fragment.py", "layout.py", "w8a8.py", "w8a8_wgmma.py")
_STATE: dict = {"path": os.environ.get(ENV) or None, "cache": None}


@functools.lru_cache(maxsize=None)
def kernels_fingerprint() -> str:
    """Twelve hex digits of the SHA-256 of the kernels' source files (:data:`SOURCES`)."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in SOURCES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    return h.hexdigest()[:12]


def entry_key(device_name: str, triton_version: str, key: tuple) -> str:
    """The file's key for the tuner's ``key`` on a GPU named ``device_name`` under Triton ``triton_version``."""
    return f"{device_name} | triton {triton_version} | kernels {kernels_fingerprint()} | {key!r}"


def _valid_config(cfg: object) -> bool:
    return isinstance(cfg, dict) and all(isinstance(k, str) and isinstance(v, (bool, int, float, str))
                                         for k, v in cfg.items())


class TuneCache:
    """The configs of one cache file (read on first use, merged with the file on every write)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries: dict | None = None

    def _read(self) -> dict:
        """The file's entries; ``{}`` (with a warning naming the file and the problem) when it is
        unreadable or not a cache file, ``{}`` silently when it does not exist yet."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as err:
            warnings.warn(f"tuning cache {self.path}: cannot read it ({err.strerror or err}); tuning without it",
                          RuntimeWarning, stacklevel=3)
            return {}
        try:
            doc = json.loads(text)
        except ValueError as err:
            warnings.warn(f"tuning cache {self.path}: not JSON ({err}); tuning without it, the next tuned "
                          "shape rewrites it", RuntimeWarning, stacklevel=3)
            return {}
        if not (isinstance(doc, dict) and doc.get("version") == VERSION and isinstance(doc.get("entries"), dict)):
            warnings.warn(f"tuning cache {self.path}: expected {{\"version\": {VERSION}, \"entries\": {{...}}}}, "
                          "found something else; tuning without it, the next tuned shape rewrites it",
                          RuntimeWarning, stacklevel=3)
            return {}
        return {k: v for k, v in doc["entries"].items() if isinstance(k, str) and _valid_config(v)}

    def get(self, key: str) -> dict | None:
        """The config kept under ``key`` (``None`` when there is none)."""
        if self._entries is None:
            self._entries = self._read()
        cfg = self._entries.get(key)
        return dict(cfg) if cfg is not None else None

    def put(self, key: str, cfg: dict) -> bool:
        """Keep ``cfg`` under ``key``: the file is read again (another process may have added
        entries), updated and replaced whole. Returns whether the file was written (a warning
        says why not)."""
        if not _valid_config(cfg):
            raise ValueError(f"tuning cache {self.path}: config {cfg!r} is not a flat dict of numbers and strings")
        entries = self._read()
        entries[key] = dict(cfg)
        self._entries = entries
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump({"version": VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as err:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # its folder may be what failed
                pass
            warnings.warn(f"tuning cache {self.path}: cannot write it ({err.strerror or err}); the config stays "
                          "in this process only", RuntimeWarning, stacklevel=3)
            return False
        return True


def set_path(path: str | os.PathLike | None) -> None:
    """Use the cache file at ``path`` from now on (``None``: no cache file)."""
    _STATE["path"] = None if path is None else os.fspath(path)
    _STATE["cache"] = None


def active() -> TuneCache | None:
    """The cache in use (:func:`set_path`, else ``BITSMITH_TUNE_CACHE`` at import), or ``None``."""
    if _STATE["path"] is None:
        return None
    if _STATE["cache"] is None:
        _STATE["cache"] = TuneCache(_STATE["path"])
    return _STATE["cache"]


__all__ = ["TuneCache", "active", "set_path", "entry_key", "kernels_fingerprint", "ENV"]
