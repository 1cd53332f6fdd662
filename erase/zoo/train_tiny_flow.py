"""Train ``fmnist-tiny-flow``: a rectified-flow, SD3-shaped text-to-image model on Fashion-MNIST.

    python -m erase.zoo.train_tiny_flow --output erase/zoo/fmnist-tiny-flow

Why SD3-shaped and not FLUX-shaped: ``StableDiffusion3Pipeline`` runs without its T5 encoder
(``text_encoder_3=None``), so the model needs only the two CLIP text encoders and the exact CLIP
tokenizer this project can build offline. ``FluxPipeline`` always tokenizes with T5, whose
SentencePiece vocabulary cannot be rebuilt here, and its transformer reads only T5 tokens.

What is trained, jointly, on the captions of :mod:`erase.captions` (10 % empty):

- two ``CLIPTextModelWithProjection`` (hidden 64, 3 layers; SD3 reads the penultimate layer's
  tokens and the projected end-of-text token of both, concatenated: 128-d tokens, 128-d pooled);
- an ``SD3Transformer2DModel`` (6 joint blocks, 4 heads x 32, patch 1, RMS q/k norm as SD3.5) on
  4 x 8 x 8 latents of the tiny SD's VAE. The pipeline takes the latent channels from the
  transformer, so SD3's 16-channel VAE is a quality choice at 1024 px, not a requirement of the
  family; reusing the 4-channel VAE keeps both bundled models on the same pixels. Its config gets
  SD3's convention ``z = (x - shift_factor) * scaling_factor`` with the training latents' mean and
  1 / std.

Objective: rectified flow as SD3 trains it: ``x_t = (1 - s) x_0 + s noise``, the model predicts
the velocity ``noise - x_0``, ``s`` drawn logit-normal(0, 1), timestep ``1000 s``; AdamW, cosine lr,
gradient clipping, EMA. The pipeline without T5 appends 256 zero tokens to the 77 CLIP tokens;
training keeps one of them, counted 256 times in attention (:mod:`erase.diffusion.repeated_tokens`, exact).
The result is a plain ``StableDiffusion3Pipeline`` folder (fp16 safetensors, flow-matching Euler
scheduler) that ``StableDiffusion3Pipeline.from_pretrained`` loads offline.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from erase import captions
from erase.classifier.data import load_fashion_mnist
from erase.diffusion.repeated_tokens import use_repeated_tokens
from erase.storage import resolve_model_dir
from erase.zoo import loop
from erase.zoo.common import machine, prefer_float32, setup, strip_local_paths, write_record
from erase.zoo.tokenizer import build_tokenizer, save_tokenizer
from erase.zoo.train_tiny_sd import encode_latents

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)  # 8x8 latents need no SD3 resolution shift
T5_TOKENS = 256  # what StableDiffusion3Pipeline appends without T5 (its default max_sequence_length)
TEXT_DIM = 64


def build_text_encoder() -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_DIM, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407))


def build_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=2 * TEXT_DIM, caption_projection_dim=128,
        pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=8, qk_norm="rms_norm")


def encode_text(encoders, ids: torch.Tensor, extra_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's CLIP conditioning: penultimate-layer tokens of both encoders side by side, then
    ``extra_tokens`` zero rows (the absent T5); pooled = both projected end-of-text tokens."""
    outs = [enc(ids, output_hidden_states=True) for enc in encoders]
    tokens = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], extra_tokens, tokens.shape[-1])], dim=1)
    return tokens, torch.cat([o.text_embeds for o in outs], dim=-1)


