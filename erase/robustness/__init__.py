"""Erasure under attack: run registered attacks against a finished diffusion run and write ``RUN_DIR/attacks/``.

``plan`` checks everything the command line says (run folder, attack names, budgets, prompt set)
before any model loads; ``execute`` loads the erased and base models and the judge, attacks every
prompt (resumable per prompt) and writes the outputs; ``report`` turns the per-prompt records into
tables, grids, ``robustness.json`` and the model card's Robustness section. This package sits above
``erase.attacks`` and ``erase.diffusion`` (it is the only place that needs both) and below the
commands (``erase/attack.py``, ``erase/evaluate.py --attacks``).
"""

from erase.robustness.plan import AttackPlan, make_plan
from erase.robustness.run import execute

__all__ = ["AttackPlan", "execute", "make_plan"]
