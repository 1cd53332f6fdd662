"""GPU memory of erasure training on FLUX.1-dev, *estimated* from parameter counts (nothing is built or run).

FLUX.1-dev's transformer has 11.9 B parameters (48 GB in fp32), beyond this CPU machine: erase loads
FLUX (kind "flux", ``erase.diffusion.loading``) but the benchmark cannot build it here. So the
transformer is built on the meta device from its published config (``speed_configs.FLUX_DEV``) and
counted: its total, the text-attention parameters that ``esd-x``
trains (the layer map's text stream of the 19 double-stream blocks), and the LoRA adapters on the
family's default targets. The other components' counts are the published ones
(``speed_configs.PUBLISHED_PARAMS["flux"]``: T5-v1.1-XXL encoder 4.762 B, CLIP-L 123.1 M, the 16-channel
VAE 83.8 M). The text-attention count by hand, per double-stream block, hidden h = 24 heads x 128 = 3072:
``add_q_proj``, ``add_k_proj``, ``add_v_proj`` and ``to_add_out`` are h x h weights plus h biases each,
``norm_added_q`` / ``norm_added_k`` RMSNorms of the head size (128): 4 (3072² + 3072) + 2 x 128 =
37,761,280; x 19 blocks = 717,464,320 (0.717 B, 6.0 % of the transformer). The 38 single-stream
blocks share their projections between text and image tokens, so none of theirs is text-only.

Bytes per parameter, for the denoiser D, the trained parameters Tr and the frozen parts F:

* **bf16 weights + fp32 Adam** (the usual large-model recipe): weights 2 D, gradients 2 Tr, Adam's two
  moments 8 Tr; a frozen ESD teacher (full-weight ESD) is another bf16 copy, 2 D; F in bf16, 2 F.
* **as erase's runner trains** (``--mixed-precision bf16`` is accelerate's autocast over fp32 weights):
  weights 4 D, gradients 4 Tr, Adam 8 Tr, autocast's bf16 copies of the weights saved for backward 2 D
  (``speed_memory``); ESD's
  teacher in fp16 (``teacher_dtype`` auto on a GPU) 2 D; F loaded in fp32, 4 F.
* **LoRA** r = 4 / 16: the adapters train (fp32: 4 + 4 + 8 B each); the teacher is the model itself with
  its adapters off, so no copy.

Activations at 1024 px (4096 image tokens of the 128² latent in 2 x 2 patches + 512 T5 tokens) are
counted on the meta device by ``speed_memory.saved_activations`` (fused attention: no s x s matrices
kept), with and without gradient checkpointing, batch 1. The count is of fp32 tensors; in bf16 (bf16
weights, or autocast, where the matmul outputs that dominate the count are bf16) it is about half, so
the range given is [checkpointed count / 2, full count / 2]: bf16 with and without checkpointing; the
fp32 full count is the ceiling (reported too). The CUDA context, the allocator's
fragmentation and the non-fused attention path (which would keep 24 x 4608² probabilities per
attention, 2 GiB each in fp32) are not included.
"""

from __future__ import annotations

import torch

from erase.bench.speed_configs import FLUX_DEV, PUBLISHED_PARAMS
from erase.bench.speed_memory import GIB, lora_params, saved_activations

DOUBLE_BLOCKS, SINGLE_BLOCKS, HIDDEN, HEAD = 19, 38, 3072, 128
TEXT_TOKENS = 512  # FLUX.1-dev's T5 max_sequence_length
LORA_RANKS = (4, 16)


def text_attention_by_hand() -> int:
    """The double-stream blocks' text-stream attention parameters, from the architecture's numbers."""
    per_block = 4 * (HIDDEN * HIDDEN + HIDDEN) + 2 * HEAD
    return DOUBLE_BLOCKS * per_block


def _meta_flux():
    # lazy: diffusers takes seconds to import
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**FLUX_DEV["transformer"])


def _flux_forward(model, pixels: int):
    side = pixels // 8 // 2  # VAE factor 8, 2 x 2 patches packed into the 64 input channels
    s_img = side * side
    with torch.device("meta"):
        x = torch.zeros(1, s_img, FLUX_DEV["transformer"]["in_channels"])
        enc = torch.zeros(1, TEXT_TOKENS, FLUX_DEV["transformer"]["joint_attention_dim"])
        pooled = torch.zeros(1, FLUX_DEV["transformer"]["pooled_projection_dim"])
        img_ids, txt_ids = torch.zeros(s_img, 3), torch.zeros(TEXT_TOKENS, 3)
        t, g = torch.ones(1), torch.ones(1)
    return lambda: model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
                         img_ids=img_ids, txt_ids=txt_ids, guidance=g)


