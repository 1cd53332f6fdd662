"""SD3's joint attention written out, so it can be observed (Forget-Me-Not) or reweighted (training the tiny flow model).

diffusers' ``JointAttnProcessor2_0`` projects the image stream (``to_q/to_k/to_v``) and the text stream
(``add_q_proj/add_k_proj/add_v_proj``), applies the optional q/k norms of each, attends over the
concatenation *image tokens first, then text tokens* with fused scaled-dot-product attention, and
splits the result back (``to_out``; ``to_add_out`` unless the block is ``context_pre_only``). It exposes
no attention probabilities. :func:`joint_attention` computes the same thing, with two additions:
``bias``, added to every query's logit of each key (a key that stands for ``n`` identical keys gets
``log n``), and ``on_probs``, which receives the softmax probabilities (batch, heads, queries, keys) —
then the attention is computed explicitly instead of by the fused kernel. Tests compare both with
diffusers' processor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def joint_attention(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    bias: torch.Tensor | None = None,
                    on_probs: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image output, text output) of one SD3 joint attention ``attn`` (a diffusers ``Attention``)."""
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
    mask = None if bias is None else bias.to(q.dtype).view(1, 1, 1, -1)
    if on_probs is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = (logits if mask is None else logits + mask).softmax(dim=-1)
        on_probs(probs)
        out = probs @ v
    out = out.transpose(1, 2).reshape(n, -1, out.shape[1] * out.shape[-1]).to(q.dtype)
    image, text = out[:, :hidden_states.shape[1]], out[:, hidden_states.shape[1]:]
    image = attn.to_out[1](attn.to_out[0](image))
    return image, (text if attn.context_pre_only else attn.to_add_out(text))
