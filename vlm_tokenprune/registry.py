"""A strict name -> object registry (peft style): duplicates raise, unknown names list the valid ones."""
from __future__ import annotations

import re
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """Maps lowercase names to objects of one kind (criteria, presets, adapters)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{self.kind} name must be lowercase [a-z][a-z0-9_]*, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> T:
        """Remove ``name`` (tests and plugins that register temporarily); returns what it held."""
        if name not in self._items:
            raise UnknownNameError(self.kind, name, self._items)
        return self._items.pop(name)

    def decorator(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            return self.register(name, obj)

        return wrap

    def get(self, name: str, field: str | None = None) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(field or self.kind, name, self._items) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())


CRITERIA: Registry = Registry("criterion")
PRESETS: Registry = Registry("preset")
ADAPTERS: Registry = Registry("adapter")
