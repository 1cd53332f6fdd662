"""FLUX.1's transformer call, in the task's (N, C, H, W) latent vocabulary.

What ``FluxTransformer2DModel`` reads (diffusers 0.42 ``pipeline_flux.py`` ``__call__``, and the same call in
``examples/dreambooth/train_dreambooth_flux.py``):

* ``hidden_states``: *packed* latents, each 2x2 latent patch one token of 4C channels
  (``FluxPipeline._pack_latents``); the output comes back packed (``_unpack_latents``). Erase's methods
  noise, predict and compare in (N, C, H, W) (``task.add_noise``, ``denoising_target``), so :func:`predict`
  packs on the way in and unpacks on the way out, as the dreambooth script unpacks before its loss;
* ``img_ids``: (row, column) rotary position ids of the H/2 x W/2 token grid (``_prepare_latent_image_ids``);
  ``txt_ids``: zeros, one row per text token (``encode_prompt``);
* ``timestep``: the scheduler's timestep (sigma * 1000) **divided by 1000**, i.e. sigma itself (the transformer
  multiplies by 1000 inside its time embedding);
* ``guidance``: on the guidance-distilled FLUX.1-dev (``transformer.config.guidance_embeds``) a (N,) float32
  tensor holding the *embedded* guidance scale (the call's ``guidance_scale``, 3.5 by default; the dreambooth
  script trains at ``--guidance_scale`` 3.5); None on FLUX.1-schnell, which has no guidance embedding;
* ``pooled_projections``: CLIP's pooled output; ``encoder_hidden_states``: T5's token states.

T5 reads 512 tokens on dev and 256 on schnell (Black Forest Labs' reference sampler, ``src/flux/cli.py``:
``load_t5(torch_device, max_length=256 if name == "flux-schnell" else 512)``; diffusers' FLUX docs: schnell's
``max_sequence_length`` cannot exceed 256), told apart here by the guidance embedding.

FLUX's default call has no negative prompt: the distilled guidance embedding stands in for classifier-free
guidance (true CFG needs ``true_cfg_scale > 1`` plus a negative prompt). Where erase's methods need an
"unconditional" prediction (ESD's ε(x, ∅), the task's null condition) it is the transformer's prediction under
the **encoded empty prompt** (T5 and CLIP of ""), as in the ESD authors' FLUX code (``utils/esd_trainer.py``,
``FluxESDAdapter``: ``prompts.append("")`` encoded with ``encode_prompt``), at the same embedded guidance as
the conditional prediction it is compared with.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from erase.diffusion.conditioning import PooledText

DEV_T5_TOKENS, SCHNELL_T5_TOKENS = 512, 256


def t5_length(transformer) -> int:
    """T5 tokens the model was trained with: 512 for a guidance-distilled (dev) transformer, 256 for schnell."""
    return DEV_T5_TOKENS if transformer.config.get("guidance_embeds", False) else SCHNELL_T5_TOKENS


def pack(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) latents -> (N, H/2 * W/2, 4C) tokens, exactly as the pipeline packs them."""
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent sides must be even, got {h}x{w}")
    return FluxPipeline._pack_latents(x, n, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, H/2 * W/2, 4C) tokens -> (N, C, H, W) latents (the inverse of :func:`pack`)."""
    return FluxPipeline._unpack_latents(tokens, h, w, 1)  # vae_scale_factor 1: h, w are latent sides already


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids of the packed token grid of an H x W latent."""
    return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)


def predict(model, x_t: torch.Tensor, timestep: torch.Tensor, cond: PooledText,
            guidance: torch.Tensor | None) -> torch.Tensor:
    """The transformer's (velocity) output at (N, C, H, W) ``x_t``, unpacked to (N, C, H, W).

    ``timestep``: what the pipeline passes, sigma (the scheduler's timestep / 1000); ``guidance``: (N,) embedded
    guidance, or None for a model without a guidance embedding."""
    n, _, h, w = x_t.shape
    dtype = x_t.dtype
    out = model(hidden_states=pack(x_t), timestep=timestep.to(x_t.device, dtype).expand(n), guidance=guidance,
                pooled_projections=cond.pooled.to(dtype), encoder_hidden_states=cond.embeds.to(dtype),
                txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x_t.device, dtype=dtype),
                img_ids=image_ids(h, w, x_t.device, dtype)).sample
    return unpack(out, h, w)
