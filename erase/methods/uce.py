"""uce — Unified Concept Editing (Gandikota et al., WACV 2024): a closed-form cross-attention edit.

Every text cross-attention key and value projection (as the model's layer map names them: 32
matrices in SD 1.x) is rewritten independently in closed form (``erase.methods._closed_form``) so that the
erased concepts' token vectors produce what the guide's tokens produced, the preserved concepts'
outputs stay put, and the weights stay near the original (λ). No optimiser step runs, and the run
writes the same model, grid, card and metrics as any other method.

Defaults follow the authors' current script (``trainscripts/uce_sd_erase.py``): λ 0.5, erase and
preserve scale 1, guide '' (unconditional), the last word token of each prompt. ``--tokens
last-to-end`` switches to the paper-era script (``train-scripts/train_erase.py``), which also
feeds end-of-text and padding tokens and made the published checkpoints (and RECE's starting
points); that script's preserve scale ``max(0.1, 1/len(preserve))`` is ``--preserve-scale -1``.

What is erased, guided and preserved:

* erase: the run's concept(s), as bare text ("garbage truck"), as both official scripts do; with
  ``--expand-prompts`` also inside each of the run's prompt templates ("a photo of a garbage
  truck", ...), like the scripts' ``--expand_prompts`` / ``add_prompts``. Deviation: a non-empty
  guide is put into the same template (the scripts pair every expanded prompt with the bare guide),
  so "a photo of a garbage truck" is steered to "a photo of a church";
* guide: '' (the empty prompt, i.e. towards the unconditional prediction; the scripts' ' ' is the
  same token sequence), one concept for all, or one per erased concept;
* preserve: the run's retain concepts (``--retain-concepts``, or the task's default set) plus the
  empty prompt, so classifier-free guidance's unconditional branch is unchanged (the paper-era
  script always keeps ''); ``--preserve none`` keeps nothing (the current script's default).

Adaptation to MMDiT families (SD3, FLUX; erase's own, not in the paper). UCE rests on every edited
projection reading the text encoder's output itself, so one solved map T (W <- W T) moves the
concept's tokens onto the guide's everywhere. In a joint-attention transformer no key/value
projection reads that output: each block's text-stream key/value projections read a stream the
blocks update with image information and the timestep. The layers that do read it are the context
embedder (every text token, once, before the first block) and the first linear of the pooled
text's embedder (the adaLN conditioning of every block): the layer map's ``text_inputs`` /
``pooled_inputs`` (module names in ``erase.diffusion.layers``). UCE's closed form is applied to those two, with the same
λ and scales: token rows as above (SD3: the CLIP block, and T5's block with its own tokenizer's
positions when the pipeline has T5; without T5 its rows are zeros and are left out; FLUX: T5's block,
its whole token condition, CLIP entering only pooled), pooled rows one per prompt. Every block then
reads the guide's text where it read the concept's, which is what UCE's per-layer K/V edit achieves on
SD. ``--edit v`` has no meaning there and is refused. RECE's adversarial rounds run on the context
embedder alone (its Eq. for c' is over the token projections).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from erase.engine.layers import LayerMap
from erase.engine.method import Method, MethodConfig
from erase.errors import EraseError
from erase.fields import opt
from erase.methods._closed_form import TOKEN_MODES, aligned_rows, apply_map, preserve_rows, uce_map
from erase.registry import register_method


@dataclass
class UCEConfig(MethodConfig):
    length_fields = ()  # a closed-form edit: no optimiser steps, so --epochs / --max-steps do not apply
    epochs: float = opt(0.0, "unused: a closed-form edit takes no optimiser steps")
    max_steps: int = opt(0, "unused: a closed-form edit takes no optimiser steps")
    guide: str = opt("", "what erased concepts are steered to: '' = the empty prompt (unconditional), one concept for "
                     "all, a comma-separated list paired with the erased concepts, or 'anchor' = the neighbouring "
                     "concept the model's erase.yaml names (as ca uses)")
    preserve: str = opt("", "concepts whose outputs are kept: '' = the run's retain concepts, 'none' = nothing, or a "
                        "comma-separated list; the empty prompt is kept too unless 'none'")
    lamb: float = opt(0.5, "λ: pull towards the original weights (the authors' code; the paper's Eq. 7 has none)")
    erase_scale: float = opt(1.0, "s_e: weight of the erase terms")
    preserve_scale: float = opt(1.0, "s_p: weight of the preserve terms; negative = the paper-era script's "
                                "max(0.1, 1/len(preserve prompts))")
    tokens: str = opt("last", "token vectors per prompt: the last word token (current script) or it through "
                      "end-of-text and padding (paper-era script)", TOKEN_MODES)
    edit: str = opt("kv", "projections to edit: keys and values, or values only", ("kv", "v"))
    expand_prompts: bool = opt(False, "also erase and preserve each concept inside the run's prompt templates")

    def validate(self) -> None:
        super().validate()
        if not self.lamb > 0:
            raise EraseError(f"--lamb must be > 0 (it keeps the solve well posed), got {self.lamb}")
        if self.erase_scale < 0:
            raise EraseError(f"--erase-scale must be >= 0, got {self.erase_scale}")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def edit_problem(lmap: LayerMap, edit: str) -> str | None:
    """Why the closed form cannot edit ``edit`` ("kv" / "v") on ``lmap``'s family, or None."""
    if lmap.reads_text and not lmap.kv_read_text_embedding:
        if not lmap.text_inputs:
            return (f"the closed-form edit needs layers that read the text encoder's output; a {lmap.family} "
                    "denoiser's layer map names none (not supported)")
        if edit == "v":
            return (f"--edit v edits value projections that read the text embedding; a {lmap.family} denoiser has none "
                    "(its context embedder feeds keys and values alike): use --edit kv")
    return None


