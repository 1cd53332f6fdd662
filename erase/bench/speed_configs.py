"""The published architectures the full-size speed benchmark builds with random weights (data only).

Sources (the component ``config.json`` files of the diffusers repositories on the Hugging Face hub,
typed in from memory of those files: this machine is offline, so the numbers are checked instead by
the parameter count each config builds, against the published totals in ``PUBLISHED_PARAMS``):

* **SDXL base 1.0** — ``stabilityai/stable-diffusion-xl-base-1.0``: ``unet/config.json``
  (block_out_channels (320, 640, 1280), transformer_layers_per_block (1, 2, 10), attention_head_dim
  (5, 10, 20), cross_attention_dim 2048, addition_embed_type "text_time", addition_time_embed_dim 256,
  projection_class_embeddings_input_dim 2816 = 6 time ids x 256 + the 1280-d pooled text,
  use_linear_projection True, sample_size 128), ``text_encoder/config.json`` (CLIP ViT-L/14's text
  tower: 768 wide, 12 layers, 12 heads, quick_gelu), ``text_encoder_2/config.json`` (OpenCLIP ViT-bigG's
  text tower with its projection: 1280 wide, 32 layers, 20 heads, gelu, projection 1280),
  ``vae/config.json`` (SD's VAE with scaling_factor 0.13025), ``scheduler/scheduler_config.json``
  (EulerDiscreteScheduler on SD's scaled-linear betas, "leading" spacing, steps_offset 1).
* **SD3-medium** — ``stabilityai/stable-diffusion-3-medium-diffusers``: ``transformer/config.json``
  (sample_size 128, patch_size 2, in_channels 16, num_layers 24, attention_head_dim 64,
  num_attention_heads 24, joint_attention_dim 4096, caption_projection_dim 1536, pooled_projection_dim
  2048, out_channels 16, pos_embed_max_size 192), ``text_encoder`` / ``text_encoder_2`` (CLIP-L and
  CLIP-G, both ``CLIPTextModelWithProjection``: their pooled outputs concatenate to the 2048-d pooled
  projection), ``vae/config.json`` (16 latent channels, scaling_factor 1.5305, shift_factor 0.0609, no
  quant convs), ``scheduler`` (FlowMatchEulerDiscreteScheduler, shift 3.0). ``text_encoder_3`` is
  T5-v1.1-XXL's encoder (``T5EncoderModel``, 4.762 B parameters): the benchmark builds the pipeline
  *without* it (``text_encoder_3=None``, as erase loads an SD3 folder saved without T5). The T5 is
  frozen — it only encodes prompts — so it adds its own weights and nothing else: ``T5_XXL_PARAMS`` x 2
  bytes = 9.5 GB in fp16, x 4 = 19.0 GB in fp32 (see ``erase.bench.speed_memory``).
* **FLUX.1-dev** — ``black-forest-labs/FLUX.1-dev``: ``transformer/config.json`` (19 double-stream
  blocks, 38 single-stream blocks, 24 heads x 128 = 3072 hidden, joint_attention_dim 4096, pooled 768,
  in_channels 64, guidance_embeds True). Only counted (on the meta device), never built: its 11.9 B
  parameters are 48 GB in fp32.

What could not be verified offline: every number above is from memory of the published files. The
built parameter counts (``tests/test_speed_bench.py`` and the benchmark's report) agree with the
published totals (SDXL UNet 2.567 B, SD3-medium transformer 2.028 B, FLUX.1-dev transformer 11.90 B,
CLIP-L 123.1 M, CLIP-G with projection 694.7 M), which a wrong width, depth or head count would
change; fields that do not change a parameter count (e.g. SDXL's ``addition_embed_type_num_heads``,
the VAE's ``force_upcast``, the scheduler's ``interpolation_type``) are left at diffusers' defaults and
are not checked. The tokenizers are the bundled exact CLIP tokenizer for both CLIP encoders (SDXL's
``tokenizer_2`` pads with "!" instead of end-of-text; that changes no shape or cost).

``TINY_SDXL`` / ``TINY_SD3`` are the same families at toy size (after ``tests/tiny_diffusion.py``), for
``--tiny`` runs in the test suite.
"""

from __future__ import annotations

# Stable Diffusion v1.4 (CompVis/stable-diffusion-v1-4, unet/text_encoder/vae config.json), except
# sample_size 32 so the pipeline's default resolution is the benchmark's 256 px.
SD14 = {
    "unet": dict(sample_size=32, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                 freq_shift=0, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
                 norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8),
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                         projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512),
}
_CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                    pad_token_id=1)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768, **_CLIP_COMMON)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280, **_CLIP_COMMON)
_SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               act_fn="silu", norm_num_groups=32, sample_size=1024)

SDXL = {
    "unet": dict(sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                 freq_shift=0, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(320, 640, 1280), layers_per_block=2,
                 downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
                 cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
    "text_encoder": dict(CLIP_L),      # CLIPTextModel
    "text_encoder_2": dict(CLIP_BIGG),  # CLIPTextModelWithProjection
    "vae": dict(_SD_VAE, latent_channels=4, scaling_factor=0.13025, force_upcast=True),
    "scheduler": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear",
                      use_karras_sigmas=False),
}

SD3_MEDIUM = {
    "transformer": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    "text_encoder": dict(CLIP_L),      # CLIPTextModelWithProjection
    "text_encoder_2": dict(CLIP_BIGG),  # CLIPTextModelWithProjection
    "vae": dict(_SD_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False, force_upcast=True),
    "scheduler": dict(num_train_timesteps=1000, shift=3.0),
}

FLUX_DEV = {
    "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
}

# Published parameter totals (the model cards and the counts of the published weights).
PUBLISHED_PARAMS = {
    "sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "sd3": {"transformer": 2_028_328_000},  # "2B" in the model card; 2.028 B in the published weights
    "flux": {"transformer": 11_901_408_320, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
             "vae": 83_819_683},
}
T5_XXL_PARAMS = 4_762_310_656  # google/t5-v1_1-xxl's encoder (T5EncoderModel): SD3's and FLUX's text_encoder_3 / _2
# The relative tolerance of the built-versus-published check: the totals above are quoted to 4 digits.
PARAM_TOLERANCE = 5e-4

_TINY_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=49406,
                  eos_token_id=49407, pad_token_id=49407)
_TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), norm_num_groups=8,
                 sample_size=16)
TINY_SDXL = {
    "unet": dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
                 cross_attention_dim=32 + 32, norm_num_groups=8),
    "text_encoder": dict(_TINY_CLIP),
    "text_encoder_2": dict(_TINY_CLIP),
    "vae": dict(_TINY_VAE, latent_channels=4),
    "scheduler": dict(SDXL["scheduler"]),
}
TINY_SD3 = {
    "transformer": dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                        pooled_projection_dim=64, pos_embed_max_size=8),
    "text_encoder": dict(_TINY_CLIP),
    "text_encoder_2": dict(_TINY_CLIP),
    "vae": dict(_TINY_VAE, latent_channels=4, shift_factor=0.06, scaling_factor=1.5),
    "scheduler": dict(num_train_timesteps=1000, shift=3.0),
}

FULL = {"sdxl": SDXL, "sd3": SD3_MEDIUM}
TINY = {"sdxl": TINY_SDXL, "sd3": TINY_SD3}
NAMES = {"sdxl": "SDXL base 1.0", "sd3": "SD3-medium (without T5)"}
