"""Speed and memory of closed-form and gradient erasure at Stable Diffusion v1.4 scale, without downloads.

    python -m erase.bench.speed                    # SD-1.4 architecture with random weights
    python -m erase.bench.speed --only uce-1,rece-1
    python -m erase.bench.speed --tiny             # tiny configs: the whole benchmark in seconds

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
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import erase.diffusion.task  # noqa: F401
from erase.bench.common import describe_machine, machine_info, set_threads
from erase.diffusion.task import DiffusionConfig, DiffusionTask
from erase.engine import RunContext
from erase.engine.masking import ParameterMask
from erase.engine.optim import build_optimizer
from erase.engine.streams import Stream, move_to
from erase.errors import EraseError
from erase.methods import get_method
from erase.methods._closed_form import uce_edit, uce_map
from erase.methods.rece import RECE, RECEConfig
from erase.methods.uce import UCE, UCEConfig, kv_projections
from erase.storage import ZOO_DIR, atomic_write_json, atomic_write_text

# Stable Diffusion v1.4 (CompVis/stable-diffusion-v1-4, unet/text_encoder/vae config.json), except
# sample_size 32 so the pipeline's default resolution is the benchmark's 256 px.
SD14 = {
    "unet": dict(sample_size=32, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                 freq_shift=0, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
                 norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8),
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                         projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512),
}
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
ESD_DDIM_STEPS = 50
ESD_MEAN_STOP = 24  # ESD draws the partial-sampling stop uniformly from 0..49

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


def _rss_gb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return float("nan")


def _peak_rss_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def _task(model_dir: Path, concept: str = "garbage truck", gradient_checkpointing: bool = False,
          streams: tuple[str, ...] = ()):
    cfg = DiffusionConfig(model=str(model_dir), concept=concept, n_forget=1, n_retain=1, sample_steps=2,
                          eval_images=1, gradient_checkpointing=gradient_checkpointing)
    return DiffusionTask(cfg, streams=streams)


def _ctx(task, model, out: Path):
    # lazy: accelerate pulls in torch
    from accelerate import Accelerator


    return RunContext(accelerator=Accelerator(cpu=not torch.cuda.is_available()), model=model, task=task,
                      views=task.views, output_dir=out, seed=0, progress=False)


class _Clock:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        clock = self

        class _Span:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.times[name] = round(time.perf_counter() - self.t, 4)

        return _Span()


# -- measurements --------------------------------------------------------------------------------------

def measure_build(model_dir: Path, configs: dict) -> dict:
    clock = _Clock()
    with clock("build_s"):
        pipe = build_pipeline(configs)
    with clock("save_s"):
        pipe.save_pretrained(model_dir, safe_serialization=True)
    params = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "text_encoder", "vae")}
    return {"times": clock.times, "main_s": clock.times["build_s"], "params": params}


def measure_uce(model_dir: Path, out: Path, n: int) -> dict:
    clock = _Clock()
    names = [f"concept {i}" for i in range(n)]
    with clock("load_s"):
        task = _task(model_dir, ",".join(names))  # several concepts at once
        model = task.build_model(False)
    rss_loaded = _rss_gb()
    method = UCE(UCEConfig())
    method.check_task(task)
    layers = kv_projections(task.layer_map(model), model, method.config.edit)
    with clock("encode_s"):
        erase, guide, keep, n_preserve = method.uce_rows(task)
    cfg, ps = method.config, method.effective_preserve_scale(n_preserve)
    with clock("solve_s"):
        method.edit_layers(layers, uce_map(erase, guide, keep, cfg.lamb, cfg.erase_scale, ps))
    with clock("per_layer_solve_s"):
        for _, lin in layers:
            uce_edit(lin.weight, erase, guide, keep, cfg.lamb, cfg.erase_scale, ps)
    with clock("save_s"):
        task.save_model(model, out)
    t = clock.times
    t["edit_s"] = round(t["encode_s"] + t["solve_s"], 4)
    t["load_to_saved_s"] = round(t["load_s"] + t["edit_s"] + t["save_s"], 4)
    return {"times": t, "main_s": t["edit_s"], "rss_loaded_gb": rss_loaded, "matrices": len(layers),
            "erase_rows": len(erase), "preserve_rows": len(keep)}


def measure_rece(model_dir: Path, out: Path) -> dict:
    clock = _Clock()
    with clock("load_s"):
        task = _task(model_dir)
        model = task.build_model(False)
    rss_loaded = _rss_gb()
    method = RECE(RECEConfig(epochs=1))
    method.check_task(task)
    with clock("edit_s"):
        method.apply(_ctx(task, model, out))
    return {"times": clock.times, "main_s": clock.times["edit_s"], "rss_loaded_gb": rss_loaded}


def _seed_for_stop(stop: int) -> int:
    """A seed under which ESD's first draw, randint(0, ddim_steps), is ``stop``."""
    for seed in range(100_000):
        torch.manual_seed(seed)
        if int(torch.randint(0, ESD_DDIM_STEPS, (1,))) == stop:
            return seed
    raise RuntimeError(f"no seed draws stop {stop}")


