"""FLUX.1 end to end on tiny random FluxPipelines (dev-shaped with a guidance embedding, schnell-shaped without):
loading, T5 + CLIP-pooled conditions, flow-matching targets on packed latents with the transformer's timestep / 1000
and embedded guidance, the methods (ESD at one embedded guidance), export and reload with FluxPipeline, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import erase
from erase.cli import run_cli
from erase.diffusion.layers import layer_map
from erase.train import main as train_main
from tests.test_diffusion import FAST, _ctx, check_flow_matching_loss, exported_changes, two_steps
from tests.tiny_diffusion import tiny_flux

RES = ["--resolution", "16"]  # the tiny pipeline's own default would be FluxPipeline's 128 latents x 2 = 256 px


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-models")
    os.environ["ERASE_CACHE"] = str(root / "cache")
    return tiny_flux(root / "flux")


@pytest.fixture(scope="module")
def schnell(flux):
    return tiny_flux(flux.parent / "schnell", guidance_embeds=False)


def _task(folder, streams=("forget", "retain"), resolution=16, **kw):
    from erase.diffusion.task import DiffusionConfig, DiffusionTask

    cfg = DiffusionConfig(model=str(folder), concept="garbage truck", n_forget=4, n_retain=4, sample_steps=2,
                          eval_images=2, retain_concepts="church,parachute", resolution=resolution, **kw)
    return DiffusionTask(cfg, seed=0, streams=streams)


def _pipe(folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(folder)


def test_loads_as_flux_with_pooled_conditions(flux):
    from erase.diffusion.conditioning import PooledText
    from erase.diffusion.loading import model_kind

    assert model_kind(str(flux)) == "flux"
    task = _task(flux)
    assert task.kind == "flux" and task.has_cross_attention and not task.one_text_encoder
    assert task.flow is not None and task.flow.shift == 1.0  # dynamic shifting: training noise levels unshifted
    assert task.guidance == 3.5  # FluxPipeline's embedded guidance by default
    assert type(task.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    cond = task.encode(["a photo of a garbage truck"])
    # T5's 512 token states (dev) and CLIP's pooled output, as FluxPipeline.encode_prompt gives them.
    assert isinstance(cond, PooledText) and cond.embeds.shape == (1, 512, 32) and cond.pooled.shape == (1, 32)
    pipe = task.base.pipe
    t5_ids = pipe.tokenizer_2(["a photo of a garbage truck"], padding="max_length", max_length=512, truncation=True,
                              return_tensors="pt").input_ids
    clip_ids = pipe.tokenizer(["a photo of a garbage truck"], padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(cond.embeds, pipe.text_encoder_2(t5_ids)[0])
        torch.testing.assert_close(cond.pooled, pipe.text_encoder(clip_ids).pooler_output)
    # The "unconditional" side is the encoded empty prompt (FLUX has no negative prompt), not zeros.
    null = task.null_condition(2, "cpu")
    torch.testing.assert_close(null[:1].embeds, task.encode([""]).embeds)
    assert null.pooled.any() and null.embeds.any()
    assert not torch.equal(null[:1].embeds, cond.embeds)
    assert task.forget_set.latents.shape == (4, 4, 8, 8)
    assert _task(flux, streams=(), resolution=0).resolution == 256  # FluxPipeline's default_sample_size 128 x VAE 2


def test_schnell_reads_256_t5_tokens_and_no_guidance(schnell):
    task = _task(schnell, streams=())
    assert task.encode(["a church"]).embeds.shape == (1, 256, 32)
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([300]), task.concept_condition(1, "cpu")
    with torch.no_grad():  # no guidance embedding: the guidance a prediction asks for changes nothing
        torch.testing.assert_close(task.predict(task.base.unet, x, t, cond, guidance=1.0),
                                   task.predict(task.base.unet, x, t, cond, guidance=7.0))


def test_packing_round_trip_matches_the_pipeline():
    from diffusers import FluxPipeline

    from erase.diffusion.flux import image_ids, pack, unpack

    x = torch.randn(2, 4, 6, 8)
    tokens = pack(x)
    assert tokens.shape == (2, 3 * 4, 16)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    torch.testing.assert_close(unpack(tokens, 6, 8), x)
    # The pipeline unpacks from pixel sides: at VAE factor 8, 48 x 64 px are these 6 x 8 latents.
    torch.testing.assert_close(FluxPipeline._unpack_latents(tokens, 48, 64, 8), x)
    ids = image_ids(6, 8, "cpu", torch.float32)
    assert ids.shape == (12, 3) and ids[:, 0].eq(0).all()
    assert ids[5].tolist() == [0.0, 1.0, 1.0]  # token 5 of a 3 x 4 grid: row 1, column 1
    with pytest.raises(ValueError, match="even"):
        pack(torch.randn(1, 4, 5, 8))


def test_flow_matching_noise_target_and_what_the_transformer_reads(flux):
    """x_t = (1 - s) x0 + s noise on the unshifted training schedule; velocity target; the transformer reads packed
    latents, sigma (timestep / 1000), the embedded guidance, T5 tokens, CLIP pooled, zero txt_ids, grid img_ids."""
    from diffusers import FluxPipeline

    task = _task(flux, streams=())
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([0, 499])
    s = torch.tensor([0.001, 0.5])  # (t + 1) / 1000, no shift: diffusers' FLUX training draws from the base table
    torch.testing.assert_close(task.add_noise(x0, noise, t), (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(task.denoising_target(x0, noise, t), noise - x0)
    model, cond = task.base.unet, task.concept_condition(2, "cpu")

    def direct(g):
        out = model(hidden_states=FluxPipeline._pack_latents(x0, 2, 4, 8, 8), timestep=s, guidance=g,
                    pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=torch.zeros(512, 3),
                    img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)).sample
        return FluxPipeline._unpack_latents(out, 16, 16, task.base.pipe.vae_scale_factor)

    with torch.no_grad():
        torch.testing.assert_close(task.predict(model, x0, t, cond), direct(torch.full((2,), 3.5)))
        one = task.predict(model, x0, t, cond, guidance=1.0)
        torch.testing.assert_close(one, direct(torch.full((2,), 1.0)))
        assert not torch.allclose(one, direct(torch.full((2,), 3.5)))  # the guidance embedding is read


def test_partial_samples_map_the_samplers_timestep_back_exactly(flux):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    task = _task(flux, streams=())
    model = task.base.unet
    x_t, t_mid = task.partial_sample(model, 1, 1, 3, 3.5, [5])
    assert x_t.shape == (1, 4, 8, 8)
    # FluxPipeline's schedule for 16 tokens: sigmas 1 .. 1/3 shifted by mu from the token count.
    sched = type(task.scheduler).from_config(task.scheduler.config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=calculate_shift(16, 256, 4096, 0.5, 1.15))
    assert sched.timesteps[1] > 1000 * (2 / 3) + 50  # shifted (mu ~ 0.46 at 16 tokens): the round trip is not trivial
    torch.testing.assert_close(task.flow.model_timestep(t_mid), sched.timesteps[1].float())
    # Stopped before any step: the pipeline's own initial noise (drawn per seed, then packed), at timestep 1000.
    x_0, t_0 = task.partial_sample(model, 1, 0, 3, 3.5, [5])
    packed, _ = task.base.pipe.prepare_latents(1, 4, 16, 16, torch.float32, "cpu", [torch.Generator().manual_seed(5)])
    torch.testing.assert_close(x_0, task.base.pipe._unpack_latents(packed, 16, 16, 2))
    torch.testing.assert_close(task.flow.model_timestep(t_0), torch.tensor(1000.0))


def test_task_loss_is_the_flow_matching_loss(flux):
    check_flow_matching_loss(_task(flux, streams=("forget",)))


CASES = ["salun", "salun_soft", "rl", "ga", "ga_plus", "ft", "l1_sparse", "esd-x", "esd-u", "ca"]


@pytest.mark.parametrize("method", CASES)
def test_method_two_steps(flux, tmp_path, method):
    task = _task(flux)
    changed, before = two_steps(task, tmp_path, method, **({"anchor": "church"} if method == "ca" else {}))
    lmap = layer_map(task.base.unet)
    text = {n for n in before if lmap.is_text_attention(n)}
    assert text and not any(n.startswith("single_transformer_blocks.") for n in text)
    if method == "esd-x":
        assert changed <= text
    if method == "ca":
        assert all(".attn.add_k_proj." in n or ".attn.add_v_proj." in n for n in changed)
    if method == "esd-u":
        assert not changed & text
        assert any(n.startswith("single_transformer_blocks.") for n in changed)


def test_esd_reads_teacher_and_student_at_one_embedded_guidance(flux, tmp_path):
    """x_t is sampled at --sample-guidance embedded; the teacher's two predictions and the student's at
    --guidance-embedding (1 by default), as the authors' FLUX ESD code does."""
    task = _task(flux, streams=())
    cls = erase.get_method("esd-x", "diffusion")
    ctx = _ctx(task, tmp_path)
    m = cls(cls.Config(max_steps=1, ddim_steps=3, sample_guidance=3.0))
    m.setup(ctx)
    seen = []

    def record(module, args, kwargs):
        seen.append((module is ctx.unwrapped, kwargs["guidance"].unique().tolist()))

    hooks = [mod.register_forward_pre_hook(record, with_kwargs=True) for mod in (ctx.unwrapped, m.teacher)]
    try:
        torch.manual_seed(0)  # draws a stop after two of the three steps: the pipeline runs twice
        m.losses({}, ctx)["esd"].backward()
    finally:
        for h in hooks:
            h.remove()
    *sampling, student, teacher_null, teacher_concept = seen  # the student's prediction comes before the target's
    assert sampling and all(g == [3.0] for _, g in sampling)  # the pipeline's call: the sampling guidance, embedded
    assert teacher_null == teacher_concept == (False, [1.0]) and student == (True, [1.0])
    with pytest.raises(erase.EraseError, match="--guidance-embedding must be >= 0"):
        cls.Config(guidance_embedding=-1.0).validate()


