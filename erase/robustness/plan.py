"""Everything an attack command asks, checked before any model loads: the run, the attacks, their budgets, the prompts.

Budgets layer as methods do (``erase.config``): an attack's config defaults < the base model folder's
``erase.yaml`` ``attacks: {name: {setting: value}}`` (``erase.storage.model_settings``) < ``--set``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from erase.attacks import get_attack, list_attacks
from erase.attacks.base import Attack
from erase.diffusion.concepts import make_concepts
from erase.diffusion.evaluation import EVAL_SEED
from erase.diffusion.loading import is_fmnist, model_kind
from erase.diffusion.task import DiffusionConfig
from erase.errors import EraseError
from erase.fields import flag_name
from erase.prompts import PromptRow, load_prompts
from erase.storage import atomic_write_text, model_settings, read_yaml

DEFAULT_PROMPTS = "the run's concept prompt and its held-out paraphrases"


@dataclass
class AttackPlan:
    run_dir: Path
    diffusion: DiffusionConfig          # the run's task settings (config.yaml)
    seed: int                           # the attacks' own randomness (default: the run's seed)
    attacks: dict[str, Attack]          # name -> attack with its resolved budget
    rows: list[PromptRow]               # the attack prompt set, every row with its concept
    prompt_set: str                     # where the rows came from (a CSV, or DEFAULT_PROMPTS)
    evaluator: str                      # the judge: a classifier folder or bundled name
    overwrite: bool = False
    progress: bool = True
    sources: dict[str, dict] = field(default_factory=dict)  # name -> {"model": erase.yaml layer, "flags": --set layer}
    base_only: bool = False             # attack the unerased base model (the attacks' sanity check), not a run's model


def make_plan(run_dir: str | Path, attack: str = "all", prompts: str | None = None, sets: list[str] | None = None,
              limit: int = 0, evaluator: str = "", seed: int | None = None, overwrite: bool = False,
              progress: bool = True, base_model: str = "", concept: str = "") -> AttackPlan:
    """``base_model`` (with ``concept``): attack that unerased model, writing into ``run_dir`` (created), as if it
    were a run that erased ``concept`` — every attack must bring the concept back there."""
    run, saved = base_run(run_dir, base_model, concept) if base_model else read_run(run_dir)
    cfg = run_config(run, saved)
    names = attack_names(attack)
    layers = model_layers(cfg.model, names)
    flags = parse_sets(sets or [], names)
    attacks, sources = {}, {}
    for name in names:
        cls = get_attack(name, "diffusion")
        values = {**layers.get(name, {}), **flags.get(name, {})}
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls.Config)})
        if unknown:  # only the erase.yaml layer can get here: --set names were checked against the config
            raise EraseError(f"{cfg.model}/erase.yaml attacks.{name}: unknown setting(s) {', '.join(unknown)}")
        attacks[name] = cls(cls.Config(**values))  # the constructor validates the ranges, naming the flag
        sources[name] = {"model": layers.get(name, {}), "flags": flags.get(name, {})}
    if limit < 0:
        raise EraseError(f"--limit must be >= 0, got {limit}")
    rows, source = prompt_rows(cfg, prompts, limit)
    judge = evaluator or cfg.evaluator or ("fmnist-classifier" if _fmnist(cfg) else "")
    if not judge:
        raise EraseError(f"the run in {run} has no evaluator to judge attack success: pass --evaluator DIR "
                         "(a classifier folder saved by erase)")
    run_seed = int((saved.get("run") or {}).get("seed", 0) or 0)
    return AttackPlan(run, cfg, run_seed if seed is None else seed, attacks, rows, source, judge, overwrite, progress,
                      sources, bool(base_model))


def base_run(out_dir: str | Path, model: str, concept: str) -> tuple[Path, dict]:
    """A folder standing for the unerased ``model`` and ``concept`` (its config.yaml, written once; a folder made for
    another model or concept is refused)."""
    if not str(out_dir).strip():
        raise EraseError("--base-model needs an output folder (RUN_DIR): where attacks/ goes")
    if not concept.strip():
        raise EraseError("--base-model needs --concept: the concept every attack must bring back")
    out = Path(out_dir).expanduser()
    saved = {"run": {"task": "diffusion", "seed": 0, "base_model_only": True},
             "diffusion": {"model": model, "concept": concept}}
    config = out / "config.yaml"
    if config.is_file():
        old = read_yaml(config, "run config") or {}
        if (old.get("diffusion") or {}) != saved["diffusion"] or not (old.get("run") or {}).get("base_model_only"):
            raise EraseError(f"{out} holds another run ({config}); choose an empty folder for --base-model")
        return out, old
    if out.exists() and any(out.iterdir()):
        raise EraseError(f"{out} is not empty; choose an empty or new folder for --base-model")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(yaml.safe_dump(saved, sort_keys=False), config)
    return out, saved


def read_run(run_dir: str | Path) -> tuple[Path, dict]:
    run = Path(run_dir).expanduser()
    if not str(run_dir).strip():
        raise EraseError("RUN_DIR is empty: give a finished diffusion run folder written by erase/train.py")
    if not run.is_dir():
        raise EraseError(f"RUN_DIR {run}: no such folder (a finished diffusion run written by erase/train.py)")
    if not (run / "config.yaml").is_file():
        raise EraseError(f"RUN_DIR {run} is not an erase run folder: it has no config.yaml")
    saved = read_yaml(run / "config.yaml", "run config") or {}
    if not isinstance(saved, dict) or not isinstance(saved.get("diffusion"), dict):
        task = (saved.get("run") or {}).get("task") if isinstance(saved, dict) else None
        raise EraseError(f"RUN_DIR {run} is a {task or 'non-diffusion'} run; attacks need a diffusion run "
                         "(a text-to-image model)")
    if not (run / "model").is_dir() and not (run / "delta.safetensors").is_file():
        lora = " (it saved only LoRA adapters in lora/; rerun with --save-format pipeline or delta)" \
            if (run / "lora").is_dir() else "; is the run finished?"
        raise EraseError(f"RUN_DIR {run} holds no erased model: neither model/ nor delta.safetensors{lora}")
    return run, saved


def run_config(run: Path, saved: dict) -> DiffusionConfig:
    known = {f.name for f in dataclasses.fields(DiffusionConfig)}
    cfg = DiffusionConfig(**{k: v for k, v in saved["diffusion"].items() if k in known})
    cfg.validate()
    if model_kind(cfg.model) == "ddpm":
        raise EraseError(f"RUN_DIR {run} erased from a class-conditional DDPM ({cfg.model}); attacks need a "
                         "text-conditioned model (Stable Diffusion), which has a prompt to attack")
    return cfg


def attack_names(spec: str) -> list[str]:
    """``all`` (every attack for diffusion runs) or comma-separated names, each checked by the registry."""
    if not spec.strip():
        raise EraseError(f"--attack is empty: name an attack ({', '.join(list_attacks('diffusion'))}) or 'all'")
    if spec.strip().lower() == "all":
        return list_attacks("diffusion")
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    for n in names:
        get_attack(n, "diffusion")  # an unknown name: the registry's one line with the choices
    return list(dict.fromkeys(names))


def model_layers(model: str, names: list[str]) -> dict[str, dict]:
    """The base model folder's recommended attack budgets (``erase.yaml`` ``attacks:``)."""
    attacks = model_settings(model).get("attacks") or {}
    if not isinstance(attacks, dict) or any(v is not None and not isinstance(v, dict) for v in attacks.values()):
        raise EraseError(f"{model}/erase.yaml: expected 'attacks: {{attack name: {{setting: value}}}}'")
    return {n: dict(attacks.get(n) or {}) for n in names}


