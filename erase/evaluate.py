"""Evaluate erasure: diffusion models or image folders (FID, concept accuracy, NudeNet, CLIP score),
or finished classifier runs against a retrained reference.

    # a diffusion model before and after erasure: generate, then score (accelerate launch splits generation)
    python erase/evaluate.py model --base fmnist-tiny-sd --erased runs/esd-trouser --concept trouser \\
        --prompts prompts/fmnist_classes.csv --images-per-prompt 8 --output-dir eval/esd-trouser
    python erase/evaluate.py runs/esd-trouser          # the same, settings read from the run folder
    python erase/evaluate.py runs/esd-trouser --attacks ring-a-bell   # and attack it (erase/attack.py)
    # images already generated (erase/generate.py output, or any folder of images)
    python erase/evaluate.py images gen/trouser --concept trouser
    # classifier unlearning runs against retrain
    python erase/evaluate.py runs/salun-class-1 runs/ft-class-1 --retrain runs/retrain-class-1

Diffusion evaluations write ``metrics.json`` and ``report.md`` (tables, a plot, the before/after
grids); every metric records its evaluator's name, version, weights source, threshold and input
convention. FID is Inception FID only with ``--inception-weights`` (or the file in the torch hub
cache); otherwise it is FID-fmnist on the bundled evaluator's features, named as such.

Classifier comparisons print UA, RA, TA, MIA-efficacy, their gaps to retrain, the average gap and
the run-time efficiency, and write ``comparison.json`` / ``comparison.md`` (or ``--output PREFIX``).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

if __name__ == "__main__" and not __package__:
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    if os.path.abspath(sys.path[0]) == _here:  # don't let erase/*.py shadow other modules
        sys.path[0] = os.path.dirname(_here)

SUBCOMMANDS = ("model", "images", "runs")


def build_parser():
    """The classifier-run comparison (the default when no subcommand is named)."""
    p = argparse.ArgumentParser(prog="erase/evaluate.py", description=__doc__,
                                usage="%(prog)s model ... | images FOLDER ... | DIFFUSION_RUN | RUN [RUN ...] [--retrain RUN]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished run folders written by erase/train.py")
    p.add_argument("--retrain", help="the retrained reference run (same forget set); gives the gaps and RTE ratio")
    p.add_argument("--output", help="write PREFIX.json and PREFIX.md (default: comparison.* in the first run's folder)")
    return p


def add_metric_args(p) -> None:
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics", default="fid,concept,nudenet",
                   help="comma-separated: fid, concept, nudenet, clip (clip is added when --clip-model is given)")
    g.add_argument("--concept", default="", help="the erased concept: gives UA and retained accuracy")
    g.add_argument("--fid-features", default="auto",
                   help="auto (Inception when its weights are here, else fmnist-classifier) | inception | a classifier folder")
    g.add_argument("--inception-weights", metavar="FILE", help="pt_inception-2015-12-05-6726825d.pth for Inception FID")
    g.add_argument("--fid-reference", default="auto",
                   help="real side of FID: auto | fmnist-test | base (the base model's images) | a folder of images")
    g.add_argument("--fid-reference-images", type=int, default=10_000, help="at most this many reference images")
    g.add_argument("--classifier", default="auto",
                   help="judge of concept accuracy: auto | an erase classifier folder or bundled name | torchvision:ARCH | clip")
    g.add_argument("--classifier-weights", metavar="FILE", help="ImageNet weights for --classifier torchvision:ARCH")
    g.add_argument("--clip-model", help="CLIP checkpoint for CLIP score / zero-shot: local folder, open_clip:ARCH=FILE, or hub id")
    g.add_argument("--nudenet-threshold", type=float, default=0.6, help="NudeNet detection score threshold")
    g.add_argument("--label", default="", help="concept of every image of a plain image folder (no images.csv)")
    g.add_argument("--eval-batch-size", type=int, default=32, help="images per metric batch")


def _suite_settings(a):
    # lazy: the command's --help answers without importing torch
    from erase.metrics.suite import SuiteSettings

    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    if a.clip_model and "clip" not in metrics:
        metrics.append("clip")
    return SuiteSettings(metrics, a.fid_features, a.inception_weights, a.fid_reference, a.fid_reference_images,
                         a.classifier, a.classifier_weights, a.clip_model, a.nudenet_threshold, a.concept, a.label,
                         a.eval_batch_size)


def score_folder(folder, out, args, title: str, extra: dict | None = None) -> dict:
    """Run the metric suite over an image folder; write metrics.json and report.md into ``out``."""
    # lazy: the command's --help answers without importing torch
    from erase.metrics.eval_report import write_report
    from erase.metrics.suite import evaluate_images, read_image_set
    from erase.storage import atomic_write_json

    t0 = time.perf_counter()
    folder, out = Path(folder), Path(out)
    settings = _suite_settings(args)
    result = evaluate_images(read_image_set(folder, settings.label), settings)
    gen = folder / "generation.json"
    result = {"title": title, "images": str(folder), **(extra or {}),
              "generation": json.loads(gen.read_text()) if gen.is_file() else None, **result}
    result["settings"] = {k: v for k, v in vars(settings).items()}
    result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out / "metrics.json")
    report = write_report(result, out, title, sorted((folder / "grids").glob("*.png")))
    # lazy: the command's --help answers without importing torch
    from erase.metrics.eval_report import summary_table

    print("\n".join(summary_table(result)))
    print(f"\nwritten: {out / 'metrics.json'}, {report}")
    return result


def images_main(argv) -> int:
    p = argparse.ArgumentParser(prog="erase/evaluate.py images", description="Score a folder of generated images "
                                "(erase/generate.py output, or any images; one sub-folder per model).")
    p.add_argument("folder")
    p.add_argument("--output-dir", help="where metrics.json and report.md go (default: the folder)")
    add_metric_args(p)
    a = p.parse_args(argv)
    score_folder(a.folder, a.output_dir or a.folder, a, f"Evaluation of {a.folder}")
    return 0


def model_main(argv, run_defaults: dict | None = None) -> int:
    # lazy: the command's --help answers without importing torch
    from erase.generate import add_generation_args, generate

    p = argparse.ArgumentParser(prog="erase/evaluate.py model", description="Generate from a base and/or an erased "
                                "model on a prompt CSV, then score the images.")
    add_generation_args(p)
    p.add_argument("--output-dir", required=run_defaults is None, help="images, metrics.json and report.md go here")
    p.add_argument("--overwrite", action="store_true", help="discard images made with other settings")
    p.add_argument("--no-progress", action="store_true")
    if run_defaults:
        p.add_argument("--attacks", metavar="NAME[,NAME]", help="then attack the run's erased model (as erase/attack.py "
                       "RUN_DIR --attack NAME, default budgets and prompt set; 'all' for every attack; "
                       "--overwrite redoes them too)")
    add_metric_args(p)
    if run_defaults:
        p.set_defaults(**run_defaults)
    a = p.parse_args(argv)
    # lazy: the command's --help answers without importing torch
    from erase.progress import set_progress

    set_progress(not a.no_progress)
    plan = None
    if getattr(a, "attacks", None) is not None:
        # lazy: the command's --help answers without importing torch
        from erase.robustness import make_plan

        # Planned (every check done) before generation, so a typo fails before any model loads.
        plan = make_plan(a.erased, a.attacks, overwrite=a.overwrite, progress=not a.no_progress)
    # lazy: the command's --help answers without importing torch
    from erase.metrics.suite import check_concept

    settings = _suite_settings(a)
    generate(a, a.output_dir, progress=not a.no_progress,
             check_rows=lambda rows: check_concept(settings, [r.concept for r in rows]))
    # lazy: the command's --help answers without importing torch
    from accelerate import PartialState

    if not PartialState().is_main_process:  # the state generate() set up
        return 0  # generation was split; scoring runs once
    names = " vs ".join(filter(None, [a.base and f"base {a.base}", a.erased and f"erased {a.erased}"]))
    score_folder(a.output_dir, a.output_dir, a, f"Evaluation: {names}" + (f", concept {a.concept!r}" if a.concept else ""))
    if plan is not None:
        # lazy: the command's --help answers without importing torch
        from erase.attack import summary_text
        from erase.robustness import execute

        print(summary_text(execute(plan)))
        print(f"attack outputs in {plan.run_dir / 'attacks'}/")
    return 0


def run_folder_defaults(run) -> dict | None:
    """Settings for ``evaluate.py RUN``, from a finished diffusion erasure run folder (None otherwise)."""
    run = Path(run)
    cfg_file = run / "config.yaml"
    if not (run / "model").is_dir() and not (run / "delta.safetensors").is_file():
        return None
    cfg = (yaml.safe_load(cfg_file.read_text()) or {}).get("diffusion", {}) if cfg_file.is_file() else {}
    base = cfg.get("model") or "fmnist-tiny-sd"
    fmnist = Path(base).name in ("fmnist-tiny-sd", "fmnist-ddpm")
    # lazy: the command's --help answers without importing torch
    from erase.prompts import PROMPTS_DIR

    defaults = {"base": base, "erased": str(run), "concept": cfg.get("concept", ""),
                "output_dir": str(run / "evaluation"), "steps": cfg.get("sample_steps") or 25,
                "images_per_prompt": 8 if fmnist else 1,
                "prompts": str(PROMPTS_DIR / ("fmnist_classes.csv" if fmnist else "imagenette.csv"))}
    if (cfg.get("guidance") or -1) >= 0:
        defaults["guidance"] = cfg["guidance"]
    return defaults


def compare_main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # first, so --help does not wait for torch and torchmetrics
    # lazy: the command's --help answers without importing torch
    from erase.metrics.report import compare_runs, load_run, markdown_table, write_report

    runs = [load_run(p) for p in args.runs]
    retrain = load_run(args.retrain) if args.retrain else None
    forget = {r["metrics"].get("settings", {}).get("forget") for r in runs + ([retrain] if retrain else [])}
    if len(forget) > 1:
        # lazy: the command's --help answers without importing torch
        from erase.errors import EraseError

        raise EraseError(f"runs forget different sets ({', '.join(map(str, forget))}); compare like with like")
    rows = compare_runs(([retrain] if retrain else []) + runs, retrain)
    out = Path(args.output) if args.output else Path(args.runs[0]) / "comparison"
    notes = [f"forget set: {forget.pop()}", "gaps are |method - retrain|; RTE_ratio = wall time / retrain wall time"]
    write_report(rows, out, "Unlearning vs retrain", notes)
    print(markdown_table(rows))
    print(f"\nwritten: {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "model":
        return model_main(argv[1:])
    if argv and argv[0] == "images":
        return images_main(argv[1:])
    if argv and argv[0] == "runs":
        return compare_main(argv[1:])
    # A single diffusion run folder: evaluate its erased model against its base (flags may follow).
    if argv and not argv[0].startswith("-") and "--retrain" not in argv:
        defaults = run_folder_defaults(argv[0])
        if defaults:
            return model_main(argv[1:], defaults)
    return compare_main(argv)


def cli() -> None:
    # lazy: the command's --help answers without importing torch
    from erase.cli import run_cli

    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
