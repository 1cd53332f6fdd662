"""Diffusion erasure on tiny models built in code: SD-1.x-shaped, SD-2.x-shaped (v-prediction), CIFAR-shaped DDPM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import erase
from erase.cli import run_cli
from erase.engine import LoopSettings, RunContext, run_method
from erase.train import main as train_main
from tests.tiny_diffusion import tiny_ddpm, tiny_sd

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--n-forget", "4", "--n-retain", "4", "--eval-images", "2", "--sample-steps", "2", "--grid-seeds", "2",
        "--no-progress"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion-models")
    os.environ["ERASE_CACHE"] = str(root / "cache")
    return {"sd1": tiny_sd(root / "sd1"), "sd2v": tiny_sd(root / "sd2v", v_prediction=True, sd2=True),
            "ddpm": tiny_ddpm(root / "ddpm"), "bundled": "fmnist-tiny-sd"}


def _task(model_dir, concept="garbage truck", streams=("forget", "retain"), **kw):
    from erase.diffusion.task import DiffusionConfig, DiffusionTask

    retain = {"airplane": "", "airplane,automobile": "", "trouser": "bag,coat", "trouser,sneaker": "bag,coat"}.get(
        concept, "church,parachute")
    cfg = DiffusionConfig(model=str(model_dir), concept=concept, n_forget=4, n_retain=4, sample_steps=2, eval_images=2,
                          retain_concepts=retain, **kw)
    return DiffusionTask(cfg, seed=0, streams=streams)


def _ctx(task, tmp_path, text_encoder=False):
    from accelerate import Accelerator

    model = task.build_model(False, text_encoder=text_encoder)
    return RunContext(accelerator=Accelerator(cpu=True), model=model, task=task, views=task.views,
                      output_dir=Path(tmp_path), seed=0)


def two_steps(task, tmp_path, method: str, **extra) -> tuple[set[str], dict]:
    """Run ``method`` on ``task`` for two optimiser steps (lr 1e-3, batch 2; ESD-style sampling 3 steps) and check what
    every family's method test checks: two finite log rows, something changed, and nothing the method's parameter
    masks leave out. Returns the names of the changed parameters and the weights before."""
    cls = erase.get_method(method, "diffusion")
    ctx = _ctx(task, tmp_path, text_encoder=cls.trains_text_encoder)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    cfg = cls.Config(**{**cls.task_defaults.get("diffusion", {}), "max_steps": 2, "batch_size": 2, "lr": 1e-3, **extra})
    if hasattr(cfg, "ddim_steps"):
        cfg.ddim_steps = 3
    m = cls(cfg)
    m.check_task(task)
    run_method(m, ctx, LoopSettings(progress=False, log_every=1))
    logs = [json.loads(line) for line in (Path(tmp_path) / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(v)) for r in logs for k, v in r.items() if k != "phase")
    after = dict(ctx.unwrapped.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed, "nothing changed"
    for n, mask in (m.parameter_masks(ctx) or {}).items():
        assert torch.equal(after[n].detach()[~mask], before[n][~mask]), n
    return changed, before


def exported_changes(model_dir, pipe, out: Path, fmt: str, *extra: str) -> list[str]:
    """Erase 'garbage truck' from ``model_dir`` with esd-x for two steps, saved as ``fmt`` (lora or delta), apply the
    export to ``pipe`` (the plain diffusers pipeline of ``model_dir``) and return the denoiser parameters it changed."""
    from erase.diffusion.export import load_delta
    from erase.train import main as train_main

    args = ["--concept", "garbage truck", "--method", "esd-x", "--model", str(model_dir), "--retain-concepts", "church",
            "--max-steps", "2", "--ddim-steps", "3", "--lr", "1e-2", "--save-format", fmt, "--output-dir", str(out),
            *extra, *FAST]
    assert run_cli(train_main, args) == 0
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    before = {n: p.clone() for n, p in denoiser.named_parameters()}
    if fmt == "lora":
        pipe.load_lora_weights(out / "lora")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    else:
        assert load_delta(pipe, out / "delta.safetensors") > 0
    return [n for n, p in denoiser.named_parameters() if n in before and not torch.equal(p, before[n])]


def check_flow_matching_loss(task) -> None:
    """``task.loss`` on a flow model is the MSE to the velocity noise - x0 at x_t = add_noise(x0, noise, t)."""
    model = task.base.unet
    batch = {"latents": task.forget_set.latents[:2], "prompt": task.forget_set.prompt[:2]}
    torch.manual_seed(3)
    got = task.loss(model, batch)
    torch.manual_seed(3)
    x0 = batch["latents"]
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (2,))
    with torch.no_grad():
        pred = task.predict(model, task.add_noise(x0, noise, t), t, task.condition(batch["prompt"]))
    torch.testing.assert_close(got.detach(), torch.nn.functional.mse_loss(pred, noise - x0))


CLOSED_FORM = ("uce", "rece")  # no optimiser steps; tests/test_closed_form.py runs them
CASES = [(m, k) for m in erase.list_methods(task="diffusion") for k in ("sd1", "sd2v", "ddpm", "bundled")
         if not (k == "ddpm" and m in ("esd-x", "fmn", "advunlearn")) and m not in CLOSED_FORM]
CONCEPT = {"sd1": "garbage truck", "sd2v": "garbage truck", "ddpm": "airplane", "bundled": "trouser"}
# Settings a method needs beyond the defaults on a model (ca: an anchor the bundled model's erase.yaml would give).
EXTRA = {("ca", "sd1"): {"anchor": "church"}, ("ca", "sd2v"): {"anchor": "church"},
         ("ca", "ddpm"): {"anchor": "bird", "params": "full"}}


@pytest.mark.parametrize("method,kind", CASES)
def test_method_two_steps(models, tmp_path, method, kind):
    changed, _ = two_steps(_task(models[kind], concept=CONCEPT[kind]), tmp_path, method, **EXTRA.get((method, kind), {}))
    if method in ("esd-x", "fmn"):
        assert all(".attn2." in n for n in changed)
    if method == "ca" and kind != "ddpm":
        assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    if method == "esd-u":
        assert not any(".attn2." in n for n in changed)
    if method == "advunlearn":
        assert all(n.startswith("text_encoder.") for n in changed)


def test_ddpm_rejects_text_only_methods(models):
    task = _task(models["ddpm"], concept="airplane")
    for name in ("esd-x", "fmn", "advunlearn"):
        cls = erase.get_method(name)
        with pytest.raises(erase.EraseError, match="DDPM"):
            cls(cls.Config()).check_task(task)


def test_esd_target_matches_hand_computation(models, tmp_path):
    task = _task(models["sd1"])
    ctx = _ctx(task, tmp_path)
    cls = erase.get_method("esd-u")
    m = cls(cls.Config(negative_guidance=2.5))
    m.setup(ctx)
    torch.manual_seed(0)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    target = m.target(ctx, x_t, t)
    unet = task.base.unet
    with torch.no_grad():
        e0 = unet(x_t, t, encoder_hidden_states=task.encode(["", ""])).sample
        ec = unet(x_t, t, encoder_hidden_states=task.encode(["a photo of a garbage truck"] * 2)).sample
    torch.testing.assert_close(target, e0 - 2.5 * (ec - e0), rtol=1e-4, atol=1e-5)


def test_partial_sampling_stops_where_asked(models):
    task = _task(models["sd1"])
    full, _ = task.partial_sample(task.base.unet, 1, 0, 4, 3.0, [7])
    x2, t2 = task.partial_sample(task.base.unet, 1, 2, 4, 3.0, [7])
    x2b, _ = task.partial_sample(task.base.unet, 1, 2, 4, 3.0, [7])
    assert int(t2) == int(task.scheduler.timesteps[2])
    assert torch.equal(x2, x2b) and not torch.equal(x2, full)


def test_attention_store_captures_the_concept_tokens(models):
    from erase.diffusion.attention import AttentionStore, token_positions

    task = _task(models["sd1"])
    tok = task.base.pipe.tokenizer
    assert token_positions(tok, "a photo of a garbage truck", "garbage truck") == [5, 6]
    assert token_positions(tok, "a photo of a church", "garbage truck") == []
    unet = task.base.unet
    store = AttentionStore().install(unet)
    store.recording = True
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=task.encode(["a photo of a garbage truck"]))
    store.remove()
    names = {n for n in unet.attn_processors if ".attn2." in n}
    assert set(store.maps) == names
    for probs in store.maps.values():
        assert probs.shape[-1] == 77
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert not any(type(p).__name__ == "StoringAttnProcessor" for p in unet.attn_processors.values())


def test_relabel_points_forget_batches_elsewhere(models):
    sd = _task(models["sd1"])
    b = next(sd.iterate("forget"))
    r = sd.relabel(b)
    assert "target_prompt" in r and all(sd.prompts[int(i)] not in sd.forget_prompts for i in r["target_prompt"])
    dd = _task(models["ddpm"], concept="airplane")
    b = next(dd.iterate("forget"))
    r = dd.relabel(b)  # SalUn's DDPM code: predictions under the next class are the stop-gradient target
    assert torch.equal(r["prompt"], b["prompt"]) and (r["target_prompt"] == (dd.concept_classes[0] + 1) % dd.null_class).all()


def test_cli_writes_model_grid_card_and_metrics_and_reloads(models, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "erase" / "train.py"), "--concept", "garbage truck", "--method", "salun",
           "--model", str(models["sd1"]), "--retain-concepts", "church,parachute", "--max-steps", "2",
           "--output-dir", str(out), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors", "grid.png", "README.md",
                 "metrics.json", "config.yaml", "run.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "garbage truck" in card and "salun" in card and "grid.png" in card
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    assert Image.open(out / "grid.png").size[0] > 200
    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    img = pipe("a photo of a church", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, 16, 16)
    base = StableDiffusionPipeline.from_pretrained(models["sd1"])
    diff = [n for n, p in pipe.unet.named_parameters() if not torch.equal(p, dict(base.unet.named_parameters())[n])]
    assert diff, "the saved UNet is the base UNet"


def test_delta_export_round_trip(models, tmp_path):
    from diffusers import StableDiffusionPipeline

    from erase.diffusion.export import load_delta

    out = tmp_path / "delta"
    args = ["--concept", "garbage truck", "--method", "esd-x", "--model", str(models["sd1"]), "--retain-concepts",
            "church", "--max-steps", "2", "--ddim-steps", "3", "--lr", "1e-3", "--save-format", "delta",
            "--output-dir", str(out), *FAST]
    assert run_cli(train_main, args) == 0
    pipe = StableDiffusionPipeline.from_pretrained(models["sd1"])
    n = load_delta(pipe, out / "delta.safetensors")
    assert n > 0
    from safetensors.torch import load_file

    assert all(".attn2." in k for k in load_file(str(out / "delta.safetensors")))


def test_resume_reproduces_an_uninterrupted_diffusion_run(models, tmp_path):
    base = ["--concept", "garbage truck", "--method", "rl", "--model", str(models["sd1"]), "--retain-concepts",
            "church", "--max-steps", "4", "--lr", "1e-3", "--checkpoint-every", "2", *FAST]
    assert run_cli(train_main, base + ["--output-dir", str(tmp_path / "a")]) == 0
    # Simulate an interruption: keep only the step-2 checkpoint of a second run, then resume it.
    assert run_cli(train_main, base + ["--output-dir", str(tmp_path / "b")]) == 0
    import shutil

    b = tmp_path / "b"
    shutil.rmtree(b / "checkpoints" / "step-000004")
    (b / "run.json").unlink()
    assert run_cli(train_main, base + ["--output-dir", str(b), "--resume"]) == 0
    from safetensors.torch import load_file

    ua = load_file(str(tmp_path / "a" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    ub = load_file(str(b / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ua[k], ub[k]) for k in ua)


def test_bad_diffusion_inputs(models, tmp_path, capsys):
    def err(args):
        code = run_cli(train_main, args + ["--output-dir", str(tmp_path / "o"), *FAST])
        assert code == 2
        return capsys.readouterr().err

    assert "--concept is empty" in err(["--task", "diffusion", "--concept", " ", "--model", str(models["sd1"])])
    assert "not found" in err(["--concept", "x", "--model", str(tmp_path / "nope")])
    # SDXL, SD3 and FLUX load now (tests/test_sdxl.py, test_sd3.py, test_flux.py); PixArt is refused, naming what
    # is supported.
    pixart = tmp_path / "pixart"
    pixart.mkdir()
    (pixart / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    assert "holds PixArt, which erase does not support" in err(["--concept", "x", "--model", str(pixart)])
    sd3 = tmp_path / "sd3"  # an SD3 folder without its parts: one line naming the folder
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert "could not load the model in" in err(["--concept", "x", "--model", str(sd3)])
    code = run_cli(train_main, ["--concept", "garbage truck", "--model", str(models["sd1"]), "--output-dir",
                                str(models["sd1"] / "erased"), *FAST])
    assert code == 2 and "base model" in capsys.readouterr().err
    assert "unknown class" in err(["--concept", "unicorn", "--model", str(models["ddpm"])])


def test_lora_training_export_and_teacher(models, tmp_path):
    """LoRA: only adapters train, the teacher is the same UNet with adapters off, the export reloads."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    args = ["--concept", "garbage truck", "--method", "esd-x", "--model", str(models["sd1"]), "--retain-concepts",
            "church", "--max-steps", "2", "--ddim-steps", "3", "--lr", "1e-2", "--save-format", "lora",
            "--output-dir", str(out), *FAST]
    assert run_cli(train_main, args) == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(models["sd1"])
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    pipe.load_lora_weights(out / "lora")
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, restores the plain module names
    changed = [n for n, p in pipe.unet.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed and all(".attn2." in n for n in changed)
    with pytest.raises(erase.EraseError, match="saliency"):
        cls = erase.get_method("salun")
        cls(cls.Config()).check_task(_task(models["sd1"], save_format="lora"))