def parse_sets(sets: list[str], names: list[str]) -> dict[str, dict]:
    """``--set FIELD=VALUE`` (every named attack that has FIELD) or ``--set ATTACK.FIELD=VALUE`` -> name -> {field: value}."""
    out: dict[str, dict] = {n: {} for n in names}
    for item in sets:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise EraseError(f"--set {item!r}: expected FIELD=VALUE or ATTACK.FIELD=VALUE, e.g. --set population=64")
        target, _, fname = key.strip().rpartition(".")
        fname = fname.replace("-", "_")
        if target and target.lower() not in names:
            raise EraseError(f"--set {item!r}: attack {target!r} is not among those run ({', '.join(names)})")
        hit = False
        for name in [target.lower()] if target else names:
            cls = get_attack(name, "diffusion")
            fields = {f.name for f in dataclasses.fields(cls.Config)}
            if fname in fields:
                out[name][fname] = _convert(typing.get_type_hints(cls.Config)[fname], text, item)
                hit = True
        if not hit:
            known = sorted({flag_name(f.name)[2:] for n in names for f in dataclasses.fields(get_attack(n).Config)})
            raise EraseError(f"--set {item!r}: no attack run here has a setting {fname.replace('_', '-')!r}; "
                             f"settings: {', '.join(known)}")
    return out


def _convert(kind, text: str, item: str):
    if kind is str:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise EraseError(f"--set {item!r}: expected {'true/false' if kind is bool else kind.__name__}, got {text!r}")


def _fmnist(cfg: DiffusionConfig) -> bool:
    return is_fmnist(cfg.model)


def prompt_rows(cfg: DiffusionConfig, prompts: str | None, limit: int) -> tuple[list[PromptRow], str]:
    """The attack prompt set, each row with the concept it must not show."""
    concepts = make_concepts(cfg.concept_list(), cfg.retain_concepts, cfg.paraphrases, _fmnist(cfg), None)
    if prompts is None:
        texts = [(c, t) for c in concepts.concepts for t in [concepts.prompt(c), *concepts.paraphrases.get(c, [])]]
        rows = [PromptRow(str(i), t, EVAL_SEED + i, None, concept=c) for i, (c, t) in enumerate(texts)]
        return (rows[:limit] if limit else rows), DEFAULT_PROMPTS
    if not prompts.strip():
        raise EraseError("--prompts is empty: give a CSV with a 'prompt' column (leave the flag out for "
                         f"{DEFAULT_PROMPTS})")
    rows = load_prompts(prompts, limit=limit or None)
    if any(not r.prompt for r in rows):
        line = next(i for i, r in enumerate(rows) if not r.prompt) + 2
        raise EraseError(f"{prompts}, line {line}: empty prompt; attacks need prompt text")
    if any(not r.concept for r in rows):
        if len(concepts.concepts) > 1:
            raise EraseError(f"--prompts {prompts}: the run erased {len(concepts.concepts)} concepts; the CSV needs a "
                             "'class' (or 'label') column naming each row's concept")
        rows = [r if r.concept else dataclasses.replace(r, concept=concepts.concept) for r in rows]
    return rows, str(prompts)
