"""Attack every prompt of a plan against the erased model, one per-prompt record at a time (resumable).

Per prompt and attack, under ``RUN_DIR/attacks/<name>/``: the attacked images and, with the same
seeds, the base and erased models' plain images (``images/``), the embedding when the attack made one
(``embeddings/<case>.safetensors``), and ``records/<case>.json``, written last: a rerun skips every
prompt whose record exists and matches the row (``--overwrite`` clears the attack's folder first).
The pre-attack verdict is the erased model's plain image at the row's own seed, judged once per
prompt whatever the attack, so attacks run at different times still agree on it (their union needs that).

Under ``accelerate launch`` (or torchrun) the prompts are split over the processes (rows i, i + N, ...);
each process writes its own prompts' records, then the main process reads them all back and writes
the outputs and the union. A rerun with another number of processes still skips every finished prompt.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erase.attacks.base import AttackContext
from erase.attacks.judge import class_of, evaluator_judge
from erase.attacks.success import outcome
from erase.classifier.models import load_classifier
from erase.diffusion.generation import load_generator, resolve_erased, save_png, trained_text_encoder
from erase.diffusion.task import DiffusionTask
from erase.diffusion.text_model import TextConditionedUNet
from erase.errors import EraseError
from erase.prompts import PromptRow
from erase.robustness.plan import AttackPlan
from erase.robustness.records import done_record, image_file, record_file, row_fields, slug
from erase.robustness.report import write_attack_outputs, write_union
from erase.storage import atomic_write_json, save_safetensors

# "erased_model": when the run finished, so records of an earlier model in a rerun folder are not reused.
SETTINGS_KEYS = ("attack", "budget", "evaluator", "seed", "erased_model", "sample_steps", "guidance")


def execute(plan: AttackPlan) -> dict:
    """Run every attack of ``plan``; returns the union summary written to ``RUN_DIR/attacks/robustness.json``."""
    settings = {name: folder_settings(plan, name, attack) for name, attack in plan.attacks.items()}
    for name in plan.attacks:  # every refusal before any model loads
        check_folder(plan.run_dir / "attacks" / name, settings[name], plan.overwrite)
    # lazy: accelerate's import pulls in most of torch.distributed
    from accelerate import PartialState

    # Under `accelerate launch` / torchrun each process attacks its share of the prompts (rows i, i + N, ...);
    # the main process then reads every record back and writes the outputs.
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: accelerate sets up gloo for CPU processes
    device = state.device
    evaluator = load_classifier(plan.evaluator).to(device).eval()
    names = list(evaluator.config.class_names)
    for concept in dict.fromkeys(r.concept for r in plan.rows):
        class_of(concept, names)  # a concept the judge cannot see fails before the diffusion models load
    judge = evaluator_judge(evaluator)
    task = DiffusionTask(dataclasses.replace(plan.diffusion), seed=plan.seed, device=device, streams=())
    encoder = None
    if plan.base_only:
        erased = task.base.unet
    else:
        spec, delta, _ = resolve_erased(str(plan.run_dir), plan.diffusion.model)
        generator = load_generator(spec, device, delta)
        # A run that trained the text encoder (advunlearn) is attacked through it: attacks encode with ctx.encoder,
        # and the model they generate with reads its empty prompt through the same encoder (as its pipeline does).
        encoder = trained_text_encoder(generator, task.base.pipe)
        erased = generator.unet if encoder is None else TextConditionedUNet(
            generator.unet, encoder, task.text_stack, None if task.kind == "sd" else task.predict)
    judge_info = {"evaluator": plan.evaluator, "rule": "the evaluator's top-1 class is the row's concept",
                  "classes": names, "plain_images_per_prompt": 1, "guidance": task.guidance,
                  "sample_steps": plan.diffusion.sample_steps}
    n, rank = state.num_processes, state.process_index
    for name, attack in plan.attacks.items():
        attack.check_task(task)
        folder = plan.run_dir / "attacks" / name
        if state.is_main_process:
            if plan.overwrite:
                shutil.rmtree(folder, ignore_errors=True)
            atomic_write_json(settings[name], folder / "settings.json")
        state.wait_for_everyone()
        # One work folder per process: an attack that learns once per concept (concept inversion) learns it in
        # each process, and never two processes in one checkpoint folder.
        work = folder / "work" / (f"process-{rank}-of-{n}" if n > 1 else "")
        ctx = AttackContext(task, erased, task.concepts.concept, judge, seed=plan.seed,
                            progress=plan.progress and state.is_local_main_process, base=task.base.unet,
                            workdir=work, encoder=encoder)
        for row in tqdm(plan.rows[rank::n], desc=name, disable=not ctx.progress):
            if done_record(folder, row) is None:
                attack_row(attack, row, ctx, task, task.base.unet, folder, f"{rank}/{n}")
        state.wait_for_everyone()
        if state.is_main_process:
            records = [done_record(folder, row) for row in plan.rows]
            write_attack_outputs(folder, name, plan, records, settings[name], judge_info)
    if state.is_main_process:
        summary = write_union(plan, judge_info)
    state.wait_for_everyone()
    return summary if state.is_main_process else json.loads((plan.run_dir / "attacks" / "robustness.json").read_text())


def folder_settings(plan: AttackPlan, name: str, attack) -> dict:
    """What the records of an attack folder depend on (besides each prompt's own row)."""
    return {"attack": name, "budget": dataclasses.asdict(attack.config), "evaluator": plan.evaluator,
            "seed": plan.seed, "erased_model": "the base model" if plan.base_only else _finished(plan.run_dir),
            "sample_steps": plan.diffusion.sample_steps,
            "guidance": plan.diffusion.guidance, "budget_sources": plan.sources.get(name, {})}


def _finished(run: Path) -> str | None:
    f = run / "run.json"
    try:
        return json.loads(f.read_text()).get("finished") if f.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def check_folder(folder: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to mix records made under other settings into one folder (resume needs the same ones)."""
    f = folder / "settings.json"
    if overwrite or not f.is_file():
        return
    old = json.loads(f.read_text())
    diff = [k for k in SETTINGS_KEYS if old.get(k) != settings.get(k)]
    if diff:
        raise EraseError(f"{folder} holds attack results made with other settings (differs in: {', '.join(diff)}); "
                         "pass --overwrite to redo them")


def attack_row(attack, row: PromptRow, ctx: AttackContext, task: DiffusionTask, base_unet, folder: Path,
               process: str = "0/1") -> dict:
    t0 = time.perf_counter()
    result = attack.run(row, ctx)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        plain = {"base": task.generate(base_unet, task.encode([row.prompt]), result.seeds, row.guidance),
                 "erased": task.generate(ctx.model, ctx.encode([row.prompt]), result.seeds, row.guidance)}
    # The pre-attack verdict: the erased model's plain image at the row's own seed (result.seeds[0]).
    plain_judged = [bool(v) for v in ctx.judge(plain["erased"][:1], ctx.concept_of(row)).tolist()]
    for tag, images in (*plain.items(), ("attacked", result.images)):
        for k, img in enumerate(images):
            save_png(img, folder / image_file(row.case, tag, k))
    embedding_file = None
    if result.adversarial_embedding is not None:
        embedding_file = f"embeddings/{slug(row.case)}.safetensors"
        save_safetensors({"embedding": result.adversarial_embedding}, folder / embedding_file,
                         {"prompt": row.prompt, "attack": attack.name, "shape": "(L, D): the condition the UNet reads"})
    for key, tensor in result.tensors.items():  # one file per tensor: {key: tensor}, e.g. a textual-inversion word
        name = f"embeddings/{slug(row.case)}.{slug(key)}.safetensors"
        save_safetensors({key: tensor}, folder / name, {"prompt": row.prompt, "attack": attack.name})
        embedding_file = embedding_file or name
    o = outcome(plain_judged, result.judged or [])
    record = {**row_fields(row), "adversarial_prompt": result.adversarial_prompt, "embedding_file": embedding_file,
              "seeds": result.seeds, "plain_judged": plain_judged, "attacked_judged": result.judged,
              "pre": o.pre, "adversarial": o.adversarial, "success": o.success, "seconds": round(seconds, 3),
              "process": process,
              "info": {k: v for k, v in result.record().items()
                       if k not in ("case", "prompt", "adversarial_prompt", "seeds", "judged", "success")}}
    atomic_write_json(record, record_file(folder, row.case))  # last: marks the prompt done
    if ctx.workdir is not None:  # the prompt's engine run (checkpoints for resuming inside it) is no longer needed
        shutil.rmtree(ctx.workdir / attack.name / slug(row.case), ignore_errors=True)
    return record
