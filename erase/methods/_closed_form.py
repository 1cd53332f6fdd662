"""Closed-form cross-attention edits (UCE, RECE) as pure torch: no task, model or pipeline types here.

UCE (Gandikota et al., WACV 2024) rewrites a projection W0 (a text key or value projection, shape (out, d))
so that erased token vectors c_i map where their guides g_i used to go, preserved vectors c_j keep
their outputs, and the weights stay near W0:

    W = [λW0 + s_e Σ_E (W0 g_i) c_iᵀ + s_p Σ_P (W0 c_j) c_jᵀ] · [λI + s_e Σ_E c_i c_iᵀ + s_p Σ_P c_j c_jᵀ]⁻¹

(the authors' code; the paper's Eq. 7 has no λ pair). Because every term on the left is W0 times
a d×d matrix, W = W0 · T with T = [λI + s_e Σ g_i c_iᵀ + s_p Σ c_j c_jᵀ] · M⁻¹ — one solve gives
the edit of every layer that sees the same text embeddings (``uce_map``); ``uce_edit`` is the
per-matrix statement of the same formula.

RECE (Gong et al., ECCV 2024) finds, in closed form, the embedding that makes the *edited*
projections reproduce what the *original* ones made of the concept:

    c' = argmin_c Σ_l ‖W'_l c − W_l c_t‖² + λ_r‖c‖² = (λ_r I + Σ_l W'_lᵀW'_l)⁻¹ Σ_l W'_lᵀ W_l c_t

All solves run in float32 (float64 inputs stay float64) on the symmetric matrix with
``torch.linalg.solve``, never an explicit inverse; results come back in the weights' dtype.

Token selection (which rows of a (77, d) prompt embedding enter the sums):

* ``last`` — the last word token only, index ``attention_mask.sum() - 2`` (UCE's current
  ``trainscripts/uce_sd_erase.py``); preserve prompts contribute the same token;
* ``last-to-end`` — the last word token through end-of-text and padding (the paper-era
  ``train-scripts/train_erase.py``, used for the published checkpoints RECE starts from); erase and
  guide sequences are aligned by cutting the longer tail so both have ``77 - max(i_e, i_g)`` rows,
  and preserve prompts contribute all 77 tokens, as that script does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TOKEN_MODES = ("last", "last-to-end")


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rows(x: torch.Tensor | None, d: int, dtype, device) -> torch.Tensor:
    if x is None or x.numel() == 0:
        return torch.zeros(0, d, dtype=dtype, device=device)
    x = x.reshape(-1, x.shape[-1]).to(device=device, dtype=dtype)
    if x.shape[1] != d:
        raise ValueError(f"token vectors have width {x.shape[1]}, the projection expects {d}")
    return x


def _systems(erase_emb, guide_emb, preserve_emb, lamb, erase_scale, preserve_scale, d, dtype, device):
    """The d×d matrices of the UCE normal equations: M = λI + s_e EᵀE + s_p PᵀP and A = λI + s_e GᵀE + s_p PᵀP."""
    e = _rows(erase_emb, d, dtype, device)
    g = _rows(guide_emb, d, dtype, device)
    p = _rows(preserve_emb, d, dtype, device)
    if e.shape != g.shape:
        raise ValueError(f"erase and guide rows must align one to one, got {tuple(e.shape)} and {tuple(g.shape)}")
    eye = torch.eye(d, dtype=dtype, device=device)
    keep = preserve_scale * (p.T @ p)
    m = lamb * eye + erase_scale * (e.T @ e) + keep
    a = lamb * eye + erase_scale * (g.T @ e) + keep
    return m, a


def uce_edit(W0: torch.Tensor, erase_emb: torch.Tensor, guide_emb: torch.Tensor, preserve_emb: torch.Tensor | None,
             lamb: float = 0.5, erase_scale: float = 1.0, preserve_scale: float = 1.0) -> torch.Tensor:
    """UCE's edited weight for one projection ``W0`` (out, d); embeddings are (n, d) stacks of token vectors.

    ``erase_emb[i]`` is steered to ``W0 @ guide_emb[i]``; ``preserve_emb`` rows (may be empty/None)
    keep ``W0 @ c_j``. Returns W in ``W0``'s dtype.
    """
    dtype = _work_dtype(W0, erase_emb, guide_emb)
    w0 = W0.detach().to(dtype)
    d = w0.shape[1]
    e = _rows(erase_emb, d, dtype, w0.device)
    g = _rows(guide_emb, d, dtype, w0.device)
    p = _rows(preserve_emb, d, dtype, w0.device)
    if e.shape != g.shape:
        raise ValueError(f"erase and guide rows must align one to one, got {tuple(e.shape)} and {tuple(g.shape)}")
    m = lamb * torch.eye(d, dtype=dtype, device=w0.device) + erase_scale * (e.T @ e) + preserve_scale * (p.T @ p)
    lhs = lamb * w0 + erase_scale * (w0 @ g.T) @ e + preserve_scale * (w0 @ p.T) @ p
    # W M = lhs with M symmetric  <=>  M Wᵀ = lhsᵀ.
    return torch.linalg.solve(m, lhs.T).T.to(W0.dtype)


def uce_map(erase_emb: torch.Tensor, guide_emb: torch.Tensor, preserve_emb: torch.Tensor | None, lamb: float = 0.5,
            erase_scale: float = 1.0, preserve_scale: float = 1.0) -> torch.Tensor:
    """The d×d matrix T with ``uce_edit(W0, ...) == W0 @ T`` for every W0 of input width d.

    The edit of all 32 K/V projections of SD 1.x is then one solve plus 32 matrix products.
    """
    dtype = _work_dtype(erase_emb, guide_emb)
    d = erase_emb.shape[-1]
    m, a = _systems(erase_emb, guide_emb, preserve_emb, lamb, erase_scale, preserve_scale, d, dtype, erase_emb.device)
    return torch.linalg.solve(m, a.T).T  # T = A M⁻¹  <=>  M Tᵀ = Aᵀ


def apply_map(W: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``W @ T`` in T's precision, returned in W's dtype."""
    return (W.detach().to(T.dtype) @ T.to(W.device)).to(W.dtype)


