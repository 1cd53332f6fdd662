"""The full-size denoiser's training step on its own: what a method's step costs without the rest of the pipeline.

At full size erase's own path holds every component in fp32 (SDXL: 12.9 GiB before anything trains),
so on a 24 GB machine most method rows are over the memory budget. These rows (``den:...`` in
``speed_fullsize``) load only the denoiser, from the same folder, and time one Adam step of it:

* trained parameters as the methods select them — ``den:esd-x`` the text attention of the family's
  layer map (what ESD-x's masks leave trainable), ``den:esd-u`` everything else, ``den:lora`` rank-4
  LoRA adapters on the family's default targets (as ``DiffusionTask.build_model`` adds them, base
  frozen);
* ``+gc`` gradient checkpointing, ``+bf16`` accelerate's bf16 autocast (as ``speed_measure``);
* the step: the denoiser's forward at 256 px on random latents and random conditions of the task's
  shapes (SDXL: 77 x 2048 tokens, the 1280-d pooled text, six time ids; SD3: 77 + 256 x 4096 tokens,
  the 2048-d pooled text), an MSE to a random target, backward, Adam. ``forward_s`` is one forward
  without gradients in the row's precision (accelerate's prepare leaves the model's forward under
  autocast) — one prediction of a frozen teacher, or one sampling step: an ESD
  iteration stopped at x_T costs about ``step_s + 2 x forward_s`` (two teacher predictions), one at
  the mean stop 24 more ``forward_s`` (x2 with guidance).

Not included, compared with the method rows: the text encoders and VAE (frozen; their weights add
4 B per parameter), ESD's teacher copy (4 B x the denoiser without LoRA), the prompt
table.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.nn import functional as F

from erase.bench.speed_build import denoiser_name
from erase.bench.speed_measure import Clock, accelerator, rss_gb, watch_dtypes
from erase.diffusion.layers import layer_map
from erase.engine.optim import build_optimizer

SD3_TEXT_TOKENS = 77 + 256  # CLIP tokens + T5's max_sequence_length (zeros when the pipeline has no T5)
SELECTIONS = ("esd-x", "esd-u", "lora")


def vae_factor(configs: dict) -> int:
    return 2 ** (len(configs["vae"]["block_out_channels"]) - 1)


def text_shape(family: str, configs: dict) -> tuple[int, int]:
    """(tokens, width) of the condition the denoiser reads."""
    c = configs[denoiser_name(family)]
    return (SD3_TEXT_TOKENS, c["joint_attention_dim"]) if family == "sd3" else (77, c["cross_attention_dim"])


def forward_call(family: str, model, configs: dict, pixels: int, device: str = "meta"):
    """A zero-argument call of ``model`` (family sd14, sdxl or sd3) on inputs of the task's shapes at ``pixels``:
    zeros on the meta device (for counting), seeded random values elsewhere. Returns the prediction tensor."""
    side = pixels // vae_factor(configs)
    c = configs[denoiser_name(family)]
    gen = torch.Generator().manual_seed(0)

    def make(*shape):
        return torch.zeros(shape, device="meta") if device == "meta" else torch.randn(shape, generator=gen).to(device)

    x, t = make(1, c["in_channels"], side, side), torch.full((1,), 500.0, device=device)
    tokens, width = text_shape(family, configs)
    enc = make(1, tokens, width)
    if family == "sd3":
        pooled = make(1, c["pooled_projection_dim"])
        return lambda m=model: m(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t).sample
    if c.get("addition_embed_type") != "text_time":
        return lambda m=model: m(x, t, encoder_hidden_states=enc).sample
    added = {"text_embeds": make(1, c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]),
             "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], dtype=torch.float32, device=device)}
    return lambda m=model: m(x, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample


def _load(family: str, model_dir: Path):
    # lazy: diffusers takes seconds to import
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    cls = SD3Transformer2DModel if family == "sd3" else UNet2DConditionModel
    return cls.from_pretrained(model_dir / denoiser_name(family))


def select(model, selection: str, rank: int) -> int:
    """Make ``selection``'s parameters the trainable ones; how many there are."""
    lmap = layer_map(model)
    if selection == "lora":
        # lazy: peft pulls in transformers
        from peft import LoraConfig

        model.requires_grad_(False)  # as DiffusionTask.build_model: only the adapters train
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=list(lmap.lora_targets)))
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(lmap.is_text_attention(name) == (selection == "esd-x"))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure_denoiser(family: str, configs: dict, model_dir: Path, selection: str, gc: bool, bf16: bool, pixels: int,
                     rank: int) -> dict:
    """One warm-up and one timed Adam step of the denoiser alone, then one forward without gradients."""
    clock = Clock()
    with clock("load_s"):
        model = _load(family, model_dir)
    rss_loaded = rss_gb()
    if gc:
        model.enable_gradient_checkpointing()
    trainable = select(model, selection, rank)
    model.train()
    optimizer = build_optimizer(model.parameters(), "adam", 1e-5)
    acc = accelerator("bf16" if bf16 else "no")
    wrapped = model
    if bf16:
        wrapped, optimizer = acc.prepare(model, optimizer)
    call = forward_call(family, wrapped, configs, pixels, "cpu")
    target = None
    seen, handle = watch_dtypes(model)

    def step() -> None:
        nonlocal target
        out = call()
        if target is None:
            target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        loss = F.mse_loss(out.float(), target)
        if bf16:
            acc.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with clock("warmup_s"):
        step()
    seen.clear()
    with clock("step_s"):
        step()
    handle.remove()
    model.eval()
    with clock("forward_s"), torch.no_grad():
        forward_call(family, model, configs, pixels, "cpu")()
    t = clock.times
    t["esd_step_estimate_s"] = round(t["step_s"] + 2 * t["forward_s"], 4)
    return {"times": t, "main_s": t["step_s"], "rss_loaded_gb": rss_loaded, "trainable_params": trainable,
            "gradient_checkpointing": gc, "mixed_precision": "bf16" if bf16 else "no", "autocast_dtypes": sorted(seen),
            "finished": time.strftime("%H:%M:%S")}