@torch.no_grad()
def latent_statistics(mean: torch.Tensor, std: torch.Tensor, n: int = 8192) -> tuple[float, float]:
    """(shift_factor, scaling_factor) of SD3's VAE convention from posterior samples."""
    g = torch.Generator().manual_seed(0)
    z = mean[:n] + std[:n] * torch.randn(mean[:n].shape, generator=g)
    return round(z.mean().item(), 5), round(1.0 / z.std().item(), 5)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="pipeline folder to write (e.g. erase/zoo/fmnist-tiny-flow)")
    p.add_argument("--work-dir", default="work/zoo/tiny-flow", help="checkpoints and the latent cache")
    p.add_argument("--vae", default=None, help="an AutoencoderKL folder; default: the bundled fmnist-tiny-sd's vae/")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps to run")
    p.add_argument("--schedule-steps", type=int, default=3500,
                   help="horizon of the cosine learning-rate schedule (the shipped model stopped at step 2000 of 3500)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: PyTorch's default)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    args = p.parse_args(argv)

    setup(args.seed, args.threads)
    work = Path(args.work_dir)
    vae_dir = Path(args.vae) if args.vae else resolve_model_dir("fmnist-tiny-sd") / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    train = load_fashion_mnist(train=True, pad_to=32)
    lat_mean, lat_std = encode_latents(vae, train, work / "latents.safetensors")
    shift, scale = latent_statistics(lat_mean, lat_std)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    labels = train.labels

    tokenizer = build_tokenizer()
    caption_ids = tokenizer(captions.all_training_captions(), padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids

    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    encoders = [build_text_encoder(), build_text_encoder()]
    transformer = build_transformer()
    use_repeated_tokens(transformer)
    modules = [*encoders, transformer]
    params = [q for m in modules for q in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=200, num_training_steps=args.schedule_steps)
    *encoders, transformer, opt, sched = accelerator.prepare(*encoders, transformer, opt, sched)
    ema = EMAModel(params, decay=args.ema_decay)
    names = [f"{prefix}.{n}" for prefix, m in zip(("text_encoder", "text_encoder_2", "transformer"), modules)
             for n, _ in m.named_parameters()]

    def step(k: int) -> float:
        idx = loop.batch_indices(len(train), args.batch_size, k, args.seed)
        g = torch.Generator().manual_seed(args.seed * 7919 + k)
        ids = caption_ids[captions.sample_caption_ids(labels[idx].tolist(), random.Random(args.seed * 7919 + k))]
        x0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g) - shift) * scale
        noise = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(len(idx), generator=g))
        s4 = s.view(-1, 1, 1, 1)
        dev = accelerator.device
        tokens, pooled = encode_text(encoders, ids.to(dev), extra_tokens=1)
        pred = transformer(((1 - s4) * x0 + s4 * noise).to(dev), tokens, pooled, (s * 1000).to(dev),
                           joint_attention_kwargs={"repeat_last": T5_TOKENS}).sample
        loss = torch.nn.functional.mse_loss(pred, (noise - x0).to(dev))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        return loss.item()

    for m in modules:
        m.train()
    record = loop.run(accelerator, step, args.steps, work, args.checkpoint_every, "tiny-flow", *loop.ema_hooks(ema, names))
    encoders = [accelerator.unwrap_model(e).eval() for e in encoders]
    transformer = accelerator.unwrap_model(transformer).eval()
    ema.copy_to(params)
    tokenizer_2 = build_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None)
    out = Path(args.output)
    pipe.to(dtype=torch.float16).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out / name)
        save_tokenizer(out / name)
    strip_local_paths(out)
    for name in ("text_encoder", "text_encoder_2"):
        prefer_float32(out / name / "config.json")
    record.update(
        recipe={k: v for k, v in vars(args).items() if k not in ("output", "work_dir", "vae", "threads")},
        params={"transformer": sum(q.numel() for q in transformer.parameters()),
                "text_encoder": sum(q.numel() for q in encoders[0].parameters()),
                "text_encoder_2": sum(q.numel() for q in encoders[1].parameters()),
                "vae": sum(q.numel() for q in vae.parameters())},
        vae={"source": "fmnist-tiny-sd/vae (same weights)", "shift_factor": shift, "scaling_factor": scale},
        machine=machine(), command="python -m erase.zoo.train_tiny_flow " + " ".join(argv),
        captions={"templates": captions.TRAIN_TEMPLATES, "held_out_templates": captions.HELD_OUT_TEMPLATES,
                  "names": captions.CLASS_NAMES, "empty_rate": captions.EMPTY_CAPTION_RATE})
    write_record(out, "training", record)
    print(f"tiny flow model written to {out} ({record['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
