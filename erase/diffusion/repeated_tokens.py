"""Exact SD3 joint attention over a run of identical trailing context tokens, kept once.

``StableDiffusion3Pipeline`` without its T5 encoder appends ``max_sequence_length`` (256) zero rows to the
77 CLIP rows of every prompt. Those rows enter the transformer identical and stay identical in every block
(same input, same query, same attention, same MLP), so keeping one of them and adding ``log(count)`` to its
attention logit gives the same softmax as keeping all of them: ``count * exp(s) == exp(s + log count)``.
Since the full and the shortened model are the same function of the weights, gradients are exact too.

:func:`use_repeated_tokens` installs :class:`RepeatedTokensJointAttnProcessor` on an SD3 transformer (it
computes diffusers' joint attention unchanged unless it is passed ``repeat_last``); :func:`collapse` shortens
conditions and returns the ``joint_attention_kwargs`` that count the kept row. A condition with no such
run (SD3 with T5: its padding rows differ) or a transformer running other processors (Forget-Me-Not's
recorder) is passed through untouched. On the bundled fmnist-tiny-flow (64 image tokens) one transformer call
reads 78 context tokens instead of 333.
"""

from __future__ import annotations

import math

import torch

from erase.diffusion.joint_attention import joint_attention


class RepeatedTokensJointAttnProcessor:
    """diffusers' SD3 joint attention, where the last context token may stand for ``repeat_last`` tokens."""

    def __init__(self):
        self._plain = _default_processor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args,
                 repeat_last: int = 1, **kwargs):
        # SD3.5's second (image-only) attention has no context: the count does not concern it.
        if encoder_hidden_states is None or repeat_last == 1:
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        keys = hidden_states.shape[1] + encoder_hidden_states.shape[1]
        bias = torch.zeros(keys, device=hidden_states.device)
        bias[-1] = math.log(repeat_last)
        return joint_attention(attn, hidden_states, encoder_hidden_states, bias=bias)


def use_repeated_tokens(transformer) -> bool:
    """Install the processor on every attention of ``transformer`` when all of them run diffusers' default SD3
    processor (anything else is left alone); whether it is installed now."""
    processors, default = transformer.attn_processors.values(), type(_default_processor())
    if processors and all(type(p) is default for p in processors):
        transformer.set_attn_processor(RepeatedTokensJointAttnProcessor())
    return counts_repeats(transformer)


def _default_processor():
    # lazy: diffusers takes seconds to import, and sampling (which imports this module) serves DDPMs too
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    return JointAttnProcessor2_0()


def counts_repeats(transformer) -> bool:
    processors = getattr(transformer, "attn_processors", {}).values()
    return bool(processors) and all(isinstance(p, RepeatedTokensJointAttnProcessor) for p in processors)


def trailing_run(embeds: torch.Tensor) -> int:
    """How many of the last rows of (N, L, D) ``embeds`` equal the last row, in every batch entry."""
    same = (embeds == embeds[:, -1:]).all(dim=-1).all(dim=0)
    return int(same.flip(0).cumprod(0).sum())


def collapse(transformer, *embeds: torch.Tensor | None) -> tuple[list[torch.Tensor | None], dict | None]:
    """``embeds`` (N, L, D each, or None) with their common run of identical trailing rows kept once, and the
    ``joint_attention_kwargs`` that count it; unchanged and None where that would not be exact or not help."""
    present = [e for e in embeds if e is not None]
    if not present or not counts_repeats(transformer):
        return list(embeds), None
    run = min(trailing_run(e) for e in present)
    if run < 2:
        return list(embeds), None
    return [None if e is None else e[:, :e.shape[1] - run + 1] for e in embeds], {"repeat_last": run}
