"""Catalogue A: l1_sparse, ga_plus, salun_soft, boundary_shrink, boundary_expand, iu and ssd.

Each method runs two steps on the tiny model (the generic test in test_methods.py covers the rest),
and each has a check that can fail: closed-form edits are compared with hand computations.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import erase
from erase.engine import DataView, LoopSettings, run_method
from erase.errors import EraseError
from tests.conftest import TensorSet, ToyTask, make_ctx, toy_model

CATALOGUE_A = ("l1_sparse", "ga_plus", "salun_soft", "boundary_shrink", "boundary_expand", "iu", "ssd")
CLOSED_FORM = ("iu", "ssd")


def _run(tmp_path, name, task=None, model=None, **cfg):
    cls = erase.get_method(name, "classifier")
    method = cls(cls.Config(**cfg))
    ctx = make_ctx(task or ToyTask(), model or toy_model(), tmp_path)
    info = run_method(method, ctx, LoopSettings(progress=False, log_every=1))
    return method, ctx, info


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_catalogue_a_is_registered_for_classifiers():
    assert set(CATALOGUE_A) <= set(erase.list_methods(task="classifier"))
    for name in CATALOGUE_A:
        cls = erase.get_method(name)
        assert cls.__module__ == f"erase.methods.{name}", "one file per method"
        assert len(sys.modules[cls.__module__].__doc__ or "") > 300, f"{name}: document defaults and sources"
        for f in dataclasses.fields(cls.Config):
            assert f.metadata.get("help"), f"{name}: --{f.name} has no help text"


@pytest.mark.parametrize("name", CATALOGUE_A)
def test_two_steps_are_finite(tmp_path, name):
    before = _params(toy_model())
    method, ctx, info = _run(tmp_path, name, max_steps=2, batch_size=8, lr=0.05)
    assert info["steps"] == (0 if name in CLOSED_FORM else 2)
    if name in CLOSED_FORM:
        assert method.streams == () and method.phases(ctx) == []
    else:
        for line in (tmp_path / "log.jsonl").read_text().splitlines():
            rec = json.loads(line)
            assert all(torch.isfinite(torch.tensor(v)) for k, v in rec.items() if k != "phase")
    after = _params(ctx.unwrapped)
    assert set(after) == set(before)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in before)


# -- l1_sparse -----------------------------------------------------------------------------------
def test_l1_sparse_gamma_decays_linearly_per_epoch(tmp_path):
    cls = erase.get_method("l1_sparse")
    ctx = make_ctx(ToyTask(), toy_model(), tmp_path)  # 84 retain examples: 11 steps per epoch at batch 8
    method = cls(cls.Config(epochs=10, batch_size=8, gamma=1.0))
    ctx.total_steps = sum(p.steps for p in method.phases(ctx))
    gammas = [method.gamma_at(ctx, 11 * e) for e in range(10)]
    assert gammas == pytest.approx([1 - e / 10 for e in range(10)])
    assert method.gamma_at(ctx, 11 * 9 + 10) == pytest.approx(0.1)  # the last epoch keeps γ/E
    method = cls(cls.Config(epochs=10, batch_size=8, gamma=1.0, no_l1_epochs=2))
    assert [method.gamma_at(ctx, 11 * e) for e in (0, 4, 7, 8, 9)] == pytest.approx([1, 0.5, 1 / 8, 0, 0])


def test_l1_sparse_shrinks_the_l1_norm_relative_to_ft(tmp_path):
    common = dict(max_steps=6, batch_size=8, lr=0.05)
    _, ft, _ = _run(tmp_path / "ft", "ft", **common)
    _, l1, _ = _run(tmp_path / "l1", "l1_sparse", gamma=0.01, **common)
    _, zero, _ = _run(tmp_path / "zero", "l1_sparse", gamma=0.0, **common)

    def norm(m):
        return float(sum(p.detach().abs().sum() for p in m.parameters()))

    assert norm(l1.unwrapped) < norm(ft.unwrapped) - 0.1
    for a, b in zip(zero.unwrapped.parameters(), ft.unwrapped.parameters()):  # γ = 0 is exactly FT
        assert torch.equal(a, b)


# -- ga_plus -------------------------------------------------------------------------------------
def test_ga_plus_weights_and_ascent_on_forget(tmp_path):
    cls = erase.get_method("ga_plus")
    assert cls(cls.Config(forget_weight=0.25)).weights() == {"retain_loss": 1.0, "forget_loss": -0.25}
    assert cls(cls.Config(loss_weights={"forget_loss": -2})).weights()["forget_loss"] == -2.0
    with pytest.raises(EraseError):
        cls(cls.Config(forget_weight=-1))

    common = dict(max_steps=8, batch_size=8, lr=0.1, momentum=0.9, weight_decay=5e-4)
    _, ft, _ = _run(tmp_path / "ft", "ft", **common)
    _, plain, _ = _run(tmp_path / "zero", "ga_plus", forget_weight=0.0, **common)
    _, ascent, _ = _run(tmp_path / "ga", "ga_plus", forget_weight=1.0, **common)
    for a, b in zip(plain.unwrapped.parameters(), ft.unwrapped.parameters()):  # same retain batches: λ = 0 is FT
        assert torch.allclose(a, b, atol=1e-6)
    task = ToyTask()
    forget = next(task.iterate("forget"))
    assert task.loss(ascent.unwrapped, forget) > task.loss(plain.unwrapped, forget) + 0.05


# -- salun_soft ----------------------------------------------------------------------------------
def test_soft_threshold_factor_is_real_valued_and_zero_below_tau():
    from erase.methods.salun_soft import soft_threshold_factor

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(1000, generator=g)
    factor, tau = soft_threshold_factor(delta, 300)
    assert factor.is_floating_point()
    assert tau == pytest.approx(float(delta.abs().sort().values[299]))
    assert torch.equal(factor == 0, delta.abs() <= tau) and int((factor == 0).sum()) == 300
    moved = factor > 0
    assert bool(((factor[moved] > 0) & (factor[moved] < 1)).all()) and int(moved.sum()) == 700
    expected = delta.sign() * (delta.abs() - tau).clamp(min=0)
    assert torch.allclose(factor * delta, expected, atol=1e-6)
    assert torch.equal(soft_threshold_factor(delta, 0)[0], torch.ones(1000))


def test_salun_soft_proximal_step_on_the_model(tmp_path):
    cls = erase.get_method("salun_soft")
    model = toy_model()
    ctx = make_ctx(ToyTask(), model, tmp_path)
    method = cls(cls.Config(prox_ratio=0.5))
    method.setup(ctx)
    assert method.parameter_masks(ctx) is None  # the reference ignores the hard mask
    original = _params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    moved = _params(model)
    ctx.total_steps = 4
    n = sum(p.numel() for p in model.parameters())
    assert method.count_at(ctx, 0) == int(0.5 * 3 / 4 * n) and method.count_at(ctx, 3) == 0
    method.proximal_step(ctx, 0)
    tau, count = ctx.state["prox_tau"], ctx.state["prox_count"]
    back = sum(int(torch.eq(p, original[k]).sum()) for k, p in model.named_parameters())
    assert back == count == int(0.5 * 3 / 4 * n)
    for k, p in model.named_parameters():
        d = moved[k] - original[k]
        assert torch.allclose(p - original[k], d.sign() * (d.abs() - tau).clamp(min=0), atol=1e-7)


def test_salun_soft_thresholds_after_every_step_and_resumes(tmp_path):
    method, ctx, info = _run(tmp_path / "a", "salun_soft", max_steps=4, batch_size=8, lr=0.05)
    assert info["steps"] == 4 and ctx.state["prox_step"] == 3 and ctx.state["prox_count"] == 0

    cls = erase.get_method("salun_soft")

    class Cut(cls):
        def losses(self, batch, ctx):
            if ctx.global_step == 3:
                raise KeyboardInterrupt
            return super().losses(batch, ctx)

    cfg = cls.Config(max_steps=5, batch_size=8, lr=0.05)
    _, straight, _ = _run(tmp_path / "straight", "salun_soft", max_steps=5, batch_size=8, lr=0.05)
    ctx = make_ctx(ToyTask(), toy_model(), tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        run_method(Cut(cfg), ctx, LoopSettings(progress=False, checkpoint_every=1))
    ctx = make_ctx(ToyTask(), toy_model(), tmp_path / "cut")
    run_method(cls(cfg), ctx, LoopSettings(progress=False, checkpoint_every=1, resume=True))
    for (n, a), (_, b) in zip(straight.unwrapped.named_parameters(), ctx.unwrapped.named_parameters()):
        assert torch.equal(a, b), n


def test_salun_soft_hard_mask_keeps_masked_weights(tmp_path):
    before = _params(toy_model())
    method, ctx, _ = _run(tmp_path, "salun_soft", max_steps=3, batch_size=8, lr=0.05, hard_mask=True)
    masks = method.parameter_masks(ctx)
    assert masks is not None
    for n, p in ctx.unwrapped.named_parameters():
        assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]), n


# -- boundary_shrink -----------------------------------------------------------------------------
def test_boundary_shrink_labels_come_from_the_attacked_inputs(tmp_path):
    task = ToyTask()
    base = toy_model()
    original = _params(base)
    batch = next(task.iterate("forget"))
    cls = erase.get_method("boundary_shrink")
    method = cls(cls.Config(epsilon=1.5, clamp=False, max_steps=3, batch_size=8, lr=0.5))
    ctx = make_ctx(task, base, tmp_path)
    run_method(method, ctx, LoopSettings(progress=False))
    assert not torch.equal(ctx.unwrapped[0].weight, original["0.weight"])  # the model trained ...

    ref = toy_model()  # ... but the labels still come from the frozen original
    x = batch["image"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(ref(x), batch["label"]), x)
    x_adv = batch["image"] + 1.5 * grad.sign()
    expected = ref(x_adv).argmax(1)
    got = method.neighbour_labels(batch, ctx)
    assert torch.equal(got, expected)
    assert not torch.equal(got, ref(batch["image"]).argmax(1)), "the attack changed no label; the test is vacuous"


def test_boundary_shrink_clamps_and_quantises_pixels(tmp_path):
    cls = erase.get_method("boundary_shrink")
    method = cls(cls.Config())
    ctx = make_ctx(ToyTask(), toy_model(), tmp_path)
    method.setup(ctx)
    batch = next(ToyTask().iterate("forget"))
    batch = {**batch, "image": batch["image"].sigmoid()}
    x_adv = method.attack(batch, ctx)
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert torch.allclose(x_adv * 255, (x_adv * 255).round(), atol=1e-4)
    assert float((x_adv - batch["image"]).abs().max()) <= 0.1 + 1 / 255


# -- boundary_expand -----------------------------------------------------------------------------
def test_boundary_expand_trains_a_shadow_class_and_prunes_it(tmp_path):
    task = ToyTask()
    before = _params(toy_model())
    method, ctx, _ = _run(tmp_path, "boundary_expand", task=task, max_steps=3, batch_size=8, lr=0.5)
    wide = method.head
    assert wide.out_features == task.num_classes + 1 and method.head_name == "2"
    model = ctx.unwrapped
    assert isinstance(model[2], nn.Linear) and model[2].out_features == task.num_classes
    x = next(task.iterate("forget"))["image"]
    assert model(x).shape == (len(x), task.num_classes)
    assert torch.equal(model[2].weight, wide.weight[: task.num_classes])
    assert torch.equal(model[2].bias, wide.bias[: task.num_classes])
    assert not torch.equal(model[0].weight, before["0.weight"]), "the whole network trains, not only the head"
    # training pushed the forget set towards the shadow class of the widened model
    feats = model[:2](x)
    with torch.no_grad():
        probs = wide(feats).softmax(1)[:, -1]
    assert float(probs.mean()) > 1 / (task.num_classes + 1)


def test_boundary_expand_widened_head_copies_the_original_rows(tmp_path):
    cls = erase.get_method("boundary_expand")
    model = toy_model()
    head = _params(model)
    ctx = make_ctx(ToyTask(), model, tmp_path)
    method = cls(cls.Config())
    method.setup(ctx)
    wide = model[2]
    assert wide.out_features == 5
    assert torch.equal(wide.weight[:4], head["2.weight"]) and torch.equal(wide.bias[:4], head["2.bias"])
    assert float(wide.bias[4].detach()) == 0.0 and float(wide.weight[4].detach().abs().sum()) > 0
    again = toy_model()
    cls(cls.Config()).setup(make_ctx(ToyTask(), again, tmp_path))
    assert torch.equal(again[2].weight, wide.weight), "the shadow row is seeded"


def test_boundary_expand_needs_a_linear_head(tmp_path):
    cls = erase.get_method("boundary_expand")
    conv_only = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 4, 4), nn.Flatten())
    with pytest.raises(EraseError, match="nn.Linear"):
        cls(cls.Config()).setup(make_ctx(ToyTask(), conv_only, tmp_path))
    wrong = nn.Sequential(nn.Linear(16, 7))
    with pytest.raises(EraseError, match="7 outputs"):
        cls(cls.Config()).setup(make_ctx(ToyTask(), wrong, tmp_path))


def test_boundary_expand_on_the_resnet(tmp_path):
    from erase.classifier.models import ResNet18, ResNetConfig

    model = ResNet18(ResNetConfig(num_classes=4, in_channels=1, width=2, image_size=8))
    g = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 4
    data = TensorSet(torch.rand(24, 1, 8, 8, generator=g), y)
    task = ToyTask()
    task.views = {"forget": DataView(data, torch.arange(0, 24, 4)), "retain": DataView(data, torch.arange(1, 24, 4))}
    method, ctx, _ = _run(tmp_path, "boundary_expand", task=task, model=model, max_steps=2, batch_size=4, lr=0.1)
    assert method.head_name == "fc" and ctx.unwrapped.fc.out_features == 4 and ctx.unwrapped.config.num_classes == 4


# -- iu ------------------------------------------------------------------------------------------
class TinyTask(ToyTask):
    """Two classes on 4-d inputs in float64, so a Linear(4, 2) has exactly 10 parameters."""

    def __init__(self, n=20):
        g = torch.Generator().manual_seed(3)
        y = torch.arange(n) % 2
        x = torch.randn(n, 4, generator=g, dtype=torch.float64) + F.one_hot(y, 4).double()
        data = TensorSet(x, y)
        self.num_classes = 2
        self.views = {"forget": DataView(data, torch.arange(0, n, 5)),
                      "retain": DataView(data, torch.tensor([i for i in range(n) if i % 5]))}
        self.eval_views = dict(self.views)
        self.cfg = type("Cfg", (), {"eval_batch_size": 3})()

    def iterate(self, name, augment=False):
        return self.eval_views[name].batches(3)


def _tiny_model():
    torch.manual_seed(5)
    return nn.Linear(4, 2).double()


def _flat_grad(model, x, y):
    loss = F.cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def _iu_by_hand(task, big_n):
    model = _tiny_model()
    data = task.views["retain"].dataset
    f_idx, r_idx = task.views["forget"].indices, task.views["retain"].indices
    n_f, n_r = len(f_idx), len(r_idx)
    per = {int(i): _flat_grad(model, data.x[i:i + 1], data.y[i:i + 1]) for i in torch.cat([f_idx, r_idx])}
    v = sum(per[int(i)] for i in f_idx) / (n_f + n_r) - sum(per[int(i)] for i in r_idx) * n_f / ((n_f + n_r) * n_r)
    samples = [per[int(i)] for i in r_idx[: big_n + 2]]
    return model, v, samples


def test_iu_matches_the_inverse_of_the_matrix_its_recursion_represents(tmp_path):
    task, big_n, alpha = TinyTask(), 5, 3.0
    model, v, g = _iu_by_hand(task, big_n)
    assert sum(p.numel() for p in model.parameters()) == 10 and len(g) == big_n + 2
    # The recursion applies (I + o_n g_nᵀ/N)⁻¹ in turn, with o_n = s_n·g_0 (o is only rescaled).
    eye = torch.eye(10, dtype=torch.float64)
    a, o = eye.clone(), g[0].clone()
    for gn in g[1:]:
        a = a @ (eye + torch.outer(o, gn) / big_n)
        o = o * big_n / (big_n + o @ gn)
    k = torch.linalg.solve(a, v)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    method, ctx, info = _run(tmp_path, "iu", task=task, model=_tiny_model(), alpha=alpha, fisher_samples=big_n)
    after = torch.cat([p.detach().reshape(-1) for p in ctx.unwrapped.parameters()])
    assert info["steps"] == 0
    assert torch.allclose(after - before, alpha * k, rtol=1e-9, atol=1e-12)
    # ... so k − v lies along the first sample's gradient: not the WoodFisher inverse it intends.
    resid = k - v
    assert torch.allclose(resid, (resid @ g[0]) / (g[0] @ g[0]) * g[0], atol=1e-12)
    assert float(resid.norm()) > 1e-3 * float(v.norm())
    fisher = eye + sum(torch.outer(x, x) for x in g) / big_n
    assert not torch.allclose(k, torch.linalg.solve(fisher, v), rtol=1e-3)


def test_iu_woodbury_is_the_exact_inverse_fisher(tmp_path):
    task, big_n, alpha = TinyTask(), 5, 2.0
    model, v, g = _iu_by_hand(task, big_n)
    fisher = torch.eye(10, dtype=torch.float64) + sum(torch.outer(x, x) for x in g) / big_n
    k = torch.linalg.solve(fisher, v)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    _, ctx, _ = _run(tmp_path, "iu", task=task, model=_tiny_model(), alpha=alpha, fisher_samples=big_n,
                     hessian="woodbury")
    after = torch.cat([p.detach().reshape(-1) for p in ctx.unwrapped.parameters()])
    assert torch.allclose(after - before, alpha * k, rtol=1e-9, atol=1e-12)


def test_iu_uses_at_most_n_plus_two_retain_samples(tmp_path):
    task = TinyTask()
    cls = erase.get_method("iu")
    method = cls(cls.Config(fisher_samples=3))
    ctx = make_ctx(task, _tiny_model(), tmp_path)
    params = list(ctx.unwrapped.parameters())
    assert len(list(method.sample_gradients(ctx, params))) == 5
    method = cls(cls.Config(fisher_samples=1000))
    assert len(list(method.sample_gradients(ctx, params))) == len(task.views["retain"])


# -- ssd -----------------------------------------------------------------------------------------
def _importance(model, task, names, bs):
    x = torch.cat([task.views[n].dataset.x[task.views[n].indices] for n in names])
    y = torch.cat([task.views[n].dataset.y[task.views[n].indices] for n in names])
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batches = 0
    for s in range(0, len(y), bs):  # unshuffled, batches straddle the retain/forget boundary
        grads = torch.autograd.grad(F.cross_entropy(model(x[s:s + bs]), y[s:s + bs]), list(model.parameters()))
        for (n, _), gr in zip(model.named_parameters(), grads):
            acc[n] += gr.pow(2)
        batches += 1
    return {n: a / batches for n, a in acc.items()}


@pytest.mark.parametrize("alpha,dampening", [(10.0, 1.0), (2.0, 0.5)])
def test_ssd_dampens_exactly_the_selected_coordinates(tmp_path, alpha, dampening):
    task, bs = ToyTask(), 20
    model = toy_model()
    imp_d = _importance(model, task, ("retain", "forget"), bs)
    imp_f = _importance(model, task, ("forget",), bs)
    before = _params(model)
    _, ctx, info = _run(tmp_path, "ssd", task=task, model=model, batch_size=bs, alpha=alpha, dampening=dampening)
    assert info["steps"] == 0
    selected = 0
    for n, p in ctx.unwrapped.named_parameters():
        where = imp_f[n] > alpha * imp_d[n]
        beta = (dampening * imp_d[n] / imp_f[n]).clamp(max=1)
        assert torch.equal(p.detach()[~where], before[n][~where]), f"{n}: an unselected weight moved"
        assert torch.allclose(p.detach()[where], before[n][where] * beta[where], rtol=1e-5, atol=1e-9), n
        selected += int(where.sum())
    total = sum(p.numel() for p in before.values())
    assert 0 < selected < total, "the toy must select some but not all coordinates"
    assert ctx.state["ssd_selected"] == selected


def test_ssd_rebatch_straddles_views():
    from erase.methods.ssd import rebatch

    parts = [{"label": torch.arange(0, 5)}, {"label": torch.arange(5, 7)}, {"label": torch.arange(7, 12)}]
    out = [b["label"].tolist() for b in rebatch(parts, 4)]
    assert out == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [b["label"].tolist() for b in rebatch(parts[:2], 4)] == [[0, 1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize("name", CATALOGUE_A)
def test_flags_do_not_clash_with_task_or_run_flags(name):
    from erase.config import build_parser, task_registry

    tasks = [t for t in erase.get_method(name).tasks if t in task_registry()]
    assert tasks
    for task in tasks:
        build_parser(name, task, "erase/train.py", "test")
