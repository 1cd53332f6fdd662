"""Built-in attacks: every module in this package that registers an attack does so on import.

Look attacks up here (``get_attack``, ``list_attacks``): importing this package is what registers
them. The contract (``Attack``, ``AttackConfig``, ``AttackContext``, ``AttackResult``, the
``TextTask`` protocol) is in ``erase.attacks.base``; success accounting in ``erase.attacks.success``.
"""

import importlib
import pkgutil

from erase.attacks.base import ATTACKS, register_attack

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

get_attack = ATTACKS.get
list_attacks = ATTACKS.names

__all__ = ["ATTACKS", "get_attack", "list_attacks", "register_attack"]
