"""Report finished unlearning runs against a retrained reference.

    python erase/evaluate.py runs/salun-class-1 runs/ft-class-1 --retrain runs/retrain-class-1

Prints UA, RA, TA, MIA-efficacy, their gaps to retrain, the average gap, and the run-time
efficiency (seconds, and as a ratio to the retrain run's wall time), and writes
``comparison.json`` / ``comparison.md`` (or ``--output PREFIX``).
"""

import sys

if __name__ == "__main__" and not __package__:
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    if os.path.abspath(sys.path[0]) == _here:  # don't let erase/*.py shadow other modules
        sys.path[0] = os.path.dirname(_here)


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="erase/evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished run folders written by erase/train.py")
    p.add_argument("--retrain", help="the retrained reference run (same forget set); gives the gaps and RTE ratio")
    p.add_argument("--output", help="write PREFIX.json and PREFIX.md (default: comparison.* in the first run's folder)")
    return p


def main(argv=None) -> int:
    from pathlib import Path

    from erase.metrics.report import compare_runs, load_run, markdown_table, write_report

    args = build_parser().parse_args(argv)
    runs = [load_run(p) for p in args.runs]
    retrain = load_run(args.retrain) if args.retrain else None
    forget = {r["metrics"].get("settings", {}).get("forget") for r in runs + ([retrain] if retrain else [])}
    if len(forget) > 1:
        from erase.errors import EraseError

        raise EraseError(f"runs forget different sets ({', '.join(map(str, forget))}); compare like with like")
    rows = compare_runs(([retrain] if retrain else []) + runs, retrain)
    out = Path(args.output) if args.output else Path(args.runs[0]) / "comparison"
    notes = [f"forget set: {forget.pop()}", "gaps are |method - retrain|; RTE_ratio = wall time / retrain wall time"]
    write_report(rows, out, "Unlearning vs retrain", notes)
    print(markdown_table(rows))
    print(f"\nwritten: {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    return 0


def cli() -> None:
    from erase.cli import run_cli

    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
