"""Registries: one validated name -> one small class (methods today, attacks next).

A class registers itself with a decorator (``@register_method("salun")``). Names are lower-case and
unique, and each class declares the tasks it supports, so a CLI can list the valid choices and reject
a typo with that list. This module is a leaf: the packages that own the classes (``erase.methods``)
import their files, so looking a name up goes through that package (``erase.methods.get_method``).
"""

from __future__ import annotations

import re
from typing import Generic, TypeVar

from erase.errors import EraseError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str):
        """Class decorator adding ``cls`` under ``name`` (sets ``cls.name``)."""
        if not _NAME.match(name):
            raise ValueError(f"invalid {self.kind} name {name!r}: use lower-case letters, digits, '_' or '-'")

        def decorator(cls):
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._classes[name].__module__}")
            if not getattr(cls, "tasks", None):
                raise ValueError(f"{self.kind} {name!r} must declare the tasks it supports")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorator

    def names(self, task: str | None = None) -> list[str]:
        """Sorted names, optionally only those supporting ``task``."""
        return sorted(n for n, cls in self._classes.items() if task is None or task in cls.tasks)

    def get(self, name: str, task: str | None = None) -> type[T]:
        """The class for ``name``; a clear error listing the choices otherwise."""
        key = name.strip().lower()
        if key not in self._classes:
            raise EraseError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names(task))}")
        cls = self._classes[key]
        if task is not None and task not in cls.tasks:
            raise EraseError(f"{self.kind} {key!r} does not support task {task!r} (it supports {', '.join(cls.tasks)}); "
                             f"{self.kind}s for {task}: {', '.join(self.names(task))}")
        return cls


METHODS: Registry = Registry("method")
register_method = METHODS.register
