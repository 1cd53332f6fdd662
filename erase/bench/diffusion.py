"""Diffusion erasure benchmark on the bundled Fashion-MNIST models.

    python -m erase.bench.diffusion            # every method, both concepts, the DDPM, 3 seeds
    python -m erase.bench.diffusion --quick    # 1 seed, fewer evaluation images
    python -m erase.bench.diffusion --sd-methods uce,rece,ca --ddpm-methods '' --keep-results   # add rows
    python -m erase.bench.diffusion --eval-images 8 --sd-methods '' --multi '' --ddpm-methods '' --keep-results
                                               # add only the fmnist-tiny-flow rows to the committed report

Protocol (written into the report): the bundled text-to-image model ``fmnist-tiny-sd`` erases
"trouser" and "sneaker" with salun, esd-x, esd-u, fmn, ga, rl, uce, rece and ca, and the three
concepts {trouser, sneaker, bag} at once with uce, rece, salun, esd-u and ca (the multi-concept
scenario); the bundled class-conditional ``fmnist-ddpm`` forgets class "trouser" with salun,
esd-u, rl and ga; the bundled SD3-shaped rectified-flow ``fmnist-tiny-flow`` (same captions, classes
and evaluator as fmnist-tiny-sd) erases "trouser" and "sneaker" with salun, esd-u, esd-x and uce
(``--flow-methods``, ``--flow-concepts``, ``--flow-model``; its rows get their own table). Every method runs with the
recipe the model ships in ``erase.yaml`` (the same recipe for every concept and seed); a seed
changes the generated forget/retain data, the random timesteps and the noise. Per run: concept
accuracy before/after (the bundled evaluator on images from the concept's prompt), accuracy on
the other classes, accuracy on held-out paraphrases (SD), FID-fmnist before/after when available,
and wall time. Runs are folders under ``--out-dir``; finished ones are read back, failed ones are
recorded with their error.

The flow block when its model is absent (``fmnist-tiny-flow`` is trained by ``python -m erase.zoo.train_tiny_flow``
and may not be bundled yet): if none of ``--flow-methods``/``--flow-concepts``/``--flow-model`` was given and
another block has runs, it is skipped with a printed note, so the default command still reproduces the other
rows; otherwise (a --flow-* flag given, or the flow rows are all the invocation would add) the command stops with
a one-line error before any run (a run started without its model would leave a failed record that later
invocations read back).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from erase.bench.common import (
    describe_machine,
    fmt_duration,
    fmt_pm,
    machine_info,
    mean_std,
    parse_method_overrides,
    run_once,
    set_threads,
    short_hash,
)
from erase.diffusion.loading import model_kind
from erase.errors import EraseError
from erase.storage import atomic_write_json, atomic_write_text, model_settings, slug

SD_METHODS = ("salun", "esd-x", "esd-u", "fmn", "ga", "rl", "uce", "rece", "ca")
DDPM_METHODS = ("salun", "esd-u", "rl", "ga")
MULTI_CONCEPTS = "trouser,sneaker,bag"
MULTI_METHODS = ("uce", "rece", "salun", "esd-u", "ca")
FLOW_MODEL = "fmnist-tiny-flow"
FLOW_METHODS = ("salun", "esd-u", "esd-x", "uce")  # issue 14
FLOW_CONCEPTS = "trouser,sneaker"
FLOW_TITLES = {FLOW_MODEL: "fmnist-tiny-flow (SD3-shaped rectified flow)"}  # other --flow-model values: their name
RESULTS = "results/diffusion_fmnist"
KEYS = ("concept_acc", "paraphrase_acc", "other_acc", "fid")


def _erased_and_kept(m: dict) -> bool:
    return m["after"]["concept_acc"] <= 5 and m["before"]["other_acc"] - m["after"]["other_acc"] <= 5


def _clean_erasure(m: dict) -> bool:
    return m["after"]["concept_acc"] <= 1 and m["before"]["other_acc"] - m["after"]["other_acc"] <= 1


def _erased_and_kept_3(m: dict) -> bool:
    return m["after"]["concept_acc"] <= 5 and m["before"]["other_acc"] - m["after"]["other_acc"] <= 3


def _multi_erased(m: dict) -> bool:
    per = m["after"].get("concept_acc_per_concept") or {"": m["after"]["concept_acc"]}
    return max(per.values()) <= 5 and m["before"]["other_acc"] - m["after"]["other_acc"] <= 3


ERASED_AND_KEPT = "concept acc <= 5 % and other-class acc within 5 points of the base"
CLEAN = "concept acc <= 1 % and other-class acc within 1 point of the base"
MULTI = "each erased concept's acc <= 5 % and the other seven classes within 3 points of the base"
FLOW_TARGET = "concept acc <= 5 % and other-class acc within 3 points of the base, mean of >= 3 seeds"
# The issues' done-when targets: (model, method, what is checked, test on one run's or the mean's metrics,
# seeds the mean needs); method "*" checks every method that ran, scenario "multi" the runs erasing several
# concepts at once.
TARGETS = (
    ("fmnist-tiny-sd", "salun", ERASED_AND_KEPT, _erased_and_kept, 1),
    ("fmnist-tiny-sd", "esd-u", ERASED_AND_KEPT, _erased_and_kept, 1),
    ("fmnist-ddpm", "salun", "UA >= 95 % (concept acc <= 5 %)", lambda m: m["after"]["concept_acc"] <= 5, 1),
    ("fmnist-tiny-sd", "*", CLEAN, _clean_erasure, 1),
    ("fmnist-tiny-sd multi", "*", MULTI, _multi_erased, 1),
    (FLOW_MODEL, "*", FLOW_TARGET, _erased_and_kept_3, 3),  # issue 14
)


def plan(args) -> list[dict]:
    """Every run of the invocation; the flow block's runs carry ``block: flow`` (their own table in the report)."""
    runs = []
    for model, methods, concepts, block in (
            ("fmnist-tiny-sd", args.sd_methods, args.concepts, ""),
            ("fmnist-tiny-sd", args.multi_methods, [args.multi] if args.multi else [], ""),
            ("fmnist-ddpm", args.ddpm_methods, args.ddpm_concepts, ""),
            (args.flow_model, args.flow_methods, args.flow_concepts, "flow")):
        for concept in concepts:
            for method in methods:
                for seed in range(args.seeds):
                    runs.append({"model": model, "concept": concept, "method": method, "seed": seed}
                                | ({"block": block} if block else {}))
    return runs


