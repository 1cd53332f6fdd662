"""Exact joint attention when the last context token stands for ``count`` identical tokens.

``StableDiffusion3Pipeline`` without a T5 encoder appends ``max_sequence_length`` (256) zero rows to
the CLIP embedding. Those rows enter the transformer identical and stay identical in every block
(same input, same query, same attention, same MLP), so keeping one of them and adding ``log(count)``
to its attention logit gives the same softmax as keeping all of them: ``count * exp(s) ==
exp(s + log count)``. The tiny flow model trains with 78 context tokens instead of 333 (3.6x faster
per step on one CPU thread, measured before training) and is exact for the pipeline's default call,
which a test checks against the unmodified processor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RepeatedLastTokenJointAttnProcessor:
    """SD3 joint attention (image stream first, then context) with the last context token counted
    ``count`` times. Same projections and q/k norms as diffusers' ``JointAttnProcessor2_0``."""

    def __init__(self, count: int):
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self.log_count = math.log(count)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        n = hidden_states.shape[0]

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(n, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = (split_heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq, ck, cv = (split_heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        bias = torch.zeros(1, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
        bias[..., -1] = self.log_count
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(n, -1, out.shape[1] * out.shape[-1]).to(q.dtype)
        image, context = out[:, :hidden_states.shape[1]], out[:, hidden_states.shape[1]:]
        image = attn.to_out[1](attn.to_out[0](image))
        if attn.context_pre_only:
            return image, context
        return image, attn.to_add_out(context)
