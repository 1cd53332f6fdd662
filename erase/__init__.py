"""erase: remove concepts and training data from trained models, and prove it."""

from erase.errors import EraseError
from erase.methods import get_method, list_methods
from erase.registry import register_method

__version__ = "0.1.0"
__all__ = ["EraseError", "get_method", "list_methods", "register_method", "__version__"]
