"""Side-by-side classifier unlearning benchmark: every registered method against retrain.

    python -m erase.bench.classifier            # the full table (Fashion-MNIST subset, 3 seeds)
    python -m erase.bench.classifier --quick    # a smaller, untuned preview (<= 10 min on 2 cores)
    python -m erase.bench.classifier --methods ft,salun --seeds 3 --width 8

Protocol (all of it is written into the report):

- one **original model** per setup (dataset subset, width, epochs): the ``retrain`` recipe with
  nothing forgotten; every method of every scenario and seed starts from it;
- **scenarios**: 10 % random forgetting (``random:0.1``; seed s draws forget set s) and one-class
  forgetting (``class:1``); per seed, ``retrain`` from scratch on the retain set is the reference
  (gaps and RTE ratios compare a method with the retrain of the same scenario and seed);
- **budget rule** (the same for every method): each method runs its documented default number of
  epochs times ``--epoch-scale`` (the papers' defaults assume CIFAR-10 with a 160-182-epoch retrain;
  here retrain runs ``--epochs`` epochs) and tries the same ``k = len(--lr-grid)`` learning rates
  (its default times each multiplier) once, on seed 0 of a **validation forget set** (random: forget
  set #1000; class: ``--val-class``) against a retrain on that set; the learning rate with the
  smallest average gap is then run on every seed. A method that trains no step (closed form) is run
  once: its learning rate does nothing;
- every run is its own folder under ``--out-dir``; finished runs are skipped when the benchmark is
  rerun (resume), failed runs are recorded with their error and skipped (``--retry-failed``).

Outputs: ``<results>.json`` (every run's metrics, costs and paths), ``<results>.md`` and
``<results>_gaps.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from erase.bench.common import (
    METRIC_KEYS,
    REFERENCE,
    ClassifierRuns,
    ClassifierSettings,
    add_run_flags,
    add_setup_flags,
    apply_flags,
    describe_machine,
    fmt_duration,
    fmt_pm,
    loadavg,
    machine_info,
    mean_std,
    print_results,
    pyplot,
    read_run,
    set_threads,
    short_hash,
    unlearning_methods,
    write_results,
)
from erase.classifier.task import ClassifierConfig, ClassifierTask
from erase.methods import get_method
from erase.metrics.classifier import gap_to_retrain
from erase.storage import atomic_write_json

ORIGINAL_ROW = "original (no unlearning)"
NOISE_ROW = "retrain, another seed (noise floor)"
REFERENCE_ROWS = (REFERENCE, ORIGINAL_ROW, NOISE_ROW)
NOISE_SEED = 1000  # run seed offset of the second, independent retrain per seed


@dataclass
class BenchSettings(ClassifierSettings):
    seeds: int = 3
    scenarios: list[str] = field(default_factory=lambda: ["random:0.1", "class:1"])
    val_class: int = 8
    val_split_seed: int = 1000
    lr_grid: list[float] = field(default_factory=lambda: [1 / 3, 1.0, 3.0, 10.0])
    methods: list[str] | None = None
    out_dir: str = "runs/bench/classifier"
    results: str = "results/classifier_fmnist"
    quick: bool = False


FIGURE = "_gaps.png"  # beside <results>.json and .md
QUICK = {"limit_train": 2000, "limit_test": 1000, "eval_max_retain": 1000, "epochs": 10.0, "seeds": 2,
         "lr_grid": [1.0], "epoch_scale": 0.1, "results": "results/classifier_fmnist_quick"}


# -- plan ----------------------------------------------------------------------------------------

def slug(spec: str) -> str:
    return spec.replace(":", "-").replace(",", "_")


def seed_forget(s: BenchSettings, scenario: str, seed: int) -> tuple[str, int]:
    """(forget spec, split seed) of a scenario at a seed: random sets differ per seed, a class does not."""
    return (scenario, seed) if scenario.startswith("random") else (scenario, 0)


def val_forget(s: BenchSettings, scenario: str) -> tuple[str, int]:
    if scenario.startswith("random"):
        return scenario, s.val_split_seed
    return f"class:{s.val_class}", 0


# The budget rule reads each method's own declarations: ``tunable`` (the knobs the grid multiplies; None:
# every learning rate) and ``epoch_fields`` (lengths in epochs that ``epochs`` does not set).

def _scale_field(value, factor: float):
    if isinstance(value, str):  # comma-separated epochs, e.g. reinit_kp's "2,1,1,1"
        return ",".join(f"{float(v) * factor:.6g}" for v in value.split(",") if v.strip())
    return round(float(value) * factor, 6)


def tuned_fields(method_cls) -> list[str]:
    """The config fields the tuning grid multiplies: the method's ``tunable``, else its positive learning rates."""
    if method_cls.tunable is not None:
        return list(method_cls.tunable)
    cfg = method_cls.Config()
    return [f.name for f in dataclasses.fields(cfg) if (f.name == "lr" or f.name.endswith("_lr"))
            and isinstance(getattr(cfg, f.name), float) and getattr(cfg, f.name) > 0]


