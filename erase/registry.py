"""The method registry: one validated name -> one small method class.

Methods register themselves with ``@register_method("name")``. Names are lower-case, unique and
declare the tasks they support, so the CLI can list valid choices and reject typos with the list.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from erase.errors import EraseError

if TYPE_CHECKING:
    from erase.methods.base import Method

_METHODS: dict[str, type[Method]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


def register_method(name: str):
    """Class decorator adding a :class:`~erase.methods.base.Method` subclass under ``name``."""
    if not _NAME.match(name):
        raise ValueError(f"invalid method name {name!r}: use lower-case letters, digits, '_' or '-'")

    def decorator(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__module__}")
        if not getattr(cls, "tasks", None):
            raise ValueError(f"method {name!r} must declare the tasks it supports")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def _load_builtin_methods() -> None:
    # Importing the package registers every built-in method file exactly once.
    import erase.methods  # noqa: F401


def list_methods(task: str | None = None) -> list[str]:
    """Sorted names of the registered methods, optionally only those supporting ``task``."""
    _load_builtin_methods()
    return sorted(n for n, cls in _METHODS.items() if task is None or task in cls.tasks)


def get_method(name: str, task: str | None = None) -> type[Method]:
    """The method class for ``name``; a clear error listing the choices otherwise."""
    _load_builtin_methods()
    key = name.strip().lower()
    if key not in _METHODS:
        raise EraseError(f"unknown method {name!r}; choose one of: {', '.join(list_methods(task))}")
    cls = _METHODS[key]
    if task is not None and task not in cls.tasks:
        raise EraseError(
            f"method {key!r} does not support task {task!r} (it supports {', '.join(cls.tasks)}); "
            f"methods for {task}: {', '.join(list_methods(task))}"
        )
    return cls
