"""Erase a concept or unlearn data: ``accelerate launch erase/train.py --concept trouser``.

Also runs as ``python erase/train.py`` and ``python -m erase.train``. ``--help`` lists every
flag of both tasks; ``--method NAME --help`` adds that method's own flags.
"""

import sys

if __name__ == "__main__" and not __package__:
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    if os.path.abspath(sys.path[0]) == _here:  # don't let erase/*.py shadow other modules
        sys.path[0] = os.path.dirname(_here)

DESCRIPTION = """Remove a concept (diffusion) or data (classifier) from a trained model.

examples:
  accelerate launch erase/train.py --concept trouser          # SalUn on the bundled tiny Stable Diffusion
  accelerate launch erase/train.py --concept trouser --method esd-u --output-dir runs/esd-u-trouser
  accelerate launch erase/train.py --concept "garbage truck" --method esd-x --model CompVis/stable-diffusion-v1-4
  python -m erase.classifier.pretrain --output-dir runs/original    # a classifier to unlearn from
  accelerate launch erase/train.py --method salun --forget class:1 --original runs/original
  accelerate launch erase/train.py --method retrain --forget class:1 --original runs/original
"""


def main(argv=None) -> int:
    # lazy: the command's --help answers without importing torch
    from erase.config import parse_cli
    from erase.methods import list_methods
    from erase.runner import run

    resolved, ns = parse_cli(argv, prog="erase/train.py", description=DESCRIPTION)
    # lazy: the command's --help answers without importing torch
    from erase.progress import set_progress

    set_progress(resolved.run.progress)
    if ns.list_methods:
        print("\n".join(list_methods(resolved.task_name)))
        return 0
    out = run(resolved).output_dir
    # lazy: the command's --help answers without importing torch
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        print((out / "report.md").read_text())
        print(f"outputs in {out}/")
    return 0


def cli() -> None:
    # lazy: the command's --help answers without importing torch
    from erase.cli import run_cli

    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
