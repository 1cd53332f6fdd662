"""The layer map: one per denoiser architecture, built on tiny random denoisers; methods' masks ask it."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from erase.diffusion.layers import FLUX, SD3_MMDIT, SD_UNET, denoiser_of, layer_map
from erase.errors import EraseError

METHODS = Path(__file__).resolve().parents[1] / "erase" / "methods"


# -- tiny denoisers (sizes after diffusers' own get_dummy_components) ------------------------------------
def sd_unet(sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80) if sdxl else {}
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8, **extra)


def sd3(sd35: bool = False):
    """Two joint blocks (the last one is context_pre_only: no to_add_out); SD 3.5 style adds a dual-attention block
    (an image-only attn2) and RMS q/k norms."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if sd35 else {}
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                                 pooled_projection_dim=16, out_channels=4, **extra)


def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8])


def ddpm():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11)


def _params(model, keep) -> set[str]:
    return {n for n, _ in model.named_parameters() if keep(n)}


# -- the maps ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sdxl", [False, True])
def test_sd_unet_map_is_attn2(sdxl):
    unet = sd_unet(sdxl)
    lmap = layer_map(unet)
    assert lmap.family == "sd-unet" and lmap.reads_text and lmap.kv_read_text_embedding
    assert lmap.text_encoders == (("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",))
    text = _params(unet, lmap.is_text_attention)
    assert text == _params(unet, lambda n: ".attn2." in n) and text
    assert not any(".attn1." in n for n in text)
    for name in text:
        assert lmap.text_key_value(name) == ("k" if ".to_k." in name else "v" if ".to_v." in name else None)
    proj = lmap.text_projections(unet)
    assert [n for n, _ in proj] == [n for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert [n for n, _ in lmap.text_projections(unet, ("v",))] == [n for n, _ in proj if n.endswith("to_v")]
    points = lmap.attention_processor_names(unet)
    assert points == [n for n in unet.attn_processors if ".attn2." in n] and points


@pytest.mark.parametrize("sd35", [False, True])
def test_sd3_map_is_the_joint_blocks_text_stream(sd35):
    model = sd3(sd35)
    lmap = layer_map(model)
    assert lmap.family == "sd3-mmdit" and lmap.reads_text and not lmap.kv_read_text_embedding
    assert lmap.text_encoders == ("text_encoder", "text_encoder_2", "text_encoder_3")
    text = _params(model, lmap.is_text_attention)
    stream = r"transformer_blocks\.\d+\.attn\.(add_[qkv]_proj|to_add_out" + (r"|norm_added_[qk]" if sd35 else "") + r")\."
    assert text == _params(model, lambda n: re.match(stream, n)) and text
    assert any("to_add_out" in n for n in text) and any("add_q_proj" in n for n in text)
    if sd35:  # SD 3.5's attn2 is image self-attention: never text attention, never a recording point
        assert any(".attn2." in n for n, _ in model.named_parameters())
        assert not any(".attn2." in n for n in text)
    assert {lmap.text_key_value(n) for n in text} == {"k", "v", None}
    assert {n for n in text if lmap.text_key_value(n) == "k"} == _params(model, lambda n: ".attn.add_k_proj." in n)
    assert {n for n in text if lmap.text_key_value(n) == "v"} == _params(model, lambda n: ".attn.add_v_proj." in n)
    assert lmap.text_key_value("transformer_blocks.0.attn.to_k.weight") is None  # the image stream's key
    assert [n for n, _ in lmap.text_projections(model)] == [
        f"transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("add_k_proj", "add_v_proj")]
    assert lmap.attention_processor_names(model) == ["transformer_blocks.0.attn.processor",
                                                     "transformer_blocks.1.attn.processor"]


def test_flux_map_is_the_double_stream_text_stream():
    model = flux()
    lmap = layer_map(model)
    assert lmap.family == "flux" and lmap.text_encoders == ("text_encoder", "text_encoder_2")
    text = _params(model, lmap.is_text_attention)
    assert text == _params(model, lambda n: re.match(
        r"transformer_blocks\.0\.attn\.(add_[qkv]_proj|to_add_out|norm_added_[qk])\.", n))
    # Single-stream blocks share to_q/to_k/to_v between text and image tokens: not text attention (see the module doc).
    assert any(n.startswith("single_transformer_blocks.") for n, _ in model.named_parameters())
    assert not any(n.startswith("single_transformer_blocks.") for n in text)
    assert lmap.text_key_value("single_transformer_blocks.0.attn.to_k.weight") is None
    assert [n for n, _ in lmap.text_projections(model)] == ["transformer_blocks.0.attn.add_k_proj",
                                                            "transformer_blocks.0.attn.add_v_proj"]
    assert lmap.attention_processor_names(model) == ["transformer_blocks.0.attn.processor",
                                                     "single_transformer_blocks.0.attn.processor"]


def test_ddpm_map_has_no_text_layers():
    unet = ddpm()
    assert any(n.endswith("to_k") for n, _ in unet.named_modules())  # self-attention a name filter would pick up
    lmap = layer_map(unet)
    assert lmap.family == "ddpm-unet" and not lmap.reads_text and not lmap.text_encoders
    assert not _params(unet, lmap.is_text_attention)
    assert not any(lmap.text_key_value(n) for n, _ in unet.named_parameters())
    assert lmap.text_projections(unet) == [] and lmap.attention_processor_names(unet) == []


def test_unknown_denoiser_is_refused_by_name():
    class MyDenoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn2 = nn.Linear(2, 2)

    with pytest.raises(EraseError, match="no layer map for a MyDenoiser denoiser"):
        layer_map(MyDenoiser())


def test_wrappers_are_unwrapped():
    from peft import LoraConfig

    from erase.diffusion.text_model import TextConditionedUNet

    unet = sd_unet()
    stack = SimpleNamespace(tokenizer=None, with_encoders=lambda encoders: SimpleNamespace(encoders=encoders))
    wrapped = TextConditionedUNet(unet, [nn.Linear(2, 2)], stack)
    assert denoiser_of(wrapped) is unet and layer_map(wrapped) is SD_UNET
    assert denoiser_of(nn.DataParallel(wrapped)) is unet
    assert denoiser_of(torch.compile(unet)) is unet
    # TextConditionedUNet names: unet.* is the denoiser; its text encoder's attention is not "text attention".
    names = {n for n, _ in wrapped.named_parameters() if layer_map(wrapped).is_text_attention(n)}
    assert names == {f"unet.{n}" for n, _ in unet.named_parameters() if ".attn2." in n}
    # diffusers' add_adapter injects LoRA in place: the layers inside a wrapped projection answer as it does.
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(SD_UNET.lora_targets)))
    lora = [n for n, _ in unet.named_parameters() if "lora_A" in n and ".attn2.to_k." in n]
    assert lora and all(SD_UNET.text_key_value(n) == "k" for n in lora)
    # The projections are peft LoRA layers now, not nn.Linear (as before the map; closed-form edits refuse LoRA).
    assert SD_UNET.text_projections(unet) == []