def model_missing(model: str) -> str:
    """Why ``model`` cannot be run ('' when it can): neither a bundled name nor a folder holding a pipeline."""
    if model_kind(model) is None:
        return (f"{model!r} is neither a bundled model (erase/zoo/{model}/) nor a local folder with a "
                "model_index.json")
    return ""


def resolve_flow_block(args) -> None:
    """Decide the flow block (see the module doc): keep it, skip it with a note, or stop with one line."""
    asked = any(getattr(args, k) is not None for k in ("flow_methods", "flow_concepts", "flow_model"))
    args.flow_model = args.flow_model if args.flow_model is not None else FLOW_MODEL
    args.flow_methods = _split(args.flow_methods if args.flow_methods is not None else ",".join(FLOW_METHODS))
    args.flow_concepts = _split(args.flow_concepts if args.flow_concepts is not None else FLOW_CONCEPTS)
    if not (args.flow_methods and args.flow_concepts):
        return
    why = model_missing(args.flow_model)
    others = ((args.sd_methods and args.concepts) or (args.multi_methods and args.multi)
              or (args.ddpm_methods and args.ddpm_concepts))
    if why and (asked or not others):  # not others: the flow rows are all this invocation could add
        raise EraseError(f"--flow-model: {why}; it is trained by python -m erase.zoo.train_tiny_flow "
                         "(or pass --flow-methods '' to skip the flow block)")
    if why:
        print(f"note: flow block skipped: {why} (pass --flow-methods '' to skip it without this note)", flush=True)
        args.flow_methods = []
        return
    recipes = model_settings(args.flow_model).get("methods") or {}
    without = [m for m in args.flow_methods if m not in recipes]
    if without:  # the runs go on with the methods' defaults, as any model without a recipe would
        print(f"note: {args.flow_model} ships no erase.yaml recipe for {', '.join(without)}: those runs use the "
              "method defaults", flush=True)


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def run_all(args) -> dict:
    records = []
    t0 = time.perf_counter()
    for i, r in enumerate(plan(args)):
        if args.shard and i % args.shard[1] != args.shard[0]:
            continue
        override = args.overrides.get(r["method"], {})
        rec = run_erasure(args, r, override)
        print(f"{r['model']:15s} {r['concept']:19s} {r['method']:6s} seed {r['seed']}: {rec['status']}"
              + (f" ({rec.get('error', '')[:120]})" if rec["status"] == "failed" else ""), flush=True)
        records.append({**r, **rec})
    return {"records": records, "wall_s": time.perf_counter() - t0}


