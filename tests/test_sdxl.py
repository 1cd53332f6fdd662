"""SDXL end to end on a tiny random StableDiffusionXLPipeline: loading, conditioning, the methods, export, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import erase
from erase.cli import run_cli
from erase.train import main as train_main
from tests.test_diffusion import FAST, exported_changes, two_steps
from tests.tiny_diffusion import tiny_sdxl


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-models")
    os.environ["ERASE_CACHE"] = str(root / "cache")
    return tiny_sdxl(root / "sdxl")


def _task(folder, streams=("forget", "retain"), **kw):
    from erase.diffusion.task import DiffusionConfig, DiffusionTask

    cfg = DiffusionConfig(model=str(folder), concept="garbage truck", n_forget=4, n_retain=4, sample_steps=2,
                          eval_images=2, retain_concepts="church,parachute", **kw)
    return DiffusionTask(cfg, seed=0, streams=streams)


def test_loads_as_sdxl_with_pooled_conditions(sdxl):
    from erase.diffusion.conditioning import PooledText
    from erase.diffusion.loading import model_kind

    assert model_kind(str(sdxl)) == "sdxl"
    task = _task(sdxl)
    assert task.kind == "sdxl" and task.has_cross_attention and not task.one_text_encoder
    assert task.resolution == 16  # unet sample_size 8 x VAE factor 2
    assert type(task.scheduler).__name__ == "DDIMScheduler"  # the shipped Euler stays for exports
    assert type(task.base.shipped_scheduler).__name__ == "EulerDiscreteScheduler"
    cond = task.encode(["a photo of a garbage truck"])
    assert isinstance(cond, PooledText) and cond.embeds.shape == (1, 77, 64) and cond.pooled.shape == (1, 32)
    # What cross-attention reads is both encoders' penultimate states, concatenated (SDXL's encode_prompt).
    pipe = task.base.pipe
    ids = pipe.tokenizer(["a photo of a garbage truck"], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out2 = pipe.text_encoder_2(ids, output_hidden_states=True)
    torch.testing.assert_close(cond.embeds, torch.cat([h1, out2.hidden_states[-2]], -1))
    torch.testing.assert_close(cond.pooled, out2.text_embeds)
    torch.testing.assert_close(task.cross_attention_text(["a photo of a garbage truck"]), cond.embeds)
    # The unconditional side is zeros, as StableDiffusionXLPipeline guides (force_zeros_for_empty_prompt).
    null = task.null_condition(2, "cpu")
    assert null.embeds.shape == (2, 77, 64) and not null.embeds.any() and not null.pooled.any()
    assert task.forget_set.latents.shape == (4, 4, 8, 8)


def test_predict_feeds_pooled_text_and_time_ids(sdxl):
    task = _task(sdxl, streams=())
    unet = task.base.unet
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 700])
    cond = task.concept_condition(2, "cpu")
    ids = torch.tensor([[16, 16, 0, 0, 16, 16]] * 2, dtype=torch.float32)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=cond.embeds,
                    added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": ids}).sample
        got = task.predict(unet, x, t, cond)
        other = task.predict(unet, x, t, task.null_condition(2, "cpu"))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, other)


CASES = ["salun", "salun_soft", "rl", "ga", "ga_plus", "ft", "l1_sparse", "esd-x", "esd-u", "ca", "fmn"]


@pytest.mark.parametrize("method", CASES)
def test_method_two_steps(sdxl, tmp_path, method):
    changed, _ = two_steps(_task(sdxl), tmp_path, method, **({"anchor": "church"} if method == "ca" else {}))
    if method in ("esd-x", "fmn"):
        assert all(".attn2." in n for n in changed)
    if method == "ca":
        assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    if method == "esd-u":
        assert not any(".attn2." in n for n in changed)


def _unet(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_closed_form_edits_only_attn2_kv_and_reloads_with_diffusers(sdxl, tmp_path, method):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "run"
    args = ["--concept", "garbage truck", "--method", method, "--model", str(sdxl), "--retain-concepts",
            "church,parachute", "--output-dir", str(out), *FAST]
    assert run_cli(train_main, args) == 0
    before, after = _unet(sdxl), _unet(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    should = {k for k in before if ".attn2." in k and k.endswith(("to_k.weight", "to_v.weight"))}
    assert should and changed == should
    assert all(after[k].shape[1] == 64 for k in changed)  # the edit is on the concatenated (32 + 32) embedding
    assert all(torch.isfinite(after[k]).all() for k in changed)
    assert "StableDiffusionXLPipeline.from_pretrained" in (out / "README.md").read_text()
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["scheduler"][1] == "EulerDiscreteScheduler"
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "model")
    img = pipe("a photo of a church", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()


def test_resolution_flag(sdxl):
    from erase.diffusion.task import DiffusionConfig

    for bad in (-8, 12):
        with pytest.raises(erase.EraseError, match="--resolution"):
            DiffusionConfig(model=str(sdxl), concept="x", resolution=bad).validate()
    task = _task(sdxl, streams=(), resolution=24)  # the tiny model: VAE factor 2 x one UNet down-sampling = 4
    assert task.resolution == 24
    task.base.pipe.vae_scale_factor = 8  # as SD's VAE: now sides must be multiples of 16
    with pytest.raises(erase.EraseError, match="--resolution must be a multiple of 16 for this model"):
        task._resolution()
    task = _task(sdxl, streams=("forget",), resolution=32)
    assert task.resolution == 32 and task.forget_set.latents.shape == (4, 4, 16, 16)
    x = task.generate(task.base.unet, task.encode(["a photo of a church"]), [1])
    assert x.shape == (1, 3, 32, 32)
    x_t, _ = task.partial_sample(task.base.unet, 1, 1, 2, 3.0, [7])
    assert x_t.shape == (1, 4, 16, 16)
    assert task.predict(task.base.unet, x_t, torch.tensor([500]), task.concept_condition(1, "cpu")).shape == x_t.shape


def test_unsupported_folders_are_refused_naming_what_is_supported(tmp_path):
    from erase.diffusion.loading import load_base, model_kind

    folder = tmp_path / "PixArt"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    assert model_kind(str(folder)) is None
    with pytest.raises(erase.EraseError, match="holds PixArt, which erase does not support.*SDXL .*SD 3/3.5.*FLUX.1"):
        load_base(str(folder))


def test_single_files_are_told_apart_by_their_tensor_names(tmp_path):
    from safetensors.torch import save_file

    from erase.diffusion.loading import single_file_kind

    def ckpt(name, key):
        path = tmp_path / f"{name}.safetensors"
        save_file({key: torch.zeros(1)}, str(path))
        return path

    assert single_file_kind(ckpt("xl", "conditioner.embedders.1.model.ln_final.weight")) == "sdxl"
    assert single_file_kind(ckpt("sd", "cond_stage_model.transformer.text_model.final_layer_norm.weight")) == "sd"
    assert single_file_kind(tmp_path / "old.ckpt") == "sd"  # a pickle is not opened: taken for SD 1.x/2.x as before
    assert single_file_kind(ckpt("sd3", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight")) == "sd3"
    assert single_file_kind(ckpt("flux", "double_blocks.0.img_attn.qkv.weight")) == "flux"  # BFL's own layout
    assert single_file_kind(ckpt("flux-ldm", "model.diffusion_model.double_blocks.0.img_attn.qkv.weight")) == "flux"


def test_generate_renders_sdxl_prompts(sdxl):
    from erase.diffusion.generation import Job, load_generator, render
    from erase.prompts import PromptRow

    model = load_generator(str(sdxl), "cpu")
    jobs = [Job("base", PromptRow("0", "a photo of a church", 3, 5.0), k, 5.0) for k in range(2)]
    images = render(model, jobs, 2)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    again = render(model, jobs[1:], 2)
    torch.testing.assert_close(again[0], images[1])  # an image depends on its own seed only


@pytest.mark.parametrize("fmt", ["lora", "delta"])
def test_lora_and_delta_exports_apply_to_the_sdxl_pipeline(sdxl, tmp_path, fmt):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    changed = exported_changes(sdxl, pipe, tmp_path / fmt, fmt)
    assert changed and all(".attn2." in n for n in changed)
