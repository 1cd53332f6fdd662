"""One layer map per denoiser architecture, in one place: which modules read the text.

``layer_map(model)`` picks the map from the denoiser's class (after unwrapping erase's
:class:`~erase.diffusion.text_model.TextConditionedUNet`, DDP / FSDP / DeepSpeed / ``torch.compile``
wrappers and a peft ``PeftModel``); methods ask it through ``DenoisingTask.layer_map`` and never name
a module path themselves. The map type and its pattern language are in ``erase.engine.layers``.
Module names below are diffusers 0.42's.

**sd-unet** — ``UNet2DConditionModel``: SD 1.x, SD 2.x and SDXL. Each transformer block has
``attn1`` (self-attention over image tokens) and ``attn2`` (cross-attention: image queries, keys and
values from the text encoder's hidden states, ``encoder_hidden_states``). Text attention is all of
``attn2`` (ESD's ``esd-x`` selects ``'attn2' in name``, in the CompVis code and in the authors'
``esd_sdxl.py`` alike); the text keys and values are ``attn2.to_k`` / ``attn2.to_v`` and read the
text embedding itself in every layer, so UCE's one closed-form map serves them all. SDXL's UNet uses
the same names (its ``addition_embed_type="text_time"`` also feeds the pooled text embedding into
the time embedding, ``add_embedding``, which is not attention and not in the map); its pipeline has
two text encoders, ``text_encoder`` and ``text_encoder_2`` (the refiner's ``text_encoder`` is None).
Text-token attention is recorded at the ``attn2`` processors.

**sd3-mmdit** — ``SD3Transformer2DModel``: SD 3 / 3.5. Each ``JointTransformerBlock`` has one joint
attention, ``attn``, over the concatenated image and text tokens, with separate projections per
stream: ``to_q/to_k/to_v/to_out`` for image tokens, ``add_q_proj/add_k_proj/add_v_proj/to_add_out``
(and, with ``qk_norm``, ``norm_added_q/norm_added_k``) for text tokens. Text attention is that text
stream; its keys and values are ``add_k_proj`` / ``add_v_proj``, through which the image tokens see
the text. Unlike SD's they read the *text stream's* hidden states, which each block updates
(``context_embedder`` projects the encoders' output once, then attention and ``ff_context`` change
it), so ``kv_read_text_embedding`` is False. The layers that do read the encoders' output are
``context_embedder`` (every text token, once, before the first block) and the pooled text's
``time_text_embed.text_embedder.linear_1`` (into the adaLN conditioning of every block): the map's
``text_inputs`` / ``pooled_inputs``, where UCE / RECE apply their closed form on this family. SD 3.5's
dual-attention blocks (``dual_attention_layers``) add an ``attn2`` that is *self-attention over
image tokens* — not text attention, whatever its name suggests on a UNet. Text encoders:
``text_encoder``, ``text_encoder_2`` (CLIP) and ``text_encoder_3`` (T5).

**flux** — ``FluxTransformer2DModel``: FLUX.1. Its double-stream ``transformer_blocks`` have joint
attention with the same per-stream projection names as SD3 (text stream: ``add_*_proj``,
``to_add_out``, ``norm_added_q/k``); that text stream is text attention. Its single-stream
``single_transformer_blocks`` run one attention over the concatenated text and image tokens with
*shared* ``to_q/to_k/to_v`` (and a shared ``proj_out`` fused with the MLP): the same weights project
text and image tokens, so no parameter there is text-only. They are therefore *not* text attention:
``esd-x`` leaves them alone (training them would change how every image token is processed, which
is ``esd-u``'s unconditional erasure, not ``esd-x``'s prompt-specific one) and ``esd-u`` trains them.
Their attention still has text tokens among its keys, so they are recording points with the
double-stream blocks. Keys/values read the text stream as in SD3, and the layers that read the encoders' output have
SD3's names (``context_embedder`` for T5's tokens, ``time_text_embed.text_embedder.linear_1`` for
CLIP's pooled embedding). Text encoders: ``text_encoder`` (CLIP, pooled) and ``text_encoder_2`` (T5).

**ddpm-unet** — ``UNet2DModel`` (class-conditional DDPM): no text; its ``AttnDownBlock2D`` attention
is self-attention. Every text question answers "none".

Recording text-token attention (``erase.diffusion.attention``): on sd-unet the store swaps in
diffusers' classic ``AttnProcessor``, which materialises the attention probabilities; on sd3-mmdit
it swaps in SD3's joint attention written out (``erase.diffusion.joint_attention``), keeping the
image-query x text-key block. diffusers' FLUX processor (``FluxAttnProcessor``: rotary position
embeddings, text tokens first) has no such variant yet, so the store refuses flux with an EraseError.

LoRA targets (``--lora-targets`` default): SD, the attention projections ``to_q, to_k, to_v,
to_out.0`` (of both ``attn1`` and ``attn2``, diffusers' SD LoRA scripts); SD3 / FLUX, both streams'
attention projections (as diffusers' SD3 DreamBooth LoRA script's default).
"""

