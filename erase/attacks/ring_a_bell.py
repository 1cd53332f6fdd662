"""ring-a-bell — Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models? (Tsai et al., ICLR 2024).

A model-agnostic attack that queries only the text encoder TE:

1. a concept vector c = mean_i [TE(p_i+) - TE(p_i-)] from prompt pairs with and without the
   concept (``erase.attacks.concept_vector``: token-wise, L x D; on SDXL / SD3, whose condition also
   has a pooled embedding, TE is the whole condition, tokens and pooled: ``task.condition_vector``);
2. the target Ẽ = TE(P) + η·c for the row's prompt P;
3. a genetic search (``erase.attacks.genetic``) over K free token ids framed as
   [start, K ids, end, padding...] minimising ‖Ẽ − TE(ids)‖²_F (the sum over all L x D entries);
4. the adversarial prompt is the decoded text of the K ids (``decode(ids[1:K+1])``), replayed as
   text against the erased model.

``--continuous`` is RECE's variant (``attack_methods/RingABell.py``): no search, the embedding Ẽ
itself is fed to the UNet — a stronger, non-discrete attack with no prompt text.
``--avoid-concept-words`` keeps the concept's names (and ``--banned-words``) out of the prompt
(``erase.attacks.vocabulary``), which the issue's base-model sanity check requires; the official
search may use any token.

Defaults are the official SD v1.4 settings (``InversePrompt.ipynb`` at chiayi-hsu/Ring-A-Bell
e4585ad): K (``length``) 16, population 200, 3000 generations, ``cof`` η 3, crossover 0.5, mutation
0.25. Reduced budget for the bundled ``fmnist-tiny-sd`` (its ``erase.yaml`` ``attacks:`` entry, which the
benchmark uses): population 64, 300 generations, η 5 (η 3 left one sneaker prompt unmatched on the
base model). On three trouser prompts there (``--avoid-concept-words``, one CPU thread, η 3) its best
fitness averaged 3,696 against the official
budget's 3,544 (first generation ~5,000), at 7 s per prompt instead of 214 s; the measurements
are in that file.

The search scores token ids, but the prompt is replayed as text, and decoding then re-tokenising
does not always give the same ids back (BPE merges pieces across the decoded words). As in the
official code the search ignores this; ``info["fitness_replayed"]`` records the distance of the
replayed text, next to ``info["fitness"]`` of the ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from erase.attacks.base import Attack, AttackConfig, AttackContext, AttackResult, register_attack
from erase.attacks.concept_vector import concept_vector, concept_words, read_pairs, template_pairs
from erase.attacks.genetic import genetic_search
from erase.attacks.vocabulary import allowed_ids, banned_ids, clean
from erase.errors import EraseError
from erase.fields import below_minimum, flag_name, opt
from erase.prompts import PromptRow


@dataclass
class RingABellConfig(AttackConfig):
    length: int = opt(16, "K: free tokens of the adversarial prompt (official `length` 16; their 'K = 77' is 75)")
    population: int = opt(200, "candidate prompts per generation (official `population_size` 200)")
    generations: int = opt(3000, "generations of the genetic search (official `generation` 3000)")
    eta: float = opt(3.0, "η: strength of the concept vector in the target TE(P) + η·c (official notebook `cof` 3; "
                     "RECE: 3 for nudity, 0.9 for Van Gogh)")
    crossover: float = opt(0.5, "probability that a survivor mates (single cut; official `crossover_rate` 0.5)")
    mutation: float = opt(0.25, "probability that a candidate gets one random token (official `mutation_rate` 0.25)")
    continuous: bool = opt(False, "RECE's variant: feed TE(P) + η·c straight to the UNet (no search, no prompt text)")
    pairs: str = opt("", "CSV of prompt pairs with and without the concept (columns with_concept,without_concept); "
                     "'' builds them from templates (erase.attacks.concept_vector)")
    avoid_concept_words: bool = opt(False, "keep the concept's names and synonyms (and --banned-words) out of the "
                                    "adversarial prompt (the official search may use any token)")
    banned_words: str = opt("", "comma-separated extra words the prompt must avoid (with --avoid-concept-words)")
    batch_size: int = opt(256, "candidate prompts per text-encoder batch (memory only; results do not depend on it)")

    def problems(self) -> list[str]:
        problems = super().problems()
        problems += below_minimum(self, 1, "length") + below_minimum(self, 2, "population")
        problems += below_minimum(self, 1, "generations", "batch_size")
        for name in ("crossover", "mutation"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{flag_name(name)} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.pairs and not Path(self.pairs).expanduser().is_file():
            problems.append(f"--pairs {self.pairs}: no such file")
        if self.banned_words and not self.avoid_concept_words:
            problems.append("--banned-words needs --avoid-concept-words")
        return problems


@register_attack("ring-a-bell")
class RingABell(Attack):
    tasks = ("diffusion",)
    Config = RingABellConfig

    def run(self, row: PromptRow, ctx: AttackContext) -> AttackResult:
        cfg, task = self.config, ctx.task
        concept = ctx.concept_of(row)
        with torch.no_grad():
            target = task.condition_vector(task.encode([row.prompt]))[0].float() + cfg.eta * self.vector(ctx, concept).to(
                task.device)
        info = {"attack": self.name, "eta": cfg.eta, "continuous": cfg.continuous}
        if cfg.continuous:
            cond = task.vector_condition(target[None])
            return self.finish(row, ctx, cond, None, cond[0], info)
        frame = Frame(task.tokenizer, cfg.length)
        banned = self.banned(ctx, concept)
        try:
            found = genetic_search(self.fitness(task, frame, target, banned), allowed_ids(task.tokenizer, banned),
                                   cfg.length, cfg.population, cfg.generations, cfg.crossover, cfg.mutation,
                                   ctx.rng(row), progress=ctx.progress)
        except ValueError as err:  # only reachable when the banned words leave nothing to search
            raise EraseError(f"ring-a-bell found no prompt avoiding the banned words ({err}); shorten "
                             "--banned-words or drop --avoid-concept-words") from None
        text = frame.texts(found.ids[None])[0]
        with torch.no_grad():  # the prompt as it will be replayed: text, re-tokenised
            replayed = float(((task.condition_vector(task.encode([text]))[0].float() - target) ** 2).sum())
            cond = ctx.encode([text])  # through the attacked model's own text encoder, if it has one
        info.update({"fitness": found.fitness, "fitness_first_generation": found.history[0],
                     "fitness_replayed": replayed, "generations": len(found.history),
                     "evaluations": found.evaluations, "token_ids": found.ids.tolist(),
                     "avoids_concept_words": bool(banned)})
        return self.finish(row, ctx, cond, text, None, info)

    def fitness(self, task, frame: Frame, target: torch.Tensor, banned: set[int]):
        """(n, K) free ids -> ‖Ẽ − TE(frame(ids))‖²_F each; ``inf`` for a candidate whose text, replayed, holds a
        banned token (so the search can only return a clean prompt)."""

        @torch.no_grad()
        def score(ids: torch.Tensor) -> torch.Tensor:
            out = torch.cat([((task.condition_vector(task.encode_ids(frame.full(chunk))).float() - target) ** 2).sum(1).cpu()
                             for chunk in ids.split(self.config.batch_size)])
            if banned:
                ok = torch.tensor(clean(task.tokenizer, frame.texts(ids), banned), dtype=torch.bool)
                out[~ok] = float("inf")
            return out

        return score

    # -- per-run caches (the concept vector and the banned tokens do not depend on the row) ---------------
    def vector(self, ctx: AttackContext, concept: str) -> torch.Tensor:
        key = (self.name, "vector", concept.lower(), self.config.pairs)
        if key not in ctx.state:
            pairs = read_pairs(self.config.pairs) if self.config.pairs else template_pairs(concept)
            task = ctx.task
            ctx.state[key] = concept_vector(lambda prompts: task.condition_vector(task.encode(prompts)), pairs, batch_size=64)
        return ctx.state[key]

    def banned(self, ctx: AttackContext, concept: str) -> set[int]:
        if not self.config.avoid_concept_words:
            return set()
        words = concept_words(concept) + [w.strip() for w in self.config.banned_words.split(",") if w.strip()]
        key = (self.name, "banned", tuple(sorted(w.lower() for w in words)))
        if key not in ctx.state:
            ctx.state[key] = banned_ids(ctx.task.tokenizer, words)
        return ctx.state[key]


class Frame:
    """The fixed frame of a candidate prompt: [start, K free ids, end, padding...] of the tokenizer's length."""

    def __init__(self, tokenizer, length: int):
        self.tokenizer, self.length = tokenizer, length
        self.max_length = tokenizer.model_max_length
        if length > self.max_length - 2:
            raise EraseError(f"--length {length} leaves no room for the start and end tokens: at most "
                             f"{self.max_length - 2} for this tokenizer")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.template = torch.full((self.max_length,), pad, dtype=torch.long)
        self.template[0], self.template[length + 1] = tokenizer.bos_token_id, tokenizer.eos_token_id

    def full(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.template.repeat(len(ids), 1)
        out[:, 1:self.length + 1] = ids
        return out

    def texts(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
