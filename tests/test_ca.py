"""Concept Ablation: its data, its target, its anchors, and what it trains, on tiny SD-1.x/2.x and a DDPM."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import erase
from erase.cli import run_cli
from erase.errors import EraseError
from erase.train import main as train_main
from tests.test_diffusion import FAST, _task, models  # noqa: F401  (the session fixture of tiny models)


def _ca(**kw):
    cls = erase.get_method("ca", "diffusion")
    return cls(cls.Config(**kw))


def test_anchor_view_pairs_anchor_images_with_the_concept_prompt(models):  # noqa: F811
    task = _task(models["sd1"], streams=())
    view = task.anchor_view(["church"], 4)
    b = view.batches(4).__next__()
    assert [task.prompts[i] for i in b["prompt"].tolist()] == [task.forget_prompts[j % len(task.forget_prompts)]
                                                               for j in range(4)]
    anchor_prompts = [task.prompts[i] for i in b["target_prompt"].tolist()]
    assert all("church" in p and "garbage truck" not in p for p in anchor_prompts)
    # the same template on both sides: the anchor word replaced by the concept
    assert [p.replace("church", "garbage truck") for p in anchor_prompts] == [task.prompts[i] for i in b["prompt"]]


def test_ca_loss_is_the_concept_prediction_pulled_to_the_stop_gradient_anchor_prediction(models):  # noqa: F811
    task = _task(models["sd2v"], streams=())
    unet = task.build_model(False)
    b = next(task.anchor_view(["church"], 2).batches(2))
    torch.manual_seed(3)
    loss = task.loss(unet, b)
    loss.backward()
    torch.manual_seed(3)
    x0 = b["latents"]
    noise = torch.randn_like(x0)
    t = torch.randint(0, task.num_train_timesteps, (2,))
    x_t = task.scheduler.add_noise(x0, noise, t)
    with torch.no_grad():
        pred = unet(x_t, t, encoder_hidden_states=task.embeds[b["prompt"]]).sample
        target = unet(x_t, t, encoder_hidden_states=task.embeds[b["target_prompt"]]).sample
    assert torch.allclose(loss.detach(), ((pred - target) ** 2).mean(), atol=1e-6)
    assert torch.isfinite(unet.conv_in.weight.grad).all()


def test_anchors_default_from_the_model_and_bad_anchors_are_refused(models):  # noqa: F811
    bundled = _task(models["bundled"], concept="trouser,sneaker", streams=())
    m = _ca()
    m.check_task(bundled)
    assert m.anchors == ["dress", "sandal"]  # the bundled SD's erase.yaml
    m = _ca(anchor="jeans")
    with pytest.raises(EraseError, match="concepts the run keeps, not erased"):
        m.check_task(bundled)  # jeans is a synonym of trouser
    with pytest.raises(EraseError, match="concepts the run keeps, not erased"):
        _ca(anchor="sneaker").check_task(bundled)  # erased too
    with pytest.raises(EraseError, match="3 concepts for 2 erased concepts"):
        _ca(anchor="coat,bag,dress").check_task(bundled)
    sd = _task(models["sd1"], streams=())
    with pytest.raises(EraseError, match="--anchor is needed for 'garbage truck'"):
        _ca().check_task(sd)
    with pytest.raises(EraseError, match="class-conditional DDPM"):
        _ca(anchor="bird").check_task(_task(models["ddpm"], concept="airplane", streams=()))
    _ca(anchor="bird", params="full").check_task(_task(models["ddpm"], concept="airplane", streams=()))


@pytest.mark.parametrize("kind", ["sd1", "sd2v"])
def test_ca_trains_only_cross_attention_keys_and_values(models, tmp_path, kind):  # noqa: F811
    out = tmp_path / "ca"
    rc = run_cli(train_main, ["--model", str(models[kind]), "--concept", "garbage truck", "--retain-concepts", "church",
                              "--method", "ca", "--anchor", "parachute", "--anchor-images", "4", "--max-steps", "2",
                              "--lr", "1e-2", "--output-dir", str(out), *FAST])
    assert rc == 0
    base = load_file(str(models[kind] / "unet" / "diffusion_pytorch_model.safetensors"))
    new = load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], new[k].to(base[k].dtype))}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed), sorted(changed)[:5]
