"""One registry per extension point (codecs, methods, exporters, ...), keyed by a short name."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from ..errors import SpecError

T = TypeVar("T")


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """Maps a short name to an object, filled by an explicit ``@registry.register("name")``.

    A duplicate name raises at import time; an unknown name raises :class:`SpecError` listing
    the valid choices.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for n in (name, *aliases):
                key = _normalise(n)
                if key in self._items:
                    raise ValueError(f"{self.kind} {key!r} is registered twice")
                self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        key = _normalise(str(name))
        try:
            return self._items[key]
        except KeyError:
            raise SpecError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return _normalise(str(name)) in self._items
