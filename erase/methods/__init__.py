"""Built-in methods: every module in this package is one method file and registers itself on import.

Look methods up here (``get_method``, ``list_methods``): importing this package is what registers them.
"""

import importlib
import pkgutil

from erase.registry import METHODS

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

get_method = METHODS.get
list_methods = METHODS.names

__all__ = ["get_method", "list_methods"]
