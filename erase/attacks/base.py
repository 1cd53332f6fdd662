"""What an attack is: a typed config, the tasks it supports, and ``run(prompt_row, ctx) -> AttackResult``.

Attacks mirror methods (``erase.engine.method``): one small registered file per attack, a config
dataclass whose fields carry help text and the source of each default, and nothing model-specific
outside the task they are handed. An attack sees the task only through :class:`TextTask` (text
in, text-encoder states out, images from a condition), so the same attack runs on any text-to-image
adapter that offers it; ``erase.diffusion.task.DiffusionTask`` is the Stable Diffusion one. Attacks
that optimise through the denoiser also use the ``DenoisingTask`` extension (``predict``, noise).

The contract, for one prompt of an attack prompt set (``erase.prompts.PromptRow``):

1. ``run(row, ctx)`` builds an adversarial prompt (text, so others can replay it without erase)
   and/or an adversarial condition (an embedding fed straight to the denoiser);
2. it generates ``config.images`` images from it with ``ctx.model`` (the erased model), the
   row's seed (then seed + 1, ...) and the row's guidance (else the task's);
3. ``ctx.judge`` (the run's evaluator) says which of them show the concept. The plain,
   pre-attack image of the row is *not* the attack's business: the caller generates it once per
   row and combines both with ``erase.attacks.success`` (pre-attack and attack success kept apart).

Attacks that optimise by gradient (concept inversion's token embedding, UnlearnDiffAtk's relaxed
one-hot prefix, P4D's projected embeddings) run through the engine, not a loop of their own
(DESIGN §8): an embedding is a parameter too. ``erase.attacks.optimised`` wraps the parameter as
the engine's "model" (the frozen denoiser and text encoder stay outside it, so the optimiser and
the checkpoints see nothing else), hands ``erase.engine.loop.run_method`` a small ``Method`` whose
loss calls ``DenoisingTask.predict`` with a condition built from the parameter
(``TextTask.encode_ids(ids, token_embeds)``), and whose ``after_step`` projects the parameter and,
every so often, decodes it, generates and asks the judge — stopping the run early on success
(``RunContext.request_stop``). Seeds, resume from checkpoints, progress bars, logging and the NaN
guard are the ones every method gets; the inner run's folder is the prompt's own, so an
interrupted attack resumes inside the prompt. Ring-A-Bell optimises nothing by gradient (a
genetic search over token ids that queries only the text encoder), so it runs inline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from erase.errors import EraseError
from erase.fields import field_problems, flag_name, opt
from erase.prompts import PromptRow
from erase.registry import Registry

# images in [0, 1] (N, C, H, W), the concept's name -> bool (N,): which images show the concept.
Judge = Callable[[torch.Tensor, str], torch.Tensor]


@runtime_checkable
class TextTask(Protocol):
    """What an attack needs from a text-to-image task (the diffusion task adapter's view for attacks).

    ``tokenizer`` is the model's transformers tokenizer (ids <-> text, special ids, ``model_max_length``);
    ``text_encoders`` the base model's (frozen while an attack's gradients pass through them);
    ``token_table(encoder=None)`` their input token embeddings (V, D_tok), what gradient attacks search;
    ``has_cross_attention`` says the model reads text at all (False for a class-conditional DDPM).
    ``encode(prompts)`` is the condition the denoiser reads for each prompt, (N, L, D) (SDXL / SD3: a
    ``PooledText`` of that and the pooled embedding);
    ``encode_ids(ids, token_embeds=None)`` the same from token ids padded to L, with the
    encoder's input token embeddings optionally replaced by ``token_embeds`` (N, L, D_tok); it keeps
    gradients when called outside ``torch.no_grad`` (for attacks that optimise through the text encoder);
    ``generate(model, cond, seeds, guidance)`` images in [0, 1] on the CPU, one per seed, from one
    condition (1, L, D) or one per seed (N, L, D), with the task's sampler and steps.
    """

    tokenizer: Any
    text_encoders: list
    device: torch.device
    has_cross_attention: bool

    def encode(self, prompts: list[str]) -> torch.Tensor: ...

    def encode_ids(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor: ...

    def token_table(self, encoder: nn.Module | None = None) -> torch.Tensor: ...

    def condition_vector(self, cond) -> torch.Tensor: ...

    def vector_condition(self, x: torch.Tensor): ...

    def generate(self, model: nn.Module, cond: torch.Tensor, seeds: list[int],
                 guidance: float | None = None) -> torch.Tensor: ...


@dataclass
class AttackContext:
    """What an attack sees: the task, the model under attack, the concept and the judge."""

    task: TextTask
    model: nn.Module                 # the (erased) denoiser the attack generates with
    concept: str                     # the concept the attack tries to bring back (a row's own concept wins)
    judge: Judge | None = None       # the run's evaluator; None: images are not judged
    seed: int = 0
    progress: bool = True
    state: dict = field(default_factory=dict)  # per-run cache across rows (e.g. a concept vector)
    encoder: nn.Module | list | None = None  # the erased model's own text encoder(s) (advunlearn); None: the task's
    base: nn.Module | None = None     # the base denoiser (targets of UnlearnDiffAtk and P4D); None: not offered
    workdir: Path | None = None       # where an optimising attack keeps its per-prompt engine runs (resume)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Conditions of ``prompts`` as the model under attack reads them (its own text encoder if it has one)."""
        if self.encoder is None:
            return self.task.encode(prompts)
        return self.task.encode_ids(self.task.token_ids(prompts), encoder=self.encoder).detach()

    def token_table(self) -> torch.Tensor:
        """(V, D_tok) the attacked model's input token embeddings (frozen; SDXL / SD3: both CLIP encoders' side by
        side, see erase.diffusion.text_stack)."""
        return self.task.token_table(self.encoder)

    def encode_ids(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Conditions from token ids (and replaced input token embeddings) through the attacked model's encoder."""
        if self.encoder is None:
            return self.task.encode_ids(ids, token_embeds)
        return self.task.encode_ids(ids, token_embeds, encoder=self.encoder)

    def concept_of(self, row: PromptRow) -> str:
        return row.concept or self.concept

    def rng(self, row: PromptRow) -> torch.Generator:
        """A generator for the attack's own randomness on ``row``: the run's seed and the row's seed."""
        return torch.Generator().manual_seed(1_000_003 * self.seed + row.seed)


@dataclass
class AttackResult:
    """One prompt's attack: what was built, the images it made, and which of them the judge flagged."""

    case: str                                   # the row's case number
    prompt: str                                 # the row's (plain) prompt
    adversarial_prompt: str | None              # replayable text; None for an embedding-only attack
    adversarial_embedding: torch.Tensor | None  # (L, D) condition fed to the denoiser, if the attack made one
    images: torch.Tensor                        # (N, C, H, W) in [0, 1], CPU
    seeds: list[int]
    judged: list[bool] | None                   # per image: shows the concept (None: no judge)
    info: dict = field(default_factory=dict)    # attack-specific numbers (fitness, generations, ...)
    tensors: dict = field(default_factory=dict)  # name -> tensor saved beside the prompt (a learned word's embedding)

    @property
    def success(self) -> bool | None:
        """Whether any attacked image shows the concept (the plain image is not counted here)."""
        return None if self.judged is None else any(self.judged)

    def record(self) -> dict:
        """JSON-ready summary (no tensors)."""
        return {"case": self.case, "prompt": self.prompt, "adversarial_prompt": self.adversarial_prompt,
                "embedding_only": self.adversarial_prompt is None, "seeds": self.seeds, "judged": self.judged,
                "success": self.success, **self.info}


@dataclass
class AttackConfig:
    """Knobs every attack has; subclasses add their own (each default with its source)."""

    images: int = opt(1, "images generated per adversarial prompt (seeds: the row's seed, seed + 1, ...); "
                      "one, as UnlearnDiffAtk judges each decoded prompt")

    def problems(self) -> list[str]:
        """Range problems, one message per flag; a subclass extends this list."""
        problems = field_problems(self)
        if self.images < 1:
            problems.append(f"{flag_name('images')} must be >= 1, got {self.images}")
        return problems

    def validate(self) -> None:
        """Everything checkable from the config alone, before any model loads."""
        problems = self.problems()
        if problems:
            raise EraseError("; ".join(problems))


class Attack(ABC):
    name: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[AttackConfig]] = AttackConfig

    def __init__(self, config: AttackConfig):
        config.validate()
        self.config = config

    def check_task(self, task: Any) -> None:
        """Refuse a task this attack cannot run on, before any work (raise EraseError)."""
        try:
            text = bool(task.has_cross_attention) and isinstance(task, TextTask)
        except AttributeError:
            text = False
        if not text:
            raise EraseError(f"attack {self.name!r} needs a text-conditioned model (Stable Diffusion): the task "
                             "offers no tokenizer / text encoder")
        problem = task.token_access_problem() if hasattr(task, "token_access_problem") else None
        if problem:
            raise EraseError(f"attack {self.name!r} works on the model's text tokens: {problem}")

    @abstractmethod
    def run(self, row: PromptRow, ctx: AttackContext) -> AttackResult:
        """Attack one prompt: the adversarial prompt (text and/or embedding), its images and their verdicts."""

    # -- helpers -------------------------------------------------------------------------------
    def seeds(self, row: PromptRow) -> list[int]:
        return [row.seed + i for i in range(self.config.images)]

    @torch.no_grad()
    def finish(self, row: PromptRow, ctx: AttackContext, cond: torch.Tensor, text: str | None,
               embedding: torch.Tensor | None = None, info: dict | None = None) -> AttackResult:
        """Generate the attack's images from ``cond`` with the model under attack, and judge them."""
        seeds = self.seeds(row)
        images = ctx.task.generate(ctx.model, cond, seeds, row.guidance)
        judged = None
        if ctx.judge is not None:
            judged = [bool(v) for v in ctx.judge(images, ctx.concept_of(row)).tolist()]
        if embedding is not None and not isinstance(embedding, torch.Tensor):  # SDXL / SD3: tokens + pooled, flat
            embedding = ctx.task.condition_vector(embedding)[0]
        emb = None if embedding is None else embedding.detach().float().cpu()
        return AttackResult(row.case, row.prompt, text, emb, images, seeds, judged, dict(info or {}))


ATTACKS: Registry = Registry("attack")
register_attack = ATTACKS.register
