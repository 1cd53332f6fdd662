"""advunlearn: only the text encoder trains (and attn2 when asked), the inner attack, exports and loaders, refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import erase
from erase.cli import run_cli
from erase.engine import LoopSettings, run_method
from erase.errors import EraseError
from erase.methods.advunlearn import AdvUnlearn, AdvUnlearnConfig
from erase.train import main as train_main
from tests.test_diffusion import FAST, _ctx, _task, models  # noqa: F401  (the session fixture of tiny models)

EMBEDDINGS = ("embeddings.token_embedding", "embeddings.position_embedding")


def _method(**kw) -> AdvUnlearn:
    base = dict(max_steps=2, warmup_iters=1, attack_steps=2, ddim_steps=3, retain_batch=2, lr=1e-2)
    return AdvUnlearn(AdvUnlearnConfig(**{**base, **kw}))


@pytest.mark.parametrize("kind,kw", [("sd1", {}), ("sd2v", {"attack": "fast-at", "attack_init": "latest"}),
                                     ("sd1", {"train": "text-encoder+xattn"})])
def test_two_steps_train_only_the_text_encoder(models, tmp_path, kind, kw):  # noqa: F811
    task = _task(models[kind], streams=())
    ctx = _ctx(task, tmp_path, text_encoder=True)
    m = _method(**kw)
    m.check_task(task)
    base_te = {n: p.detach().clone() for n, p in task.base.pipe.text_encoder.named_parameters()}
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    run_method(m, ctx, LoopSettings(progress=False, log_every=1))
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and "attack" not in logs[0] and "attack" in logs[1]  # step 2 is past the warm-up
    assert all(torch.isfinite(torch.tensor(r[k])) for r in logs for k in ("unlearn", "retain", "loss"))
    changed = {n for n, p in ctx.unwrapped.named_parameters() if not torch.equal(before[n], p.detach())}
    te = {n for n in changed if n.startswith("text_encoder.")}
    assert te and not any(e in n for n in te for e in EMBEDDINGS)
    unet = changed - te
    if kw.get("train") == "text-encoder+xattn":
        assert unet and all(".attn2." in n for n in unet)
    else:
        assert not unet
    # the base model's own text encoder (the task's conditions, ε₀'s inputs) is untouched
    assert all(torch.equal(p, base_te[n]) for n, p in task.base.pipe.text_encoder.named_parameters())
    if kw.get("attack_init") == "latest":
        assert len(ctx.state["advunlearn_prefix"][0]) == 1  # k = 1 prefix token kept for the next round


def test_inner_attack_lowers_its_own_loss(models, tmp_path):  # noqa: F811
    task = _task(models["sd1"], streams=())
    ctx = _ctx(task, tmp_path, text_encoder=True)
    m = _method(attack_steps=10, attack_lr=1e-3)  # the official lr; larger steps overshoot embeddings of ~0.02
    m.setup(ctx)
    model = ctx.unwrapped
    ids = m.prefixed_ids(0)
    assert ids.shape == m.concept_ids[0].shape
    assert torch.equal(ids[0, 2:], m.concept_ids[0][0, 1:-1])  # [sot, δ, prompt…]: the prompt moved right by k = 1
    torch.manual_seed(0)
    fixed = [m.sample(ctx, model, 0, stop, 1) for stop in (0, 1, 2, 1)]

    def objective(prefix):
        with torch.no_grad():
            return sum(float(m.attack_loss(model, ids, prefix, x, t, ep)) for x, t, ep in fixed) / len(fixed)

    start = m.initial_prefix(ctx, model)
    assert start.shape == (1, 1, model.text_encoder.get_input_embeddings().weight.shape[1])
    found, last = m.adversarial_prefix(ctx, 0, init=start)
    assert torch.isfinite(last) and not torch.equal(found, start)
    assert objective(found) < 0.9 * objective(start)
    assert all(p.grad is None for p in model.parameters())  # the attack differentiates the prefix only


def test_evaluation_reads_prompts_and_the_empty_prompt_through_the_trained_encoder(models, tmp_path):  # noqa: F811
    """task.generate with the trained model == the pipeline with that text encoder swapped in (what model/ loads as)."""
    from erase.diffusion.sampling import decode_sd

    task = _task(models["sd1"], streams=())
    model = task.build_model(False, text_encoder=True)
    with torch.no_grad():
        model.text_encoder.get_encoder().layers[0].mlp.fc1.weight.mul_(3.0)  # an "erased" encoder
    prompt, seeds = "a photo of a church", [7]
    ours = task.generate(model, task.encode_for(model, [prompt]), seeds)
    pipe = task.base.pipe
    original = pipe.text_encoder
    pipe.text_encoder = model.text_encoder
    try:
        latents = pipe(prompt=[prompt], guidance_scale=task.guidance, num_inference_steps=task.cfg.sample_steps,
                       generator=[torch.Generator().manual_seed(7)], output_type="latent").images
    finally:
        pipe.text_encoder = original
    assert torch.allclose(ours, decode_sd(pipe, latents).cpu(), atol=1e-5)
    assert not torch.allclose(ours, task.generate(task.base.unet, task.encode([prompt]), seeds), atol=1e-3)


def _files_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


ARGS = ["--concept", "trouser", "--method", "advunlearn", "--retain-concepts", "dress,bag", "--evaluator",
        "fmnist-classifier", "--max-steps", "2", "--warmup-iters", "1", "--attack-steps", "2", "--ddim-steps", "3",
        "--retain-batch", "2", "--lr", "1e-2", *FAST]


@pytest.fixture(scope="module")
def pipeline_run(models, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("advunlearn") / "run"
    digest = _files_digest(Path(models["sd1"]))
    assert run_cli(train_main, [*ARGS, "--model", str(models["sd1"]), "--output-dir", str(out)]) == 0
    assert _files_digest(Path(models["sd1"])) == digest, "the base model's folder changed"
    return out


def test_pipeline_save_reloads_with_plain_diffusers(models, pipeline_run):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_run / "model")
    base = StableDiffusionPipeline.from_pretrained(models["sd1"])
    te_base = dict(base.text_encoder.named_parameters())
    changed = [n for n, p in pipe.text_encoder.named_parameters() if not torch.equal(p, te_base[n])]
    assert changed and not any(e in n for n in changed for e in EMBEDDINGS)
    unet_base = dict(base.unet.named_parameters())
    assert all(torch.equal(p, unet_base[n]) for n, p in pipe.unet.named_parameters())
    img = pipe("a photo of a bag", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    assert metrics["method"] == "advunlearn" and "concept_acc" in metrics["after"]
    assert "trained text encoder in `model/text_encoder/`" in (pipeline_run / "README.md").read_text()


def test_attack_command_attacks_through_the_erased_text_encoder(pipeline_run, monkeypatch):
    from erase.attack import main as attack_main
    from erase.diffusion.text_model import TextConditionedUNet
    from erase.robustness import run as robustness

    seen = []
    real = robustness.attack_row

    def spy(attack, row, ctx, task, base_unet, folder, *rest):
        seen.append((ctx, task))
        return real(attack, row, ctx, task, base_unet, folder, *rest)

    monkeypatch.setattr(robustness, "attack_row", spy)
    args = [str(pipeline_run), "--attack", "ring-a-bell", "--set", "population=8", "--set", "generations=2",
            "--limit", "1", "--no-progress"]
    assert run_cli(attack_main, args) == 0
    ctx, task = seen[0]
    assert ctx.encoder is not None and isinstance(ctx.model, TextConditionedUNet)
    assert ctx.model.text_encoders == ctx.encoder and ctx.model.text_encoder is ctx.encoder[0]
    assert not torch.allclose(ctx.encode(["a photo of a trouser"]), task.encode(["a photo of a trouser"]))


def test_delta_holds_the_text_encoder_and_erase_loaders_apply_it(models, tmp_path):  # noqa: F811
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from erase.diffusion import generation as G
    from erase.diffusion.export import load_delta

    out = tmp_path / "delta"
    assert run_cli(train_main, [*ARGS, "--model", str(models["sd1"]), "--save-format", "delta",
                                "--output-dir", str(out)]) == 0
    path = out / "delta.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["format"] == "erase-delta" and meta["parts"] == "text_encoder"
    assert keys and all(k.startswith("text_encoder.") for k in keys)
    assert "text-encoder tensors: apply it to the whole pipeline" in (out / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(models["sd1"])
    with pytest.raises(EraseError, match="text-encoder weights.*whole pipeline"):
        load_delta(pipe.unet, path)
    assert load_delta(pipe, path) == len(keys)
    base = StableDiffusionPipeline.from_pretrained(models["sd1"])
    # generate.py / evaluate.py / attack.py load an erased run through resolve_erased + load_generator
    spec, delta, implied = G.resolve_erased(str(out), None)
    assert delta == path and implied == str(models["sd1"])
    erased = G.load_generator(spec, "cpu", delta)
    assert G.trained_text_encoder(erased, base) == [erased.pipe.text_encoder]
    te = dict(pipe.text_encoder.named_parameters())
    assert all(torch.equal(p, te[n]) for n, p in erased.pipe.text_encoder.named_parameters())


@pytest.mark.parametrize("kw,flag", [({"retain_batch": 0}, "--retain-batch"), ({"attack_steps": 0}, "--attack-steps"),
                                     ({"adv_prompt_num": 0}, "--adv-prompt-num"), ({"attack_lr": 0.0}, "--attack-lr"),
                                     ({"warmup_iters": -1}, "--warmup-iters"), ({"ddim_steps": 1}, "--ddim-steps"),
                                     ({"retain_weight": -0.1}, "--retain-weight"), ({"max_steps": 0}, "--max-steps"),
                                     ({"attack": "fgsm"}, "--attack "), ({"attack_init": "zeros"}, "--attack-init"),
                                     ({"train": "unet"}, "--train"), ({"start_guidance": float("nan")}, "--start-guidance")])
def test_bad_config_values_name_the_flag(kw, flag):
    with pytest.raises(EraseError, match=flag):
        AdvUnlearn(AdvUnlearnConfig(**kw))


def test_lora_and_ddpm_are_refused_in_one_line_before_any_work(models, tmp_path, capsys):  # noqa: F811
    for extra, words in ((["--save-format", "lora"], "LoRA"), (["--lora-rank", "4"], "LoRA")):
        out = tmp_path / "lora"
        capsys.readouterr()
        code = run_cli(train_main, [*ARGS, "--model", str(models["sd1"]), *extra, "--output-dir", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and words in err and "--save-format pipeline or delta" in err and len(err.splitlines()) == 1
        assert not out.exists()  # refused while the config was resolved: no folder, no model, no images
    code = run_cli(train_main, ["--concept", "airplane", "--method", "advunlearn", "--model", str(models["ddpm"]),
                                "--output-dir", str(tmp_path / "ddpm"), *FAST])
    assert code == 2 and "DDPM" in capsys.readouterr().err
    assert erase.get_method("advunlearn").trains_text_encoder and not erase.get_method("esd-x").trains_text_encoder


def test_resume_reproduces_the_uninterrupted_run(models, tmp_path):  # noqa: F811
    """The retain-prompt pool and the latest prefix live in the checkpoint: a resumed run ends where one run ends."""
    import shutil

    from safetensors.torch import load_file

    args = [*ARGS, "--model", str(models["sd1"]), "--max-steps", "4", "--attack-init", "latest", "--checkpoint-every", "2"]
    assert run_cli(train_main, [*args, "--output-dir", str(tmp_path / "a")]) == 0
    b = tmp_path / "b"
    assert run_cli(train_main, [*args, "--output-dir", str(b)]) == 0
    state = json.loads((b / "checkpoints" / "step-000002" / "state.json").read_text())["method_state"]
    assert "advunlearn_unseen_retain" in state and "advunlearn_prefix" in state
    shutil.rmtree(b / "checkpoints" / "step-000004")
    (b / "run.json").unlink()
    assert run_cli(train_main, [*args, "--output-dir", str(b), "--resume"]) == 0
    weights = "model/text_encoder/model.safetensors"
    ta, tb = load_file(str(tmp_path / "a" / weights)), load_file(str(b / weights))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
