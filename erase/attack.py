"""Attack an erased model: ``python erase/attack.py RUN_DIR --attack ring-a-bell`` (or ``--attack all``).

Also runs as ``python -m erase.attack``; ``erase/evaluate.py RUN_DIR --attacks NAME`` calls the same code.
"""

import argparse
import sys

if __name__ == "__main__" and not __package__:
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    if os.path.abspath(sys.path[0]) == _here:  # don't let erase/*.py shadow other modules
        sys.path[0] = os.path.dirname(_here)

DESCRIPTION = """Does the concept come back under attack? Runs registered attacks (e.g. ring-a-bell) against the
erased model of a finished diffusion run, for every prompt of an attack prompt set, and judges each image
with the run's evaluator.

Writes RUN_DIR/attacks/<name>/: prompts.csv (the adversarial prompts as text, replayable with
erase/generate.py --prompts), embeddings/ (safetensors, for attacks that make embeddings), images/,
table.csv and table.md (per prompt), grid.png (base | erased | erased under attack, same seeds) and
robustness.json (pre-ASR, ASR, adversarial-alone ASR, the union over attacks, judge settings, budget, wall
time per prompt); RUN_DIR/attacks/robustness.json holds the union, and the run's README.md gains a
Robustness section. A rerun skips prompts already attacked; --overwrite redoes them.

Attack budgets: the attack's defaults (the official code's) < the base model's erase.yaml `attacks:` entry
(the bundled fmnist-tiny-sd ships a reduced ring-a-bell budget) < --set.

examples:
  python erase/attack.py runs/uce-trouser --attack ring-a-bell
  python erase/attack.py runs/uce-trouser --attack ring-a-bell --set avoid-concept-words=true --set population=32
  python erase/attack.py runs/esd-nudity --attack all --prompts i2p_nudity.csv --evaluator my-nudity-classifier
  python erase/attack.py runs/base-trouser --base-model fmnist-tiny-sd --concept trouser --attack all
  python erase/attack.py --list-attacks
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="erase/attack.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a finished diffusion run folder (erase/train.py output)")
    p.add_argument("--attack", default="all", help="attack name, comma-separated names, or 'all' (default: all)")
    p.add_argument("--prompts", metavar="CSV", help="attack prompt set: any CSV with a 'prompt' column (optional "
                   "class|label, seed, guidance, case_number); default: the run's concept prompt and its held-out "
                   "paraphrases")
    p.add_argument("--limit", type=int, default=0, help="attack only the first N prompts (0: all)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[ATTACK.]FIELD=VALUE",
                   help="an attack setting, e.g. --set population=32 or --set ring-a-bell.continuous=true "
                        "(repeatable; --list-attacks shows every setting)")
    p.add_argument("--evaluator", default="", help="judge: a classifier folder saved by erase or a bundled name "
                   "(default: the run's evaluator)")
    p.add_argument("--seed", type=int, default=None, help="seed of the attacks' own randomness (default: the run's)")
    p.add_argument("--overwrite", action="store_true", help="redo prompts already attacked (clears attacks/<name>/)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--base-model", default="", metavar="MODEL", help="attack this unerased base model instead of a "
                   "run's erased model (the sanity check: every attack should bring the concept back); RUN_DIR is then "
                   "the folder the results go to, and --concept names the concept")
    p.add_argument("--concept", default="", help="with --base-model: the concept the attacks try to bring back")
    p.add_argument("--list-attacks", action="store_true", help="print the attacks and their settings, and exit")
    return p


def list_attack_settings() -> str:
    # lazy: the command's --help answers without importing torch
    import dataclasses

    from erase.attacks import get_attack, list_attacks

    out = []
    for name in list_attacks("diffusion"):
        cls = get_attack(name)
        out.append(f"{name}:")
        for f in dataclasses.fields(cls.Config):
            out.append(f"  {f.name.replace('_', '-')} = {f.default!r}: {f.metadata.get('help', '')}")
    return "\n".join(out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_attacks:
        print(list_attack_settings())
        return 0
    # lazy: the command's --help answers without importing torch
    from erase.errors import EraseError

    if args.run_dir is None:
        raise EraseError("RUN_DIR is required: a finished diffusion run folder written by erase/train.py (with "
                         "--base-model: the folder the results go to)")
    if args.concept and not args.base_model:
        raise EraseError("--concept goes with --base-model (a run folder already names its concept)")
    # lazy: the command's --help answers without importing torch
    from erase.progress import set_progress
    from erase.robustness import execute, make_plan

    set_progress(not args.no_progress)
    plan = make_plan(args.run_dir, args.attack, args.prompts, args.sets, args.limit, args.evaluator, args.seed,
                     args.overwrite, not args.no_progress, args.base_model, args.concept)
    summary = execute(plan)
    print(summary_text(summary))
    print(f"outputs in {plan.run_dir / 'attacks'}/")
    return 0


def summary_text(summary: dict) -> str:
    lines = [f"{summary['prompts']} prompts ({summary['prompt_set']}); per cent of prompts:",
             f"{'attack':<16} {'pre-ASR':>8} {'ASR':>8} {'adv. ASR':>9}"]
    for name, r in [*summary["attacks"].items(), ("union", summary["union"])]:
        lines.append(f"{name:<16} {r['pre_asr']:>8.1f} {r['asr']:>8.1f} {r['adversarial_asr']:>9.1f}")
    return "\n".join(lines)


def cli() -> None:
    # lazy: the command's --help answers without importing torch
    from erase.cli import run_cli

    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