def budget_layer(method_cls, epoch_scale: float, mult: float) -> dict:
    """The method's defaults under the budget rule: every length in epochs × ``epoch_scale``, tuned fields × ``mult``."""
    cfg = method_cls.Config()
    layer = {"epochs": round(cfg.epochs * epoch_scale, 6)}
    for f in method_cls.epoch_fields:
        layer[f] = _scale_field(getattr(cfg, f), epoch_scale)
    for f in tuned_fields(method_cls):
        layer[f] = float(f"{getattr(cfg, f) * mult:.6g}")
    return layer


def method_layer(name: str, s: BenchSettings, mult: float) -> dict:
    """The method's config layer under the budget rule, with its tuned fields times ``mult``; --set wins."""
    return {**budget_layer(get_method(name, "classifier"), s.epoch_scale, mult), **s.overrides.get(name, {})}


def registered_methods(s: BenchSettings) -> list[str]:
    return unlearning_methods(s.methods)


# -- running -------------------------------------------------------------------------------------

class Bench(ClassifierRuns):
    def __init__(self, s: BenchSettings):
        super().__init__(s)
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")

    def original_eval(self, scenario: str, seed: int, original: str) -> dict | None:
        """The original model's metrics on a scenario's split (the "do nothing" row)."""
        out = self.root / slug(scenario) / "original-eval" / f"seed{seed}.json"
        if out.is_file():
            return json.loads(out.read_text())
        if self.s.report_only:
            return None
        forget, split_seed = seed_forget(self.s, scenario, seed)
        cfg = ClassifierConfig(**self.s.task_layer(forget, split_seed, original))
        task = ClassifierTask(cfg, seed=seed)
        model = task.build_model(from_scratch=False)
        metrics = task.evaluate(model, "cpu")

        atomic_write_json(metrics, out)
        return metrics

    def execute(self) -> dict:
        s = self.s
        s.threads = set_threads(s.threads)
        methods = registered_methods(s)
        self.log(f"setup {s.tag()}; methods ({len(methods)}): {', '.join(methods)}; load {loadavg()}")
        orig = self.original()
        if orig["status"] != "done":
            return self.report({}, methods, orig)
        original = orig["path"]
        scen_results = {}
        for scenario in s.scenarios:
            scen_results[scenario] = self.scenario(scenario, methods, original)
            self.report(scen_results, methods, orig)  # partial results after each scenario
        return self.report(scen_results, methods, orig)

    def scenario(self, scenario: str, methods: list[str], original: str) -> dict:
        s = self.s
        sdir = self.root / slug(scenario)
        res = {"retrain": [], "retrain_b": [], "original": [], "val_retrain": None, "methods": {}}
        # references first: the validation retrain and one retrain per seed
        vforget, vseed = val_forget(s, scenario)
        if len(s.lr_grid) > 1:
            res["val_retrain"] = self.run(sdir / "val" / "retrain", REFERENCE, s.task_layer(vforget, vseed, original),
                                          s.recipe(), 0, f"{scenario} val retrain ({vforget}#{vseed})")
        for seed in range(s.seeds):
            forget, split_seed = seed_forget(s, scenario, seed)
            res["retrain"].append(self.run(sdir / "retrain" / f"seed{seed}", REFERENCE,
                                           s.task_layer(forget, split_seed, original), s.recipe(), seed,
                                           f"{scenario} retrain seed {seed}"))
            res["original"].append(self.original_eval(scenario, seed, original))
        for seed in range(s.seeds):  # same forget set, another training seed: how far apart two retrains land
            forget, split_seed = seed_forget(s, scenario, seed)
            res["retrain_b"].append(self.run(sdir / "retrain-b" / f"seed{seed}", REFERENCE,
                                             s.task_layer(forget, split_seed, original), s.recipe(), NOISE_SEED + seed,
                                             f"{scenario} independent retrain seed {seed} (run seed {NOISE_SEED + seed})"))
        for name in methods:
            res["methods"][name] = self.method(scenario, name, original, res)
        return res

    def method(self, scenario: str, name: str, original: str, res: dict) -> dict:
        s = self.s
        sdir = self.root / slug(scenario)
        vforget, vseed = val_forget(s, scenario)
        vret = res["val_retrain"]
        tuning = []
        if len(s.lr_grid) == 1:  # no tuning: run the single setting on every seed
            layer = method_layer(name, s, s.lr_grid[0])
            return {"status": "done", "tuning": [], "chosen": layer, "chosen_lr_mult": s.lr_grid[0],
                    "seeds": [self.run(sdir / name / short_hash(layer) / f"seed{seed}", name,
                                       s.task_layer(*seed_forget(s, scenario, seed), original), layer, seed,
                                       f"{scenario} {name} seed {seed}") for seed in range(s.seeds)]}
        for mult in sorted(s.lr_grid, key=lambda m: (m != 1.0, m)):  # the default first
            layer = method_layer(name, s, mult)
            out = sdir / "val" / name / short_hash(layer)
            rec = self.run(out, name, s.task_layer(vforget, vseed, original), layer, 0,
                           f"{scenario} tune {name} ×{mult:.3g}")
            row = {"lr_mult": mult, "method_config": layer, "status": rec["status"], "path": rec["path"]}
            if rec["status"] == "done":
                row["steps"] = rec["run"]["steps"]
                row["total_s"] = rec["run"]["total_s"]
                if vret["status"] == "done":
                    row["val_avg_gap"] = gap_to_retrain(rec["metrics"], vret["metrics"])["avg_gap"]
            else:
                row["error"] = rec.get("error")
            tuning.append(row)
            if rec["status"] == "done" and rec["run"]["steps"] == 0 and get_method(name, "classifier").tunable is None:
                break  # trains no step and tunes only learning rates: the other settings would be identical
        done = [t for t in tuning if t.get("val_avg_gap") is not None]
        if not done:
            failed = [t for t in tuning if t["status"] == "failed"]
            return {"status": "failed" if failed else "missing", "tuning": tuning,
                    "error": failed[0].get("error") if failed else None, "seeds": []}
        best = min(done, key=lambda t: (t["val_avg_gap"], t["lr_mult"]))
        layer = best["method_config"]
        seeds = []
        for seed in range(s.seeds):
            forget, split_seed = seed_forget(s, scenario, seed)
            out = sdir / name / short_hash(layer) / f"seed{seed}"
            rec = self.run(out, name, s.task_layer(forget, split_seed, original), layer, seed,
                           f"{scenario} {name} seed {seed}")
            seeds.append(rec)
        return {"status": "done", "tuning": tuning, "chosen": layer, "chosen_lr_mult": best["lr_mult"], "seeds": seeds}

    # -- report ----------------------------------------------------------------------------------

    def report(self, scen_results: dict, methods: list[str], orig: dict) -> dict:
        data = summarise(self.s, scen_results, methods, orig)
        data["invocation_wall_s"] = self.wall_s()
        data["new_runs_this_invocation"] = self.n_new
        command = " ".join(["python -m erase.bench.classifier", *sys.argv[1:]])
        # The invocations that trained this table's runs (a resumed benchmark has several).
        history = []
        prev = Path(self.s.results).with_suffix(".json")
        if prev.is_file() and self.n_read_back:  # earlier invocations count only if their runs are in this table
            try:
                old = json.loads(prev.read_text())
                if old.get("setup_tag") == data["setup_tag"]:
                    history = [h for h in old.get("invocations", []) if h.get("started") != self.started]
            except (OSError, ValueError):
                history = []
        if self.n_new or not history:
            history.append({"started": self.started, "command": command, "wall_s": data["invocation_wall_s"],
                            "new_runs": self.n_new, "torch_threads": self.s.threads})
        data["invocations"] = history
        data["command"] = next((h["command"] for h in history if h["new_runs"]), command)
        write_outputs(data, Path(self.s.results))
        return data