def measure_step(model_dir: Path, out: Path, name: str, gradient_checkpointing: bool) -> dict:
    clock = _Clock()
    cls = get_method(name, "diffusion")
    with clock("load_s"):
        task = _task(model_dir, gradient_checkpointing=gradient_checkpointing, streams=cls.streams)
        model = task.build_model(False)
    rss_loaded = _rss_gb()
    cfg = cls.Config(**{**cls.task_defaults.get("diffusion", {}), "batch_size": 1})
    if hasattr(cfg, "ddim_steps"):
        cfg.ddim_steps = ESD_DDIM_STEPS
    method = cls(cfg)
    method.check_task(task)
    ctx = _ctx(task, model, out)
    with clock("setup_s"):
        method.setup(ctx)
        masks = method.parameter_masks(ctx)
        masker = ParameterMask(model, masks) if masks else None
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    weights = method.weights()
    streams = {s: Stream(task.views[s], cfg.batch_size, 0, s) for s in method.streams}
    model.train()

    def step(seed: int) -> None:  # the engine's inner loop (erase.engine.loop.run_method) for one step
        torch.manual_seed(seed)
        batch = {s: move_to(streams[s].next(), ctx.device) for s in method.streams}
        terms = method.losses(batch, ctx)
        sum(weights[k] * v for k, v in terms.items()).backward()
        if masker is not None:
            masker.mask_grads()
        optimizer.step()
        if masker is not None:
            masker.restore()
        optimizer.zero_grad(set_to_none=True)

    at_once = _seed_for_stop(0)
    with clock("warmup_s"):
        step(at_once)
    with clock("step_s"):
        step(at_once)
    if name.startswith("esd"):
        with clock("esd_iter_s"):
            step(_seed_for_stop(ESD_MEAN_STOP))
    trainable = sum(int(m.sum()) for m in masks.values()) if masks else sum(p.numel() for p in model.parameters())
    return {"times": clock.times, "main_s": clock.times["step_s"], "rss_loaded_gb": rss_loaded,
            "trainable_params": trainable, "gradient_checkpointing": gradient_checkpointing}


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
    record["peak_rss_gb"] = _peak_rss_gb()
    atomic_write_json(record, Path(args.result))
    return 0


def _run_child(name: str, args, model_dir: Path, work: Path) -> dict:
    result = work / f"{name}.json"
    cmd = [sys.executable, "-m", "erase.bench.speed", "--child", name, "--model-dir", str(model_dir), "--result",
           str(result), "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"error": f"exit {proc.returncode}{killed}: {tail[0]}", "process_s": round(time.perf_counter() - t0, 1)}
    record = json.loads(result.read_text())
    record["process_s"] = round(time.perf_counter() - t0, 1)
    return record


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
    record["peak_rss_gb"] = _peak_rss_gb()
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m erase.bench.speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny configs (seconds; what the test suite runs)")
    p.add_argument("--only", default="", help=f"comma-separated measurements (default all: {', '.join(MEASUREMENTS)})")
    p.add_argument("--out-dir", default="results", help="where speed.json / speed.md (speed_tiny.* with --tiny) go")
    p.add_argument("--threads", type=int, default=1, help="torch threads per measurement (0: all cores when idle)")
    p.add_argument("--in-process", action="store_true", help="no subprocesses (peak RSS becomes cumulative)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)

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
