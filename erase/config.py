"""Typed run configuration: dataclass defaults < YAML file (``--config``) < command-line flags.

Three sections, each a dataclass whose fields carry their help text:
``run`` (engine settings), the task's section (``classifier`` ...), and ``method`` (the chosen
method's own config). OmegaConf merges and type-checks them; the resolved config is written as
``config.yaml`` beside every output so a run can be reproduced exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from erase.engine.method import MethodConfig
from erase.errors import EraseError
from erase.fields import opt
from erase.methods import get_method, list_methods
from erase.storage import atomic_write_text, model_settings, read_yaml, yaml_problem


@dataclass
class RunConfig:
    task: str = opt("", "classifier or diffusion (default: diffusion when --concept is given, else classifier)")
    method: str = opt("salun", "unlearning method (see `--list-methods`)")
    output_dir: str = opt("", "where the run writes its model, metrics and checkpoints (default: runs/<method>-<target>)")
    seed: int = opt(0, "random seed of the run (data order, random labels, initialisation)")
    overwrite: bool = opt(False, "replace a finished run already in --output-dir")
    resume: bool = opt(False, "continue an interrupted run from its latest checkpoint in --output-dir "
                              "(refused when other settings differ from the run's config.yaml)")
    grad_accum: int = opt(1, "micro-batches accumulated per optimiser step")
    mixed_precision: str = opt("no", "mixed precision through accelerate", ("no", "fp16", "bf16"))
    checkpoint_every: int = opt(0, "optimiser steps between checkpoints (0: at the end of each phase only)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    log_every: int = opt(10, "optimiser steps between log lines (log.jsonl and trackers)")
    report_to: str = opt("none", "accelerate tracker to log to", ("none", "tensorboard", "wandb", "all"))
    progress: bool = opt(True, "show progress bars")

    def validate(self) -> None:
        """Range checks, so a bad value fails before any model loads or any output is written."""
        for name, low in (("grad_accum", 1), ("checkpoint_every", 0), ("keep_checkpoints", 1), ("log_every", 1)):
            value = getattr(self, name)
            if value < low:
                raise EraseError(f"{_flag(name)} must be >= {low}, got {value}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise EraseError(f"{_flag(f.name)} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")


def task_registry() -> dict[str, tuple[type, type]]:
    """Task name -> (config dataclass, task adapter class); imported lazily to keep start-up fast."""
    # lazy: the task adapters import diffusers; --help and classifier runs start without it
    from erase.classifier.task import ClassifierConfig, ClassifierTask
    from erase.diffusion.task import DiffusionConfig, DiffusionTask

    # The flagship first: --help shows the task groups in this order.
    return {"diffusion": (DiffusionConfig, DiffusionTask), "classifier": (ClassifierConfig, ClassifierTask)}


@dataclass
class Resolved:
    run: RunConfig
    task_name: str
    task: typing.Any
    method_cls: type
    method: MethodConfig

    def to_dict(self) -> dict:
        return {"run": dataclasses.asdict(self.run), self.task_name: dataclasses.asdict(self.task),
                "method": {"name": self.method_cls.name, **dataclasses.asdict(self.method)}}

    def save(self, path: Path) -> None:
        atomic_write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), path)


# Settings a resumed run may change: how the output folder is treated and what is shown, logged or
# checkpointed, none of which changes a weight (resume is bit-identical at any checkpoint cadence).
# Everything else, evaluation settings included, must match: config.yaml describes the whole run.
RESUME_MAY_CHANGE = frozenset({"run.resume", "run.overwrite", "run.output_dir", "run.progress", "run.log_every",
                               "run.report_to", "run.checkpoint_every", "run.keep_checkpoints"})


def diff_configs(saved: dict, new: dict, ignore: frozenset[str] = RESUME_MAY_CHANGE) -> list[str]:
    """``"section.key: saved -> new"`` for every setting that differs between two resolved configs.

    Both sides go through YAML first, so a config compares equal to the ``config.yaml`` it wrote.
    """
    a, b = (_flatten(yaml.safe_load(yaml.safe_dump(d))) for d in (saved, new))
    missing = "<absent>"
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}" for k in sorted(a.keys() | b.keys())
            if k not in ignore and a.get(k, missing) != b.get(k, missing)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):  # an empty mapping adds no keys: {} and {x: 1} differ in x alone
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# -- argparse generated from the dataclasses ------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_fields(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, section: str,
               skip: set[str] = frozenset()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        t = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        # Say the default unless the help text already explains it ("default: diffusion when ...").
        told = "(default" in help_text
        kwargs = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS}
        if t is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                help=help_text if told else f"{help_text} (default: {default})", **kwargs)
            continue
        if t is dict or typing.get_origin(t) is dict:
            kwargs["type"] = _yaml_flag(_flag(f.name), _yaml_mapping)
            metavar = "YAML"
        elif t is list or typing.get_origin(t) is list:
            kwargs["type"] = _yaml_flag(_flag(f.name), _yaml_list)
            metavar = "LIST"
        else:
            kwargs["type"] = t
            metavar = t.__name__.upper()
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name), metavar=metavar,
                            help=help_text if told else f"{help_text} (default: {default!r})", **kwargs)


def _yaml_mapping(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise EraseError(f"expected a mapping like '{{name: 1.0}}', got {text!r}")
    return value


def _yaml_list(text: str) -> list:
    """'[1, 2]' or '1,2' -> a list (YAML-typed items)."""
    value = yaml.safe_load(text if text.strip().startswith("[") else f"[{text}]")
    if not isinstance(value, list):
        raise EraseError(f"expected a list like '1,2,3', got {text!r}")
    return value


def _yaml_flag(flag: str, parse: typing.Callable[[str], typing.Any]) -> typing.Callable[[str], typing.Any]:
    """An argparse ``type`` for a YAML-valued flag whose errors name the flag in one line.

    It raises EraseError rather than ArgumentTypeError on purpose: argparse would print its whole usage
    text above the message, and PyYAML's own message spans three lines.
    """

    def convert(text: str):
        try:
            return parse(text)
        except yaml.YAMLError as err:
            raise EraseError(f"{flag}: invalid YAML in {text!r} ({yaml_problem(err)})") from None
        except EraseError as err:
            raise EraseError(f"{flag}: {err}") from None

    convert.__name__ = parse.__name__.lstrip("_")  # argparse names the type in its own messages
    return convert


def _merge(cls: type, *layers: dict):
    try:
        base = OmegaConf.structured(cls)
        merged = OmegaConf.merge(base, *[OmegaConf.create(layer) for layer in layers if layer])
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        msg = str(err).splitlines()[0]
        raise EraseError(f"invalid {cls.__name__} setting: {msg}") from None


def config_sections() -> tuple[str, ...]:
    return ("run", *task_registry(), "method")


def load_yaml(path: str | None) -> dict:
    """A ``--config`` file: top-level sections run / <task> / method, each a mapping."""
    if path is None:
        return {}
    p = Path(path).expanduser()
    if not str(path).strip():
        raise EraseError("--config is empty: give a YAML file with run / <task> / method sections")
    if not p.is_file():
        raise EraseError(f"--config file not found: {p}")
    data = read_yaml(p, "--config file") or {}
    sections = config_sections()
    if not isinstance(data, dict):
        raise EraseError(f"--config file {p}: expected a mapping with sections {' / '.join(sections)}")
    # A misspelt section ("clasifier:") would otherwise be ignored without a word.
    unknown = [str(k) for k in data if k not in sections]
    if unknown:
        raise EraseError(f"--config file {p}: unknown section(s) {', '.join(map(repr, unknown))}; "
                         f"valid sections: {', '.join(sections)}")
    for name, body in data.items():
        if body is None:
            data[name] = {}
        elif not isinstance(body, dict):
            raise EraseError(f"--config file {p}: section {name!r} must be a mapping of settings, "
                             f"got {type(body).__name__}")
    return data


def resolve(run_layer: dict, task_layer: dict, method_layer: dict, file_cfg: dict) -> Resolved:
    """Merge defaults < YAML < CLI for each section and validate names."""
    run = _merge(RunConfig, file_cfg.get("run", {}), run_layer)
    run.validate()
    method_name = method_layer.pop("name", None) or run.method
    if "method" in file_cfg and "name" in file_cfg["method"] and "method" not in run_layer:
        method_name = file_cfg["method"]["name"]
    tasks = task_registry()
    # ``"concept" in``, not its truth: ``--concept ''`` is a diffusion run with an empty concept (its own error).
    task_name = run.task or ("diffusion" if ("concept" in task_layer or file_cfg.get("diffusion")) else "classifier")
    if task_name not in tasks:
        raise EraseError(f"unknown task {task_name!r}; choose one of: {', '.join(tasks)}")
    run.task, run.method = task_name, method_name
    method_cls = get_method(method_name, task_name)
    task_cfg = _merge(tasks[task_name][0], file_cfg.get(task_name, {}), task_layer)
    task_cfg.validate()
    file_method = {k: v for k, v in file_cfg.get("method", {}).items() if k != "name"}
    # Layers: the method's defaults < its defaults for this task < the base model's recommended
    # recipe (erase.yaml shipped beside the model) < the YAML file < command-line flags.
    recipe = model_recipe(task_cfg.base_model(), method_cls.name)
    method_cfg = _merge(method_cls.Config, method_cls.task_defaults.get(task_name, {}), recipe, file_method, method_layer)
    # The Method constructor validates the config's ranges; then the method may reject the task from
    # its config alone (e.g. esd-x on a DDPM folder) before any model loads or any image is generated.
    method_cls(method_cfg).check_task_config(task_cfg)
    return Resolved(run, task_name, task_cfg, method_cls, method_cfg)


def model_recipe(model: str, method: str) -> dict:
    """Hyper-parameters a model folder recommends for ``method`` (``erase.yaml``: ``methods: {name: {...}}``)."""
    settings = model_settings(model)
    methods = settings.get("methods") or {}
    recipe = methods.get(method) if isinstance(methods, dict) else None
    if not isinstance(methods, dict) or (recipe is not None and not isinstance(recipe, dict)):
        raise EraseError(f"model recipe {model}/erase.yaml: expected 'methods: {{method name: {{setting: value}}}}'")
    return dict(recipe or {})


USAGE = "%(prog)s [--concept TEXT | --forget SPEC --original MODEL] [--method NAME] [flags]"


def build_parser(method_name: str | None, task_name: str | None, prog: str, description: str) -> argparse.ArgumentParser:
    """The parser for ``task_name``; ``task_name=None`` (``--help`` without a task) shows every task's flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description, usage=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="YAML file with run / <task> / method sections; flags override it")
    parser.add_argument("--list-methods", action="store_true", help="print the registered methods for the task and exit")
    add_fields(parser.add_argument_group("run"), RunConfig, "run")
    tasks = task_registry()
    selects = {"diffusion": " (selected by --concept)", "classifier": " (the default without --concept)"}
    for name, (cfg_cls, _) in tasks.items():
        if task_name in (None, name):
            add_fields(parser.add_argument_group(f"{name} task{selects.get(name, '') if task_name is None else ''}"),
                       cfg_cls, name)
    if method_name:
        cls = get_method(method_name, task_name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        # The defaults printed per flag are the method's own; say which ones a task replaces.
        overrides = [f"on {t} these defaults apply instead: " + ", ".join(f"{_flag(k)} {v}" for k, v in d.items())
                     for t, d in cls.task_defaults.items() if task_name in (None, t)]
        text = "\n".join(x for x in [doc, *overrides] if x)
        add_fields(parser.add_argument_group(f"method {cls.name}", text or None), cls.Config, "method")
    else:
        listing = [f"methods for {t}: {', '.join(list_methods(t))}" for t in tasks if task_name in (None, t)]
        parser.epilog = "\n".join([*listing, "Add --method NAME to --help to see that method's own flags (lr, epochs, ...)."])
    return parser


# Flags whose default is empty ("not given") but whose value, once given, must not be blank.
VALUE_REQUIRED = {"concept": "name the concept to erase, e.g. --concept trouser",
                  "original": "the trained model to unlearn from (a folder saved by erase, or a bundled name)",
                  "data_root": "a folder holding the dataset (leave the flag out for the default)",
                  "output_dir": "a folder for the run's outputs (leave the flag out for runs/<method>-<target>)",
                  "mask_file": "a saved saliency mask (.safetensors)"}


def _check_not_blank(section: str, key: str, value) -> None:
    """An explicitly given but blank string (``--forget ''``, an unset shell variable) is a mistake.

    Blank would otherwise mean "the default" for some flags and fail deep inside the run for others.
    """
    if not isinstance(value, str) or value.strip():
        return
    # Method flags with a non-empty default have choices (argparse enforces them) or are number lists
    # that the method config's validate() rejects when blank.
    cls = RunConfig if section == "run" else None if section == "method" else task_registry()[section][0]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)} if cls else {}
    if key in VALUE_REQUIRED or defaults.get(key) not in ("", None):
        hint = VALUE_REQUIRED.get(key) or f"leave the flag out for the default {defaults.get(key)!r}"
        raise EraseError(f"{_flag(key)} is empty: {hint}")


