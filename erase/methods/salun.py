"""salun — Saliency Unlearning (Fan et al., ICLR 2024): random labeling restricted to salient weights.

Saliency: s = |∇θ ℓ_f(θo; Df)|, the magnitude of the forget-loss gradient at the original weights
(summed over the whole forget set), ranked globally over all parameters; the top
``mask_fraction`` (default 50 %, the paper's choice) are trainable, the rest stay bit-exact.
Then Random Labeling (see rl.py) runs on the masked parameters only. On a diffusion task the
same file runs the generation variant: the task's ``relabel`` maps the concept to another
concept (ε(x_t|c) → sg ε(x_t|c')), and its ``loss`` on retain data is the denoising MSE.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from erase.errors import EraseError
from erase.fields import opt
from erase.methods.rl import RandomLabel, RLConfig
from erase.registry import register_method
from erase.saliency import density_report, gradient_statistics, load_masks, save_masks, topk_masks
from erase.storage import atomic_write_text


@dataclass
class SalUnConfig(RLConfig):
    mask_fraction: float = opt(0.5, "share of parameters (ranked by saliency) that may change")
    mask_scope: str = opt("global", "rank saliency over all parameters or within each tensor", ("global", "layer"))
    mask_file: str = opt("", "use this saved mask (safetensors of bool tensors) instead of computing one")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.mask_fraction <= 1:
            raise EraseError(f"--mask-fraction must be in (0, 1], got {self.mask_fraction}")
        if self.mask_file and not Path(self.mask_file).expanduser().is_file():
            raise EraseError(f"--mask-file {self.mask_file} not found")


@register_method("salun")
class SalUn(RandomLabel):
    Config = SalUnConfig

    LORA_ERROR = ("salun's saliency mask is defined on the model's own weights; train full weights "
                  "(--lora-rank 0, --save-format pipeline or delta)")

    def check_task_config(self, task_cfg):
        super().check_task_config(task_cfg)
        if task_cfg.trains_adapters():
            raise EraseError(self.LORA_ERROR)

    def check_task(self, task):
        if task.trains_adapters:
            raise EraseError(self.LORA_ERROR)

    def setup(self, ctx):
        cfg = self.config
        cached = ctx.output_dir / "saliency_mask.safetensors"
        source = cfg.mask_file or (str(cached) if cached.is_file() else "")
        if source:
            masks = load_masks(source)
            check_masks_fit(masks, ctx.unwrapped, source)
        else:
            torch.manual_seed(ctx.seed)  # the augmentation of the forget batches
            scores = gradient_statistics(
                ctx.unwrapped, ctx.task.loss, ctx.task.iterate("forget", augment=True),
                power=1, reduce="sum_then_abs", device=ctx.device, desc="saliency", progress=ctx.progress)
            masks = topk_masks(scores, cfg.mask_fraction, cfg.mask_scope)
            if ctx.accelerator.is_main_process:
                save_masks(masks, cached, {"fraction": cfg.mask_fraction, "scope": cfg.mask_scope})
                atomic_write_text(density_report(masks) + "\n", ctx.output_dir / "saliency_density.md")
        self.masks = masks

    def parameter_masks(self, ctx):
        return self.masks


def check_masks_fit(masks: dict[str, torch.Tensor], model: torch.nn.Module, source) -> None:
    """A mask file made for another model (other names or shapes) gets one line, not the engine's ValueError."""
    params = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(params))
    shapes = [f"{n}: mask {tuple(m.shape)} vs parameter {tuple(params[n].shape)}"
              for n, m in masks.items() if n in params and m.shape != params[n].shape]
    if not masks or unknown or shapes:
        what = ("it holds no tensors" if not masks else
                f"{len(unknown)} of its {len(masks)} tensors name parameters this model does not have, e.g. {unknown[0]}"
                if unknown else f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
        raise EraseError(f"mask file {source} does not fit this model: {what}; was it saved for another model?")
