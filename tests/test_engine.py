"""The engine, tested once for every method: masking, accumulation, resume, NaN guard, phases."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from erase.engine import LoopSettings, ParameterMask, run_method
from erase.engine.method import Method, MethodConfig, Phase
from erase.errors import NonFiniteLossError
from tests.conftest import ToyTask, make_ctx, toy_model


class PlainCE(Method):
    """Cross-entropy on the retain stream: the smallest possible method."""

    name = "plain"
    tasks = ("classifier",)
    streams = ("retain",)
    default_weights = {"ce": 1.0}

    def __init__(self, config, masks=None, fail_at=None, nan_at=None, blow_up_at=None):
        super().__init__(config)
        self.masks, self.fail_at, self.nan_at, self.blow_up_at = masks, fail_at, nan_at, blow_up_at

    def after_step(self, ctx):
        if ctx.global_step == self.blow_up_at:  # finite but diverged weights: the next loss is inf/NaN
            with torch.no_grad():
                for p in ctx.model.parameters():
                    p.mul_(1e31)

    def parameter_masks(self, ctx):
        return self.masks

    def losses(self, batch, ctx):
        if self.fail_at is not None and ctx.global_step == self.fail_at:
            raise KeyboardInterrupt
        loss = ctx.task.loss(ctx.model, batch["retain"])
        if self.nan_at is not None and ctx.global_step >= self.nan_at:
            loss = loss * float("nan")
        return {"ce": loss}


def _run(tmp_path, cfg, **kw):
    task = ToyTask()
    model = toy_model()
    grad_accum = kw.pop("grad_accum", 1)
    settings = LoopSettings(progress=False, **kw.pop("settings", {}))
    ctx = make_ctx(task, model, tmp_path, grad_accum=grad_accum)
    method = PlainCE(cfg, **kw)
    info = run_method(method, ctx, settings)
    return ctx.unwrapped, info


def _random_masks(model, frac=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < frac for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer,wd", [("adamw", 0.1), ("sgd", 5e-4), ("adam", 1e-2)])
def test_masked_coordinates_stay_bit_exact(tmp_path, optimizer, wd):
    base = toy_model()
    masks = _random_masks(base)
    masks["2.bias"] = torch.zeros(4, dtype=torch.bool)  # a fully frozen tensor
    cfg = MethodConfig(optimizer=optimizer, weight_decay=wd, momentum=0.9, lr=0.05, batch_size=16, max_steps=12)
    model, _ = _run(tmp_path, cfg, masks=masks)
    for (n, p), (_, p0) in zip(model.named_parameters(), base.named_parameters()):
        frozen = ~masks[n]
        assert torch.equal(p.detach()[frozen], p0.detach()[frozen]), n
        if masks[n].any():
            assert not torch.equal(p.detach()[masks[n]], p0.detach()[masks[n]]), f"{n} never moved"


def test_zeroing_gradients_alone_would_not_freeze(tmp_path):
    """Why the engine restores: AdamW's decay moves zero-gradient coordinates."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)
    p.grad = torch.zeros(3)
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3))


