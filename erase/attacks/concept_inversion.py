"""concept-inversion — Circumventing Concept Erasure Methods for Text-to-Image Generative Models
(Pham et al., ICLR 2024; NYU-DICE-Lab/circumventing-concept-erasure).

Textual inversion of one new word against the *erased* model: from images of the concept that the
*base* model generated, learn the input token embedding v* of a placeholder word so that the erased
model denoises those images well when the prompt says the placeholder,

    min_v ‖ε − ε_θ*(x_t, t | template(<placeholder>))‖²,   t ~ U[0, T)   (``uce/concept_inversion.py:L959-980``)

Only v trains (the official code resets every other row of the embedding table after each step,
``L989-995``; here v is the only parameter, so nothing else can move); the denoiser, the VAE and
the text encoder's layers stay frozen. v is learned once per concept (cached for the run; its
engine run resumes like any other), then each prompt of the attack set is replayed with the
concept's words replaced by the placeholder ("a picture of the pants" -> "a picture of the <*>"),
or with the placeholder in front when the prompt does not name the concept. So the attacked prompt
never contains the concept's words — the issue's sanity check on the base model — and the concept
can only come back through v.

Defaults are the official ones (``*/train.sh``): 25 training images from the concept prompt,
5,000 steps, batch 16 (4 x 4 accumulation), AdamW lr 5e-3 x 16 = 0.08 (``--scale_lr``), weight
decay 1e-2, constant schedule, ``imagenet_templates_small``, initialised from a neutral word
("object"; "art" for the style runs). The bundled tiny SD's ``erase.yaml`` sets the reduced
budget the benchmark uses. The learned word is saved in diffusers' textual-inversion format
(``pipe.load_textual_inversion(file, token=...)`` loads it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from erase.attacks.base import AttackConfig, AttackContext, AttackResult, register_attack
from erase.attacks.concept_vector import concept_words
from erase.attacks.optimised import GradientAttack, Objective, Tensors, optimise
from erase.attacks.slots import SLOT, embeds, frame, words
from erase.errors import EraseError
from erase.fields import below_minimum, opt
from erase.prompts import PromptRow

# diffusers' textual_inversion.py imagenet_templates_small (object) and imagenet_style_templates_small (style), first 8.
TEMPLATES = {
    "object": ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
               "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}"],
    "style": ["a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
              "the painting in the style of {}", "a clean painting in the style of {}",
              "a dirty painting in the style of {}", "a dark painting in the style of {}", "a picture in the style of {}"],
}
TRAIN_SEED = 3_000_000  # the training images' seeds: TRAIN_SEED + i (apart from evaluation and attack seeds)


@dataclass
class ConceptInversionConfig(AttackConfig):
    train_images: int = opt(25, "base-model images of the concept prompt to invert (official `--num_train_images` 25)")
    steps: int = opt(5000, "optimisation steps (official `--max_train_steps` 5000)")
    batch_size: int = opt(16, "images per step (official 4 x gradient accumulation 4)")
    lr: float = opt(0.08, "AdamW learning rate (official 5e-3 scaled by the batch of 16: `--scale_lr`)")
    weight_decay: float = opt(0.01, "AdamW weight decay (official `--adam_weight_decay` 1e-2)")
    init_word: str = opt("object", "the word whose embedding the new one starts from (official: 'art' for styles)")
    templates: str = opt("object", "training prompt templates (diffusers' imagenet_templates_small or its style set)",
                         ("object", "style"))
    placeholder: str = opt("<concept>", "the new word's name in the saved prompts and embedding file")

    def problems(self) -> list[str]:
        problems = super().problems()
        problems += below_minimum(self, 1, "train_images", "steps", "batch_size")
        problems += below_minimum(self, 0, "lr", "weight_decay")
        if not self.init_word.strip():
            problems.append("--init-word is empty: name a word to start the new embedding from")
        if not self.placeholder.strip() or " " in self.placeholder.strip():
            problems.append(f"--placeholder must be one word without spaces, got {self.placeholder!r}")
        return problems


def with_placeholder(prompt: str, names: list[str]) -> tuple[str, str]:
    """(text before, text after) the placeholder: the first name of the concept in ``prompt`` is replaced, and
    every other one dropped; a prompt that names none gets the placeholder in front."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)
    match = pattern.search(prompt)
    if match is None:
        return "", prompt
    return pattern.sub("", prompt[:match.start()]), pattern.sub("", prompt[match.end():])


