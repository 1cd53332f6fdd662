"""Train ``fmnist-tiny-sd``: a text-to-image Stable Diffusion on Fashion-MNIST, in diffusers format.

    python -m erase.zoo.train_tiny_sd --output erase/zoo/fmnist-tiny-sd

One command reproduces it from scratch: without ``--vae`` it first trains the VAE
(:mod:`erase.zoo.train_vae`) into the work folder. Then the training latents are encoded once,
and a small ``CLIPTextModel`` (hidden 64, 2 layers) and a ``UNet2DConditionModel`` (64, 128)
with cross-attention in every block are trained jointly on captions from
:mod:`erase.captions` (10 % empty), epsilon prediction on SD's own noise schedule, AdamW 1e-3,
EMA of both. The result is a plain ``StableDiffusionPipeline`` folder (fp16 safetensors, DDIM
scheduler, no safety checker) that ``StableDiffusionPipeline.from_pretrained`` loads offline.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from erase import captions
from erase.classifier.data import load_fashion_mnist
from erase.storage import save_safetensors
from erase.zoo import loop, train_vae
from erase.zoo.common import machine, prefer_float32, setup, strip_local_paths, to_sd_pixels, write_record
from erase.zoo.tokenizer import build_tokenizer, save_tokenizer

# SD 1.x's noise schedule, so every SD sampler and erasure recipe applies unchanged.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_text_encoder() -> CLIPTextModel:
    # Nearly all 3.3 M parameters are the 49,408 x 64 token embedding the real CLIP vocabulary needs.
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))


def build_unet() -> UNet2DConditionModel:
    # attention_head_dim=2 (diffusers reads it as the number of heads here) is ~1.5x faster than 8 on CPU.
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=2, norm_num_groups=32)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images, cache: Path, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image, computed once and cached (safetensors)."""
    if cache.is_file():
        t = load_file(str(cache))
        return t["mean"], t["std"]

    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encode latents", mininterval=5):
        dist = vae.encode(to_sd_pixels(images.get_batch(range(i, min(i + batch, len(images))))["image"])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    save_safetensors({"mean": mean, "std": std}, cache)
    return mean, std


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="pipeline folder to write (e.g. erase/zoo/fmnist-tiny-sd)")
    p.add_argument("--work-dir", default="work/zoo/tiny-sd", help="checkpoints, latent cache, trained VAE")
    p.add_argument("--vae", help="a trained AutoencoderKL folder; default: train one with erase.zoo.train_vae")
    p.add_argument("--steps", type=int, default=2700)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: PyTorch's default)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    args = p.parse_args(argv)

    setup(args.seed, args.threads)
    work = Path(args.work_dir)
    if args.vae is None:
        if not (work / "vae" / "vae" / "config.json").is_file():
            train_vae.main(["--output", str(work / "vae"), "--seed", str(args.seed), "--threads", str(args.threads)])
        args.vae = str(work / "vae" / "vae")
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    sf = vae.config.scaling_factor
    train = load_fashion_mnist(train=True, pad_to=32)
    lat_mean, lat_std = encode_latents(vae, train, work / "latents.safetensors")
    labels = train.labels

    tokenizer = build_tokenizer()
    caption_list = captions.all_training_captions()
    caption_ids = tokenizer(caption_list, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids  # every distinct caption, tokenized once

    accelerator = Accelerator()
    text_encoder, unet = build_text_encoder(), build_unet()
    noise_scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=100, num_training_steps=args.steps)
    text_encoder, unet, opt, sched = accelerator.prepare(text_encoder, unet, opt, sched)
    ema = EMAModel(params, decay=args.ema_decay)
    names = [f"text_encoder.{n}" for n, _ in text_encoder.named_parameters()] + [f"unet.{n}" for n, _ in unet.named_parameters()]

    def step(k: int) -> float:
        idx = loop.batch_indices(len(train), args.batch_size, k, args.seed)
        g = torch.Generator().manual_seed(args.seed * 7919 + k)
        ids = caption_ids[captions.sample_caption_ids(labels[idx].tolist(), random.Random(args.seed * 7919 + k))]
        z = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * sf
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        dev = accelerator.device
        noisy = noise_scheduler.add_noise(z, noise, t).to(dev)
        pred = unet(noisy, t.to(dev), text_encoder(ids.to(dev))[0]).sample
        loss = torch.nn.functional.mse_loss(pred, noise.to(dev))
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        return loss.item()

    text_encoder.train()
    unet.train()
    record = loop.run(accelerator, step, args.steps, work, args.checkpoint_every, "tiny-sd",
                      *loop.ema_hooks(ema, names))
    text_encoder, unet = accelerator.unwrap_model(text_encoder), accelerator.unwrap_model(unet)
    ema.copy_to(params)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out = Path(args.output)
    pipe.to(dtype=torch.float16).save_pretrained(out, safe_serialization=True)
    # vocab.json + merges.txt (1.5 MB) instead of the 3.5 MB tokenizer.json: every transformers
    # version builds the same tokenizer from them.
    shutil.rmtree(out / "tokenizer")
    save_tokenizer(out / "tokenizer")
    strip_local_paths(out)
    prefer_float32(out / "text_encoder" / "config.json")
    vae_card = Path(args.vae).parent / "card.json"
    vae_record = json.loads(vae_card.read_text()).get("vae") if vae_card.is_file() else None
    record.update(
        recipe={k: v for k, v in vars(args).items() if k not in ("output", "work_dir", "vae", "threads")},
        params={"unet": sum(q.numel() for q in unet.parameters()),
                "text_encoder": sum(q.numel() for q in text_encoder.parameters()),
                "vae": sum(q.numel() for q in vae.parameters())},
        machine=machine(), command="python -m erase.zoo.train_tiny_sd " + " ".join(argv),
        captions={"templates": captions.TRAIN_TEMPLATES, "held_out_templates": captions.HELD_OUT_TEMPLATES,
                  "names": captions.CLASS_NAMES, "empty_rate": captions.EMPTY_CAPTION_RATE})
    write_record(out, "training", record)
    if vae_record:
        write_record(out, "vae", vae_record)
    print(f"tiny SD written to {out} ({record['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