# -- summary -------------------------------------------------------------------------------------

def _seed_row(rec: dict, ref: dict | None, seed: int) -> dict:
    row = {"seed": seed, "path": rec.get("path"), "status": rec["status"]}
    if rec["status"] != "done":
        row["error"] = rec.get("error")
        return row
    m, r = rec["metrics"], rec["run"]
    row.update({k: m[k] for k in METRIC_KEYS if k in m})
    if m.get("MIA_se") is not None:  # runs evaluated before MIA had a standard error have none
        row["MIA_se"] = m["MIA_se"]
    row.update({"RTE_s": r["total_s"], "setup_s": r.get("setup_s"), "steps": r["steps"], "eval_s": m.get("eval_s"),
                "wall_s": rec.get("bench", {}).get("wall_s"), "loadavg": rec.get("bench", {}).get("loadavg_start")})
    if "forget_class_test_acc" in m:
        row["forget_class_test_acc"] = m["forget_class_test_acc"]
    if ref is not None and ref["status"] == "done":
        gaps = gap_to_retrain(m, ref["metrics"])
        row.update({f"gap_{k}": v for k, v in gaps.items() if k != "avg_gap"})
        row["avg_gap"] = gaps["avg_gap"]
        row["RTE_ratio"] = round(r["total_s"] / ref["run"]["total_s"], 4) if ref["run"]["total_s"] else None
    return row


