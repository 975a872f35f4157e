"""A registry: the names of one kind of plug-in (tasks, backbones, adapter kinds) and their entries.

Each plug-in is one module that registers its entry when imported; the config validates names
against the registry, and the rest of the code looks entries up by name instead of naming them.
A user's plug-in registers itself the same way; the config's `plugins:` list imports it.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> entry, in registration order. Every entry has a `name` attribute."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a {self.what} needs a `name` that is a Python identifier, got {name!r}")
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.what} {name!r} is registered twice "
                             f"({type(self._entries[name]).__module__} and {type(entry).__module__})")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r} (registered: {', '.join(self._entries)})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def get_many(self, names) -> list[T]:
        return [self[n] for n in names]
