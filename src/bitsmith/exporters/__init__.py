"""Exporters translate a bitsmith checkpoint into another project's layout (HQQ, compressed-tensors,
Nunchaku, ...). Each one lives in its own module with its own packer (bit orders differ between
targets: sharing one "pack 4-bit" routine across them is the classic silent-corruption bug) and
registers itself here::

    @EXPORTERS.register("hqq")
    def export_hqq(ckpt: Checkpoint, dst: Path, *, overwrite: bool = False, progress: bool = False) -> ExportReport

An exporter writes nothing half: it builds its output under a temporary name next to ``dst`` and
renames it into place only when everything is written. It raises a BitsmithError naming the
tensor when the target layout cannot express a tensor (never a silent approximation).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..formats.registry import Registry
from ..io.checkpoint import Checkpoint


@dataclass
class ExportReport:
    """What an exporter wrote: the target, the output path, one row per exported tensor
    (``{"name", "shape", "bits", ...}``, exporter-specific), and free-form notes for the user."""

    target: str
    destination: str
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"target": self.target, "destination": self.destination, "rows": self.rows,
                "notes": self.notes, "seconds": self.seconds}


Exporter = Callable[..., ExportReport]
EXPORTERS: Registry[Exporter] = Registry("export target")

#: modules that register exporters, imported on first use (each may need an optional package)
_EXPORTER_MODULES = ("hqq", "compressed_tensors", "nunchaku")


def get_exporter(name: str) -> Exporter:
    """The exporter registered under ``name`` (importing the exporter modules on first use)."""
    for mod in _EXPORTER_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":  # the module exists but one of its imports does not
                raise
    return EXPORTERS.get(name)


__all__ = ["EXPORTERS", "ExportReport", "Exporter", "get_exporter", "Checkpoint", "Path"]