def _aggregate(rows: list[dict]) -> dict:
    keys = ["UA", "RA", "TA", "MIA", "MIA_se", "gap_UA", "gap_RA", "gap_TA", "gap_MIA", "avg_gap", "RTE_s", "RTE_ratio", "steps",
            "forget_class_test_acc"]
    out = {"n": sum(r["status"] == "done" for r in rows)}
    for k in keys:
        mean, std = mean_std([r.get(k) for r in rows if r["status"] == "done" and r.get(k) is not None])
        if mean is not None:
            out[k] = {"mean": round(mean, 4), "std": round(std, 4)}
    return out


def summarise(s: BenchSettings, scen_results: dict, methods: list[str], orig: dict) -> dict:
    machine = machine_info()
    data = {
        "title": f"Classifier unlearning benchmark: {s.dataset}, CIFAR-stem ResNet-18 width {s.width}",
        "settings": asdict(s), "setup_tag": s.tag(), "run_root": str(Path(s.out_dir) / s.tag()),
        "machine": machine, "machine_text": describe_machine(machine),
        "budget_rule": budget_rule(s),
        "original": _seed_row(orig, None, 0) if orig else None, "scenarios": {},
    }
    all_wall = []
    for scenario, res in scen_results.items():
        refs = res["retrain"]
        sc = {"rows": {}}
        rrows = [_seed_row(r, r, i) for i, r in enumerate(refs)]
        sc["rows"][REFERENCE] = {"status": "done", "seeds": rrows, "summary": _aggregate(rrows)}
        orows = []
        for i, m in enumerate(res["original"]):
            if m is None:
                orows.append({"seed": i, "status": "missing"})
                continue
            fake = {"status": "done", "metrics": m, "run": {"total_s": 0.0, "steps": 0}}
            orows.append(_seed_row(fake, refs[i], i))
        sc["rows"][ORIGINAL_ROW] = {"status": "done", "seeds": orows, "summary": _aggregate(orows)}
        brows = [_seed_row(rec, refs[i], i) for i, rec in enumerate(res.get("retrain_b", []))]
        if any(r["status"] == "done" for r in brows):
            sc["rows"][NOISE_ROW] = {"status": "done", "seeds": brows, "summary": _aggregate(brows)}
        vr = res.get("val_retrain")
        sc["val_retrain"] = _seed_row(vr, vr, 0) if vr else None
        for name in methods:
            mres = res["methods"].get(name)
            if mres is None:
                continue
            srows = [_seed_row(rec, refs[i], i) for i, rec in enumerate(mres["seeds"])]
            entry = {"status": mres["status"], "tuning": mres["tuning"], "seeds": srows, "summary": _aggregate(srows)}
            entry["tuned_fields"] = tuned_fields(get_method(name, "classifier"))
            if "chosen" in mres:
                entry["chosen"] = mres["chosen"]
                entry["chosen_lr_mult"] = mres["chosen_lr_mult"]
            if mres.get("error"):
                entry["error"] = mres["error"]
            failed = [r for r in srows if r["status"] == "failed"]
            if failed:
                entry["failed_seeds"] = [{"seed": r["seed"], "error": r.get("error")} for r in failed]
            sc["rows"][name] = entry
        sc["cost"] = scenario_cost(res)
        all_wall.append(sc["cost"]["wall_s"])
        data["scenarios"][scenario] = sc
    orig_wall = (orig or {}).get("bench", {}).get("wall_s") or 0.0
    data["runs_wall_s_total"] = round(sum(all_wall) + orig_wall, 1)
    loads = [r.get("loadavg") for sc in data["scenarios"].values() for row in sc["rows"].values()
             for r in row.get("seeds", []) if r.get("loadavg") is not None]
    if loads:
        data["load"] = {"min": min(loads), "max": max(loads), "mean": round(sum(loads) / len(loads), 2)}
    data["checks"] = issue_checks(data)
    return data