from __future__ import annotations

import dataclasses

from accelerate.utils import extract_model_from_parallel
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

from erase.diffusion.text_model import TextConditionedUNet
from erase.engine.layers import LayerMap
from erase.errors import EraseError

SD_UNET = LayerMap(
    family="sd-unet",
    text_attention=("attn2",),
    text_keys=("attn2.to_k",),
    text_values=("attn2.to_v",),
    kv_read_text_embedding=True,
    attention_processors=("attn2",),
    records_attention=True,
    text_encoders=("text_encoder",),
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
)

# The text stream of a joint (MMDiT) attention: the same names in SD3's Attention and FLUX's FluxAttention.
_TEXT_STREAM = tuple(f"attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                                          "norm_added_q", "norm_added_k"))
_JOINT_LORA = tuple(f"attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0",
                                         "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))

SD3_MMDIT = LayerMap(
    family="sd3-mmdit",
    text_attention=tuple(f"transformer_blocks.*.{p}" for p in _TEXT_STREAM),
    text_keys=("transformer_blocks.*.attn.add_k_proj",),
    text_values=("transformer_blocks.*.attn.add_v_proj",),
    kv_read_text_embedding=False,
    text_inputs=("context_embedder",),
    pooled_inputs=("time_text_embed.text_embedder.linear_1",),
    attention_processors=("transformer_blocks.*.attn",),  # not attn2: SD 3.5's second attention is image-only
    records_attention=True,
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    lora_targets=_JOINT_LORA,
)

FLUX = LayerMap(
    family="flux",
    # Segments match exactly, so "transformer_blocks" never matches "single_transformer_blocks".
    text_attention=tuple(f"transformer_blocks.*.{p}" for p in _TEXT_STREAM),
    text_keys=("transformer_blocks.*.attn.add_k_proj",),
    text_values=("transformer_blocks.*.attn.add_v_proj",),
    kv_read_text_embedding=False,
    text_inputs=("context_embedder",),
    pooled_inputs=("time_text_embed.text_embedder.linear_1",),
    attention_processors=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"),
    records_attention=False,
    text_encoders=("text_encoder", "text_encoder_2"),
    lora_targets=_JOINT_LORA,
)

DDPM_UNET = LayerMap(family="ddpm-unet", lora_targets=("to_q", "to_k", "to_v", "to_out.0"))

MAPS = {m.family: m for m in (SD_UNET, SD3_MMDIT, FLUX, DDPM_UNET)}
# The map of each model kind erase loads (erase.diffusion.loading.KINDS), told before any weight is read.
BY_KIND = {"sd": SD_UNET, "sdxl": dataclasses.replace(SD_UNET, text_encoders=("text_encoder", "text_encoder_2")),
           "sd3": SD3_MMDIT, "flux": FLUX, "ddpm": DDPM_UNET}


def _sd_unet(unet: UNet2DConditionModel) -> LayerMap:
    if unet.config.get("addition_embed_type") == "text_time":  # SDXL: two CLIP text encoders
        return BY_KIND["sdxl"]
    return SD_UNET


# Checked in order: the first class the denoiser is an instance of decides.
_BY_CLASS = (
    (UNet2DConditionModel, _sd_unet),
    (SD3Transformer2DModel, lambda _: SD3_MMDIT),
    (FluxTransformer2DModel, lambda _: FLUX),
    (UNet2DModel, lambda _: DDPM_UNET),
)


def denoiser_of(model: nn.Module) -> nn.Module:
    """The denoiser inside ``model``: through TextConditionedUNet, DDP / FSDP / DeepSpeed / compile wrappers and a
    peft ``PeftModel`` (diffusers' own ``add_adapter`` LoRA injects in place and needs no unwrapping)."""
    for _ in range(8):  # wrappers nest a few levels at most; a bound keeps a cyclic attribute from looping
        inner = extract_model_from_parallel(model, keep_torch_compile=False)
        if isinstance(inner, TextConditionedUNet):
            inner = inner.unet
        elif type(inner).__name__.startswith("Peft") and callable(getattr(inner, "get_base_model", None)):
            inner = inner.get_base_model()
        if inner is model:
            return model
        model = inner
    return model


def layer_map(model: nn.Module) -> LayerMap:
    """The layer map of ``model``'s denoiser architecture; an EraseError naming the class when erase has none."""
    den = denoiser_of(model)
    for cls, build in _BY_CLASS:
        if isinstance(den, cls):
            return build(den)
    known = ", ".join(cls.__name__ for cls, _ in _BY_CLASS)
    raise EraseError(f"erase has no layer map for a {type(den).__name__} denoiser, so it cannot tell which of its "
                     f"layers read the text (known: {known}; add one in erase/diffusion/layers.py)")
