"""Speed and memory of erasure training at SDXL and SD3-medium size on this CPU machine, inside a memory budget.

    python -m erase.bench.speed --family sdxl                  # SDXL base 1.0 architecture, random weights
    python -m erase.bench.speed --family sd3 --only esd-x+lora+gc,uce-1
    python -m erase.bench.speed --family sdxl --tiny           # the same plan on toy configs (tests)

The pipeline is built from the published configs (``speed_configs``; SD3 without its T5) with random
weights, component by component (``speed_build``), and each measurement loads it through the task
adapter in its own process, as the SD-1.4 benchmark does (``erase/bench/speed.py`` says what each
phase holds). Measurements, all at 256 px (``--resolution``), batch 1:

* ``esd-x``, ``esd-u``, ``salun`` — one Adam step (``speed_measure.measure_step``: a warm-up step that
  allocates the optimiser state, then ``step_s``; ESD's partial sampling stops at x_T, so the step is
  the training part: two teacher predictions and the student's forward and backward; the 24-step
  ``esd_iter`` of the SD-1.4 table is left out: 24 more full-size forwards per measurement), each
  plain and with ``+gc`` (``--gradient-checkpointing``), ``+bf16`` (the runner's ``--mixed-precision
  bf16``: accelerate's autocast, see ``speed_measure``) and ``+lora`` (``DiffusionConfig(lora_rank=4)``
  on the family's default LoRA targets); flags combine (``esd-x+lora+gc``);
* ``uce-1`` — UCE's closed-form edit of one concept (load, encode, solve, save).

Refusals are the methods' own (asked of the method's config check or its layer selection before
anything is built): SalUn refuses LoRA (its mask is defined on the weights); such rows say so and are
not run. UCE on SD3 edits the layers that read the encoders' output (the context embedder and the
pooled text's embedder, ``erase.methods.uce``; the SD3 keys/values read a text stream every block
updates), and its row times that edit, the pooled part as ``pooled_s``.

Memory safety: before a measurement starts, its peak is estimated from parameter counts
(``speed_memory``: weights, ESD's teacher copy, masks, gradients and Adam state of the trained
parameters, autocast's weight cache, activations counted on the meta device, 1 GiB base). A measurement
whose estimate is over ``--budget-gib`` (14) is not run and its row gives the estimate's arithmetic; one
whose estimate plus 2 GiB is over the machine's MemAvailable at that moment is not run either. A started
one runs under ``speed_memory.limit_memory(--limit-gib)`` (16): an allocation past it fails that
measurement (its row shows the error), not the machine.

Results go to ``results/speed_fullsize.{json,md}`` (``speed_fullsize_tiny.*`` with ``--tiny``): each run
replaces the rows it measures and keeps its family's other rows (marked with their own run) and the other
family; the markdown also carries the FLUX.1-dev estimate
(``speed_flux``), which is computed, never measured.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from erase.bench.common import describe_machine, loadavg, machine_info, set_threads
from erase.bench.speed_build import SHARD, build_and_save, count_params, denoiser_name, meta_denoiser
from erase.bench.speed_configs import FULL, NAMES, PARAM_TOLERANCE, PUBLISHED_PARAMS, SD14, T5_XXL_PARAMS, TINY
from erase.bench.speed_denoiser import SELECTIONS, forward_call, measure_denoiser, text_shape, vae_factor
from erase.bench.speed_flux import flux_estimate
from erase.bench.speed_measure import LORA_RANK, Clock, measure_step, measure_uce, peak_rss_gb, run_in_child
from erase.bench.speed_memory import (
    GIB,
    Estimate,
    available_gib,
    estimate_denoiser,
    estimate_step,
    estimate_uce,
    fmt_count,
    limit_memory,
    lora_params,
    saved_activations,
)
from erase.diffusion.layers import layer_map
from erase.diffusion.task import DiffusionConfig
from erase.errors import EraseError
from erase.methods import get_method
from erase.methods.uce import kv_projections
from erase.storage import atomic_write_json, atomic_write_text

FAMILIES = ("sdxl", "sd3")
METHODS = ("esd-x", "esd-u", "salun")
FLAGS = ("gc", "bf16", "lora")
VARIANTS = ("", "+gc", "+bf16", "+lora")
PIXELS = 256
SAFETY_MARGIN_GIB = 2.0  # MemAvailable must exceed the estimate by this much
# Rows of the task's prompt table for one concept ("garbage truck") with the default retain set (the Imagenette
# classes); tests/test_speed_bench.py checks it against a tiny task.
PROMPT_ROWS = 41
WHAT = {"esd-x": "ESD-x: one Adam step, text attention trained", "esd-u": "ESD-u: one Adam step, all but text "
        "attention trained", "salun": "SalUn: one Adam step on the salient half, forget + retain batch",
        "uce-1": "UCE, 1 concept: load, edit (encode + solve), save the pipeline"}
FLAG_WHAT = {"gc": "gradient checkpointing", "bf16": "bf16 autocast", "lora": f"LoRA rank {LORA_RANK}"}


DENOISER = "den:"  # rows of the denoiser alone (speed_denoiser)


def default_measurements() -> list[str]:
    return ([m + v for m in METHODS for v in VARIANTS] + ["uce-1"]
            + [DENOISER + sel + v for sel in SELECTIONS for v in ("", "+gc", "+bf16")])


def parse(name: str) -> tuple[str, frozenset[str]]:
    """"esd-x+lora+gc" -> ("esd-x", {"lora", "gc"}), "den:lora+gc" -> ("den:lora", {"gc"}); an EraseError for
    anything else."""
    base, *flags = name.split("+")
    if base.startswith(DENOISER):
        ok = base.removeprefix(DENOISER) in SELECTIONS and set(flags) <= {"gc", "bf16"}
    else:
        ok = base in METHODS and set(flags) <= set(FLAGS) or name == "uce-1"
    if not ok or len(set(flags)) != len(flags):
        raise EraseError(f"--only: unknown measurement {name!r}; choose a method ({', '.join(METHODS)}) with any of "
                         f"+gc, +bf16, +lora, or uce-1, or the denoiser alone ({', '.join(DENOISER + s for s in SELECTIONS)}) "
                         f"with +gc, +bf16 (default: {', '.join(default_measurements())})")
    return base, frozenset(flags)


def describe(name: str) -> str:
    base, flags = parse(name)
    if base.startswith(DENOISER):
        sel = base.removeprefix(DENOISER)
        what = {"esd-x": "text attention (as esd-x)", "esd-u": "all but text attention (as esd-u)",
                "lora": f"LoRA rank {LORA_RANK} adapters"}[sel]
        return f"the denoiser alone: one Adam step, {what} trained" + "".join(
            f", {FLAG_WHAT[f]}" for f in FLAGS if f in flags)
    return WHAT[base] + "".join(f", {FLAG_WHAT[f]}" for f in FLAGS if f in flags)


# -- the plan: counts, estimates, refusals -----------------------------------------------------------------

def pixels_of(family: str, configs: dict, tiny: bool, resolution: int) -> int:
    """The benchmark's image side: the tiny model's own, else ``resolution``."""
    return configs[denoiser_name(family)]["sample_size"] * vae_factor(configs) if tiny else resolution


def _refusal(family: str, name: str, den) -> str | None:
    """The method's own EraseError for this combination, from the config and the meta-device denoiser, or None."""
    base, flags = parse(name)
    if base.startswith(DENOISER):
        return None
    try:
        if base == "uce-1":
            kv_projections(layer_map(den), den, "kv")
        else:
            cls = get_method(base, "diffusion")
            cls(cls.Config()).check_task_config(DiffusionConfig(model="", lora_rank=LORA_RANK if "lora" in flags else 0))
    except EraseError as err:
        return str(err)
    return None


