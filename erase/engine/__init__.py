"""The shared engine: one loop, masked steps, checkpoints and resume, deterministic streams."""

from erase.engine.context import RunContext
from erase.engine.loop import LoopSettings, run_method
from erase.engine.masking import ParameterMask
from erase.engine.streams import DataView, Stream

__all__ = ["DataView", "LoopSettings", "ParameterMask", "RunContext", "Stream", "run_method"]
