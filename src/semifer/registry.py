"""One registry mechanism for every pluggable kind (algorithms, backbones, formats...).

A registry is a dict filled by a decorator at import time; listing it is how the
CLI knows what exists. There is no second hand-kept list anywhere.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping filled by ``@registry.register("name")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj
        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)


ALGORITHMS: Registry = Registry("algorithm")
THRESHOLDS: Registry = Registry("threshold policy")
BACKBONES: Registry = Registry("backbone")
FORMATS: Registry = Registry("dataset format")
UNLABELED_SOURCES: Registry = Registry("streamed unlabeled source")
DETECTORS: Registry = Registry("face detector")