def flux_estimate(pixels: int = 1024) -> dict:
    """The FLUX.1-dev estimate: counts, per-scenario GiB with the arithmetic, activation range."""
    # lazy: the layer map imports diffusers
    from erase.diffusion.layers import FLUX, layer_map

    model = _meta_flux()
    d = sum(p.numel() for p in model.parameters())
    lmap = layer_map(model)
    text = sum(p.numel() for n, p in model.named_parameters() if lmap.is_text_attention(n))
    frozen = {k: v for k, v in PUBLISHED_PARAMS["flux"].items() if k != "transformer"}
    f = sum(frozen.values())
    lora = {r: lora_params(model, FLUX.lora_targets, r) for r in LORA_RANKS}
    acts = saved_activations(model, _flux_forward(model, pixels), checkpointing=True)
    act_low, act_high = acts["gib"] / 2, acts["plain_gib"] / 2  # bf16: with / without checkpointing

    def row(name: str, terms: dict[str, tuple[float, str]]) -> dict:
        gib = {k: round(b / GIB, 2) for k, (b, _) in terms.items()}
        fixed = round(sum(gib.values()), 1)
        return {"scenario": name, "terms_gib": gib, "arithmetic": " + ".join(f"{k} {gib[k]:.2f} ({w})" for k, (_, w)
                                                                            in terms.items()),
                "without_activations_gib": fixed,
                "total_gib": [round(fixed + act_low, 1), round(fixed + act_high, 1)]}

    def m(n):
        return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"

    rows = [
        row("full fine-tuning (esd-u-like, all weights), bf16 weights + fp32 Adam",
            {"weights": (2 * d, f"2 B x {m(d)}"), "grads": (2 * d, f"2 B x {m(d)}"), "adam": (8 * d, f"8 B x {m(d)}"),
             "frozen": (2 * f, f"bf16 T5 + CLIP + VAE, 2 B x {m(f)}")}),
        row("full fine-tuning as erase's runner (fp32 weights, bf16 autocast)",
            {"weights": (4 * d, f"4 B x {m(d)}"), "grads": (4 * d, f"4 B x {m(d)}"), "adam": (8 * d, f"8 B x {m(d)}"),
             "autocast": (2 * d, f"2 B x {m(d)}"), "frozen": (4 * f, f"fp32, 4 B x {m(f)}")}),
        row("esd-x (text attention of the double blocks), bf16 weights + fp32 Adam, bf16 teacher copy",
            {"weights": (2 * d, f"2 B x {m(d)}"), "teacher": (2 * d, f"2 B x {m(d)}"),
             "grads": (2 * text, f"2 B x {m(text)}"), "adam": (8 * text, f"8 B x {m(text)}"),
             "frozen": (2 * f, f"2 B x {m(f)}")}),
        row("esd-x as erase's runner (fp32 weights, bf16 autocast, fp16 teacher)",
            {"weights": (4 * d, f"4 B x {m(d)}"), "teacher": (2 * d, f"2 B x {m(d)}"),
             "grads": (4 * text, f"4 B x {m(text)}"), "adam": (8 * text, f"8 B x {m(text)}"),
             "autocast": (2 * d, f"2 B x {m(d)}"), "frozen": (4 * f, f"4 B x {m(f)}")}),
    ] + [
        row(f"LoRA rank {r} (esd-x/esd-u with adapters; teacher = adapters off), bf16 base",
            {"weights": (2 * d, f"2 B x {m(d)}"), "adapters": (16 * n, f"fp32 weights + grads + Adam, 16 B x {m(n)}"),
             "frozen": (2 * f, f"2 B x {m(f)}")})
        for r, n in lora.items()
    ]
    return {
        "kind": "estimate, not a measurement",
        "pixels": pixels, "image_tokens": (pixels // 16) ** 2, "text_tokens": TEXT_TOKENS,
        "params": {"transformer": d, **frozen}, "published_transformer": PUBLISHED_PARAMS["flux"]["transformer"],
        "text_attention": text, "text_attention_by_hand": text_attention_by_hand(),
        "text_attention_arithmetic": (f"{DOUBLE_BLOCKS} double blocks x (4 x ({HIDDEN}^2 + {HIDDEN}) + 2 x {HEAD}) = "
                                      f"{DOUBLE_BLOCKS} x {4 * (HIDDEN * HIDDEN + HIDDEN) + 2 * HEAD:,} = "
                                      f"{text_attention_by_hand():,}"),
        "lora_params": {str(r): n for r, n in lora.items()}, "lora_targets": list(FLUX.lora_targets),
        "activations_gib": acts, "activation_range_gib": [round(act_low, 1), round(act_high, 1)],
        "scenarios": rows,
    }
