"""The one small training loop the zoo scripts share: deterministic batches, tqdm, resumable.

It is deliberately not the erase engine: these scripts build the models the engine is later
measured on, and they must keep working (and reproduce the shipped weights) while the engine
changes. Checkpoints go through ``accelerate`` (``save_state``/``load_state``, weights as
safetensors, optimizer/scheduler loaded with ``weights_only=True``); a killed run restarts from
the last checkpoint with the same batches, because batch ``k`` depends only on (seed, k).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from tqdm.auto import tqdm

from erase.storage import atomic_write_json, save_safetensors
from erase.zoo.common import Timer, read_json


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of batch ``step``: epochs are seeded permutations, so any step can be recomputed."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size]


def run(
    accelerator: Accelerator,
    step_fn: Callable[[int], float],
    num_steps: int,
    work_dir: str | Path,
    checkpoint_every: int,
    desc: str,
    on_save: Callable[[Path], None] | None = None,
    on_resume: Callable[[Path], None] | None = None,
) -> dict:
    """Call ``step_fn(step)`` for the remaining steps; returns {"steps", "seconds", "final_loss"}.

    ``on_save``/``on_resume`` handle state that accelerate does not track (EMA weights), as
    safetensors files in the checkpoint folder.
    """
    work_dir = Path(work_dir)
    ckpt = work_dir / "checkpoint"
    progress_file = work_dir / "progress.json"
    progress = read_json(progress_file, {"step": 0, "seconds": 0.0, "loss": None})
    start = progress["step"]
    if start:
        accelerator.load_state(str(ckpt))
        if on_resume:
            on_resume(ckpt)
        accelerator.print(f"resumed {desc} from step {start} ({progress['seconds']:.0f} s so far)")
    timer = Timer(progress["seconds"])
    smooth = progress["loss"]

    def save(step: int) -> None:
        accelerator.save_state(str(ckpt))
        if on_save:
            on_save(ckpt)
        atomic_write_json({"step": step, "seconds": timer.seconds, "loss": smooth}, progress_file)

    bar = tqdm(range(start, num_steps), initial=start, total=num_steps, desc=desc,
               disable=not accelerator.is_main_process, mininterval=5)
    for step in bar:
        loss = step_fn(step)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss} at step {step}; last checkpoint in {ckpt}")
        smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
        bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
        if (step + 1) % checkpoint_every == 0 and step + 1 < num_steps:
            save(step + 1)
    save(num_steps)
    return {"steps": num_steps, "seconds": round(timer.seconds, 1), "final_loss": smooth}


def ema_hooks(ema, names: list[str]):
    """``on_save``/``on_resume`` for :func:`run` that keep a diffusers ``EMAModel`` in the checkpoint
    as ``ema.safetensors`` (tensor names = parameter names, the EMA step in the metadata)."""
    def on_save(ckpt: Path) -> None:
        save_safetensors(dict(zip(names, ema.shadow_params)), ckpt / "ema.safetensors",
                         metadata={"optimization_step": str(ema.optimization_step)})

    def on_resume(ckpt: Path) -> None:
        with safe_open(str(ckpt / "ema.safetensors"), "pt") as f:
            ema.shadow_params = [f.get_tensor(n) for n in names]
            ema.optimization_step = int(f.metadata()["optimization_step"])

    return on_save, on_resume