def rece_map(W_edit_list: Sequence[torch.Tensor], W_orig_list: Sequence[torch.Tensor], reg: float) -> torch.Tensor:
    """C (d×d) with c' = C c_t: C = (λ_r I + Σ_l W'_lᵀW'_l)⁻¹ Σ_l W'_lᵀ W_l, over all given projections together."""
    if len(W_edit_list) != len(W_orig_list) or not W_edit_list:
        raise ValueError("rece needs the same, non-zero number of edited and original projections")
    dtype = _work_dtype(*W_edit_list, *W_orig_list)
    device = W_edit_list[0].device
    d = W_edit_list[0].shape[1]
    lhs = reg * torch.eye(d, dtype=dtype, device=device)
    rhs = torch.zeros(d, d, dtype=dtype, device=device)
    for we, wo in zip(W_edit_list, W_orig_list):
        we = we.detach().to(device, dtype)
        wo = wo.detach().to(device, dtype)
        lhs += we.T @ we
        rhs += we.T @ wo
    return torch.linalg.solve(lhs, rhs)


def rece_embedding(W_edit_list: Sequence[torch.Tensor], W_orig_list: Sequence[torch.Tensor], c_t: torch.Tensor,
                   reg: float) -> torch.Tensor:
    """RECE's adversarial embedding for the rows of ``c_t`` (..., d), each row solved independently."""
    C = rece_map(W_edit_list, W_orig_list, reg)
    return (c_t.to(C.dtype) @ C.T).to(c_t.dtype)


# -- token selection --------------------------------------------------------------------------------

def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each prompt's last word token: CLIP's mask counts start + words + end, so sum - 2 (0, the start
    token, for ''). T5 (SD3's third encoder, FLUX's token encoder) has no start token: words + end give the same
    sum - 2, and its '' is '</s>' alone, whose index 0 stands in as CLIP's start token does (not -1, a pad row)."""
    return (attention_mask.sum(-1).long() - 2).clamp(min=0)


def aligned_rows(erase_emb: torch.Tensor, erase_mask: torch.Tensor, guide_emb: torch.Tensor, guide_mask: torch.Tensor,
                 mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of one erase prompt and its guide, (L, d) each, aligned row by row; inputs are (77, d) and (77,)."""
    if mode == "last":
        i, j = int(last_token_index(erase_mask)), int(last_token_index(guide_mask))
        return erase_emb[i:i + 1], guide_emb[j:j + 1]
    if mode == "last-to-end":
        i, j = int(last_token_index(erase_mask)), int(last_token_index(guide_mask))
        far, n = max(i, j), erase_emb.shape[0]
        # The paper-era script: both tails run to the end, the one starting earlier is cut short.
        return erase_emb[i:n - (far - i)], guide_emb[j:n - (far - j)]
    raise ValueError(f"unknown token mode {mode!r}; choose one of {', '.join(TOKEN_MODES)}")


def preserve_rows(emb: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Rows a preserved prompt contributes: its last word token (``last``) or all tokens (``last-to-end``)."""
    if mode == "last":
        i = int(last_token_index(attention_mask))
        return emb[i:i + 1]
    if mode == "last-to-end":
        return emb
    raise ValueError(f"unknown token mode {mode!r}; choose one of {', '.join(TOKEN_MODES)}")
