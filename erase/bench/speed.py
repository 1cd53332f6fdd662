"""Speed and memory of closed-form and gradient erasure at Stable Diffusion v1.4 scale, without downloads.

    python -m erase.bench.speed                    # SD-1.4 architecture with random weights
    python -m erase.bench.speed --only uce-1,rece-1
    python -m erase.bench.speed --tiny             # tiny configs: the whole benchmark in seconds
    python -m erase.bench.speed --family sdxl      # SDXL / SD3-medium at full size: erase/bench/speed_fullsize.py

The cost of a closed-form solve or an optimiser step does not depend on the weights' values, so the
pipeline is built from the published v1.4 configs (``SD14`` below) with random weights and saved
once to a temporary folder; every measurement then loads it through the ordinary task adapter
(``DiffusionTask``: loading, prompt encoding, and for methods with data
streams — the forget and retain images the method reads, one each, all inside ``load_s``) in a fresh
subprocess, so each one's peak resident set is its own. Measurements (all at 256 px: latents
32×32, batch 1, DDIM with v1.4's noise schedule — v1.4 ships PNDM, ESD samples with DDIM):

* ``uce-N`` (N = 1, 10, 100 concepts; the preserve set is the 10 Imagenette classes plus '') —
  ``edit_s`` = ``encode_s`` (the text encoder on every erase, guide and preserve prompt) +
  ``solve_s`` (the method's one shared d×d solve and the 32 K/V products), then ``save_s``
  (``save_pretrained`` of the whole erased pipeline); ``per_layer_solve_s`` is the same edit as 32
  independent per-matrix solves (``uce_edit``), for reference; ``load_to_saved_s`` is load + edit +
  save;
* ``rece-1`` — the method's ``apply``: the UCE edit and one adversarial round;
* ``esd-x``, ``esd-u``, ``salun``, each with and without gradient checkpointing — one optimiser
  step through the method's own ``setup``, ``parameter_masks`` and ``losses`` with the engine's
  masking and optimiser (a re-statement of the engine's inner loop without accelerate's wrappers):
  a warm-up step (allocates the optimiser state), then ``step_s``, a step whose ESD partial
  sampling stops at once (x_T), so it is the training part alone; for ESD also ``esd_iter_s``, a
  step whose partial sampling runs 24 of 50 DDIM steps (the mean of ESD's uniform draw), i.e. a
  typical whole ESD iteration. SalUn's ``setup_s`` includes its saliency mask (one forget image).

Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` of the measurement's own process (model loading
included; ``rss_loaded_gb`` is the resident set once the model is loaded). Timings are comparable
as ratios within one run on one machine. ``--in-process`` runs everything in this process (what the
test suite does with ``--tiny``); peak RSS is then cumulative and the report says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import erase.diffusion.task  # noqa: F401
from erase.bench import speed_fullsize
from erase.bench.common import describe_machine, machine_info, set_threads
from erase.bench.speed_configs import SD14
from erase.bench.speed_measure import Clock, measure_rece, measure_step, measure_uce, peak_rss_gb, run_in_child
from erase.bench.speed_memory import BUDGET_GIB, LIMIT_GIB
from erase.errors import EraseError
from erase.storage import ZOO_DIR, atomic_write_json, atomic_write_text

TINY = {
    "unet": dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
                 norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8),
    "text_encoder": dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                norm_num_groups=8, sample_size=16),
}
# v1.4's scheduler_config.json noise schedule.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)
MEASUREMENTS = ["uce-1", "uce-10", "uce-100", "rece-1"] + [
    f"{m}{gc}" for m in ("esd-x", "esd-u", "salun") for gc in ("", "+gc")]
WHAT = {
    "uce": "UCE, {n} concept(s): load, edit (encode + solve), save the pipeline",
    "rece": "RECE, 1 concept: the UCE edit + 1 adversarial round",
    "esd-x": "ESD-x: one Adam step, cross-attention trained",
    "esd-u": "ESD-u: one Adam step, all but cross-attention trained",
    "salun": "SalUn: one Adam step on the salient half, forget + retain batch",
}


# -- building and loading ----------------------------------------------------------------------------

def build_pipeline(configs: dict):
    """A StableDiffusionPipeline with random weights from ``configs`` and the bundled (exact CLIP) tokenizer."""
    # lazy: diffusers takes seconds to import
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


    torch.manual_seed(0)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**configs["unet"]), text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        vae=AutoencoderKL(**configs["vae"]), tokenizer=CLIPTokenizer.from_pretrained(ZOO_DIR / "fmnist-tiny-sd" / "tokenizer"),
        scheduler=DDIMScheduler(**SCHEDULE), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def measure_build(model_dir: Path, configs: dict) -> dict:
    clock = Clock()
    with clock("build_s"):
        pipe = build_pipeline(configs)
    with clock("save_s"):
        pipe.save_pretrained(model_dir, safe_serialization=True)
    params = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "text_encoder", "vae")}
    return {"times": clock.times, "main_s": clock.times["build_s"], "params": params}


def measure(name: str, model_dir: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if name.startswith("uce-"):
        return measure_uce(model_dir, out, int(name.split("-")[1]))
    if name == "rece-1":
        return measure_rece(model_dir, out)
    base, gc = name.removesuffix("+gc"), name.endswith("+gc")
    return measure_step(model_dir, out, base, gc)


def _describe(name: str) -> str:
    if name.startswith("uce-"):
        return WHAT["uce"].format(n=name.split("-")[1])
    base = name.removesuffix("+gc").removesuffix("-1")
    return WHAT[base] + (", gradient checkpointing" if name.endswith("+gc") else "")


# -- running ---------------------------------------------------------------------------------------

def _child(args) -> int:
    """One measurement in this (fresh) process; its record goes to ``--result``."""
    if args.family != "sd14":
        return speed_fullsize.child(args)
    set_threads(args.threads)
    import accelerate  # noqa: F401 - imported before any clock starts: load_s is loading, not importing
    import diffusers  # noqa: F401
    import transformers  # noqa: F401


    os.environ["ERASE_CACHE"] = str(Path(args.model_dir).parent / "cache")
    out = Path(args.result).parent / args.child
    if args.child == "build":
        record = measure_build(Path(args.model_dir), TINY if args.tiny else SD14)
    else:
        record = measure(args.child, Path(args.model_dir), out)
    record["peak_rss_gb"] = peak_rss_gb()
    atomic_write_json(record, Path(args.result))
    return 0


def _run_child(name: str, args, model_dir: Path, work: Path) -> dict:
    result = work / f"{name}.json"
    return run_in_child(["--child", name, "--model-dir", str(model_dir), "--result", str(result), "--threads",
                         str(args.threads)] + (["--tiny"] if args.tiny else []), result)


def _run_here(name: str, args, model_dir: Path, work: Path) -> dict:
    old = os.environ.get("ERASE_CACHE")
    os.environ["ERASE_CACHE"] = str(work / "cache")  # generated data stays in the temporary folder
    try:
        if name == "build":
            record = measure_build(model_dir, TINY if args.tiny else SD14)
        else:
            record = measure(name, model_dir, work / name)
    except Exception as err:  # noqa: BLE001 - one failed measurement must not lose the others
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        if old is None:
            os.environ.pop("ERASE_CACHE", None)
        else:
            os.environ["ERASE_CACHE"] = old
    record["peak_rss_gb"] = peak_rss_gb()
    return record


def report(data: dict) -> str:
    ms = data["measurements"]
    ref = ms.get("uce-1", {}).get("main_s")
    lines = [
        f"# Speed at {data['scale']} scale", "",
        f"- machine: {data['machine_text']}", f"- date: {data['date']}; benchmark wall time {data['wall_s']:.0f} s",
        f"- model: {data['model']}",
        f"- {data['pixels']} px (latents {data['latents']}²), batch 1; times in seconds, comparable as ratios within this "
        "run; the module docstring (`erase/bench/speed.py`) says what each phase contains",
        f"- peak RSS: {data['rss_note']}", "",
        "| measurement | what | main (s) | × uce-1 edit | phases (s) | RSS loaded (GB) | peak RSS (GB) |",
        "|---|---|---:|---:|---|---:|---:|"]
    for name, r in ms.items():
        if "error" in r:
            lines.append(f"| {name} | {_describe(name)} | failed | | {r['error']} | | |")
            continue
        phases = ", ".join(f"{k.removesuffix('_s')} {v:.3g}" for k, v in r["times"].items())
        ratio = f"{r['main_s'] / ref:.3g}" if ref else ""
        rss = f"{r['rss_loaded_gb']:.2f} | {r['peak_rss_gb']:.2f}"
        lines.append(f"| {name} | {_describe(name)} | {r['main_s']:.3g} | {ratio} | {phases} | {rss} |")
    lines += ["", "main: uce = edit_s (encode + solve, no load or save); rece = the method's apply; esd/salun = step_s "
              "(one optimiser step; ESD's partial sampling stopped at x_T, esd_iter = a step at the mean stop).", ""]
    return "\n".join(lines)


def _main_fullsize(args) -> int:
    if args.reestimate:
        path = speed_fullsize.reestimate(Path(args.out_dir), args.tiny)
        print(path.with_suffix(".md").read_text())
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or speed_fullsize.default_measurements()
    for n in names:
        speed_fullsize.parse(n)
    if args.budget_gib <= 0 or args.limit_gib < 0 or args.timeout_s < 0:
        raise EraseError("--budget-gib must be > 0, --limit-gib and --timeout-s >= 0 (0: no cap)")
    if args.resolution <= 0 or args.resolution % 16:
        raise EraseError(f"--resolution must be a positive multiple of 16, got {args.resolution}")
    section = speed_fullsize.run(args, names)
    path = speed_fullsize.write(section, Path(args.out_dir), args.tiny)
    print(path.with_suffix(".md").read_text())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m erase.bench.speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sd14", choices=("sd14",) + speed_fullsize.FAMILIES,
                   help="sd14: the SD-1.4 table (speed.*); sdxl / sd3: SDXL base 1.0 / SD3-medium at full size "
                        "within a memory budget (speed_fullsize.*, erase/bench/speed_fullsize.py)")
    p.add_argument("--tiny", action="store_true", help="tiny configs (seconds; what the test suite runs)")
    p.add_argument("--only", default="", help=f"comma-separated measurements (default all: {', '.join(MEASUREMENTS)}; "
                   f"sdxl/sd3: {', '.join(speed_fullsize.default_measurements())}, flags combine: esd-x+lora+gc)")
    p.add_argument("--out-dir", default="results", help="where speed.json / speed.md (speed_tiny.* with --tiny) go")
    p.add_argument("--threads", type=int, default=1, help="torch threads per measurement (0: all cores when idle)")
    p.add_argument("--in-process", action="store_true", help="no subprocesses (peak RSS becomes cumulative)")
    p.add_argument("--resolution", type=int, default=speed_fullsize.PIXELS, help="sdxl/sd3: image side in pixels")
    p.add_argument("--budget-gib", type=float, default=BUDGET_GIB,
                   help="sdxl/sd3: measurements estimated above this are not run")
    p.add_argument("--limit-gib", type=float, default=LIMIT_GIB,
                   help="sdxl/sd3: resident-memory cap of each measurement's process (0: none)")
    p.add_argument("--timeout-s", type=float, default=0, help="sdxl/sd3: stop a measurement after this long (0: never)")
    p.add_argument("--reestimate", action="store_true",
                   help="sdxl/sd3: recompute the estimates of the existing speed_fullsize report (runs nothing)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    if args.family != "sd14":
        return _main_fullsize(args)

    names = [n.strip() for n in args.only.split(",") if n.strip()] or MEASUREMENTS
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown:
        raise EraseError(f"--only: unknown measurement {unknown[0]!r}; choose from {', '.join(MEASUREMENTS)}")
    threads = set_threads(args.threads)
    t0 = time.perf_counter()
    run = _run_here if args.in_process else _run_child
    with tempfile.TemporaryDirectory(prefix="erase-speed-") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        build = run("build", args, model_dir, work)
        if "error" in build:
            raise EraseError(f"could not build the {'tiny' if args.tiny else 'SD-1.4'} pipeline: {build['error']}")
        measurements = {}
        for name in names:
            print(f"[speed] {name} ...", file=sys.stderr, flush=True)
            measurements[name] = run(name, args, model_dir, work)
    info = machine_info()
    configs = TINY if args.tiny else SD14
    data = {
        "scale": "tiny" if args.tiny else "SD-1.4", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": info, "machine_text": describe_machine(info), "torch_threads": threads,
        "model": (f"random weights from the {'tiny' if args.tiny else 'v1.4'} configs: "
                  + ", ".join(f"{k} {v / 1e6:.1f} M params" for k, v in build["params"].items())
                  + f"; built in {build['times']['build_s']:.1f} s, saved in {build['times']['save_s']:.1f} s"),
        "configs": configs, "schedule": SCHEDULE, "latents": configs["unet"]["sample_size"],
        "pixels": 8 * configs["unet"]["sample_size"],
        "rss_note": ("cumulative over the whole benchmark process (--in-process)" if args.in_process else
                     "each measurement's own process, model loading included"),
        "build": build, "measurements": measurements, "wall_s": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "speed_tiny" if args.tiny else "speed"
    atomic_write_json(data, out / f"{stem}.json")
    atomic_write_text(report(data), out / f"{stem}.md")
    print(report(data))
    return 0


if __name__ == "__main__":
    from erase.cli import run_cli

    sys.exit(run_cli(main))