def run_folder(args, r: dict, override: dict) -> Path:
    """Where run ``r`` (model, concept, method, seed) lives; the data and evaluation sizes are part of the folder
    so runs of another scale are never read back, and a trial recipe gets its own folders."""
    scale = f"e{args.eval_images}-f{args.n_forget}-r{args.n_retain}"
    trial = "_".join(f"{k}{v}" for k, v in override.items())
    name = r["method"] + (f"-{trial}" if trial else "") + f"-s{r['seed']}"
    return Path(args.out_dir) / scale / model_folder(r["model"]) / r["concept"].replace(" ", "-").replace(",", "+") / name


def model_folder(model: str) -> str:
    """The run folders' component for ``model``: a bundled name as is (so existing folders stay valid); a folder
    path as its name plus a hash of the whole path (never a path that escapes ``--out-dir``, no two folders alike)."""
    if "/" not in model and "\\" not in model and model not in (".", ".."):
        return model
    return f"{slug(Path(model).expanduser().name)}-{short_hash(str(Path(model).expanduser().resolve()))}"


def run_erasure(args, r: dict, override: dict | None = None) -> dict:
    """Run (or read back) one erasure of the benchmark: the record of ``erase.bench.common.run_once``."""
    override = override or {}
    task = {"model": r["model"], "concept": r["concept"], "data_seed": r["seed"],
            "eval_images": args.eval_images, "n_forget": args.n_forget, "n_retain": args.n_retain}
    return run_once(run_folder(args, r, override), r["method"], task, dict(override), r["seed"],
                    retry_failed=args.retry_failed)


def summarise(records: list[dict]) -> list[dict]:
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["concept"], r["method"]), []).append(r)
    for (model, concept, method), recs in groups.items():
        done = [r for r in recs if r["status"] == "done"]
        row = {"model": model, "concept": concept, "method": method, "seeds": len(done),
               "failed": len(recs) - len(done), "block": recs[0].get("block", "")}
        for key in KEYS:
            for when in ("before", "after"):
                vals = [r["metrics"].get(when, {}).get(key) for r in done]
                row[f"{key}_{when}"] = mean_std([v for v in vals if v is not None])
        per = [r["metrics"].get("after", {}).get("concept_acc_per_concept") for r in done]
        if any(per):  # several concepts erased at once: each one's mean over seeds
            row["concept_acc_per_concept"] = {c: mean_std([p[c] for p in per if p])[0] for c in per[0]}
        row["time_s"] = mean_std([r["run"]["total_s"] for r in done])
        row["wall_s"] = mean_std([r.get("bench", {}).get("wall_s") for r in done])
        rows.append(row)
    return rows