def plan(family: str, configs: dict, pixels: int, names: list[str], budget: float) -> tuple[dict, dict]:
    """(model facts, one entry per measurement: what, estimate, and "refused" / "skipped" where it will not run)."""
    params = count_params(family, configs)
    dname = denoiser_name(family)
    den = meta_denoiser(family, configs)
    lmap = layer_map(den)
    d = params[dname]
    text = sum(p.numel() for n, p in den.named_parameters() if lmap.is_text_attention(n))
    lora = lora_params(den, lmap.lora_targets, LORA_RANK)
    acts = saved_activations(den, forward_call(family, den, configs, pixels), checkpointing=True)
    trained = {"esd-x": text, "esd-u": d - text, "salun": d}
    entries = {}
    for name in names:
        base, flags = parse(name)
        entry = {"what": describe(name)}
        refusal = _refusal(family, name, den)
        prompts = PROMPT_ROWS * math.prod(text_shape(family, configs)) * 4
        if base == "uce-1":
            est = estimate_uce(params, _shard_bytes(), prompts)
        elif base.startswith(DENOISER):
            sel = base.removeprefix(DENOISER)
            est = estimate_denoiser(d, lora if sel == "lora" else trained[sel],
                                    acts["gib"] if "gc" in flags else acts["plain_gib"], "bf16" in flags)
        else:
            est = estimate_step(params, dname, base, lora if "lora" in flags else trained[base],
                                acts["gib"] if "gc" in flags else acts["plain_gib"], "lora" in flags, "bf16" in flags,
                                prompts)
        entry["estimate"] = est.to_dict()
        if refusal:
            entry["refused"] = refusal
        elif est.total > budget:
            entry["skipped"] = f"not run: estimated {est.total:.1f} GiB > {budget:g} GiB budget on this 24 GB machine"
        entries[name] = entry
    facts = {"params": params, "denoiser": dname, "text_attention_params": text, "lora_params": lora,
             "lora_targets": list(lmap.lora_targets), "activations_gib": acts, "pixels": pixels}
    return facts, entries


