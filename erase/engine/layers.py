"""The layer map type: which modules of a denoiser read the text, as data that methods ask.

A :class:`LayerMap` answers, for one architecture family, the questions text-erasure methods ask
about module names — which parameters are text attention (what ``esd-x`` trains), which
projections turn text into keys and values (what ``uce`` / ``rece`` / ``ca`` edit), where text-token
attention can be recorded, and which pipeline attributes hold the text encoders — so no method
names a module path. The maps themselves (one per architecture) live with the task adapter that
knows the architectures (``erase.diffusion.layers``); a method reaches them through
``DenoisingTask.layer_map(model)``. This module is generic: patterns over dotted names, nothing
about any model type.

Patterns are dotted segment runs, ``*`` standing for any one segment (``"attn2"``,
``"attn.add_k_proj"``, ``"transformer_blocks.*.attn"``). A pattern matches a name when its segments
occur consecutively anywhere in the name's segments, so one pattern serves module names,
parameter names and attention-processor names alike, under any prefix a wrapper adds
(``module.`` of DDP, ``unet.`` of erase's TextConditionedUNet) and inside a LoRA-wrapped
projection (``…to_k.lora_A.default.weight``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Literal

from torch import nn

KeyOrValue = Literal["k", "v"]


@cache
def _segments(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("."))


def _find(name: str, patterns: Iterable[str], at_end: bool = False) -> bool:
    """Whether any pattern's segments occur consecutively in ``name`` (with ``at_end``: as its last segments)."""
    parts = name.split(".")
    for pattern in patterns:
        seg = _segments(pattern)
        starts = [len(parts) - len(seg)] if at_end else range(len(parts) - len(seg) + 1)
        for i in starts:
            if i >= 0 and all(s in ("*", p) for s, p in zip(seg, parts[i:i + len(seg)])):
                return True
    return False


@dataclass(frozen=True)
class LayerMap:
    """What one architecture family's layers do with the text (all fields are patterns, see the module doc)."""

    family: str
    # Every parameter of the attention through which the text reaches the image (esd-x trains these, esd-u the rest).
    text_attention: tuple[str, ...] = ()
    # The projections that turn text tokens into attention keys / values.
    text_keys: tuple[str, ...] = ()
    text_values: tuple[str, ...] = ()
    # Whether those key/value projections read the text encoder's output itself (the same input in every layer),
    # which is what a closed-form edit (UCE, RECE) assumes; False where they read a text stream that blocks update.
    kv_read_text_embedding: bool = False
    # Where kv_read_text_embedding is False: the linear layers that do read the text encoders' token embeddings
    # (an MMDiT's ``context_embedder``), and those that read the pooled text embedding; a closed-form edit of
    # these is the adaptation of UCE / RECE to such a family (see erase/methods/uce.py).
    text_inputs: tuple[str, ...] = ()
    pooled_inputs: tuple[str, ...] = ()
    # Attention processors whose attention includes text tokens as keys (where text-token attention can be recorded).
    attention_processors: tuple[str, ...] = ()
    # Whether erase's attention store can record them yet (the processors differ per family).
    records_attention: bool = False
    # Attribute names of the family's pipeline that hold text encoders (a pipeline may hold None in some).
    text_encoders: tuple[str, ...] = ()
    # Default peft target modules (suffix names) for LoRA adapters.
    lora_targets: tuple[str, ...] = ()

    @property
    def reads_text(self) -> bool:
        """Whether the denoiser has text attention at all (False for a class-conditional UNet)."""
        return bool(self.text_attention)

    def recording_problem(self) -> str | None:
        """Why text-token attention cannot be recorded on this family (Forget-Me-Not), or None."""
        if self.reads_text and not self.records_attention:
            return (f"recording text-token attention is not supported yet for {self.family} denoisers: diffusers' "
                    "joint attention processors expose no attention probabilities (erase.diffusion.layers says what "
                    "is missing)")
        return None

    def is_text_attention(self, name: str) -> bool:
        """Whether a parameter or module name lies in text attention."""
        return _find(name, self.text_attention)

    def text_key_value(self, name: str) -> KeyOrValue | None:
        """'k' / 'v' when a parameter or module name lies in a text key / value projection, else None."""
        if _find(name, self.text_keys):
            return "k"
        if _find(name, self.text_values):
            return "v"
        return None

    def text_projections(self, model: nn.Module, kinds: Iterable[KeyOrValue] = ("k", "v")) -> list[tuple[str, nn.Linear]]:
        """The text key/value projections of ``model`` (``nn.Linear`` modules named by the patterns themselves, not
        layers inside them), in module order."""
        patterns = tuple(p for kind in kinds for p in {"k": self.text_keys, "v": self.text_values}[kind])
        return self.linear_layers(model, patterns)

    def linear_layers(self, model: nn.Module, patterns: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
        """The ``nn.Linear`` modules of ``model`` whose names end in one of ``patterns``, in module order."""
        return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _find(n, patterns, at_end=True)]

    def attention_processor_names(self, model: nn.Module) -> list[str]:
        """Names (keys of diffusers' ``model.attn_processors``) of the processors where text-token attention can be
        recorded; ``model`` is the denoiser itself (see ``erase.diffusion.layers.denoiser_of``)."""
        return [n for n in getattr(model, "attn_processors", {}) if _find(n, self.attention_processors)]