def scenario_cost(res: dict) -> dict:
    """Wall time spent in the scenario's runs (training + evaluation), split by purpose."""
    def wall(rec):
        return (rec or {}).get("bench", {}).get("wall_s") or (rec or {}).get("wall_s") or 0.0

    ref = sum(wall(r) for r in res["retrain"] + res.get("retrain_b", [])) + wall(res.get("val_retrain"))
    tune = sum(wall(read_run(Path(t["path"])) or {}) for m in res["methods"].values() for t in m["tuning"])
    final = sum(wall(r) for m in res["methods"].values() for r in m["seeds"])
    return {"reference_s": round(ref, 1), "tuning_s": round(tune, 1), "final_s": round(final, 1),
            "wall_s": round(ref + tune + final, 1)}


def budget_rule(s: BenchSettings) -> str:
    grid = ", ".join(f"×{m:.3g}" for m in sorted(s.lr_grid))
    k = len(s.lr_grid)
    tune = (f"each method tries the same k = {k} settings (its default learning rates {grid}) on seed 0 of a validation forget "
            f"set (random: split #{s.val_split_seed}; class: class {s.val_class}) against a retrain on that set, and the "
            f"one with the smallest average gap runs on every seed" if k > 1 else
            "no tuning: every method runs its default learning rate (k = 1)")
    classes = {m: get_method(m, "classifier") for m in registered_methods(s)}
    extra = "; ".join(f"{m}: {', '.join(c.epoch_fields)}" for m, c in classes.items() if c.epoch_fields) or "none here"
    closed = "; ".join(f"{m}: {', '.join(c.tunable)}" for m, c in classes.items() if c.tunable is not None) or "none here"
    return (f"every method runs its documented default epochs × {s.epoch_scale:g} (its default budget, scaled once for "
            f"all methods: the papers' defaults assume a 160-182-epoch retrain, here retrain runs {s.epochs:g} epochs; "
            f"lengths not set by `epochs` are scaled too — {extra}); "
            f"{tune}. \"Learning rates\" = every `lr` / `*_lr` field of the method (an `lr` of 0 meaning \"automatic\" "
            f"stays 0); methods that declare their own knobs tune those instead ({closed}); a method that turns out to "
            f"train no step runs once. Per-method overrides: {json.dumps(s.overrides) if s.overrides else 'none'}")


def issue_checks(data: dict) -> dict:
    checks = {}
    for scenario, sc in data["scenarios"].items():
        rows = sc["rows"]

        def gap(name, rows=rows):
            return rows.get(name, {}).get("summary", {}).get("avg_gap", {}).get("mean")

        methods = {n: r for n, r in rows.items() if n not in REFERENCE_ROWS}
        ranked = sorted((gap(n), n) for n in methods if gap(n) is not None)
        entry = {"ranking": [{"method": n, "avg_gap": g} for g, n in ranked]}
        if ranked:
            entry["best"] = ranked[0][1]
        sg = gap("salun")
        if sg is not None:
            entry["salun_below"] = {b: (sg < gap(b)) if gap(b) is not None else None for b in ("ft", "ga", "rl")}
            entry["salun_minus"] = {}
            for b in ("ft", "ga", "rl"):  # paired by seed: both runs compare with the same retrain
                per_seed = {r["seed"]: r.get("avg_gap") for r in rows.get(b, {}).get("seeds", []) if r.get("avg_gap") is not None}
                diffs = [r["avg_gap"] - per_seed[r["seed"]] for r in rows["salun"].get("seeds", [])
                         if r.get("avg_gap") is not None and r["seed"] in per_seed]
                if diffs:
                    mean, std = mean_std(diffs)
                    entry["salun_minus"][b] = {"mean": round(mean, 3), "std": round(std, 3),
                                               "seeds_lower": sum(d < 0 for d in diffs), "n": len(diffs)}
        noise = rows.get(NOISE_ROW, {}).get("summary", {}).get("avg_gap", {}).get("mean")
        if noise is not None:
            entry["noise_floor_avg_gap"] = noise
        fast = []
        for n, r in methods.items():
            summ = r.get("summary", {})
            g, ratio = summ.get("avg_gap", {}).get("mean"), summ.get("RTE_ratio", {}).get("mean")
            if g is not None and ratio is not None and g <= 1.0 and ratio <= 0.10:
                fast.append({"method": n, "avg_gap": g, "RTE_ratio": ratio})
        entry["gap_le_1_at_le_10pct_retrain"] = fast
        checks[scenario] = entry
    return checks