def _shard_bytes() -> int:
    return int(SHARD.removesuffix("GB")) * 10**9


def build_estimate(params: dict) -> Estimate:
    """Building and saving keeps one component and one shard copy at a time."""
    e = Estimate()
    big = max(params.values())
    e.add("largest component", 4 * big / GIB, f"4 B x {big / 1e9:.3f} B")
    e.add("save", _shard_bytes() / GIB, "one shard copied while saving")
    e.add("base", 1.0, "interpreter and libraries")
    return e


def published_check(family: str, params: dict) -> dict:
    """Built counts against the published totals (``speed_configs.PUBLISHED_PARAMS``), per component."""
    out = {}
    for name, published in PUBLISHED_PARAMS[family].items():
        built = params.get(name)
        out[name] = {"built": built, "published": published,
                     "match": built is not None and abs(built - published) <= PARAM_TOLERANCE * published}
    return out


def calibration(speed_json: Path) -> list[dict] | None:
    """The estimate of each SD-1.4 measurement in ``results/speed.json`` beside its measured peak RSS (those
    measurements kept ESD's masks through the step, and so does the estimate here); None without the file."""
    if not speed_json.is_file():
        return None
    data = json.loads(speed_json.read_text())
    if data.get("scale") != "SD-1.4":
        return None
    params, den = data["build"]["params"], meta_denoiser("sd14", {"unet": SD14["unet"]})
    acts = saved_activations(den, forward_call("sd14", den, SD14, data["pixels"]), checkpointing=True)
    prompts = PROMPT_ROWS * 77 * SD14["unet"]["cross_attention_dim"] * 4
    rows = []
    for name, r in data["measurements"].items():
        if "error" in r or name.startswith("rece"):
            continue
        if name.startswith("uce"):
            est = estimate_uce(params, _shard_bytes(), prompts)
        else:
            base, gc = name.removesuffix("+gc"), name.endswith("+gc")
            est = estimate_step(params, "unet", base, params["unet"] if base == "salun" else r["trainable_params"],
                                acts["gib"] if gc else acts["plain_gib"], False, False, prompts, masks_held=True)
        rows.append({"measurement": name, "estimate_gib": est.total, "measured_gib": round(r["peak_rss_gb"], 2),
                     "covers": est.total >= r["peak_rss_gb"]})
    return rows


# -- running -----------------------------------------------------------------------------------------------

