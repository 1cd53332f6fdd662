"""Generate images from a base and an erased model on the same prompts and seeds.

    python erase/generate.py --base fmnist-tiny-sd --erased runs/esd-trouser --prompts prompts/fmnist_classes.csv \\
        --images-per-prompt 4 --output-dir gen/trouser
    accelerate launch erase/generate.py ...        # the same, split across processes / GPUs

``--erased`` is a diffusers folder, an erase run folder (``model/`` or ``delta.safetensors``
inside), or a ``delta.safetensors`` file applied to ``--base``. Prompt CSVs: see ``erase/prompts.py``
(ESD/SalUn evaluation CSVs work as they are). Rerunning the same command skips the images already
written. Output: ``base/``, ``erased/``, ``images.csv``, ``generation.json``, ``grids/``.
"""

import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    if os.path.abspath(sys.path[0]) == _here:  # don't let erase/*.py shadow other modules
        sys.path[0] = os.path.dirname(_here)


def add_generation_args(p) -> None:
    p.add_argument("--base", help="base model: bundled name, diffusers folder, .safetensors/.ckpt file or hub id")
    p.add_argument("--erased", help="erased model: diffusers folder, erase run folder, or delta.safetensors (+ --base)")
    p.add_argument("--prompts", help="prompt CSV (prompt[,seed|evaluation_seed][,guidance][,negative_prompt]"
                                     "[,label|class][,case_number]); e.g. prompts/fmnist_classes.csv")
    p.add_argument("--i2p-categories", default=None, metavar="CATS",
                   help="treat --prompts as the I2P CSV and keep rows in these categories (e.g. sexual; '' keeps all)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompt rows (0: all)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per CSV row; image k uses seed + k")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (the model's own scheduler)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance for every row (default: the CSV's column, else 4 for the bundled SD, "
                        "2 for DDPMs, 7.5 otherwise)")
    p.add_argument("--batch-size", type=int, default=16, help="images per sampling batch")
    p.add_argument("--grid-seeds", type=int, default=4, help="columns of each before/after grid")


def build_parser():
    p = argparse.ArgumentParser(prog="erase/generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(p)
    p.add_argument("--output-dir", required=True, help="folder for the images, images.csv and grids")
    p.add_argument("--overwrite", action="store_true", help="discard images made with other settings")
    p.add_argument("--no-progress", action="store_true")
    return p


def generate(args, out, progress: bool = True, check_rows=None) -> dict:
    """Generate what ``args`` asks into ``out``; returns generation.json's content (+ "written").

    ``check_rows(rows)``, if given, runs on the prompt rows before any model loads (a caller's checks
    that must fail before images are generated, e.g. that the evaluator knows the concept).
    """
    # lazy: the command's --help answers without importing torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    # lazy: the command's --help answers without importing torch
    from erase.diffusion import generation as G
    from erase.errors import EraseError
    from erase.prompts import load_i2p, load_prompts

    out = Path(out)
    if not args.prompts:
        raise EraseError("--prompts is required: a prompt CSV such as prompts/fmnist_classes.csv")
    if args.images_per_prompt < 1 or args.steps < 1 or args.batch_size < 1:
        raise EraseError("--images-per-prompt, --steps and --batch-size must be at least 1")
    limit = args.limit or None
    rows = (load_i2p(args.prompts, args.i2p_categories, limit=limit) if args.i2p_categories is not None
            else load_prompts(args.prompts, limit=limit))
    if check_rows is not None:
        check_rows(rows)
    specs: dict[str, tuple[str, object]] = {}
    base = args.base
    if args.erased:
        spec, delta, implied = G.resolve_erased(args.erased, base)
        base = base or implied
        specs["erased"] = (spec, delta)
    if base:
        specs = {"base": (base, None), **specs}
    if not specs:
        raise EraseError("nothing to generate: pass --base and/or --erased")
    # lazy: the command's --help answers without importing torch
    from erase.runner import _has_accelerator

    state = PartialState(cpu=not _has_accelerator())  # accelerate sets up multi-process CPU (gloo) only when told cpu=True
    settings = {"models": {m: str(s) + (f" + {d}" if d else "") for m, (s, d) in specs.items()},
                "prompts": str(args.prompts), "prompts_sha256": G.file_sha256(args.prompts)[:16], "rows": len(rows),
                "images_per_prompt": args.images_per_prompt, "steps": args.steps, "guidance": args.guidance,
                "seeds": "row seed + k, one CPU torch.Generator per image", "processes": state.num_processes}
    if state.is_main_process:
        # lazy: the command's --help answers without importing torch
        from erase.storage import check_writable_dir

        check_writable_dir(out, "--output-dir")  # a file of that name or a read-only disk: one line, before any model loads
        G.check_settings(out, settings, getattr(args, "overwrite", False))
    state.wait_for_everyone()
    all_jobs, written, t0 = [], 0, time.perf_counter()
    for name, (spec, delta) in specs.items():
        model = G.load_generator(spec, state.device, delta)
        default = G.default_guidance(base or spec, model.kind)
        settings.setdefault("kinds", {})[name] = model.kind
        settings.setdefault("schedulers", {})[name] = type(model.scheduler).__name__
        jobs = [G.Job(name, r, k, args.guidance if args.guidance is not None else r.guidance if r.guidance is not None
                      else default) for r in rows for k in range(args.images_per_prompt)]
        all_jobs += jobs
        with state.split_between_processes(jobs) as mine:
            todo = [j for j in mine if not (out / j.file).is_file()]
            bar = tqdm(total=len(todo), desc=f"{name} images", disable=not progress or not state.is_main_process)
            for g in sorted({j.guidance for j in todo}):
                same = [j for j in todo if j.guidance == g]
                for i in range(0, len(same), args.batch_size):
                    batch = same[i:i + args.batch_size]
                    for j, img in zip(batch, G.render(model, batch, args.steps)):
                        G.save_png(img, out / j.file)
                    written += len(batch)
                    bar.update(len(batch))
            bar.close()
        del model
    state.wait_for_everyone()
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    if state.is_main_process:
        # lazy: the command's --help answers without importing torch
        from erase.storage import atomic_write_json

        missing = [j.file for j in all_jobs if not (out / j.file).is_file()]
        if missing:
            raise EraseError(f"{len(missing)} images are missing after generation (e.g. {missing[0]}); rerun to resume")
        G.write_index(out, all_jobs)
        G.write_grids(out, all_jobs, list(specs), seeds=args.grid_seeds)
        atomic_write_json(settings, out / "generation.json")
    settings["written"] = written
    return settings


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # lazy: the command's --help answers without importing torch
    from erase.progress import set_progress

    set_progress(not args.no_progress)
    s = generate(args, args.output_dir, progress=not args.no_progress)
    # lazy: the command's --help answers without importing torch
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"{s['rows']} prompts x {s['images_per_prompt']} images x {len(s['models'])} model(s) in {args.output_dir} "
              f"({s['seconds']} s; this process wrote {s['written']})")
    return 0


def cli() -> None:
    # lazy: the command's --help answers without importing torch
    from erase.cli import run_cli

    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
