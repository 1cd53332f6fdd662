"""esd-x / esd-u — Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023).

Each step: partially sample x_t under the concept c for a random number of DDIM steps, then train
the student so that ε_θ(x_t, c) matches the frozen base model's negatively guided prediction

    target = ε_θo(x_t, ∅) − η · (ε_θo(x_t, c) − ε_θo(x_t, ∅)).

``esd-x`` trains only the text attention — the cross-attention layers on SD, as the model's layer
map names them (``DenoisingTask.layer_map``; erases the concept where the prompt names it),
``esd-u`` everything except them (erases it unconditionally). Defaults from the
authors' code: η (negative guidance) 1.0, sampling guidance 3, 50 DDIM steps, lr 1e-5 (Adam),
1000 iterations, one image per step. The original CompVis code samples x_t with the model being
edited (``--sampler student``, the default here); the authors' newer diffusers script samples
with the frozen base (``--sampler base``). For class-conditional DDPMs the "prompt" is the class
and ∅ the null class; ``esd-x`` needs cross-attention, so DDPMs take ``esd-u``.

Flow models (SD3, FLUX) predict a velocity; the same target is formed from the teacher's velocities.
On guidance-distilled FLUX.1-dev, which has no negative prompt but a *guidance embedding*:

* ∅ is the encoded empty prompt (FLUX's pipeline has no negative side; the authors' FLUX code,
  ``utils/esd_trainer.py`` ``FluxESDAdapter``, encodes ``""`` for its null prediction);
* x_t is partially sampled by the pipeline's own call with ``--sample-guidance`` as the embedded guidance (the
  authors' ``--inference_guidance_scale``, 3.5 there; erase keeps ESD's 3 for every family: pass 3.5 to match);
* the teacher's ε(x_t, c) and ε(x_t, ∅) **and** the student's prediction are all evaluated at one embedded
  guidance, ``--guidance-embedding`` (1, the authors' ``esd_flux.py`` ``--guidance_scale`` default, used for
  all three transformer calls there). Why 1: ESD builds its own guidance, e_∅ − η(e_c − e_∅), from separate
  conditional and unconditional predictions; a guidance-distilled model at embedded guidance g imitates
  classifier-free guidance e_∅ + g(e_c − e_∅) of its teacher, so g = 1 gives the plain conditional prediction,
  the quantity ESD's formula expects, instead of guidance compounded inside each term. Why the student at the
  same value: the loss must compare like with like. A student read at another embedded guidance (say the
  pipeline's 3.5) would differ from the target by the guidance gap F(x, c, 3.5) − F(x, c, 1) on every x_t even
  with the concept already erased, and training would spend itself removing that gap: an edit of how the
  embedded guidance acts, not of the concept.
Models without a guidance embedding (SD, SDXL, SD3, FLUX.1-schnell) ignore ``--guidance-embedding``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from erase.engine.masking import whole
from erase.engine.method import Method, MethodConfig, Phase
from erase.errors import EraseError
from erase.fields import below_minimum, opt
from erase.registry import register_method


@dataclass
class ESDConfig(MethodConfig):
    max_steps: int = opt(1000, "training iterations (each samples fresh x_t)")
    lr: float = opt(1e-5, "learning rate")
    optimizer: str = opt("adam", "optimiser", ("sgd", "adamw", "adam"))
    weight_decay: float = opt(0.0, "weight decay")
    batch_size: int = opt(1, "images sampled per step")
    negative_guidance: float = opt(1.0, "η: how far the target is pushed away from the concept")
    sample_guidance: float = opt(3.0, "classifier-free guidance while sampling x_t (FLUX: the embedded guidance of "
                                 "the pipeline's call; the authors' FLUX script samples at 3.5)")
    guidance_embedding: float = opt(1.0, "guidance-distilled models (FLUX.1-dev): the embedded guidance of the "
                                    "teacher's conditional and unconditional predictions and of the student's "
                                    "(the authors' FLUX script: 1); ignored by models without a guidance embedding")
    ddim_steps: int = opt(50, "DDIM steps of the partial sampling schedule")
    sampler: str = opt("student", "which model samples x_t: the one being edited (original ESD) or the frozen base",
                       ("student", "base"))
    teacher_dtype: str = opt("auto", "frozen teacher precision: auto (fp16 on GPU, fp32 on CPU), fp16, bf16 or fp32",
                             ("auto", "fp16", "bf16", "fp32"))

    length_fields = ()  # ESD runs exactly --max-steps steps; --epochs is not used (checked below instead)

    def validate(self) -> None:
        super().validate()
        if self.max_steps < 1:
            raise EraseError(f"--max-steps must be at least 1 (ESD trains for exactly that many steps), got {self.max_steps}")
        if self.ddim_steps < 2:
            raise EraseError(f"--ddim-steps must be at least 2, got {self.ddim_steps}")
        problems = below_minimum(self, 0, "sample_guidance", "guidance_embedding")
        if problems:
            raise EraseError("; ".join(problems))


class _ESD(Method):
    tasks = ("diffusion",)
    Config = ESDConfig
    streams = ()
    default_weights = {"esd": 1.0}
    train_cross_attention: bool = True

    DDPM_ERROR = "esd-x trains cross-attention, which a class-conditional DDPM does not have; use esd-u"

    def check_task_config(self, task_cfg):
        if self.train_cross_attention and task_cfg.model_has_cross_attention() is False:
            raise EraseError(self.DDPM_ERROR)

    def check_task(self, task):
        if not task.has_cross_attention and self.train_cross_attention:
            raise EraseError(self.DDPM_ERROR)

    def setup(self, ctx):
        if ctx.task.trains_adapters:
            self.teacher = None  # LoRA: the teacher is the same UNet with its adapters switched off
            return
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
        dt = self.config.teacher_dtype
        if dt == "auto":
            dt = "fp16" if ctx.device.type == "cuda" else "fp32"
        self.teacher = ctx.frozen_copy(dtypes[dt])

    def parameter_masks(self, ctx):
        text = ctx.task.layer_map(ctx.model).is_text_attention
        masks = {n: whole(text(n) == self.train_cross_attention) for n, _ in ctx.model.named_parameters()}
        if not any(m.any() for m in masks.values()):
            raise EraseError(f"{self.name}: the model has no parameters of the kind it trains")
        return masks

    def phases(self, ctx):
        return [Phase("esd", self.config.max_steps, ())]

    @contextmanager
    def _teacher(self, ctx):
        if self.teacher is None:
            with ctx.task.base_weights(ctx.unwrapped) as base:
                yield base
        else:
            yield self.teacher

    def target(self, ctx, x_t, t, concept: int = 0):
        task, n = ctx.task, x_t.shape[0]
        dev, g = x_t.device, self.config.guidance_embedding
        with torch.no_grad(), self._teacher(ctx) as teacher:
            tx = x_t.to(next(teacher.parameters()).dtype)
            e0 = task.predict(teacher, tx, t, task.null_condition(n, dev), guidance=g).float()
            ec = task.predict(teacher, tx, t, task.concept_condition(n, dev, concept), guidance=g).float()
        return e0 - self.config.negative_guidance * (ec - e0)

    def losses(self, batch, ctx):
        cfg, task = self.config, ctx.task
        n = cfg.batch_size
        # Several concepts: one drawn per step (drawn only then, so a one-concept run's random stream is unchanged).
        k = int(torch.randint(0, task.n_concepts, (1,))) if task.n_concepts > 1 else 0
        stop = int(torch.randint(0, cfg.ddim_steps, (1,)))
        seeds = torch.randint(0, 2**31 - 1, (n,)).tolist()
        if cfg.sampler == "student":
            x_t, t = task.partial_sample(ctx.unwrapped, n, stop, cfg.ddim_steps, cfg.sample_guidance, seeds, k)
        else:
            with self._teacher(ctx) as teacher:
                x_t, t = task.partial_sample(teacher, n, stop, cfg.ddim_steps, cfg.sample_guidance, seeds, k)
        x_t = x_t.detach().to(ctx.device, torch.float32)
        t = torch.as_tensor(t, device=ctx.device).expand(n)
        pred = task.predict(ctx.model, x_t, t, task.concept_condition(n, ctx.device, k), guidance=cfg.guidance_embedding)
        return {"esd": F.mse_loss(pred.float(), self.target(ctx, x_t, t, k))}


@register_method("esd-x")
class ESDx(_ESD):
    __doc__ = __doc__
    train_cross_attention = True


@register_method("esd-u")
class ESDu(_ESD):
    __doc__ = __doc__
    train_cross_attention = False
