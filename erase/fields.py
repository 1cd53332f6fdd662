"""Typed config fields with help text: the leaf every config dataclass builds on (imports nothing of erase).

``opt`` declares a field, its ``--help`` text and optional allowed values; ``check_choices`` and
``flag_name`` let every ``validate()`` report a bad value under the flag the user typed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any


def opt(default: Any, help: str, choices: tuple | None = None):
    """A config field with help text (shown by ``--help``) and optional allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: ``max_steps`` -> ``--max-steps``."""
    return "--" + field_name.replace("_", "-")


def field_problems(cfg: Any) -> list[str]:
    """Values outside a field's ``choices`` and non-finite floats, one message per flag."""
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            problems.append(f"{flag_name(f.name)} must be one of {', '.join(map(str, choices))}, got {value!r}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{flag_name(f.name)} must be a finite number, got {value!r}")
    return problems


def below_minimum(cfg: Any, low: float, *names: str) -> list[str]:
    """One message per field of ``names`` whose value is below ``low``, naming its flag."""
    return [f"{flag_name(n)} must be >= {low}, got {getattr(cfg, n)}" for n in names if getattr(cfg, n) < low]
