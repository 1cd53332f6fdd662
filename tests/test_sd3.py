"""SD3 end to end on a tiny random StableDiffusion3Pipeline saved without T5: loading, flow-matching conditioning and
targets, the methods, export and reload with the plain diffusers class, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import erase
from erase.cli import run_cli
from erase.diffusion.conditioning import PooledText
from erase.diffusion.layers import layer_map
from erase.engine.masking import ParameterMask
from erase.train import main as train_main
from tests.test_diffusion import FAST, _ctx, check_flow_matching_loss, exported_changes, two_steps
from tests.tiny_diffusion import tiny_sd3


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-models")
    os.environ["ERASE_CACHE"] = str(root / "cache")
    return tiny_sd3(root / "sd3", qk_norm="rms_norm")


def _task(folder, streams=("forget", "retain"), **kw):
    from erase.diffusion.task import DiffusionConfig, DiffusionTask

    cfg = DiffusionConfig(model=str(folder), concept="garbage truck", n_forget=4, n_retain=4, sample_steps=2,
                          eval_images=2, retain_concepts="church,parachute", **kw)
    return DiffusionTask(cfg, seed=0, streams=streams)


def _pipe(folder):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)


def test_loads_as_sd3_with_pooled_conditions(sd3):
    from erase.diffusion.loading import model_kind

    assert model_kind(str(sd3)) == "sd3"
    task = _task(sd3)
    assert task.kind == "sd3" and task.has_cross_attention and not task.one_text_encoder
    assert task.resolution == 16 and task.flow is not None  # transformer sample_size 8 x VAE factor 2
    assert type(task.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert task.base.pipe.text_encoder_3 is None
    cond = task.encode(["a photo of a garbage truck"])
    # 77 CLIP tokens (32 + 32 side by side, padded to T5's width 64) + 256 zero rows where T5 would be.
    assert isinstance(cond, PooledText) and cond.embeds.shape == (1, 77 + 256, 64) and cond.pooled.shape == (1, 64)
    assert not cond.embeds[:, 77:].any()
    pipe = task.base.pipe
    ids = pipe.tokenizer(["a photo of a garbage truck"], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        o1, o2 = (enc(ids, output_hidden_states=True) for enc in (pipe.text_encoder, pipe.text_encoder_2))
    torch.testing.assert_close(cond.embeds[:, :77], torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1))
    torch.testing.assert_close(cond.pooled, torch.cat([o1.text_embeds, o2.text_embeds], -1))
    # SD3 guides against the encoded empty prompt, not zeros (no force_zeros_for_empty_prompt).
    null = task.null_condition(2, "cpu")
    torch.testing.assert_close(null[:1].pooled, task.encode([""]).pooled)
    assert null.pooled.any()
    assert task.forget_set.latents.shape == (4, 4, 8, 8)


def test_flow_matching_noise_target_and_timesteps(sd3):
    """x_t = (1 - s) x0 + s noise with SD3's shifted schedule, velocity target, and the transformer reads s * 1000."""
    task = _task(sd3, streams=())
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([0, 999])
    s = torch.tensor([3 * 0.001 / (1 + 2 * 0.001), 1.0])  # shift 3: s' = 3 s / (1 + 2 s), s = (t + 1) / 1000
    torch.testing.assert_close(task.add_noise(x0, noise, t), (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(task.denoising_target(x0, noise, t), noise - x0)
    model, cond = task.base.unet, task.concept_condition(2, "cpu")
    with torch.no_grad():
        want = model(hidden_states=x0, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                     timestep=s * 1000).sample
        torch.testing.assert_close(task.predict(model, x0, t, cond), want)
    # A partial sample comes back with the t whose noise level is the sampler's: the model then reads exactly
    # the scheduler's timestep value.
    x_t, t_mid = task.partial_sample(model, 1, 1, 3, 3.0, [5])
    task.scheduler.set_timesteps(3)
    torch.testing.assert_close(task.flow.model_timestep(t_mid), task.scheduler.timesteps[1].float())
    assert x_t.shape == (1, 4, 8, 8)


def test_task_loss_is_the_flow_matching_loss(sd3):
    check_flow_matching_loss(_task(sd3, streams=("forget",)))


CASES = ["salun", "salun_soft", "rl", "ga", "ga_plus", "ft", "l1_sparse", "esd-x", "esd-u", "ca", "fmn"]


@pytest.mark.parametrize("method", CASES)
def test_method_two_steps(sd3, tmp_path, method):
    task = _task(sd3)
    changed, before = two_steps(task, tmp_path, method, **({"anchor": "church"} if method == "ca" else {}))
    lmap = layer_map(task.base.unet)
    text = {n for n in before if lmap.is_text_attention(n)}
    assert text
    if method in ("esd-x", "fmn"):
        assert changed <= text
    if method == "ca":
        assert all(".attn.add_k_proj." in n or ".attn.add_v_proj." in n for n in changed)
    if method == "esd-u":
        assert not changed & text


def _transformer(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_erased_sd3_reloads_with_diffusers(sd3, tmp_path):
    out = tmp_path / "run"
    args = ["--concept", "garbage truck", "--method", "esd-x", "--model", str(sd3), "--retain-concepts", "church",
            "--max-steps", "2", "--ddim-steps", "3", "--lr", "1e-2", "--output-dir", str(out), *FAST]
    assert run_cli(train_main, args) == 0
    before, after = _transformer(sd3), _transformer(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lmap = layer_map(_pipe(sd3).transformer)
    assert changed and all(lmap.is_text_attention(k) for k in changed)
    readme = (out / "README.md").read_text()
    assert "StableDiffusion3Pipeline.from_pretrained(\"model\", text_encoder_3=None, tokenizer_3=None)" in readme
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    img = _pipe(out / "model")("a photo of a church", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "after" in metrics


@pytest.mark.parametrize("fmt", ["lora", "delta"])
def test_lora_and_delta_exports_apply_to_the_sd3_pipeline(sd3, tmp_path, fmt):
    pipe = _pipe(sd3)
    changed = exported_changes(sd3, pipe, tmp_path / fmt, fmt)
    lmap = layer_map(pipe.transformer)
    assert changed and all(lmap.is_text_attention(n) for n in changed), changed


def test_resolution_flag_is_a_multiple_of_the_patch(sd3):
    task = _task(sd3, streams=("forget",), resolution=8)  # VAE factor 2 x patch 1
    assert task.resolution == 8 and task.forget_set.latents.shape == (4, 4, 4, 4)
    with pytest.raises(erase.EraseError, match="larger than this transformer's position embedding allows .16 px"):
        _task(sd3, streams=(), resolution=24)
    task.base.pipe.vae_scale_factor = 16
    with pytest.raises(erase.EraseError, match="multiple of 16 for this model .*patch size"):
        task._resolution()


def test_generate_renders_sd3_prompts(sd3):
    from erase.diffusion.generation import Job, load_generator, render
    from erase.prompts import PromptRow

    model = load_generator(str(sd3), "cpu")
    jobs = [Job("base", PromptRow("0", "a photo of a church", 3, 5.0), k, 5.0) for k in range(2)]
    images = render(model, jobs, 2)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    again = render(model, jobs[1:], 2)
    torch.testing.assert_close(again[0], images[1])


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_closed_form_edits_the_layers_that_read_the_text_and_reloads(sd3, tmp_path, method):
    """UCE / RECE adapted to SD3: the edit lands on context_embedder and the pooled embedder's first linear only, and
    (UCE, erase scale 100) the edited context_embedder maps the concept's last token where the old one mapped the
    guide's (the empty prompt's), and keeps a preserved concept's token where it was."""
    out = tmp_path / "run"
    args = ["--concept", "garbage truck", "--method", method, "--model", str(sd3), "--retain-concepts",
            "church,parachute", "--output-dir", str(out), "--erase-scale", "100", *FAST]
    assert run_cli(train_main, args) == 0
    before, after = _transformer(sd3), _transformer(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"}
    assert all(torch.isfinite(after[k]).all() for k in changed)
    if method == "uce":
        task = _task(sd3, streams=())
        blocks = task.text_segments(["garbage truck", "", "church"])
        assert len(blocks) == 1  # no T5 in this pipeline: its zero rows are left out
        emb, mask = blocks[0]
        last = mask.sum(-1) - 2
        concept, guide, kept = (emb[i, last[i]] for i in range(3))
        w0, w1 = before["context_embedder.weight"].float(), after["context_embedder.weight"].float()
        assert (w1 @ concept - w0 @ guide).norm() < 0.1 * (w0 @ concept - w0 @ guide).norm()
        assert (w1 @ kept - w0 @ kept).norm() < 0.1 * (w0 @ kept).norm()
    img = _pipe(out / "model")("a photo of a church", num_inference_steps=2, output_type="pt").images
    assert torch.isfinite(img).all()


def test_joint_attention_written_out_matches_diffusers_and_records_text_attention(sd3):
    """The recording processor changes nothing in the output; what it stores is the image-query x text-key block of
    the softmax; the repeated-token processor (loaded SD3 pipelines run it) equals 256 real zero tokens, in the
    output and in the weights' gradients."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from erase.diffusion.attention import AttentionStore
    from erase.diffusion.repeated_tokens import collapse, counts_repeats, use_repeated_tokens

    task = _task(sd3, streams=())
    model = task.base.unet
    assert counts_repeats(model)  # installed at load
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([200, 800])
    cond = task.concept_condition(2, "cpu")
    assert collapse(model, cond.embeds)[1] == {"repeat_last": 256}

    def output_and_grads():
        model.zero_grad()
        out = task.predict(model, x, t, cond)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.requires_grad_(True)
    fast, fast_grads = output_and_grads()
    model.set_attn_processor(JointAttnProcessor2_0())  # diffusers' own: all 333 rows read
    assert collapse(model, cond.embeds)[1] is None
    want, want_grads = output_and_grads()
    model.requires_grad_(False)
    torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == want_grads.keys() and "context_embedder.bias" in want_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        store = AttentionStore().install(model)
        store.recording = True
        got = task.predict(model, x, t, cond)
        store.remove()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert len(store.maps) == 2  # both joint blocks
        for probs in store.maps.values():
            assert probs.shape == (2 * 2, 64, 77 + 256)  # (batch x heads, 8 x 8 image tokens, text tokens)
            assert 0 < probs.sum(-1).max() < 1  # the image tokens take the rest of each query's attention
    assert use_repeated_tokens(model)


def test_sampling_with_the_repeated_token_processor_matches_diffusers(sd3):
    """The sampler keeps the zero rows once (pipeline call with joint_attention_kwargs): the same latents."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from erase.diffusion.repeated_tokens import use_repeated_tokens

    task = _task(sd3, streams=())
    cond = task.concept_condition(1, "cpu")
    lengths = []
    hook = task.base.unet.register_forward_pre_hook(
        lambda _, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    fast = task.generate(task.base.unet, cond, [3, 4])
    task.base.unet.set_attn_processor(JointAttnProcessor2_0())
    want = task.generate(task.base.unet, cond, [3, 4])
    hook.remove()
    assert set(lengths) == {78, 333}  # 77 CLIP rows + 1 counted 256 times; then all of them
    assert use_repeated_tokens(task.base.unet)
    torch.testing.assert_close(fast, want, atol=1e-4, rtol=1e-4)


def test_fmn_marks_the_concept_tokens_in_the_sd3_condition(sd3):
    task = _task(sd3, streams=())
    mask = task.concept_token_mask()
    assert mask.shape == (len(task.prompts), 77 + 256)
    assert mask[0].sum() == 2 and not mask[0, 77:].any()  # "garbage truck": two CLIP tokens, no T5 rows


def test_attack_command_runs_every_attack_on_an_erased_sd3(sd3, tmp_path):
    """erase/attack.py on an SD3 run: all four attacks, records and robustness.json."""
    from erase.attack import main as attack_main

    out = tmp_path / "run"
    args = ["--concept", "trouser", "--method", "uce", "--model", str(sd3), "--retain-concepts", "dress",
            "--paraphrases", "a pair of pants", "--evaluator", "fmnist-classifier", "--output-dir", str(out), *FAST]
    assert run_cli(train_main, args) == 0
    tiny = ["--set", "population=4", "--set", "generations=2", "--set", "timesteps=1", "--set", "iterations=1",
            "--set", "steps=1", "--set", "train-images=1", "--set", "concept-inversion.batch-size=1",
            "--set", "check-every=1", "--set", "p4d.images=1", "--set", "ring-a-bell.images=1",
            "--set", "unlearndiffatk.images=1", "--set", "concept-inversion.images=1", "--no-progress"]
    assert run_cli(attack_main, [str(out), "--attack", "all", "--limit", "1", *tiny]) == 0
    union = json.loads((out / "attacks" / "robustness.json").read_text())
    assert set(union["attacks"]) == {"ring-a-bell", "unlearndiffatk", "p4d", "concept-inversion"}
    for name in union["attacks"]:
        records = list((out / "attacks" / name / "records").glob("*.json"))
        assert len(records) == 1 and json.loads(records[0].read_text())["adversarial_prompt"]


def test_bundled_flow_model_end_to_end(tmp_path):
    """--model fmnist-tiny-flow: a bundled name, Fashion-MNIST classes and evaluator, an erased model that reloads."""
    out = tmp_path / "run"
    args = ["--concept", "trouser", "--method", "uce", "--model", "fmnist-tiny-flow", "--retain-concepts", "dress",
            "--output-dir", str(out), "--n-forget", "2", "--n-retain", "2", "--eval-images", "1", "--sample-steps", "2",
            "--grid-seeds", "1", "--no-progress"]
    assert run_cli(train_main, args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["evaluator"] == "fmnist-classifier" and "concept_acc" in metrics["after"]
    resolved = (out / "config.yaml").read_text()
    assert "erase_scale: 30.0" in resolved  # the bundled model's recipe (erase.yaml)
    img = _pipe(out / "model")("a photo of a dress", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, 32, 32)


def test_lora_teacher_keeps_a_masked_adapter_frozen_and_checkpointing_works(sd3, tmp_path):
    """base_weights turns the adapters off and on again; peft's enable_adapters would mark every adapter weight
    trainable, undoing ESD-x's mask (only the text attention's adapters train), and under gradient checkpointing
    the recomputed forward would then differ from the first (CheckpointError)."""
    cls = erase.get_method("esd-x")
    task = _task(sd3, streams=(), lora_rank=4, gradient_checkpointing=True)
    method = cls(cls.Config(max_steps=2, ddim_steps=3))
    ctx = _ctx(task, tmp_path)
    model = ctx.model
    method.setup(ctx)
    masker = ParameterMask(model, method.parameter_masks(ctx))
    frozen = [n for n, p in model.named_parameters() if "lora" in n and not p.requires_grad]
    assert frozen and all(".attn.add_" in n or ".attn.to_add_out" in n
                          for n, p in model.named_parameters() if "lora" in n and p.requires_grad)
    model.train()
    for _ in range(2):  # a second step: the first teacher call must not have unfrozen anything
        loss = method.losses({}, ctx)["esd"]
        loss.backward()
        masker.mask_grads()
    params = dict(model.named_parameters())
    assert not any(params[n].requires_grad or params[n].grad is not None for n in frozen)


def test_refusals_on_sd3_come_before_loading(sd3, tmp_path, capsys, monkeypatch):
    """uce --edit v (no value projection reads the text embedding) and, on a folder with T5, advunlearn (it searches
    CLIP tokens only): one line each, told from the files before any model loads."""
    import shutil

    def no_loading(*_, **__):
        raise AssertionError("the model was loaded before the refusal")

    with_t5 = tmp_path / "sd3-t5"
    shutil.copytree(sd3, with_t5)
    index = json.loads((with_t5 / "model_index.json").read_text())
    index.update(text_encoder_3=["transformers", "T5EncoderModel"], tokenizer_3=["transformers", "T5TokenizerFast"])
    (with_t5 / "model_index.json").write_text(json.dumps(index))
    monkeypatch.setattr("erase.diffusion.task.load_base", no_loading)
    for model, extra, says in [(sd3, ["--method", "uce", "--edit", "v"], "--edit v edits value projections"),
                               (with_t5, ["--method", "advunlearn"], "this pipeline also has T5")]:
        args = ["--concept", "trouser", "--model", str(model), "--output-dir", str(tmp_path / "run"), *extra]
        assert run_cli(train_main, args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
