"""Sampling from the bundled generators, with classifier-free guidance.

diffusers has no class-conditional pipeline with guidance for ``UNet2DModel`` (``DDPMPipeline``
is unconditional), so :func:`sample_ddpm` wraps erase's loop: any diffusers scheduler, guidance as
``eps_null + g * (eps_class - eps_null)`` with the null class the model was trained with.
"""

from __future__ import annotations

import torch

from erase.diffusion.loading import load_scheduler
from erase.diffusion.sampling import sample_ddpm as sample
from erase.storage import resolve_model_dir

DDPM_NULL_CLASS = 10  # index of the "no class" embedding of fmnist-ddpm (labels 0-9 are the classes)


def sample_ddpm(unet, scheduler, labels, guidance: float = 2.0, steps: int = 50,
                generator: torch.Generator | None = None, null_class: int | None = None) -> torch.Tensor:
    """Images in [-1, 1], shape (N, C, H, W), for class ``labels`` (ints or a LongTensor).

    ``null_class`` defaults to ``unet.config.num_class_embeds - 1``; ``guidance`` 1 disables guidance.
    ``generator`` draws one seed per image; the images come from :func:`erase.diffusion.sampling.sample_ddpm`
    (the one DDPM sampling loop), so they are the same on every device and in any batch.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    seeds = torch.randint(0, 2**62, (len(labels),), generator=generator).tolist()
    null = unet.config.num_class_embeds - 1 if null_class is None else null_class
    return sample(unet, scheduler, labels, seeds, guidance, steps, null)[0]


@torch.no_grad()
def sample_sd(pipe, prompts: list[str], guidance: float = 4.0, steps: int = 25,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [0, 1], shape (N, 3, H, W), from a StableDiffusionPipeline (or StableDiffusion3Pipeline) at its
    native size."""
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
               output_type="pt", return_dict=True)
    return out.images.float().clamp(0, 1)


def load_ddpm(path, device="cpu", dtype=torch.float32):
    """The UNet and scheduler of a DDPM folder (``unet/`` + ``scheduler/``), e.g. ``fmnist-ddpm``."""
    # lazy: diffusers takes seconds to import
    from diffusers import UNet2DModel


    d = resolve_model_dir(path, kind="DDPM")
    unet = UNet2DModel.from_pretrained(d / "unet").eval()  # float32 (diffusers' default)
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)
    scheduler = load_scheduler(d / "scheduler")  # fmnist-ddpm: ancestral DDPM (its DDIM samples are noisy)
    return unet, scheduler


def load_tiny_sd(path="fmnist-tiny-sd", device="cpu", dtype=torch.float32):
    """A StableDiffusionPipeline from a folder or bundled name, DDIM scheduler, no progress bar."""
    # lazy: diffusers takes seconds to import
    from diffusers import DDIMScheduler, StableDiffusionPipeline


    d = resolve_model_dir(path, kind="Stable Diffusion")
    # No dtype argument: diffusers renamed torch_dtype to dtype; the bundled configs load as float32.
    pipe = StableDiffusionPipeline.from_pretrained(d, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def load_tiny_flow(path="fmnist-tiny-flow", device="cpu", dtype=torch.float32):
    """A StableDiffusion3Pipeline without T5 from a folder or bundled name (its own flow-matching Euler scheduler)."""
    # lazy: diffusers takes seconds to import
    from diffusers import StableDiffusion3Pipeline

    d = resolve_model_dir(path, kind="SD3 flow")
    pipe = StableDiffusion3Pipeline.from_pretrained(d, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