def _transformer(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_erased_flux_reloads_with_diffusers(flux, tmp_path):
    out = tmp_path / "run"
    args = ["--concept", "garbage truck", "--method", "esd-x", "--model", str(flux), "--retain-concepts", "church",
            "--max-steps", "2", "--ddim-steps", "3", "--lr", "1e-2", "--output-dir", str(out), *RES, *FAST]
    assert run_cli(train_main, args) == 0
    before, after = _transformer(flux), _transformer(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lmap = layer_map(_pipe(flux).transformer)
    assert changed and all(lmap.is_text_attention(k) for k in changed)
    readme = (out / "README.md").read_text()
    assert "FluxPipeline.from_pretrained(\"model\")" in readme and "FLUX.1 (rectified flow), flow velocity" in readme
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["tokenizer_2"][1].startswith("T5Tokenizer")
    img = _pipe(out / "model")("a photo of a church", num_inference_steps=2, height=16, width=16,
                               output_type="pt").images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    assert "after" in json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("fmt", ["lora", "delta"])
def test_lora_and_delta_exports_apply_to_the_flux_pipeline(flux, tmp_path, fmt):
    pipe = _pipe(flux)
    changed = exported_changes(flux, pipe, tmp_path / fmt, fmt, *RES)
    lmap = layer_map(pipe.transformer)
    assert changed and all(lmap.is_text_attention(n) for n in changed), changed


def test_resolution_is_a_multiple_of_the_2x2_packing(flux):
    task = _task(flux, streams=("forget",), resolution=8)  # VAE factor 2 x packing 2
    assert task.resolution == 8 and task.forget_set.latents.shape == (4, 4, 4, 4)
    task.base.pipe.vae_scale_factor = 16
    with pytest.raises(erase.EraseError, match="multiple of 32 for this model .*2x2 latent packing"):
        task._resolution()


def test_token_level_work_is_refused_on_flux(flux):
    task = _task(flux, streams=())
    assert "FLUX's token condition is T5's alone" in task.token_access_problem()
    with pytest.raises(erase.EraseError, match="FLUX"):
        task.encode_ids(task.token_ids(["a photo"]))
    cls = erase.get_method("advunlearn", "diffusion")
    with pytest.raises(erase.EraseError, match="FLUX"):
        cls(cls.Config()).check_task(task)
    from erase.attacks import get_attack, list_attacks

    for name in list_attacks():
        attack = get_attack(name)
        with pytest.raises(erase.EraseError, match="FLUX"):
            attack(attack.Config()).check_task(task)


def test_generate_renders_flux_prompts(flux):
    from erase.diffusion.generation import Job, load_generator, render
    from erase.prompts import PromptRow

    model = load_generator(str(flux), "cpu")
    model.pipe.default_sample_size = 8  # render at the pipeline's default size: 8 latents x VAE 2 = 16 px
    jobs = [Job("base", PromptRow("0", "a photo of a church", 3, 3.5), k, 3.5) for k in range(2)]
    images = render(model, jobs, 2)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    again = render(model, jobs[1:], 2)
    torch.testing.assert_close(again[0], images[1])
    negative = [Job("base", PromptRow("7", "a church", 3, 3.5, negative_prompt="fog"), 0, 3.5)]
    with pytest.raises(erase.EraseError, match="row 7 has a negative prompt; FLUX.1 is guidance-distilled"):
        render(model, negative, 2)


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_closed_form_edits_the_layers_that_read_the_text_and_reloads(flux, tmp_path, method):
    """UCE / RECE adapted as on SD3: only context_embedder (T5's tokens) and the pooled embedder's first linear
    (CLIP's pooled) change; UCE at erase scale 100 maps the concept's last T5 token where the old map sent the
    guide's (the empty prompt's, '</s>' at T5 position 0) and keeps a preserved concept's."""
    from erase.methods._closed_form import last_token_index

    out = tmp_path / "run"
    args = ["--concept", "garbage truck", "--method", method, "--model", str(flux), "--retain-concepts",
            "church,parachute", "--output-dir", str(out), "--erase-scale", "100", *RES, *FAST]
    assert run_cli(train_main, args) == 0
    before, after = _transformer(flux), _transformer(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"}
    if method == "uce":
        task = _task(flux, streams=())
        blocks = task.text_segments(["garbage truck", "", "church"])
        assert len(blocks) == 1 and blocks[0][0].shape[1] == 512  # T5's block alone: CLIP enters only pooled
        emb, mask = blocks[0]
        last = last_token_index(mask)
        assert last[1] == 0  # '' is '</s>' alone in T5
        concept, guide, kept = (emb[i, last[i]] for i in range(3))
        w0, w1 = before["context_embedder.weight"].float(), after["context_embedder.weight"].float()
        assert (w1 @ concept - w0 @ guide).norm() < 0.1 * (w0 @ concept - w0 @ guide).norm()
        assert (w1 @ kept - w0 @ kept).norm() < 0.1 * (w0 @ kept).norm()
    img = _pipe(out / "model")("a photo of a church", num_inference_steps=2, height=16, width=16,
                               output_type="pt").images
    assert torch.isfinite(img).all()


def test_fmn_marks_the_concept_in_t5_tokens_and_refuses_to_record_flux_attention(flux):
    task = _task(flux, streams=())
    mask = task.concept_token_mask()
    assert mask.shape == (len(task.prompts), 512)
    ids = task.base.pipe.tokenizer_2(task.forget_prompts[0], padding="max_length", max_length=512).input_ids
    word = task.base.pipe.tokenizer_2("garbage truck", add_special_tokens=False).input_ids
    assert [ids[i] for i in mask[0].nonzero().flatten().tolist()] == word
    with pytest.raises(erase.EraseError, match="not supported yet for flux"):  # the built task refuses too
        task.record_attention(task.base.unet)


@pytest.mark.parametrize("method, says", [("fmn", "not supported yet for flux"),
                                          ("advunlearn", "FLUX's token condition is T5's alone")])
def test_a_method_that_cannot_run_on_flux_says_so_before_loading(flux, tmp_path, capsys, monkeypatch, method, says):
    def no_loading(*_, **__):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("erase.diffusion.task.load_base", no_loading)
    out = tmp_path / "run"
    args = ["--concept", "garbage truck", "--method", method, "--model", str(flux), "--output-dir", str(out), *RES]
    assert run_cli(train_main, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