def test_parameter_mask_rejects_wrong_shapes():
    model = toy_model()
    with pytest.raises(ValueError, match="shape"):
        ParameterMask(model, {"0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="does not have"):
        ParameterMask(model, {"nope": torch.ones(3, dtype=torch.bool)})


def test_whole_tensor_masks_freeze_or_train_without_copies():
    """A 0-dim mask (ESD / FMN / CA train whole layers) freezes or keeps a tensor without a per-coordinate copy."""
    from erase.engine.masking import whole

    model = toy_model()
    names = [n for n, _ in model.named_parameters()]
    masker = ParameterMask(model, {names[0]: whole(False), names[1]: whole(True)})
    params = dict(model.named_parameters())
    assert not params[names[0]].requires_grad and params[names[1]].requires_grad
    assert masker._entries == []  # nothing to copy back or to multiply
    from erase.engine.masking import trainable_coordinates

    p0, p1 = params[names[0]], params[names[1]]
    assert trainable_coordinates(whole(True), p1) == p1.numel() and trainable_coordinates(whole(False), p0) == 0
    assert trainable_coordinates(torch.tensor([True, False, True]), torch.zeros(3)) == 2
    masker.release()
    assert params[names[0]].requires_grad


def test_gradient_accumulation_matches_big_batch(tmp_path):
    big, _ = _run(tmp_path / "a", MethodConfig(batch_size=16, max_steps=5, lr=0.1, weight_decay=0.0, momentum=0.0))
    acc, _ = _run(tmp_path / "b", MethodConfig(batch_size=8, max_steps=5, lr=0.1, weight_decay=0.0, momentum=0.0),
                  grad_accum=2)
    # Same examples per step (the stream walks the same permutation), so the updates agree.
    for (n, a), (_, b) in zip(big.named_parameters(), acc.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_gives_identical_weights(tmp_path):
    cfg = MethodConfig(batch_size=16, max_steps=9, lr=0.05, optimizer="sgd", momentum=0.9)
    straight, _ = _run(tmp_path / "straight", cfg)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", cfg, fail_at=5, settings={"checkpoint_every": 2})
    assert (tmp_path / "cut" / "checkpoints" / "step-000004").is_dir()
    resumed, info = _run(tmp_path / "cut", cfg, settings={"checkpoint_every": 2, "resume": True})
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
    cfg = MethodConfig(batch_size=16, max_steps=8, lr=0.05)
    with pytest.raises(NonFiniteLossError, match="step-000004"):
        _run(tmp_path, cfg, nan_at=5, settings={"checkpoint_every": 2})


def test_nan_guard_names_the_logged_step_and_sets_a_diverged_checkpoint_aside(tmp_path):
    cfg = MethodConfig(batch_size=16, max_steps=8, lr=0.05)
    # Step 4 (global index 3) leaves weights of ~1e31: finite, so its checkpoint is written, but step 5's loss is not.
    with pytest.raises(NonFiniteLossError) as err:
        _run(tmp_path, cfg, blow_up_at=3, settings={"checkpoint_every": 1, "log_every": 1, "keep_checkpoints": 1})
    msg = str(err.value)
    assert "at step 5 " in msg and "last good checkpoint: " in msg and msg.rstrip(".").count("step-000003") >= 1
    assert "--resume" in msg
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "step-000003").is_dir() and (ckpts / "step-000004.nonfinite").is_dir()
    assert not (ckpts / "step-000004").exists()  # --resume picks step 3, not the diverged weights
    logged = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # the step the error names is the first one the log does not have


def test_nan_guard_without_a_checkpoint_does_not_advise_resume(tmp_path):
    cfg = MethodConfig(batch_size=16, max_steps=8, lr=0.05)
    with pytest.raises(NonFiniteLossError) as err:
        _run(tmp_path, cfg, nan_at=0)
    assert "at step 1 " in str(err.value) and "--resume" not in str(err.value) and "untouched" in str(err.value)


def test_resumed_run_does_not_repeat_log_lines(tmp_path):
    cfg = MethodConfig(batch_size=16, max_steps=9, lr=0.05)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, cfg, fail_at=5, settings={"checkpoint_every": 4, "log_every": 1})
    _run(tmp_path, cfg, settings={"checkpoint_every": 4, "log_every": 1, "resume": True})
    logged = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 10))


def test_checkpoints_are_pruned_and_logged(tmp_path):
    cfg = MethodConfig(batch_size=16, max_steps=6, lr=0.05)
    _run(tmp_path, cfg, settings={"checkpoint_every": 1, "keep_checkpoints": 2, "log_every": 2})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000005", "step-000006"]
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"ce"' in lines[0]


@dataclass
class TwoPhaseConfig(MethodConfig):
    pass


class TwoPhase(Method):
    """Max steps on forget, then min steps on retain: phases declared, engine runs them."""

    name = "two-phase"
    tasks = ("classifier",)
    streams = ("forget", "retain")
    default_weights = {"forget_ce": -1.0, "retain_ce": 1.0}

    def __init__(self, config):
        super().__init__(config)
        self.seen = []

    def phases(self, ctx):
        return [Phase("max", 2, ("forget",), on_start=lambda c: self.seen.append("start-max")),
                Phase("min", 3, ("retain",), lr_scale=0.5)]

    def losses(self, batch, ctx):
        self.seen.append((ctx.phase, tuple(batch)))
        if "forget" in batch:
            return {"forget_ce": ctx.task.loss(ctx.model, batch["forget"])}
        return {"retain_ce": ctx.task.loss(ctx.model, batch["retain"])}