# -- outputs -------------------------------------------------------------------------------------

def markdown(data: dict) -> str:
    s = data["settings"]
    lines = [f"# {data['title']}", ""]
    lines += [
        f"- command: `{data['command']}`",
        f"- scale: {s['dataset']} first {s['limit_train']} training images (original trained on all of them), "
        f"first {s['limit_test']} test images, RA on {s['eval_max_retain']} random retain images; "
        f"CIFAR-stem ResNet-18 width {s['width']}; original and retrain: {s['epochs']:g} epochs of the retrain recipe "
        f"(one-cycle SGD, peak lr 0.1, batch 128) with label smoothing {s['label_smoothing']:g} and "
        f"{'flip + shift augmentation' if s['augment'] else 'no augmentation'} (also in every method's training streams)",
        f"- seeds: {s['seeds']} (seed s: run seed s; random forgetting also draws forget set s); "
        "mean ± std (ddof 1) over seeds; gaps and RTE ratios against the retrain of the same seed",
        f"- budget rule: {data['budget_rule']}",
        f"- machine: {data['machine_text']}",
        f"- wall time: {fmt_duration(data['runs_wall_s_total'])} summed over all runs of this table (training + evaluation, "
        f"tuning included), trained by " + "; ".join(
            f"`{h['command']}` on {h['started']} ({fmt_duration(h['wall_s'])}, {h['new_runs']} new runs, "
            f"{h.get('torch_threads', '?')} torch thread(s))" for h in data.get("invocations", []) if h["new_runs"])
        + f"; runs live in `{data['run_root']}`",
        f"- machine load: 1-minute load average at the start of the runs {data['load']['min']:.1f}–{data['load']['max']:.1f} "
        f"(mean {data['load']['mean']:.1f}) on {data['machine']['logical_cpus']} logical CPUs: other jobs shared the cores, "
        "so seconds and RTE ratios carry that noise (compare the noise-floor row's RTE ratio, ideally 1)"
        if data.get("load") else "- machine load: not recorded",
        "- RTE = the method's unlearning wall time (setup such as saliency masks included, evaluation excluded); "
        "RTE ratio = RTE / retrain's wall time, both measured in this benchmark on this machine",
        "- MIA = MIA-efficacy (SVC on the true-label probability, every retain image vs the test images, share of the "
        "forget set called non-member), the mean over the attack's balanced resampling draws; MIA se = its standard "
        "error over those draws, averaged over seeds (how much the resampling alone moves one run's MIA, next to the "
        "± over seeds); UA = 100 − forget accuracy; all ×100",
        "",
    ]
    orig = data.get("original")
    if orig and orig.get("status") == "done":
        lines.append(f"Original model: train accuracy (RA, no forget set) {orig.get('RA', float('nan')):.2f}, "
                     f"TA {orig.get('TA', float('nan')):.2f}, trained in {orig['RTE_s']:.0f} s.")
        lines.append("")
    for scenario, sc in data["scenarios"].items():
        lines += [f"## {scenario_title(scenario)}", ""]
        cols = ["method", "UA", "RA", "TA", "MIA", "MIA se", "avg gap", "RTE (s)", "RTE / retrain", "tuned", "steps"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|---|" + "|".join("---:" for _ in cols[1:]) + "|")
        order = sorted(sc["rows"].items(), key=lambda kv: _sort_key(kv[0], kv[1]))
        for name, row in order:
            summ = row.get("summary", {})
            if row["status"] != "done" or not summ.get("n"):
                err = (row.get("error") or "no finished run")[:120].replace("|", "/")
                lines.append(f"| {name} | failed: {err} |" + " |" * (len(cols) - 2))
                continue

            def pm(k, d=2, summ=summ):
                v = summ.get(k)
                return fmt_pm(v["mean"], v["std"], d) if v else "—"

            lr_txt = ""
            if row.get("chosen") is not None:
                fields = row.get("tuned_fields") or []
                vals = ", ".join(f"{f} {row['chosen'][f]:.3g}" for f in fields[:2] if f in row["chosen"])
                lr_txt = f"×{row.get('chosen_lr_mult', 1):.3g}" + (f": {vals}" if vals else "") + (" …" if len(fields) > 2 else "")
            steps = summ.get("steps", {}).get("mean")
            mia_se = summ.get("MIA_se", {}).get("mean")
            mia_se = "—" if mia_se is None else f"{mia_se:.2f}"
            n = summ["n"]
            nm = name if n == data["settings"]["seeds"] else f"{name} ({n}/{data['settings']['seeds']} seeds)"
            lines.append(f"| {nm} | {pm('UA')} | {pm('RA')} | {pm('TA')} | {pm('MIA')} | {mia_se} | {pm('avg_gap')} | "
                         f"{pm('RTE_s', 1)} | {pm('RTE_ratio', 3)} | {lr_txt} | {'' if steps is None else f'{steps:.0f}'} |")
        lines.append("")
        if NOISE_ROW in sc["rows"]:
            g = sc["rows"][NOISE_ROW]["summary"].get("avg_gap", {})
            lines.append(f"- *{NOISE_ROW}*: a second retrain on the same forget set with another training seed "
                         f"(run seed {NOISE_SEED}+s), compared with the reference retrain: two equally valid references already "
                         f"differ by an average gap of {g.get('mean', float('nan')):.2f}, so differences between methods below "
                         "about that are noise")
        failed = [(n, r) for n, r in sc["rows"].items() if r.get("failed_seeds")]
        for n, r in failed:
            for f in r["failed_seeds"]:
                lines.append(f"- {n} seed {f['seed']} failed: {str(f['error'])[:300]}")
        if any(k == "forget_class_test_acc" for r in sc["rows"].values() for k in r.get("summary", {})):
            fc = [f"{n} {r['summary']['forget_class_test_acc']['mean']:.1f}" for n, r in order
                  if "forget_class_test_acc" in r.get("summary", {})]
            lines.append("- accuracy on the forgotten class's test images: " + ", ".join(fc))
        c = sc["cost"]
        lines.append(f"- cost of this scenario: references {fmt_duration(c['reference_s'])}, tuning "
                     f"{fmt_duration(c['tuning_s'])}, final runs {fmt_duration(c['final_s'])}")
        tuned = [(n, r) for n, r in sc["rows"].items() if r.get("tuning") and len(r["tuning"]) > 1]
        if tuned:
            lines += ["", "Tuning on the validation forget set (average gap per learning rate; * = chosen):", "",
                      "| method | " + " | ".join(f"×{m:.3g}" for m in sorted(data["settings"]["lr_grid"])) + " |",
                      "|---|" + "|".join("---:" for _ in data["settings"]["lr_grid"]) + "|"]
            for n, r in sorted(tuned):
                cells = []
                for m in sorted(data["settings"]["lr_grid"]):
                    t = next((t for t in r["tuning"] if abs(t["lr_mult"] - m) < 1e-9), None)
                    if t is None:
                        cells.append("")
                    elif t.get("val_avg_gap") is None:
                        cells.append("failed" if t["status"] == "failed" else "—")
                    else:
                        star = "*" if abs(m - r.get("chosen_lr_mult", -1)) < 1e-9 else ""
                        cells.append(f"{t['val_avg_gap']:.2f}{star}")
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Checks (issue 3)", ""]
    for scenario, ch in data["checks"].items():
        if "best" in ch:
            lines.append(f"- {scenario}: lowest average gap: **{ch['best']}**")
        if "salun_below" in ch:
            txt = ", ".join(f"{k}: {'yes' if v else 'no' if v is not None else 'n/a'}" for k, v in ch["salun_below"].items())
            lines.append(f"- {scenario}: SalUn's average gap below {txt}")
            if ch.get("salun_minus"):
                diffs = "; ".join(f"− {b}: {d['mean']:+.2f} ± {d['std']:.2f} (lower on {d['seeds_lower']}/{d['n']} seeds)"
                                  for b, d in ch["salun_minus"].items())
                lines.append(f"  - SalUn's gap minus the baseline's, paired by seed: {diffs}")
        if ch.get("noise_floor_avg_gap") is not None:
            lines.append(f"- {scenario}: average gap of an independent retrain (noise floor): {ch['noise_floor_avg_gap']:.2f}")
        fast = ch["gap_le_1_at_le_10pct_retrain"]
        lines.append(f"- {scenario}: methods with average gap ≤ 1.0 at ≤ 10 % of retrain time: "
                     + (", ".join(f"{f['method']} ({f['avg_gap']:.2f}, {100 * f['RTE_ratio']:.1f} %)" for f in fast) or "none"))
    lines.append("")
    lines.append(f"Per-run metrics, costs and folders: `{Path(data['settings']['results']).name}.json`. "
                 "Bar chart of the average gaps: "
                 f"`{Path(data['settings']['results']).name}_gaps.png`.")
    return "\n".join(lines) + "\n"


def scenario_title(scenario: str) -> str:
    kind, _, arg = scenario.partition(":")
    if kind == "random":
        return f"Random forgetting ({float(arg) * 100:g} % of the training images) — `{scenario}`"
    return f"Class forgetting — `{scenario}`"


def _sort_key(name: str, row: dict):
    if name == REFERENCE:
        return (0, 0.0, name)
    if name == ORIGINAL_ROW:
        return (1, 0.0, name)
    if name == NOISE_ROW:
        return (1, 1.0, name)
    g = row.get("summary", {}).get("avg_gap", {}).get("mean")
    return (2, g if g is not None else math.inf, name)


def plot(data: dict, path: Path) -> None:
    """One panel per scenario: average gap (mean ± std over seeds) per method, best first."""
    plt = pyplot()
    scen = list(data["scenarios"])
    if not scen:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no finished runs yet", ha="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    n_methods = max(len(sc["rows"]) for sc in data["scenarios"].values())
    fig, axes = plt.subplots(len(scen), 1, figsize=(max(7, 0.45 * n_methods + 2), 3.6 * len(scen)), squeeze=False)
    s = data["settings"]
    for ax, sc in zip(axes[:, 0], scen):
        rows = [(n, r["summary"]["avg_gap"]) for n, r in data["scenarios"][sc]["rows"].items()
                if n != REFERENCE and r.get("summary", {}).get("avg_gap")]
        rows.sort(key=lambda t: t[1]["mean"])
        names = [n for n, _ in rows]
        colors = ["grey" if n == ORIGINAL_ROW else "tab:green" if n == NOISE_ROW else "tab:blue" for n in names]
        ax.bar(range(len(rows)), [g["mean"] for _, g in rows], yerr=[g["std"] for _, g in rows], capsize=2, color=colors)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([n.replace(" (noise floor)", "\n(noise floor)") for n in names], rotation=40, ha="right",
                           fontsize=8)
        ax.axhline(1.0, color="tab:red", lw=0.8, ls="--")
        ax.set_ylabel("avg gap to retrain")
        ax.set_title(f"{scenario_title(sc).split(' — ')[0]} ({sc}): lower is better; dashed line = 1.0", fontsize=9)
    fig.suptitle(f"{s['dataset']}, ResNet-18 width {s['width']}, {s['limit_train']} images, {s['seeds']} seeds "
                 f"(mean ± std); every method at {s['epoch_scale']:g} × its default epochs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(data: dict, prefix: Path) -> None:
    data["markdown"] = prefix.with_suffix(".md").name
    write_results(prefix, data, markdown(data), FIGURE, lambda path: plot(data, path))


# -- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d = BenchSettings()
    p = argparse.ArgumentParser(prog="python -m erase.bench.classifier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smaller preview: {', '.join(f'{k}={v}' for k, v in QUICK.items())} (flags given explicitly win)")
    p.add_argument("--methods", help="comma-separated subset of the registered classifier methods (default: all)")
    p.add_argument("--seeds", type=int, help=f"number of seeds (default {d.seeds})")
    add_setup_flags(p, d)
    p.add_argument("--scenarios", help=f"comma-separated forget specs (default {','.join(d.scenarios)}); use ';' between "
                   "specs if one has a comma")
    p.add_argument("--val-class", type=int, help=f"class forgotten by the class scenarios' validation runs (default {d.val_class})")
    p.add_argument("--lr-grid", help="comma-separated multipliers of each method's default lr tried on the validation set "
                   "(default 0.333,1,3,10; '1' = no tuning)")
    add_run_flags(p, d)
    return p


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    s = BenchSettings()
    if args.quick:
        for k, v in QUICK.items():
            setattr(s, k, v)
        s.quick = True
    apply_flags(s, args, skip=("methods", "scenarios", "lr_grid"))
    if args.methods:
        s.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.scenarios:
        sep = ";" if ";" in args.scenarios else ","
        s.scenarios = [x.strip() for x in args.scenarios.split(sep) if x.strip()]
    if args.lr_grid:
        s.lr_grid = [float(x) for x in args.lr_grid.split(",") if x.strip()]
    return s


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    s = settings_from_args(args)
    data = Bench(s).execute()
    print_results(s.results, FIGURE, data["invocation_wall_s"])
    return 0


if __name__ == "__main__":
    from erase.cli import run_cli

    sys.exit(run_cli(main))
