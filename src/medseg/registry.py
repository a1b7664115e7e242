"""Name -> object registries with lazy loading of the built-in modules (timm style, MONAI-lazy)."""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from medseg.errors import MedsegError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries register themselves with ``@REG.register("name")``.

    ``builtin_modules`` are imported on the first lookup, so ``import medseg`` stays cheap and a
    heavy optional dependency is only imported when its entry is used.
    """

    def __init__(self, kind: str, builtin_modules: list[str]):
        self.kind = kind
        self._builtin = list(builtin_modules)
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._builtin:
                importlib.import_module(mod)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f"did you mean {close[0]!r}?" if close else None
            raise MedsegError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}", hint=hint
            )
        return self._entries[name]

    def builtin_order(self) -> list[str]:
        """Every entry: the built-ins in the order their modules are listed, then the others as registered."""
        self._load()
        rank = {m: i for i, m in enumerate(self._builtin)}
        names = list(self._entries)
        return sorted(names, key=lambda n: (rank.get(getattr(self._entries[n], "__module__", ""), len(rank)),
                                            names.index(n)))

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