def check_targets(records: list[dict]) -> list[dict]:
    """Each target per (model, concept): on the mean over seeds, and in how many seeds it holds."""
    out = []
    for target_model, target_method, what, ok, min_seeds in TARGETS:
        model, _, scenario = target_model.partition(" ")
        by_run: dict[tuple, list[dict]] = {}
        for r in records:
            multi = "," in r["concept"]
            if (r["model"] == model and target_method in ("*", r["method"]) and r["status"] == "done"
                    and multi == (scenario == "multi")):
                by_run.setdefault((r["concept"], r["method"]), []).append(r["metrics"])
        for (concept, method), ms in by_run.items():
            mean = {when: {k: mean_std([m[when].get(k) for m in ms])[0] for k in ("concept_acc", "other_acc")}
                    for when in ("before", "after")}
            per = [m["after"].get("concept_acc_per_concept") for m in ms]
            if all(per):
                mean["after"]["concept_acc_per_concept"] = {c: mean_std([p[c] for p in per])[0] for c in per[0]}
            out.append({"model": model, "concept": concept, "method": method, "target": what,
                        "met_on_mean": bool(ok(mean)) and len(ms) >= min_seeds, "seeds_met": sum(bool(ok(m)) for m in ms), "seeds": len(ms),
                        "concept_acc_after": max((mean["after"].get("concept_acc_per_concept") or
                                                  {"": mean["after"]["concept_acc"]}).values()),  # the worst concept
                        "other_acc_drop": mean["before"]["other_acc"] - mean["after"]["other_acc"]})
    return out


def markdown(rows: list[dict], meta: dict, targets: list[dict]) -> str:
    lines = ["# Diffusion erasure on the bundled Fashion-MNIST models", "",
             f"- command: `{meta['command']}`"]
    lines += [f"- earlier invocation of this report (its records kept with `--keep-results` unless rerun): `{c}`"
              for c in meta.get("earlier_commands", [])]
    lines += [f"- machine: {meta['machine']} per run",
              f"- wall time: {fmt_duration(meta['runs_wall_s'])} summed over the runs (generation, training, evaluation); "
              f"this invocation {fmt_duration(meta['wall_s'])} (runs read back from an earlier invocation cost 0)",
              f"- evaluation: {meta['eval_images']} images per prompt from fixed seeds, judged by `fmnist-classifier`; "
              "concept acc = share classified as the erased class (UA = 100 − it); other-class acc = mean over the "
              "other classes; paraphrase acc = held-out prompts naming the concept (SD only)",
              "- train time = set-up + training; run wall time = the whole run (data generation, training, the "
              "evaluation before and after, FID), under the machine load of its moment",
              "- hyper-parameters: each method's recipe from the model's `erase.yaml` (one recipe for every concept and "
              "seed)" + (f", overridden by `{meta['set']}`" if meta.get("set") else "")
              + "; mean ± std over seeds", ""]
    lines += table([r for r in rows if not r.get("block")])
    flow_models = list(dict.fromkeys(r["model"] for r in rows if r.get("block") == "flow"))
    for model in flow_models:  # the rectified-flow model's rows: their own section, the same columns
        lines += ["", f"## {FLOW_TITLES.get(model, model)}", ""]
        lines += table([r for r in rows if r.get("block") == "flow" and r["model"] == model])
    lines += ["", "## Targets (the issue's done-when; checked on the mean over seeds and per seed)", "",
              "| model | concept | method | target | concept acc after (worst concept) | other-class drop | met (mean) | "
              "seeds met |",
              "|" + "---|" * 8]
    for t in targets:
        lines.append(f"| {t['model']} | {t['concept']} | {t['method']} | {t['target']} | {t['concept_acc_after']:.1f} | "
                     f"{t['other_acc_drop']:.1f} | {'yes' if t['met_on_mean'] else '**no**'} | "
                     f"{t['seeds_met']}/{t['seeds']} |")
    return "\n".join(lines) + "\n"


