"""Name -> function registries for the RL algorithms (advantages, policy losses, preference losses).

Callers look a name up and never branch on it. Registering a name twice is an error (two modules
silently fighting over "grpo" is the bug this prevents), and an unknown name lists the known ones.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str):
        self.kind = kind  # "advantage", "policy loss", ...: used in error messages
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._fns[name].__module__})")
            self._fns[name] = fn
            return fn
        return decorator

    def get(self, name: str) -> F:
        if name not in self._fns:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._fns))}")
        return self._fns[name]

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: str) -> bool:
        return name in self._fns
