"""Exact joint attention when the last context token stands for ``count`` identical tokens.

``StableDiffusion3Pipeline`` without a T5 encoder appends ``max_sequence_length`` (256) zero rows to
the CLIP embedding. Those rows enter the transformer identical and stay identical in every block
(same input, same query, same attention, same MLP), so keeping one of them and adding ``log(count)``
to its attention logit gives the same softmax as keeping all of them: ``count * exp(s) ==
exp(s + log count)``. The tiny flow model trains with 78 context tokens instead of 333 (a quarter of
the tokens per caption; the step-time ratio was not kept as a benchmark) and is exact for the pipeline's default call,
which a test checks against diffusers' own processor.
"""

from __future__ import annotations

import math

import torch

from erase.diffusion.joint_attention import joint_attention


class RepeatedLastTokenJointAttnProcessor:
    """SD3 joint attention with the last context token counted ``count`` times."""

    def __init__(self, count: int):
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self.log_count = math.log(count)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        keys = hidden_states.shape[1] + encoder_hidden_states.shape[1]
        bias = torch.zeros(keys, device=hidden_states.device)
        bias[-1] = self.log_count
        return joint_attention(attn, hidden_states, encoder_hidden_states, bias=bias)
