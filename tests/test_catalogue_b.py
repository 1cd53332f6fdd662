"""The multi-phase catalogue methods: scrub, kl_uniform, reinit_kp, grad_reinit, prune_reinit,
reset_distill, reset_noise. Tiny CIFAR-stem ResNet-18 (width 2) on random 1x8x8 images, CPU."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.nn import functional as F

import erase
from erase.classifier.models import ResNet18, ResNetConfig
from erase.engine import LoopSettings, run_method
from erase.engine.streams import DataView
from tests.conftest import TensorSet, ToyTask, make_ctx, toy_model

METHODS = ("scrub", "kl_uniform", "reinit_kp", "grad_reinit", "prune_reinit", "reset_distill", "reset_noise")


class ImageTask(ToyTask):
    """4 classes of random 1x8x8 images with a class-dependent bright row; 16 forget (all of
    class 0, since the forget set is every 4th example) / 48 retain."""

    def __init__(self, n=64, seed=0, num_classes=4):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % num_classes
        x = 0.5 * torch.rand(n, 1, 8, 8, generator=g)
        x[torch.arange(n), 0, 2 * y] += 0.5
        self.num_classes = num_classes
        data = TensorSet(x, y)
        forget = torch.arange(0, n, 4)
        retain = torch.tensor([i for i in range(n) if i % 4])
        self.views = {"forget": DataView(data, forget), "retain": DataView(data, retain)}
        self.eval_views = dict(self.views)


def tiny_resnet(seed=0):
    torch.manual_seed(seed)
    return ResNet18(ResNetConfig(num_classes=4, in_channels=1, width=2, image_size=8))


def perturb(model, seed=1):
    """Make every parameter and BN statistic differ from its default, so any reset is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_modules(model, before):
    after = model.state_dict()
    return {k.rpartition(".")[0] for k in before
            if after[k].is_floating_point() and not torch.equal(after[k], before[k])}


def run(name, task, model, tmp_path, **cfg):
    cls = erase.get_method(name, "classifier")
    method = cls(cls.Config(**cfg))
    ctx = make_ctx(task, model, tmp_path)
    info = run_method(method, ctx, LoopSettings(progress=False, log_every=1))
    return method, ctx, info


def ctx_for(name, task, model, tmp_path, **cfg):
    """A method whose setup() ran, and its context, without training."""
    cls = erase.get_method(name, "classifier")
    method = cls(cls.Config(**cfg))
    ctx = make_ctx(task, model, tmp_path)
    method.setup(ctx)
    return method, ctx


def test_catalogue_is_registered_for_classifiers():
    assert set(METHODS) <= set(erase.list_methods(task="classifier"))