def kv_projections(lmap: LayerMap, model: nn.Module, edit: str) -> list[tuple[str, nn.Linear]]:
    """The projections of ``model`` that the closed form edits (keys and values, or values), in module order, as its
    layer map ``lmap`` (``DenoisingTask.layer_map``) names them.

    The closed form solves one map for all of them, which holds only where every projection reads the text
    encoder's output itself (the layer map's ``kv_read_text_embedding``). Where keys and values read a text stream
    that blocks update (SD3 / FLUX), the layers that read the encoders' output are the map's ``text_inputs`` (the
    context embedder): the edit goes there (module docstring)."""
    problem = edit_problem(lmap, edit)
    if problem:
        raise EraseError(problem)
    if lmap.reads_text and not lmap.kv_read_text_embedding:
        return lmap.linear_layers(model, lmap.text_inputs)
    found = lmap.text_projections(model, ("k", "v") if edit == "kv" else ("v",))
    if not found:
        raise EraseError("the model has no text cross-attention key/value projections to edit")
    return found


def pooled_projections(lmap: LayerMap, model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The layers that read the pooled text embedding (SD3 / FLUX: the pooled embedder's first linear), else []."""
    return lmap.linear_layers(model, lmap.pooled_inputs) if lmap.pooled_inputs else []


class _ClosedForm(Method):
    """Shared plumbing of UCE and RECE: prompts, their token rows, and in-place edits of the K/V projections."""

    tasks = ("diffusion",)
    streams = ()

    def _no_cross_attention(self) -> EraseError:
        return EraseError(f"{self.name} edits the text cross-attention's key/value projections; a class-conditional "
                          "DDPM has none: use esd-u, salun, rl or ga")

    def _adapters(self) -> EraseError:
        return EraseError(f"{self.name} rewrites the projection weights in closed form; use --save-format pipeline "
                          "or delta and --lora-rank 0")

    def check_task_config(self, task_cfg) -> None:
        if task_cfg.model_has_cross_attention() is False:
            raise self._no_cross_attention()
        if task_cfg.trains_adapters():
            raise self._adapters()
        lmap = task_cfg.layer_family()
        problem = edit_problem(lmap, self.config.edit) if lmap is not None else None
        if problem:
            raise EraseError(problem)

    def check_task(self, task) -> None:
        if not task.has_cross_attention:
            raise self._no_cross_attention()
        if task.trains_adapters:
            raise self._adapters()
        self._plan(task)  # the guide / preserve lists are checked before any model work

    # -- prompts ----------------------------------------------------------------------------------
    def _guides(self, task) -> list[str]:
        spec = self.config.guide.strip()
        if not spec:
            return [""] * len(task.concepts.concepts)  # the empty prompt: towards the unconditional prediction
        return task.partner_concepts(None if spec.lower() == "anchor" else _split(spec), "--guide")

    def _preserved(self, task, concepts: list[str]) -> list[str]:
        spec = self.config.preserve.strip()
        if spec.lower() == "none":
            return []
        names = _split(spec) if spec else list(task.concepts.retain)
        erased = {c.strip().lower() for c in concepts}
        clash = [p for p in names if p.lower() in erased]
        if clash:
            raise EraseError(f"--preserve includes the concept being erased ({clash[0]})")
        return names

    def _plan(self, task) -> tuple[list[tuple[str, str]], list[str]]:
        """(erase prompt, guide prompt) pairs and preserve prompts."""
        cs = task.concepts
        concepts = task.concepts.concepts
        templates = cs.templates if self.config.expand_prompts else []
        pairs = []
        for c, g in zip(concepts, self._guides(task)):
            pairs.append((c, g))
            pairs += [(cs.prompt(c, t), cs.prompt(g, t) if g else "") for t in templates]
        preserve = []
        for p in self._preserved(task, concepts):
            preserve.append(p)
            preserve += [cs.prompt(p, t) for t in templates]
        if self.config.preserve.strip().lower() != "none":
            preserve.append("")
        return pairs, preserve

    def effective_preserve_scale(self, n_prompts: int) -> float:
        """--preserve-scale, or the paper-era script's max(0.1, 1/n) when it is negative."""
        s = self.config.preserve_scale
        return s if s >= 0 else max(0.1, 1.0 / max(n_prompts, 1))

    @staticmethod
    @torch.no_grad()
    def _encode(task, prompts: list[str]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """prompt -> its token blocks, each ((L, d) float32 text embedding, (L,) attention mask); every distinct
        prompt is encoded once.

        The embedding is what the edited projections read (``task.text_segments``): SD one CLIP block; SDXL both
        encoders' concatenated penultimate states (both tokenizers give the same tokens, so one mask serves); SD3
        the CLIP block and, with T5, T5's block with its own tokenizer's mask; FLUX T5's block alone."""
        unique = list(dict.fromkeys(prompts))
        blocks = [task.text_segments(unique[i:i + 64]) for i in range(0, len(unique), 64)]
        per_block = [(torch.cat([b[k][0] for b in blocks]).float(), torch.cat([b[k][1] for b in blocks]))
                     for k in range(len(blocks[0]))]
        return {p: [(emb[i], mask[i]) for emb, mask in per_block] for i, p in enumerate(unique)}

    @staticmethod
    def all_rows(blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Every token row of a prompt's blocks, one after the other."""
        return torch.cat([emb for emb, _ in blocks])

    def uce_rows(self, task) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Erase, guide and preserve token rows (float32) and the number of preserve prompts."""
        pairs, preserve = self._plan(task)
        enc = self._encode(task, [p for pair in pairs for p in pair] + preserve)
        mode = self.config.tokens
        rows = [aligned_rows(*be, *bg, mode) for e, g in pairs for be, bg in zip(enc[e], enc[g])]
        erase = torch.cat([r[0] for r in rows])
        guide = torch.cat([r[1] for r in rows])
        keep = [preserve_rows(*b, mode) for p in preserve for b in enc[p]]
        keep = torch.cat(keep) if keep else erase.new_zeros(0, erase.shape[1])
        return erase, guide, keep, len(preserve)

    @torch.no_grad()
    def pooled_rows(self, task) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Erase, guide and preserve rows of the pooled text embedding: one per prompt."""
        pairs, preserve = self._plan(task)
        prompts = list(dict.fromkeys([p for pair in pairs for p in pair] + preserve))
        table = dict(zip(prompts, task.pooled_text(prompts).float()))
        erase = torch.stack([table[e] for e, _ in pairs])
        guide = torch.stack([table[g] for _, g in pairs])
        keep = torch.stack([table[p] for p in preserve]) if preserve else erase.new_zeros(0, erase.shape[1])
        return erase, guide, keep, len(preserve)

    @staticmethod
    @torch.no_grad()
    def edit_layers(layers: list[tuple[str, nn.Linear]], T: torch.Tensor) -> None:
        """W <- W T for every projection, refusing a non-finite result."""
        for name, lin in layers:
            if lin.in_features != T.shape[0]:
                raise EraseError(f"{name} takes {lin.in_features}-d inputs but the text encoder gives {T.shape[0]}-d")
            new = apply_map(lin.weight, T)
            if not torch.isfinite(new).all():
                raise EraseError(f"the closed-form edit of {name} is not finite; raise --lamb")
            lin.weight.copy_(new)

    def uce(self, ctx, layers: list[tuple[str, nn.Linear]]) -> None:
        """The UCE edit of ``layers`` (projections of ``ctx.unwrapped``) in place, and on families whose pooled text
        has its own input layer (SD3 / FLUX), the same edit of that layer on the pooled rows."""
        cfg = self.config
        erase, guide, keep, n_preserve = self.uce_rows(ctx.task)
        T = uce_map(erase, guide, keep, cfg.lamb, cfg.erase_scale, self.effective_preserve_scale(n_preserve))
        self.edit_layers(layers, T)
        pooled = pooled_projections(ctx.task.layer_map(ctx.unwrapped), ctx.unwrapped)
        if pooled:
            erase, guide, keep, n_preserve = self.pooled_rows(ctx.task)
            T = uce_map(erase, guide, keep, cfg.lamb, cfg.erase_scale, self.effective_preserve_scale(n_preserve))
            self.edit_layers(pooled, T)


@register_method("uce")
class UCE(_ClosedForm):
    __doc__ = __doc__
    Config = UCEConfig

    def apply(self, ctx):
        model = ctx.unwrapped
        self.uce(ctx, kv_projections(ctx.task.layer_map(model), model, self.config.edit))