def test_flux_attention_recording_is_refused():
    from erase.diffusion.attention import AttentionStore

    with pytest.raises(EraseError, match="not supported yet for flux"):
        AttentionStore().install(flux())
    with pytest.raises(EraseError, match="no text cross-attention"):
        AttentionStore().install(ddpm())


def test_family_maps_differ_where_the_names_do():
    assert SD3_MMDIT.is_text_attention("transformer_blocks.3.attn.add_k_proj.weight")
    assert not SD_UNET.is_text_attention("transformer_blocks.3.attn.add_k_proj.weight")
    assert not SD3_MMDIT.is_text_attention("transformer_blocks.0.attn2.to_k.weight")
    assert not FLUX.is_text_attention("single_transformer_blocks.0.attn.add_k_proj.weight")  # segments match exactly


# -- methods ask the map: their masks on a tiny SD UNet are the old hand-written attn2 filters --------------------
def _ctx(model):
    return SimpleNamespace(model=model, unwrapped=model, task=SimpleNamespace(layer_map=layer_map))


def _mask_names(masks) -> set[str]:
    return {n for n, m in masks.items() if bool(m.all())}


def test_method_masks_equal_the_attn2_filters():
    import erase

    unet = sd_unet()
    ctx = _ctx(unet)
    esd_x = erase.get_method("esd-x", "diffusion")
    esd_u = erase.get_method("esd-u", "diffusion")
    fmn = erase.get_method("fmn", "diffusion")
    ca = erase.get_method("ca", "diffusion")
    attn2 = _params(unet, lambda n: ".attn2." in n)
    assert _mask_names(esd_x(esd_x.Config()).parameter_masks(ctx)) == attn2
    assert _mask_names(esd_u(esd_u.Config()).parameter_masks(ctx)) == _params(unet, lambda n: ".attn2." not in n)
    assert _mask_names(fmn(fmn.Config()).parameter_masks(ctx)) == attn2
    assert _mask_names(ca(ca.Config()).parameter_masks(ctx)) == _params(
        unet, lambda n: ".attn2." in n and (".to_k." in n or ".to_v." in n))


@pytest.mark.parametrize("edit,ends", [("kv", (".to_k", ".to_v")), ("v", (".to_v",))])
def test_closed_form_projections_equal_the_attn2_filter(edit, ends):
    from erase.methods.uce import kv_projections

    unet = sd_unet()
    old = [(n, m) for n, m in unet.named_modules() if isinstance(m, nn.Linear) and ".attn2." in n and n.endswith(ends)]
    assert old and kv_projections(layer_map(unet), unet, edit) == old


@pytest.mark.parametrize("build", [sd3, flux])
def test_closed_form_on_joint_attention_edits_the_layers_that_read_the_encoders(build):
    """No MMDiT key/value projection reads the encoders' output: the edit goes to context_embedder (tokens) and the
    pooled embedder's first linear, the only layers that do; --edit v has no value-only layer there."""
    from erase.methods.uce import kv_projections, pooled_projections

    model = build()
    lmap = layer_map(model)
    assert [n for n, _ in kv_projections(lmap, model, "kv")] == ["context_embedder"]
    assert [n for n, _ in pooled_projections(lmap, model)] == ["time_text_embed.text_embedder.linear_1"]
    assert kv_projections(lmap, model, "kv")[0][1].in_features == model.config.joint_attention_dim
    with pytest.raises(EraseError, match="--edit v .* use --edit kv"):
        kv_projections(lmap, model, "v")
    with pytest.raises(EraseError, match="no text cross-attention key/value projections"):
        kv_projections(layer_map(ddpm()), ddpm(), "kv")
    assert pooled_projections(layer_map(sd_unet()), sd_unet()) == []


def test_no_method_names_a_module_path():
    """Methods ask the layer map; a module path in a method file is a regression."""
    for path in METHODS.glob("*.py"):
        text = path.read_text()
        for name in ("attn2", "attn1", "to_k", "to_v", "to_q", "add_k_proj", "add_v_proj", "to_add_out"):
            assert not re.search(rf"\b{name}\b", text), f"{path.name} names {name}"
