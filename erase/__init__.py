"""erase: remove concepts and training data from trained models, and prove it."""

from erase.errors import EraseError
from erase.registry import register_method

__version__ = "0.1.0"
__all__ = ["EraseError", "get_method", "list_methods", "register_method", "__version__"]


def __getattr__(name: str):
    # Lazy: looking a method up imports every method file (and torch); `import erase` and the CLIs'
    # --help stay fast without them.
    if name in ("get_method", "list_methods"):
        import erase.methods

        return getattr(erase.methods, name)
    raise AttributeError(f"module 'erase' has no attribute {name!r}")