def parse_cli(argv: list[str] | None, prog: str = "erase/train.py", description: str = "") -> tuple[Resolved, argparse.Namespace]:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("--task")
    pre.add_argument("--config")
    pre.add_argument("--concept")
    known, _ = pre.parse_known_args(argv)
    file_cfg = load_yaml(known.config)
    # ``is not None``: an empty --concept still means a diffusion run (whose parser knows the flag), so
    # the user gets "--concept is empty" instead of argparse's "unrecognized arguments: --concept".
    chosen = (known.task or file_cfg.get("run", {}).get("task")
              or ("diffusion" if known.concept is not None else None))
    if chosen is not None and chosen not in task_registry():
        raise EraseError(f"unknown task {chosen!r}; choose one of: {', '.join(task_registry())}")
    method_name = known.method or file_cfg.get("method", {}).get("name") or file_cfg.get("run", {}).get("method")
    if "-h" in argv or "--help" in argv:
        # Help before a task is chosen shows every task's flags, so `--help` alone finds --concept.
        help_task = chosen
        if method_name and chosen is None:
            supported = [t for t in task_registry() if t in get_method(method_name).tasks]
            help_task = supported[0] if len(supported) == 1 else None
        build_parser(method_name, help_task, prog, description).parse_args(argv)  # prints the help and exits
    task_name = chosen or "classifier"
    parser = build_parser(method_name or RunConfig.method, task_name, prog, description)
    ns = parser.parse_args(argv)
    layers: dict[str, dict] = {"run": {}, task_name: {}, "method": {}}
    for dest, value in vars(ns).items():
        section, _, key = dest.partition(".")
        if key:
            _check_not_blank(section, key, value)
            layers[section][key] = value
    if method_name and "method" not in layers["run"]:
        layers["run"]["method"] = method_name
    resolved = resolve(layers["run"], layers[task_name], layers["method"], file_cfg)
    return resolved, ns