def measure_one(family: str, name: str, model_dir: Path, out: Path, pixels: int, tiny: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    base, flags = parse(name)
    resolution = 0 if tiny else pixels
    if base == "uce-1":
        return measure_uce(model_dir, out, 1, resolution=resolution)
    if base.startswith(DENOISER):
        configs = (TINY if tiny else FULL)[family]
        return measure_denoiser(family, configs, model_dir, base.removeprefix(DENOISER), "gc" in flags, "bf16" in flags,
                                pixels, LORA_RANK)
    return measure_step(model_dir, out, base, "gc" in flags, bf16="bf16" in flags, lora="lora" in flags,
                        resolution=resolution, esd_iter=False)


def child(args) -> int:
    """One full-size measurement (or the build) in this fresh process, under the memory limit."""
    set_threads(args.threads)
    import accelerate  # noqa: F401 - imported before any clock starts and before the limit: load_s is loading
    import diffusers  # noqa: F401
    import transformers  # noqa: F401


    limit = limit_memory(args.limit_gib) if args.limit_gib > 0 else None
    os.environ["ERASE_CACHE"] = str(Path(args.model_dir).parent / "cache")
    configs = (TINY if args.tiny else FULL)[args.family]
    pixels = pixels_of(args.family, configs, args.tiny, args.resolution)
    try:
        if args.child == "build":
            clock = Clock()
            with clock("build_s"):
                params = build_and_save(args.family, configs, Path(args.model_dir))
            record = {"times": clock.times, "main_s": clock.times["build_s"], "params": params}
        else:
            record = measure_one(args.family, args.child, Path(args.model_dir), Path(args.result).parent / args.child,
                                 pixels, args.tiny)
    except (MemoryError, RuntimeError, EraseError) as err:  # an allocation past the limit lands here
        record = {"error": f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"}
    record["peak_rss_gb"] = peak_rss_gb()
    record["memory_limit"] = limit
    atomic_write_json(record, Path(args.result))
    return 0


def _run(name: str, args, model_dir: Path, work: Path, pixels: int) -> dict:
    if args.in_process:
        try:
            if name == "build":
                configs = (TINY if args.tiny else FULL)[args.family]
                record = {"params": build_and_save(args.family, configs, model_dir)}
            else:
                record = measure_one(args.family, name, model_dir, work / name, pixels, args.tiny)
        except (MemoryError, RuntimeError, EraseError) as err:
            record = {"error": f"{type(err).__name__}: {err}"}
        record["peak_rss_gb"] = peak_rss_gb()
        return record
    result = work / f"{name}.json"
    return run_in_child(["--family", args.family, "--child", name, "--model-dir", str(model_dir), "--result",
                         str(result), "--threads", str(args.threads), "--limit-gib", str(args.limit_gib),
                         "--resolution", str(args.resolution)] + (["--tiny"] if args.tiny else []), result,
                        args.timeout_s if name != "build" else None)


def _memory_gate(estimate: float, tiny: bool) -> str | None:
    avail = available_gib()
    if tiny or avail is None or avail >= estimate + SAFETY_MARGIN_GIB:
        return None
    return (f"not run: MemAvailable {avail:.1f} GiB at its start < estimated {estimate:.1f} GiB + "
            f"{SAFETY_MARGIN_GIB:g} GiB margin")


def run(args, names: list[str]) -> dict:
    """Plan, build, measure; the family's section of the report."""
    family, tiny = args.family, args.tiny
    configs = (TINY if tiny else FULL)[family]
    pixels = pixels_of(family, configs, tiny, args.resolution)
    threads = set_threads(args.threads)
    t0 = time.perf_counter()
    facts, entries = plan(family, configs, pixels, names, args.budget_gib)
    published = published_check(family, facts["params"]) if not tiny else {}
    wrong = [f"{k}: built {v['built']:,}, published {v['published']:,}" for k, v in published.items() if not v["match"]]
    if wrong:  # a mistyped config would measure another model: stop before building it
        raise EraseError(f"the {family} configs do not build the published model ({'; '.join(wrong)}); "
                         "check erase/bench/speed_configs.py")
    build_est = build_estimate(facts["params"])
    to_run = [n for n, e in entries.items() if "refused" not in e and "skipped" not in e]
    build: dict = {"skipped": "nothing to measure"}
    if to_run and build_est.total > args.budget_gib:
        raise EraseError(f"building the {family} pipeline needs about {build_est.arithmetic()}, over the "
                         f"{args.budget_gib:g} GiB budget")
    with tempfile.TemporaryDirectory(prefix="erase-speed-") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        if to_run:
            print(f"[speed] {family}: build ...", file=sys.stderr, flush=True)
            build = _run("build", args, model_dir, work, pixels)
            if "error" in build:
                raise EraseError(f"could not build the {family} pipeline: {build['error']}")
        for name in to_run:
            entry = entries[name]
            gate = _memory_gate(entry["estimate"]["total_gib"], tiny)
            if gate:
                entry["skipped"] = gate
                continue
            print(f"[speed] {family}: {name} (estimate {entry['estimate']['total_gib']:.1f} GiB) ...",
                  file=sys.stderr, flush=True)
            load = loadavg()
            entry["result"] = _run(name, args, model_dir, work, pixels)
            entry["result"]["loadavg"] = [load, loadavg()]  # 1-minute load before / after: other work on the cores
    info = machine_info()
    return {
        "family": family, "name": NAMES[family], "scale": "tiny" if tiny else "full", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": info, "machine_text": describe_machine(info), "torch_threads": threads, "pixels": pixels,
        "budget_gib": args.budget_gib, "limit_gib": args.limit_gib, "timeout_s": args.timeout_s,
        "rss_note": ("cumulative over the whole benchmark process (--in-process)" if args.in_process else
                     "each measurement's own process, model loading included"),
        "configs": configs, **facts, "published": published,
        "t5": {"params": T5_XXL_PARAMS, "fp16_gib": round(2 * T5_XXL_PARAMS / GIB, 2),
               "fp32_gib": round(4 * T5_XXL_PARAMS / GIB, 2)} if family == "sd3" else None,
        "build": build, "build_estimate": build_est.to_dict(), "measurements": entries,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _stem(tiny: bool) -> str:
    return "speed_fullsize_tiny" if tiny else "speed_fullsize"


def _save(data: dict, out_dir: Path, tiny: bool) -> Path:
    data["flux"] = flux_estimate()
    data["calibration"] = calibration(out_dir / "speed.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{_stem(tiny)}.json"
    atomic_write_json(data, path)
    atomic_write_text(report(data), out_dir / f"{_stem(tiny)}.md")
    return path


def _run_info(section: dict) -> dict:
    return {k: section[k] for k in ("date", "wall_s", "budget_gib", "limit_gib")}


def _merge_rows(old: dict, section: dict) -> None:
    """Keep ``old``'s rows that ``section`` did not measure (a ``--only`` run adds rows), each marked with the run
    it came from; a different scale or image size replaces the whole section."""
    if old.get("scale") != section["scale"] or old.get("pixels") != section["pixels"]:
        return
    new = section["measurements"]
    merged = {}
    for name, entry in old["measurements"].items():
        if name in new:
            merged[name] = new[name]
        else:
            entry.setdefault("run", _run_info(old))
            merged[name] = entry
    merged.update((n, e) for n, e in new.items() if n not in merged)
    section["measurements"] = merged
    if old["build"].get("times") and not section["build"].get("times"):
        section["build"] = old["build"]


def write(section: dict, out_dir: Path, tiny: bool) -> Path:
    """Merge ``section`` into speed_fullsize(_tiny).json (other families kept, and the family's rows this run did
    not measure) and rewrite the markdown."""
    path = out_dir / f"{_stem(tiny)}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    families = data.setdefault("families", {})
    if section["family"] in families:
        _merge_rows(families[section["family"]], section)
    families[section["family"]] = section
    return _save(data, out_dir, tiny)


def reestimate(out_dir: Path, tiny: bool) -> Path:
    """Recompute every row's estimate of an existing report with the current ``speed_memory`` (nothing is run).

    A changed estimate replaces the old one, which stays as ``estimate_at_run``; a measured row whose new
    estimate is over the run's budget says that a rerun would not run it."""
    path = out_dir / f"{_stem(tiny)}.json"
    if not path.is_file():
        raise EraseError(f"--reestimate: {path} does not exist; run the benchmark first")
    data = json.loads(path.read_text())
    for family, section in data.get("families", {}).items():
        configs = (TINY if section["scale"] == "tiny" else FULL)[family]
        _, fresh = plan(family, configs, section["pixels"], list(section["measurements"]), section["budget_gib"])
        for name, entry in section["measurements"].items():
            new = fresh[name]["estimate"]
            if abs(new["total_gib"] - entry["estimate"]["total_gib"]) > 0.005:
                entry.setdefault("estimate_at_run", entry["estimate"])
            entry["estimate"] = new
            if "result" in entry and new["total_gib"] > section["budget_gib"]:
                entry["note"] = (f"measured under the run-time estimate {entry['estimate_at_run']['total_gib']:.1f} GiB; "
                                 f"the current estimate, {new['total_gib']:.1f} GiB, is over the "
                                 f"{section['budget_gib']:g} GiB budget: a rerun would not run it")
    return _save(data, out_dir, tiny)


# -- the report --------------------------------------------------------------------------------------------

def _status(entry: dict) -> tuple[str, str, str, str, str]:
    """(status, step s, phases, peak RSS, trained) cells of one row."""
    if "refused" in entry:
        return "refused by the method", "", entry["refused"], "", ""
    if "skipped" in entry:
        return entry["skipped"].split(":")[0], "", entry["skipped"], "", ""
    r = entry.get("result", {})
    if "error" in r:
        peak = f"{r['peak_rss_gb']:.2f}" if "peak_rss_gb" in r else ""
        return "failed", "", r["error"], peak, ""
    phases = ", ".join(f"{k.removesuffix('_s')} {v:.3g}" for k, v in r["times"].items())
    if r.get("loadavg") and None not in r["loadavg"]:
        phases += f"; load {r['loadavg'][0]:.1f}/{r['loadavg'][1]:.1f}"
    if r.get("autocast_dtypes") and r.get("mixed_precision") == "bf16":
        phases += f"; autocast dtypes seen: {', '.join(r['autocast_dtypes'])}"
    trained = fmt_count(r["trainable_params"]) if "trainable_params" in r else ""
    return "measured", f"{r['main_s']:.3g}", phases, f"{r['peak_rss_gb']:.2f}", trained


def _family_report(s: dict) -> list[str]:
    p = s["params"]
    lines = [f"## {s['name']} ({s['scale']} size)", "",
             f"- machine: {s['machine_text']}", f"- date: {s['date']}; wall time {s['wall_s']:.0f} s"
             + (" (this run's rows; a row from an earlier `--only` run names its run)"
                if any(e.get("run") for e in s["measurements"].values()) else ""),
             f"- {s['pixels']} px, batch 1; times in seconds (with the machine's 1-minute load average before/after "
             "each measurement: other work shared the cores); GiB = 2^30 bytes",
             "- model: random weights from the published configs (`erase/bench/speed_configs.py`): "
             + ", ".join(f"{k} {fmt_count(v)}" for k, v in p.items()) + " params",
             f"- trained by esd-x (text attention): {fmt_count(s['text_attention_params'])}; LoRA rank {LORA_RANK} "
             f"adapters: {fmt_count(s['lora_params'])} on {', '.join(s['lora_targets'])}",
             f"- activations saved for backward (meta-device count, fp32): {s['activations_gib']['plain_gib']:.2f} GiB; "
             f"with gradient checkpointing {s['activations_gib']['gib']:.2f} GiB (saved "
             f"{s['activations_gib'].get('checkpointed_gib', 0):.2f} + largest segment "
             f"{s['activations_gib']['largest_segment_gib']:.2f})",
             f"- memory rule: not run when the estimate exceeds {s['budget_gib']:g} GiB; runs capped at "
             f"{s['limit_gib']:g} GiB resident (`speed_memory.limit_memory`)"
             + (f", stopped after {s['timeout_s']:g} s" if s.get("timeout_s") else "") + f"; peak RSS: {s['rss_note']}"]
    if s.get("published"):
        lines.append("- built vs published parameter counts: " + "; ".join(
            f"{k} {v['built']:,} vs {v['published']:,} {'(match)' if v['match'] else '(MISMATCH)'}"
            for k, v in s["published"].items()))
    if s.get("t5"):
        t5 = s["t5"]
        lines.append(f"- T5-XXL (`text_encoder_3`, {t5['params'] / 1e9:.3f} B params) is not built: frozen, it adds "
                     f"its weights only, {t5['fp16_gib']:.2f} GiB ({2 * t5['params'] / 1e9:.1f} GB) in fp16 or "
                     f"{t5['fp32_gib']:.2f} GiB ({4 * t5['params'] / 1e9:.1f} GB) in fp32, to every method row below "
                     "(erase loads it in fp32 when the folder has it)")
    b = s["build"]
    if "times" in b and "peak_rss_gb" in b:
        lines.append(f"- build: {b['times']['build_s']:.0f} s, peak RSS {b['peak_rss_gb']:.2f} GiB")
    lines += ["", "| measurement | what | status | step (s) | phases (s) / reason | trained params | "
              "estimate (GiB) | peak RSS (GiB) |", "|---|---|---|---:|---|---:|---:|---:|"]
    for name, e in s["measurements"].items():
        status, step, phases, peak, trained = _status(e)
        if e.get("note"):
            phases += f"; NOTE: {e['note']}"
        if e.get("run"):
            r = e["run"]
            phases += f" (earlier run: {r['date']}, budget {r['budget_gib']:g} GiB, cap {r['limit_gib']:g} GiB)"
        est = f"{e['estimate']['total_gib']:.1f}"
        if "estimate_at_run" in e:
            est += f" (at run: {e['estimate_at_run']['total_gib']:.1f})"
        lines.append(f"| {name} | {e['what']} | {status} | {step} | {phases} | {trained} | {est} | {peak} |")
    d = p[s["denoiser"]]
    lines += ["", f"`den:` rows hold the denoiser alone (`erase/bench/speed_denoiser.py`); erase's own run adds the "
              f"text encoders and VAE ({4 * (sum(p.values()) - d) / GIB:.2f} GiB in fp32), with full-weight ESD the "
              f"teacher copy ({4 * d / GIB:.2f} GiB); an ESD iteration stopped "
              "at x_T costs about `esd_step_estimate` = step + 2 forwards (the teacher's two predictions).", ""]
    lines += ["Estimates (bytes per parameter; `erase/bench/speed_memory.py`):", ""]
    lines += [f"- {name}: {e['estimate']['arithmetic']}" for name, e in s["measurements"].items()]
    return lines + [""]


def _flux_report(f: dict) -> list[str]:
    a = f["activations_gib"]
    lines = ["## FLUX.1-dev: an estimate of GPU memory, not a measurement", "",
             "Computed by `erase/bench/speed_flux.py` from parameter counts (the transformer built on the meta "
             "device from the published config; the other components' published counts); too large to build on this "
             "machine (48 GB in fp32).",
             "",
             "- parameters: " + ", ".join(f"{k} {v / 1e9:.3f} B" for k, v in f["params"].items())
             + f" (transformer built on the meta device: {f['params']['transformer']:,}, published "
             f"{f['published_transformer']:,}: "
             + ("match)" if f["params"]["transformer"] == f["published_transformer"] else "MISMATCH)"),
             f"- esd-x's text attention (double-stream blocks' text stream): {f['text_attention_arithmetic']}; "
             f"counted on the built model: {f['text_attention']:,}",
             f"- LoRA on {', '.join(f['lora_targets'])}: " + ", ".join(
                 f"rank {r} {n / 1e6:.2f} M" for r, n in f["lora_params"].items()),
             f"- activations at {f['pixels']} px ({f['image_tokens']} image + {f['text_tokens']} text tokens, batch 1), "
             f"counted on the meta device in fp32: {a['plain_gib']:.1f} GiB without, {a['gib']:.1f} GiB with gradient "
             f"checkpointing; about half in bf16: range {f['activation_range_gib'][0]:.1f}-"
             f"{f['activation_range_gib'][1]:.1f} GiB (fp32 ceiling {a['plain_gib']:.1f})", "",
             "| scenario | without activations (GiB) | with activations (GiB) | arithmetic |", "|---|---:|---:|---|"]
    for r in f["scenarios"]:
        lines.append(f"| {r['scenario']} | {r['without_activations_gib']:.1f} | {r['total_gib'][0]:.0f}-"
                     f"{r['total_gib'][1]:.0f} | {r['arithmetic']} |")
    return lines + ["", "Not included: the CUDA context (~0.5-1 GiB), allocator fragmentation, the prompt cache; "
                    "dropping T5 after encoding the prompts saves its share of 'frozen'.", ""]


def report(data: dict) -> str:
    lines = ["# Speed and memory at full size (SDXL, SD3-medium; FLUX.1-dev estimated)", "",
             "Measured on this CPU machine with random weights built from the published configs "
             "(`python -m erase.bench.speed --family sdxl|sd3`); the SD-1.4 table is `speed.md`.", ""]
    for fam in FAMILIES:
        if fam in data.get("families", {}):
            lines += _family_report(data["families"][fam])
    if data.get("calibration"):
        lines += ["## The estimate against the SD-1.4 measurements", "",
                  "The same estimate for each measurement of `speed.json` (SD-1.4, which held ESD's masks through the "
                  "step), beside its measured peak RSS:", "",
                  "| measurement | estimate (GiB) | measured peak (GiB) | estimate covers it |", "|---|---:|---:|---|"]
        lines += [f"| {r['measurement']} | {r['estimate_gib']:.2f} | {r['measured_gib']:.2f} | "
                  f"{'yes' if r['covers'] else 'no'} |" for r in data["calibration"]]
        lines.append("")
    if data.get("flux"):
        lines += _flux_report(data["flux"])
    return "\n".join(lines)