def test_phases_run_in_order_with_their_streams(tmp_path):
    task = ToyTask()
    ctx = make_ctx(task, toy_model(), tmp_path)
    m = TwoPhase(TwoPhaseConfig(batch_size=8))
    info = run_method(m, ctx, LoopSettings(progress=False))
    assert info["steps"] == 5
    assert m.seen == ["start-max", ("max", ("forget",)), ("max", ("forget",))] + [("min", ("retain",))] * 3


def test_streams_are_deterministic_and_resumable():
    from erase.engine.streams import DataView, Stream
    from tests.conftest import TensorSet

    data = TensorSet(torch.arange(10).float().view(-1, 1), torch.arange(10))
    a = Stream(DataView(data), 4, seed=3, name="x")
    seq = [a.next()["label"].tolist() for _ in range(7)]
    b = Stream(DataView(data), 4, seed=3, name="x")
    b.load_state_dict({"position": 4})
    assert [b.next()["label"].tolist() for _ in range(3)] == seq[4:]
    assert sorted(sum(seq[:3], [])) == list(range(10))  # one epoch covers every example once
    # Two ranks split each global batch without overlap.
    r0 = Stream(DataView(data), 4, seed=3, name="x", rank=0, world_size=2).next()["label"]
    r1 = Stream(DataView(data), 4, seed=3, name="x", rank=1, world_size=2).next()["label"]
    assert sorted(r0.tolist() + r1.tolist()) == sorted(seq[0])


class KeyedPhases(Method):
    """Two optimisers, a per-phase float mask and a per-phase learning rate."""

    name = "keyed"
    tasks = ("classifier",)
    streams = ("retain",)
    default_weights = {"ce": 1.0}

    def __init__(self, config, masks):
        super().__init__(config)
        self.masks, self.lrs = masks, []

    def phases(self, ctx):
        return [Phase("a", 2, ("retain",), optimizer="one", lr=0.2, masks=self.masks),
                Phase("b", 2, ("retain",), optimizer="two", lr=0.1, weight_decay=0.0, schedule="linear")]

    def losses(self, batch, ctx):
        opt_lr = [g["lr"] for g in ctx.accelerator._optimizers[0 if ctx.phase == "a" else 1].param_groups]
        self.lrs.append((ctx.phase, round(opt_lr[0], 4)))
        return {"ce": ctx.task.loss(ctx.model, batch["retain"])}


def test_phase_optimizers_lrs_and_float_masks(tmp_path):
    base = toy_model()
    masks = {n: torch.zeros_like(p) for n, p in base.named_parameters()}
    masks["0.weight"][:5] = 0.1  # a float mask: scaled gradients on 5 rows, the rest frozen
    ctx = make_ctx(ToyTask(), toy_model(), tmp_path)
    m = KeyedPhases(MethodConfig(batch_size=8), masks)
    run_method(m, ctx, LoopSettings(progress=False, checkpoint_every=1))
    assert m.lrs == [("a", 0.2), ("a", 0.2), ("b", 0.1), ("b", 0.05)]
    import torch as _t

    saved = _t.load(tmp_path / "checkpoints" / "step-000004" / "optimizer.pt", weights_only=True)
    assert set(saved) == {"one", "two"}


def test_phase_lr_at_sets_the_exact_learning_rate(tmp_path):
    seen = []

    class Curve(Method):
        name = "curve"
        tasks = ("classifier",)
        streams = ("retain",)
        default_weights = {"ce": 1.0}

        def phases(self, ctx):
            return [Phase("a", 3, ("retain",), lr_at=lambda i: 0.1 / (i + 1))]

        def losses(self, batch, ctx):
            seen.append(round(ctx.accelerator._optimizers[0].param_groups[0]["lr"], 5))
            return {"ce": ctx.task.loss(ctx.model, batch["retain"])}

    run_method(Curve(MethodConfig(batch_size=8)), make_ctx(ToyTask(), toy_model(), tmp_path), LoopSettings(progress=False))
    assert seen == [0.1, 0.05, 0.03333]
