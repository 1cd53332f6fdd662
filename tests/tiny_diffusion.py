"""Tiny diffusion models built in code (diffusers' get_dummy_components style), saved as folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_sd(folder: Path, v_prediction: bool = False, sd2: bool = False) -> Path:
    """An SD-1.x-shaped (or SD-2.x-shaped with v-prediction) pipeline folder with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erase.zoo.tokenizer import build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                        max_position_embeddings=77, projection_dim=32))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type="v_prediction" if v_prediction else "epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_tokenizer(), unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl(folder: Path) -> Path:
    """An SDXL-shaped pipeline folder with random weights (after diffusers' SDXL get_dummy_components): a UNet with
    the "text_time" added embedding, CLIPTextModel + CLIPTextModelWithProjection (cross-attention reads both, 32 + 32),
    the bundled CLIP tokenizer for both tokenizers; 8x8 latents, 16 px images."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from erase.zoo.tokenizer import build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids of 8 + the pooled text (projection_dim 32)
        cross_attention_dim=32 + 32, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                            max_position_embeddings=77, projection_dim=32, hidden_act="gelu")
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
                                     tokenizer=build_tokenizer(), tokenizer_2=build_tokenizer(), unet=unet, scheduler=sched)
    pipe.save_pretrained(folder)
    return folder


def tiny_sd3(folder: Path, qk_norm: str | None = None) -> Path:
    """An SD3-shaped pipeline folder with random weights, saved without T5 (after diffusers' SD3 get_dummy_components):
    an SD3Transformer2DModel (2 joint blocks, patch 1), two CLIPTextModelWithProjection (32 + 32 -> 64-d tokens and
    pooled), a flow-matching Euler scheduler with SD3's shift 3, a VAE with SD3's shift_factor; 16 px images."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from erase.zoo.tokenizer import build_tokenizer

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
        pos_embed_max_size=8, qk_norm=qk_norm)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16, shift_factor=0.06, scaling_factor=1.5)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                            max_position_embeddings=77, projection_dim=32, hidden_act="gelu")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(config), tokenizer=build_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=build_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    return folder


def tiny_t5_tokenizer():
    """A T5TokenizerFast built offline: a character-level Unigram vocabulary (every lower/upper-case letter, digit and
    common punctuation mark, with and without SentencePiece's word-start ``▁``) behind T5's special tokens (<pad> 0,
    </s> 1, <unk> 2), so distinct prompts get distinct ids; padding and the appended </s> are T5's own."""
    import string

    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + ",.'-!?:;()&/"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_flux(folder: Path, guidance_embeds: bool = True) -> Path:
    """A FLUX.1-shaped pipeline folder with random weights (after diffusers' FLUX get_dummy_components): a
    FluxTransformer2DModel (1 double-stream + 1 single-stream block, patch 1 over 2x2-packed latents: 4 latent
    channels -> 16), a CLIPTextModel (pooled, 32) and a T5EncoderModel (tokens, 32) with an offline T5 tokenizer, a
    flow-matching Euler scheduler with FLUX's dynamic shifting, a VAE with FLUX's shift_factor; 16 px images (8x8
    latents, 16 tokens). ``guidance_embeds``: FLUX.1-dev's guidance embedding (False: FLUX.1-schnell's layout)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from erase.zoo.tokenizer import build_tokenizer

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16, shift_factor=0.0609, scaling_factor=1.5035)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                        max_position_embeddings=77, projection_dim=32, hidden_act="gelu"))
    tokenizer_2 = tiny_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    # FLUX.1-dev's scheduler_config.json: shift 3 stored, but use_dynamic_shifting decides (mu from the token count).
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=clip,
                        tokenizer=build_tokenizer(), text_encoder_2=t5, tokenizer_2=tokenizer_2)
    pipe.save_pretrained(folder)
    return folder


def tiny_ddpm(folder: Path, channels: int = 3, size: int = 32, classes: int = 10) -> Path:
    """A CIFAR-shaped class-conditional DDPM folder (unet/ + scheduler/) with a null class."""
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=classes + 1)
    unet.save_pretrained(folder / "unet")
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    # As the bundled DDPM ships it: a DDPMPipeline index whose UNet has class embeddings.
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
                                                          "unet": ["diffusers", "UNet2DModel"]}))
    return folder


def write_class_names(folder: Path, names: list[str]) -> None:
    (folder / "class_names.json").write_text(json.dumps(names))
