"""Seeded sampling from SD pipelines and class-conditional DDPMs, optionally stopped part-way.

Each image has its own seed (its initial noise comes from ``torch.Generator().manual_seed(seed)``
on the CPU), so an image is the same whatever the batch or device. ``stop_after`` runs only the
first k denoising steps and returns x_t with the timestep it belongs to — ESD's partial sampling;
for Stable Diffusion it goes through the pipeline's ``callback_on_step_end`` (no patched
``__call__``). FLUX's pipeline works on packed 2x2 latent patches; what comes back here is unpacked to
(N, C, H, W) like every other family's latents.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from erase.diffusion.conditioning import PooledText
from erase.diffusion.repeated_tokens import collapse


def _generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _packs(pipe) -> bool:
    """Whether the pipeline packs 2x2 latent patches into tokens (FluxPipeline)."""
    return hasattr(type(pipe), "_pack_latents")


def default_size(pipe, unet) -> int:
    """The pipeline's own image side: the denoiser's sample_size (FLUX's transformer has none: the pipeline's
    default_sample_size, 128 latents) times the VAE factor."""
    return (unet.config.get("sample_size") or pipe.default_sample_size) * pipe.vae_scale_factor


def _set_timesteps(pipe, steps: int, side: int) -> None:
    """The schedule the pipeline's call sets for ``steps`` at a ``side``-latent image. FLUX's dynamic shifting
    takes mu from the packed token count, as pipeline_flux.py's ``__call__`` computes it."""
    cfg = pipe.scheduler.config
    if not (_packs(pipe) and cfg.get("use_dynamic_shifting", False)):
        pipe.scheduler.set_timesteps(steps)
        return
    # lazy: diffusers takes seconds to import
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift((side // 2) ** 2, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)


@torch.no_grad()
def sample_sd(pipe, unet, prompt_embeds, negative_embeds, seeds, guidance: float, steps: int,
              stop_after: int | None = None, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Denoiser-space latents (N, C, H, W) for ``prompt_embeds`` (N, L, D), or SDXL's / SD3's / FLUX's
    :class:`PooledText`, at ``size`` pixels square (None: the pipeline's default); (latents, the scheduler's
    timestep value) when stopped early.

    ``negative_embeds`` None: no negative side at all (FLUX: ``guidance`` is then the guidance *embedded* into a
    guidance-distilled transformer, the pipeline's ``guidance_scale``; schnell ignores it), else the
    classifier-free guidance against ``negative_embeds``."""
    size = size or default_size(pipe, unet)
    conds = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}
    if isinstance(prompt_embeds, PooledText):  # SDXL / SD3 / FLUX: the pooled parts go beside (SDXL: + time ids)
        conds = {"prompt_embeds": prompt_embeds.embeds, "pooled_prompt_embeds": prompt_embeds.pooled}
        if negative_embeds is not None:
            conds.update(negative_prompt_embeds=negative_embeds.embeds,
                         negative_pooled_prompt_embeds=negative_embeds.pooled)
    elif negative_embeds is None:
        del conds["negative_prompt_embeds"]
    # SD3 without T5: the identical zero rows kept once and counted (exact; erase/diffusion/repeated_tokens.py).
    (conds["prompt_embeds"], negative), counted = collapse(unet, conds["prompt_embeds"],
                                                          conds.get("negative_prompt_embeds"))
    if counted is not None:
        conds["joint_attention_kwargs"] = counted
        if negative is not None:
            conds["negative_prompt_embeds"] = negative
    attr = "unet" if hasattr(pipe, "unet") else "transformer"
    original = getattr(pipe, attr)
    setattr(pipe, attr, unet)
    state: dict = {}

    packs = _packs(pipe)
    # FLUX: the latent side is a multiple of 2 (pipeline_flux.py prepare_latents), the transformer reads 4C.
    side = 2 * (size // (pipe.vae_scale_factor * 2)) if packs else size // pipe.vae_scale_factor

    def unpacked(latents: torch.Tensor) -> torch.Tensor:
        return pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor) if packs else latents

    def stop(p, i, t, kwargs):
        if stop_after is not None and i + 1 == stop_after:
            state["latents"] = kwargs["latents"]
            p._interrupt = True
        return kwargs

    try:
        if stop_after == 0:  # nothing to denoise: x_T is the initial noise
            channels = unet.config.in_channels // 4 if packs else unet.config.in_channels
            noise = torch.cat([torch.randn((1, channels, side, side), generator=g) for g in _generators(seeds)])
            _set_timesteps(pipe, steps, side)
            # Flow schedulers start from plain noise (they have no init_noise_sigma).
            sigma = getattr(pipe.scheduler, "init_noise_sigma", 1.0)
            return noise.to(unet.device, unet.dtype) * sigma, pipe.scheduler.timesteps[0]
        out = pipe(**conds, guidance_scale=guidance, height=size, width=size,
                   num_inference_steps=steps, generator=_generators(seeds), output_type="latent",
                   callback_on_step_end=stop if stop_after is not None else None)
    finally:
        setattr(pipe, attr, original)
        pipe._interrupt = False
    if stop_after is not None:
        return unpacked(state["latents"]), pipe.scheduler.timesteps[stop_after]
    return unpacked(out.images), None


@torch.no_grad()
def sample_ddpm(unet, scheduler, labels, seeds, guidance: float, steps: int, null_class: int,
                stop_after: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pixel-space samples in [-1, 1] for class ``labels``, classifier-free guided against ``null_class``."""
    device, dtype = unet.device, unet.dtype
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    c, s = unet.config.in_channels, unet.config.sample_size
    gens = _generators(seeds)
    x = torch.cat([torch.randn((1, c, s, s), generator=g) for g in gens]).to(device, dtype)
    # Ancestral schedulers (DDPM) draw noise at every step: from the same per-image generators, so an
    # image depends on its seed only, not on the batch it was drawn in.
    step_kwargs = {"generator": gens} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    guided = guidance != 1.0
    cond = torch.cat([labels, torch.full_like(labels, null_class)]) if guided else labels
    n = steps if stop_after is None else stop_after
    for t in scheduler.timesteps[:n]:
        inp = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        eps = unet(inp, t, class_labels=cond).sample
        if guided:
            e_c, e_u = eps.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample  # diffusers draws CPU-generator noise on the CPU
    if stop_after is not None:
        return x, scheduler.timesteps[stop_after] if stop_after < len(scheduler.timesteps) else scheduler.timesteps[-1]
    return x.clamp(-1, 1), None


@torch.no_grad()
def decode_sd(pipe, latents: torch.Tensor) -> torch.Tensor:
    """SD latents -> RGB images in [0, 1] (SD3's VAE convention also has a shift: z = (x - shift) * scale)."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + _shift(vae)).sample
    return ((images.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def encode_sd(pipe, images: torch.Tensor) -> torch.Tensor:
    """RGB images in [0, 1] -> SD latents (the posterior mean, shifted and scaled)."""
    vae = pipe.vae
    dist = vae.encode(images.to(vae.device, vae.dtype) * 2 - 1).latent_dist
    return (dist.mean - _shift(vae)) * vae.config.scaling_factor


def _shift(vae) -> float:
    return vae.config.get("shift_factor") or 0.0
