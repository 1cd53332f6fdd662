"""One switch for every progress bar a run shows: erase's own and those of the libraries it calls.

``--no-progress`` must silence all of them — transformers' "Loading weights" and "Writing model
shards", the hub's download bars, erase's data generation and evaluation bars — so that an error
message stands alone on stderr. Bars are a process-wide display choice, as in those libraries.
"""

from __future__ import annotations

import sys

_enabled = True


def set_progress(enabled: bool) -> None:
    """Show (True) or hide (False) every progress bar from now on in this process."""
    global _enabled
    _enabled = bool(enabled)
    if not enabled:
        # transformers reads the hub's switch when it is imported, so this covers a later import too.
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    elif "huggingface_hub" in sys.modules:
        # lazy: the hub client is only touched to switch its bars
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()
    # diffusers' loading bars stay off either way (erase.diffusion.loading turns them off for every load).


def progress_enabled() -> bool:
    return _enabled