@pytest.mark.parametrize("name", METHODS)
def test_two_steps_on_tiny_resnet(tmp_path, name):
    model = tiny_resnet()
    before = snapshot(model)
    _, ctx, info = run(name, ImageTask(), model, tmp_path, max_steps=2, batch_size=8)
    assert info["steps"] == 2
    for line in (tmp_path / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert all(math.isfinite(v) for k, v in rec.items() if k != "phase"), rec
    assert changed_modules(ctx.unwrapped, before), f"{name} changed nothing"


# -- scrub -----------------------------------------------------------------------------------------------
def test_scrub_phases_alternate_max_then_min_for_msteps_epochs(tmp_path):
    method, ctx = ctx_for("scrub", ImageTask(), tiny_resnet(), tmp_path, epochs=3, msteps=2, batch_size=8,
                          lr_decay_epochs="1", forget_batch_size=512)
    phases = method.phases(ctx)
    assert [p.name for p in phases] == ["max-0", "min-0", "max-1", "min-1", "min-2"]
    assert [p.streams for p in phases] == [("forget",), ("retain",)] * 2 + [("retain",)]
    assert [p.steps for p in phases] == [2, 6, 2, 6, 6]      # 16 forget / 48 retain, batch 8
    assert {p.optimizer for p in phases} == {"main"}          # one shared optimiser, as the reference
    # 1 reference step of 512 vs our 2 steps of 8: half the lr per max step; decay after epoch 1.
    assert phases[0].lr * phases[0].lr_scale == pytest.approx(5e-4 * 0.5)
    assert [p.lr for p in phases] == pytest.approx([5e-4, 5e-4, 5e-5, 5e-5, 5e-5])
    assert method.weights() == {"forget_kl": -1.0, "retain_ce": 0.99, "retain_kl": 0.001}


def _train_mode_kl(teacher, student, x, t=4.0):
    from erase.methods.scrub import distill_kl

    s = copy.deepcopy(student).train()
    with torch.no_grad():
        return float(distill_kl(s(x), teacher(x), t))


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_scrub_max_phase_raises_kl_to_the_teacher_on_forget(tmp_path, sign):
    task, model = ImageTask(), tiny_resnet()
    teacher = copy.deepcopy(model).eval()
    x = task.views["forget"].get_batch(torch.arange(16))["image"]
    before = _train_mode_kl(teacher, model, x)
    # max_steps = the max pass of epoch 0 (2 steps); sign +1 turns it into descent: a control.
    _, ctx, info = run("scrub", task, model, tmp_path, max_steps=2, batch_size=8, lr=0.05, forget_batch_size=0,
                       loss_weights={"forget_kl": sign})
    assert [p["name"] for p in info["phases"]] == ["max-0"]
    after = _train_mode_kl(teacher, ctx.unwrapped, x)
    assert (after > before) == (sign < 0), (before, after)


# -- kl_uniform ------------------------------------------------------------------------------------------
def _entropy(model, batch):
    with torch.no_grad():
        log_p = F.log_softmax(model(batch["image"]), dim=1)
    return float(-(log_p.exp() * log_p).sum(1).mean())


def test_kl_uniform_stage1_raises_forget_entropy(tmp_path):
    task, model = ToyTask(), toy_model()
    with torch.no_grad():
        model[2].weight.mul_(10.0)  # a confident model: low entropy on the forget set
    batch = next(task.iterate("forget"))
    before = _entropy(model, batch)
    assert before < 1.0
    _, ctx, info = run("kl_uniform", task, model, tmp_path, max_steps=2, batch_size=8, stage1_lr=0.05)
    assert [p["name"] for p in info["phases"]] == ["stage1"]
    assert _entropy(ctx.unwrapped, batch) > before + 1e-3


def test_kl_uniform_rounds_have_their_own_optimisers(tmp_path):
    method, ctx = ctx_for("kl_uniform", ImageTask(), tiny_resnet(), tmp_path, batch_size=8)
    phases = method.phases(ctx)
    assert [p.name for p in phases[:5]] == ["stage1", "forget-0", "retain-0", "forget-1", "retain-1"]
    assert len(phases) == 1 + 2 * 8
    by_kind = {p.name.split("-")[0]: p for p in phases}
    assert {k: (p.optimizer, p.weight_decay) for k, p in by_kind.items()} == {
        "stage1": ("stage1", 0.0), "forget": ("forget", 0.0), "retain": ("retain", 1e-2)}
    assert by_kind["stage1"].lr == 0.005 and by_kind["retain"].lr == pytest.approx(0.001 * 8 / 64)
    assert by_kind["forget"].streams == ("forget", "retain")
    forget_lrs = [p.lr for p in phases if p.name.startswith("forget")]
    assert all(a > b for a, b in zip(forget_lrs, forget_lrs[1:])) and 1e-6 < forget_lrs[-1] < forget_lrs[0] < 3e-4


def test_kl_uniform_losses_have_their_known_values():
    from erase.methods.kl_uniform import contrastive_uniform_loss, kl_uniform_loss

    assert float(kl_uniform_loss(torch.zeros(3, 5))) == pytest.approx(0.0, abs=1e-6)
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    p = torch.softmax(logits, 1)
    assert float(kl_uniform_loss(logits)) == pytest.approx(float((1 / 3 * (math.log(1 / 3) - p.log())).sum()), rel=1e-5)
    # identical retain rows: the softmax over the retain batch is uniform, the loss is log(batch)
    assert float(contrastive_uniform_loss(torch.randn(4, 3), torch.ones(6, 3), 1.15)) == pytest.approx(math.log(6))


# -- reinit_kp -------------------------------------------------------------------------------------------
def test_reinit_kp_pool_excludes_head_and_shortcuts():
    from erase.methods.reinit_kp import reinit_pool

    names = [n for n, _ in reinit_pool(tiny_resnet())]
    assert len(names) == 34 and "conv1" in names and "layer1.0.bn2" in names
    assert "fc" not in names and not any("shortcut" in n for n in names)
    assert [n for n, _ in reinit_pool(toy_model())] == ["0"]  # an MLP: the hidden layer only


def test_reinit_kp_cycles_reinit_only_pool_layers_with_a_growing_share(tmp_path):
    from erase.methods.reinit_kp import reinit_pool

    model = perturb(tiny_resnet())
    method, ctx = ctx_for("reinit_kp", ImageTask(), model, tmp_path, batch_size=8)
    phases = method.phases(ctx)
    starts = [p for p in phases if p.on_start is not None]
    assert [p.name for p in starts] == ["cycle-0-epoch-0", "cycle-1-epoch-0", "cycle-2-epoch-0", "cycle-3-epoch-0"]
    assert [p.lr for p in phases] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    assert len({p.optimizer for p in phases}) == 4
    pool = {n for n, _ in reinit_pool(model)}
    for c, phase in enumerate(starts):
        before = snapshot(model)
        phase.on_start(ctx)
        record = ctx.state["reinit_kp"][str(c)]
        changed = changed_modules(model, before)
        assert changed and changed == set(record["layers"]) and changed <= pool
        assert not any(n == "fc" or "shortcut" in n for n in changed)
    draws = [ctx.state["reinit_kp"][str(c)]["draws"] for c in range(4)]
    assert draws == [3, 4, 5, 6]
    # deterministic in the seed
    again = perturb(tiny_resnet())
    m2, ctx2 = ctx_for("reinit_kp", ImageTask(), again, tmp_path / "b", batch_size=8)
    m2.phases(ctx2)[0].on_start(ctx2)
    assert ctx2.state["reinit_kp"]["0"] == ctx.state["reinit_kp"]["0"]


def test_reinit_kp_matches_the_original_on_noisy_inputs(tmp_path):
    method, ctx = ctx_for("reinit_kp", ImageTask(), tiny_resnet(), tmp_path, noise_std=0.5)
    model = ctx.unwrapped.eval()  # eval: the student equals the frozen teacher, so the MSE must be 0 ...
    batch = {"retain": next(ctx.task.iterate("retain"))}
    ctx.model = model
    assert float(method.losses(batch, ctx)["retain_kp_mse"].detach()) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():                      # ... and positive once the student moved
        model.fc.bias.add_(1.0)
    assert float(method.losses(batch, ctx)["retain_kp_mse"].detach()) > 0.5


# -- grad_reinit -----------------------------------------------------------------------------------------
def test_grad_reinit_resets_the_smallest_gradient_share_of_every_conv(tmp_path):
    from erase.methods.grad_reinit import linear_annealing_factors

    model = tiny_resnet()
    method, ctx = ctx_for("grad_reinit", ImageTask(), model, tmp_path, batch_size=8)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert set(method.reinit) == {f"{n}.weight" for n in names}
    before = snapshot(model)
    grads = method.gradient_difference(ctx, {n: dict(model.named_parameters())[n] for n in method.reinit})
    phases = method.phases(ctx)
    phases[0].on_start(ctx)
    after = model.state_dict()
    for n, mask in method.reinit.items():
        k = round(0.3 * mask.numel())
        assert int(mask.sum()) == k
        moved = after[n] != before[n]
        assert torch.equal(moved, mask)                                  # exactly the selected weights
        g = grads[n].abs().flatten()
        assert g[mask.flatten()].max() <= g[~mask.flatten()].min()       # ... which have the smallest |g|
        assert torch.equal(method.masks[n], torch.where(mask, 1.0, 0.1))
    assert changed_modules(model, before) == names                       # BN and fc untouched
    assert linear_annealing_factors(5) == pytest.approx([1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
    assert [p.lr for p in phases] == pytest.approx([1e-3 * f for f in linear_annealing_factors(5)])
    assert all(p.masks is method.masks for p in phases)


def test_grad_reinit_falls_back_to_hidden_linear_layers_on_an_mlp(tmp_path):
    method, _ = ctx_for("grad_reinit", ToyTask(), toy_model(), tmp_path)
    assert set(method.reinit) == {"0.weight"}


# -- prune_reinit ----------------------------------------------------------------------------------------
def test_prune_reinit_redraws_the_99_percent_smallest_weights(tmp_path):
    model = tiny_resnet()
    method, ctx = ctx_for("prune_reinit", ImageTask(), model, tmp_path, batch_size=8)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    tensors = {f"{n}.{k}": t for n, m in layers.items() for k, t in (("weight", m.weight), ("bias", m.bias)) if t is not None}
    before = {n: t.detach().clone() for n, t in tensors.items()}
    flat = torch.cat([t.abs().flatten() for t in before.values()])
    n_keep = flat.numel() - round(0.99 * flat.numel())
    threshold = flat.topk(n_keep).values.min()
    method.phases(ctx)[0].on_start(ctx)
    kept = 0
    for n, t in tensors.items():
        old, new = before[n], t.detach()
        keep = old.abs() >= threshold
        kept += int(keep.sum())
        assert torch.equal(new[keep], old[keep])
        if n.endswith("bias"):
            assert torch.all(new[~keep] == 0)
        else:
            bound = math.sqrt(1 / new[0].numel())
            assert new[~keep].abs().max() <= bound and not torch.equal(new[~keep], old[~keep])
    assert kept == n_keep and ctx.state["prune_reinit"]["pruned"] == flat.numel() - n_keep


def test_prune_reinit_ends_with_fp16_weights_and_class_weights(tmp_path):
    _, ctx, _ = run("prune_reinit", ImageTask(), tiny_resnet(), tmp_path, max_steps=2, batch_size=8, lr=0.05)
    for p in ctx.unwrapped.parameters():
        assert torch.equal(p, p.half().float())
    method, _ = ctx_for("prune_reinit", ImageTask(), tiny_resnet(), tmp_path / "b")
    # retain: 16 examples of classes 1-3 each; class 0 is all forgotten (count clamped to 1)
    assert torch.allclose(method.class_weights, torch.tensor([1.0] + [16.0 ** -0.1] * 3))


# -- reset_distill ---------------------------------------------------------------------------------------
def test_reset_distill_resets_first_conv_and_head_then_warms_up_by_distillation(tmp_path):
    model = perturb(tiny_resnet())
    method, ctx = ctx_for("reset_distill", ImageTask(), model, tmp_path, batch_size=8)
    phases = method.phases(ctx)
    assert [p.name for p in phases] == ["warmup", "retain-0", "retain-1", "retain-2"]
    assert [p.lr for p in phases] == pytest.approx([9e-4, 1e-3, 7.5e-4, 2.5e-4])
    assert [p.optimizer for p in phases] == ["warmup"] + ["retain"] * 3
    before = snapshot(model)
    phases[0].on_start(ctx)
    assert changed_modules(model, before) == {"conv1", "fc"}
    ctx.phase = "warmup"
    terms = method.losses({"retain": next(ctx.task.iterate("retain"))}, ctx)
    assert set(terms) == {"warmup_kd"} and float(terms["warmup_kd"].detach()) > 0


# -- reset_noise -----------------------------------------------------------------------------------------
def test_reset_noise_trains_random_subsets_then_everything(tmp_path):
    model = tiny_resnet()
    method, ctx = ctx_for("reset_noise", ImageTask(), model, tmp_path, batch_size=8)
    plan = method.plan(ctx)
    phases = method.phases(ctx)
    assert [p.name for p in phases] == [f"subset-{e}" for e in range(5)] + [f"fine-{j}" for j in range(4)]
    assert len({p.optimizer for p in phases}) == 9                     # a new SGD every epoch
    assert [p.lr for p in phases[5:]] == pytest.approx([2e-4, 2e-4, 2e-4, 1e-3])
    norm = {n for n, _ in model.named_parameters() if ".bn" in n or n.startswith("bn") or "shortcut.1" in n}
    seen = set()
    for e, (step, phase) in enumerate(zip(plan, phases)):
        drawn = [n for n in step["train"] if n not in norm]
        assert len(drawn) == 9 and norm <= set(step["train"])
        assert set(phase.masks) == {n for n, _ in model.named_parameters()} - set(step["train"])
        assert set(step["noise"]) <= set(drawn) and len(step["noise"]) <= 6
        assert (step["noise"] == []) if e == 0 else not (set(step["noise"]) & seen)
        seen |= set(step["train"])
    assert all(p.masks is None for p in phases[5:])
    # two steps: the head is reset, tensors outside epoch 0's subset stay bit-exact
    before = snapshot(model)
    _, ctx2, _ = run("reset_noise", ImageTask(), model, tmp_path / "run", max_steps=2, batch_size=8, lr=0.05)
    after = dict(ctx2.unwrapped.named_parameters())
    frozen = set(phases[0].masks) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    trained = set(plan[0]["train"]) - {"fc.weight", "fc.bias"}
    assert any(not torch.equal(after[n], before[n]) for n in trained)


def test_reset_noise_adds_noise_only_to_planned_tensors(tmp_path):
    model = tiny_resnet()
    method, ctx = ctx_for("reset_noise", ImageTask(), model, tmp_path, batch_size=8, noise_fresh_only=False)
    plan, phases = method.plan(ctx), method.phases(ctx)
    assert len(plan[1]["noise"]) == 6
    before = snapshot(model)
    phases[1].on_start(ctx)
    assert changed_modules(model, before) == {n.rpartition(".")[0] for n in plan[1]["noise"]}
