"""One registry mechanism for every pluggable kind (algorithms, backbones, formats...).

A registry is a dict filled by a decorator at import time; listing it is how the
CLI knows what exists. There is no second hand-kept list anywhere.
"""
from __future__ import annotations

import functools
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping filled by ``@registry.register("name")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._families: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj
        return deco

    def register_family(self, prefix: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Register ``fn(member, ...)`` for every name ``PREFIX:MEMBER`` (e.g. ``tv:resnet34``).

        For open-ended collections (torchvision, timm) that cannot be listed one by one.
        """
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if prefix in self._families:
                raise ValueError(f"{self.kind} family {prefix!r} is already registered")
            self._families[prefix] = fn
            return fn
        return deco

    def families(self) -> list[tuple[str, Callable[..., T]]]:
        return sorted(self._families.items())

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        prefix, sep, member = name.partition(":")
        if sep and member and prefix in self._families:
            return functools.partial(self._families[prefix], member)  # type: ignore[return-value]
        families = "".join(f", {p}:NAME" for p in self._families)
        raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}{families}")

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: str) -> bool:
        prefix, sep, member = name.partition(":")
        return name in self._items or bool(sep and member and prefix in self._families)

    def __len__(self) -> int:
        return len(self._items)


ALGORITHMS: Registry = Registry("algorithm")
THRESHOLDS: Registry = Registry("threshold policy")
BACKBONES: Registry = Registry("backbone")
FORMATS: Registry = Registry("dataset format")
UNLABELED_SOURCES: Registry = Registry("streamed unlabeled source")
DETECTORS: Registry = Registry("face detector")
