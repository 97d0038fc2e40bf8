"""One registry per kind (datasets, models, attacks, defenses, metrics).

A registry is an explicit name -> object map that refuses duplicates and answers
unknown names with a one-line error listing the allowed ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from bench.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T, *, force: bool = False) -> T:
        if name in self._entries and not force:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def get(self, name: str, *, key: str | None = None) -> T:
        try:
            return self._entries[name]
        except KeyError:
            where = f"{key}: " if key else ""
            raise UserError(
                f"{where}unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