def table(rows: list[dict]) -> list[str]:
    """The markdown table of ``rows`` (one per model, concept and method)."""
    def pair(r, key):
        b, a = r[f"{key}_before"], r[f"{key}_after"]
        return "—" if a[0] is None else f"{fmt_pm(*b, 1)} → {fmt_pm(*a, 1)}"

    lines = ["| model | concept | method | seeds | concept acc before → after | paraphrase acc after | "
             "other-class acc before → after | FID-fmnist before → after | train time | run wall time |",
             "|" + "---|" * 10]
    for r in rows:
        if "concept_acc_per_concept" in r:  # several concepts at once: the mean, then each one
            each = ", ".join(f"{c} {v:.1f}" for c, v in r["concept_acc_per_concept"].items())
            r = {**r, "concept": f"{r['concept']} (after: {each})"}
        lines.append(f"| {r['model']} | {r['concept']} | {r['method']} | {r['seeds']}"
                     + (f" ({r['failed']} failed)" if r["failed"] else "")
                     + f" | {pair(r, 'concept_acc')} | {fmt_pm(*r['paraphrase_acc_after'], 1)} | {pair(r, 'other_acc')} | "
                     f"{pair(r, 'fid')} | {fmt_pm(*r['time_s'], 0)} s | {fmt_pm(*r['wall_s'], 0)} s |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erase.bench.diffusion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 8 evaluation images per prompt")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    p.add_argument("--concepts", default="trouser,sneaker", help="concepts erased from fmnist-tiny-sd")
    p.add_argument("--ddpm-concepts", default="trouser", help="classes forgotten by fmnist-ddpm")
    p.add_argument("--multi", default=MULTI_CONCEPTS, help="concepts erased together from fmnist-tiny-sd ('' to skip)")
    p.add_argument("--multi-methods", default=",".join(MULTI_METHODS), help="methods of the multi-concept scenario")
    p.add_argument("--sd-methods", default=",".join(SD_METHODS), help="methods run on fmnist-tiny-sd")
    p.add_argument("--ddpm-methods", default=",".join(DDPM_METHODS), help="methods run on fmnist-ddpm ('' to skip)")
    p.add_argument("--flow-methods", help=f"methods run on the rectified-flow model (default {','.join(FLOW_METHODS)}; "
                   "'' to skip); when the model is not there the block is skipped with a note, unless a --flow-* "
                   "flag was given or no other block runs: then the command stops before any run")
    p.add_argument("--flow-concepts", help=f"concepts erased from the rectified-flow model (default {FLOW_CONCEPTS})")
    p.add_argument("--flow-model", help=f"the rectified-flow model: a bundled name or a folder (default {FLOW_MODEL}, "
                   "whose recipes are its erase.yaml)")
    p.add_argument("--eval-images", type=int, default=16, help="evaluation images per prompt")
    p.add_argument("--n-forget", type=int, default=64, help="generated forget images")
    p.add_argument("--n-retain", type=int, default=64, help="generated retain images")
    p.add_argument("--out-dir", default="runs/bench/diffusion", help="where the runs go (finished runs are reused)")
    p.add_argument("--results", default=RESULTS, help="prefix of the .json/.md results")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="override a method's recipe for every run of it, e.g. --set salun.lr=3e-4 (repeatable): tries "
                   "a recipe across seeds before it goes into erase.yaml; such runs get their own folders and the "
                   "results go to results/diffusion_tune/ unless --results is given")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs that failed before")
    p.add_argument("--keep-results", action="store_true", help="keep the records already in --results for runs this "
                   "invocation does not plan (adds rows to a report whose run folders are gone); a planned run "
                   "replaces its old record")
    p.add_argument("--shard", default="", metavar="I/N", help="run only runs I, I+N, I+2N, ... of the plan (0-based), "
                   "e.g. two processes with --shard 0/2 and --shard 1/2 --threads 1 on a 2-core machine; a final "
                   "invocation without --shard reads every finished run back and writes the complete report")
    return p