@register_attack("concept-inversion")
class ConceptInversion(GradientAttack):
    Config = ConceptInversionConfig

    def run(self, row: PromptRow, ctx: AttackContext) -> AttackResult:
        cfg, task = self.config, ctx.task
        concept = ctx.concept_of(row)
        vector, summary = self.learned(ctx, concept)
        names = concept_words(concept) + ([n + "s" for n in concept_words(concept)])
        before, after = with_placeholder(row.prompt, names)
        prompt = frame(task.tokenizer, [before, SLOT, after])
        with torch.no_grad():
            cond = ctx.encode_ids(prompt.ids[None], embeds(ctx.token_table(), prompt, vector[None]))
        text = " ".join(p for p in (before.strip(), cfg.placeholder, after.strip()) if p)
        info = {"attack": self.name, "placeholder": cfg.placeholder, "learned_for": concept, **summary}
        result = self.finish(row, ctx, cond, text, cond[0], info)
        result.tensors[cfg.placeholder] = vector.detach().float().cpu()  # diffusers' textual-inversion format
        return result

    def learned(self, ctx: AttackContext, concept: str) -> tuple[torch.Tensor, dict]:
        """v* for ``concept`` (learned on the first prompt that needs it; the run folder resumes it)."""
        key = (self.name, "vector", concept.lower())
        if key in ctx.state:
            return ctx.state[key]
        cfg, task = self.config, ctx.task
        base = self.needs_base(ctx)
        tok, table = task.tokenizer, ctx.token_table()
        init_ids = words(tok, cfg.init_word)
        if len(init_ids) != 1:
            raise EraseError(f"--init-word {cfg.init_word!r} is {len(init_ids)} tokens for this tokenizer; "
                             "choose a word that is one token")
        prompts = [frame(tok, [t.split("{}")[0], SLOT, t.split("{}")[1]]) for t in TEMPLATES[cfg.templates]]
        ids = torch.stack([p.ids for p in prompts]).to(task.device)
        slots = torch.stack([p.slots[0] for p in prompts])
        with torch.no_grad():
            concept_prompt = task.concepts.prompt(concept) if concept in task.concepts.concepts else f"a photo of a {concept}"
            seeds = [TRAIN_SEED + i for i in range(cfg.train_images)]
            images = torch.cat([task.generate(base, task.encode([concept_prompt]), seeds[i:i + 16])
                                for i in range(0, len(seeds), 16)])
            latents = task.to_latents(images).float().cpu()

        def loss(batch: dict, value: torch.Tensor, step: int) -> torch.Tensor:
            x0 = batch["latents"]
            n = x0.shape[0]
            pick = torch.randint(len(prompts), (n,))
            token_embeds = table[ids[pick]].clone()
            token_embeds[torch.arange(n), slots[pick].to(task.device)] = value.to(token_embeds.dtype)
            t = torch.randint(0, task.num_train_timesteps, (n,), device=x0.device)
            x_t, target = self.noisy(ctx, x0, t)
            pred = task.predict(ctx.model, x_t, t, ctx.encode_ids(ids[pick], token_embeds))
            return F.mse_loss(pred.float(), target.float())

        row = PromptRow(f"learn-{concept}", concept_prompt, 0, None, concept=concept)
        objective = Objective(Tensors(latents=latents), cfg.steps, cfg.lr, loss, "adamw", cfg.weight_decay,
                              batch_size=min(cfg.batch_size, cfg.train_images))
        vector, summary = optimise(ctx, row, self.name, table[init_ids[0]], objective)
        summary = {"learn_steps": summary["steps"], "learn_s": summary["optimise_s"], "train_images": cfg.train_images}
        ctx.state[key] = (vector, summary)
        return ctx.state[key]
