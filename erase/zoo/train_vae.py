"""Train the tiny SD's VAE: an ``AutoencoderKL`` on Fashion-MNIST, RGB (gray replicated), 32x32 -> 4x8x8.

    python -m erase.zoo.train_vae --output work/zoo/vae

Recipe (DESIGN.md §6): block_out_channels (32, 64, 64), three down/up blocks, one layer each,
batch 32, AdamW 1e-3 with cosine decay, loss = MSE + 1e-6 * KL on [-1, 1] pixels. The VAE
bounds the quality of everything generated through it, so it gets more steps than the 1,000 of
the feasibility run. ``scaling_factor`` is set to 1 / std of the training latents, as SD does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from diffusers.optimization import get_cosine_schedule_with_warmup

from erase.classifier.data import load_fashion_mnist
from erase.zoo import loop
from erase.zoo.common import machine, setup, strip_local_paths, to_sd_pixels, write_record


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32,
    )


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images, n: int = 4096, batch: int = 256) -> float:
    lat = [vae.encode(to_sd_pixels(images.get_batch(range(i, min(i + batch, n)))["image"])).latent_dist.sample()
           for i in range(0, n, batch)]
    return torch.cat(lat).std().item()


@torch.no_grad()
def test_mse(vae: AutoencoderKL, test, n: int = 2000, batch: int = 250) -> float:
    errs = []
    for i in range(0, n, batch):
        x = to_sd_pixels(test.get_batch(range(i, i + batch))["image"])
        errs.append(torch.mean((vae(x).sample.clamp(-1, 1) - x) ** 2).item())
    return sum(errs) / len(errs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for the trained VAE (diffusers format) and checkpoints")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: PyTorch's default)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    args = p.parse_args(argv)

    setup(args.seed, args.threads)
    out = Path(args.output)
    train = load_fashion_mnist(train=True, pad_to=32)
    test = load_fashion_mnist(train=False, pad_to=32)
    accelerator = Accelerator()
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=100, num_training_steps=args.steps)
    vae, opt, sched = accelerator.prepare(vae, opt, sched)

    def step(k: int) -> float:
        x = to_sd_pixels(train.get_batch(loop.batch_indices(len(train), args.batch_size, k, args.seed))["image"])
        x = x.to(accelerator.device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, x) + args.kl_weight * posterior.kl().mean()
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    vae.train()
    record = loop.run(accelerator, step, args.steps, out / "work", args.checkpoint_every, "vae")
    vae = accelerator.unwrap_model(vae).eval().cpu()
    std = latent_std(vae, train)
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(out / "vae")
    strip_local_paths(out / "vae")
    record.update(recipe={k: v for k, v in vars(args).items() if k not in ("output", "threads")},
                  params=sum(p.numel() for p in vae.parameters()), latent_std=round(std, 4),
                  scaling_factor=vae.config.scaling_factor, test_mse=round(test_mse(vae, test), 5),
                  machine=machine(), command="python -m erase.zoo.train_vae " + " ".join(argv if argv is not None else sys.argv[1:]))
    write_record(out, "vae", record)
    print(f"VAE: test MSE {record['test_mse']} on [-1, 1], latent std {std:.3f}, {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