def kept_records(path: str, planned: list[dict]) -> list[dict]:
    """Records of an earlier report that this invocation did not run again (``--keep-results``)."""
    key = lambda r: (r["model"], r["concept"], r["method"], r["seed"])  # noqa: E731
    now = {key(r) for r in planned}
    return [r for r in json.loads(Path(path).read_text())["runs"] if key(r) not in now]


def earlier_meta(path: str, eval_images: int) -> list[str]:
    """The commands that made an earlier report's records (``--keep-results``); refuses another evaluation size,
    which the report's one 'evaluation: N images per prompt' line would misstate for the kept rows."""
    meta = json.loads(Path(path).read_text()).get("meta") or {}
    if meta.get("eval_images") not in (None, eval_images):
        raise EraseError(f"--keep-results: {path} was made with --eval-images {meta['eval_images']}; pass the same "
                         f"(this invocation: {eval_images}) or another --results")
    return [*meta.get("earlier_commands", []), *([meta["command"]] if meta.get("command") else [])]


def parse_shard(text: str) -> tuple[int, int] | None:
    if not text:
        return None

    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise EraseError(f"--shard must look like I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= i < n:
        raise EraseError(f"--shard {text}: need 0 <= I < N")
    return i, n


def split_lists(args) -> None:
    """The comma-separated flags as lists; the flow block resolved (``resolve_flow_block``)."""
    args.concepts, args.ddpm_concepts = _split(args.concepts), _split(args.ddpm_concepts)
    args.sd_methods, args.ddpm_methods = _split(args.sd_methods), _split(args.ddpm_methods)
    args.multi_methods = _split(args.multi_methods)
    resolve_flow_block(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seeds, args.eval_images = 1, 8
        if args.results == RESULTS:
            args.results = RESULTS + "_quick"
    args.shard = parse_shard(args.shard)
    args.overrides = parse_method_overrides(args.set)
    if args.overrides and args.results == RESULTS:  # a trial recipe never overwrites the benchmark's results
        args.results = "results/diffusion_tune/" + "_".join(
            f"{m}-{k}{v}" for m, o in args.overrides.items() for k, v in o.items())
    split_lists(args)
    kept_file = str(args.results) + ".json"
    earlier = earlier_meta(kept_file, args.eval_images) if args.keep_results and Path(kept_file).is_file() else []
    set_threads(args.threads)
    result = run_all(args)
    if args.keep_results and Path(kept_file).is_file():
        result["records"] = kept_records(kept_file, result["records"]) + result["records"]
    if args.shard:
        print(f"shard {args.shard[0]}/{args.shard[1]} done; run again without --shard for the report")
        return 0
    rows = summarise(result["records"])
    # The threads the runs used (shards may differ from this collecting process).
    run_threads = "/".join(str(t) for t in sorted({r.get("bench", {}).get("torch_threads") for r in
                                                    result["records"]} - {None})) or "?"
    command = "python -m erase.bench.diffusion " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": command,
            "machine": describe_machine({**machine_info(), "torch_threads": run_threads}), "wall_s": result["wall_s"],
            "eval_images": args.eval_images,
            "runs_wall_s": sum(r.get("bench", {}).get("wall_s", 0.0) for r in result["records"]),
            "seeds": args.seeds, "set": " ".join(f"--set {x}" for x in args.set),
            "earlier_commands": [c for c in dict.fromkeys(earlier) if c != command]}
    targets = check_targets(result["records"])
    prefix = str(args.results)  # not Path.with_suffix: a trial's name may hold dots (lr3.5e-05)
    atomic_write_json({"meta": meta, "rows": rows, "targets": targets, "runs": result["records"]}, prefix + ".json")
    atomic_write_text(markdown(rows, meta, targets), prefix + ".md")
    print(markdown(rows, meta, targets))
    return 0


if __name__ == "__main__":
    from erase.cli import run_cli

    sys.exit(run_cli(main))
