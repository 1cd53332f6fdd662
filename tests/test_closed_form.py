"""Closed-form erasure (UCE, RECE): the algebra against hand computations, then whole runs on tiny SD pipelines."""

from __future__ import annotations

import json
import os

import pytest
import torch

import erase
from erase.cli import run_cli
from erase.methods._closed_form import (
    aligned_rows,
    apply_map,
    last_token_index,
    preserve_rows,
    rece_embedding,
    uce_edit,
    uce_map,
)
from erase.train import main as train_main
from tests.tiny_diffusion import tiny_ddpm, tiny_sd

FAST = ["--n-forget", "2", "--n-retain", "2", "--eval-images", "1", "--sample-steps", "2", "--grid-seeds", "1",
        "--no-progress"]


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _uce_by_hand(W0, E, G, P, lamb, se, sp):
    d = W0.shape[1]
    lhs = lamb * W0 + se * sum(torch.outer(W0 @ g, c) for c, g in zip(E, G)) + sp * sum(torch.outer(W0 @ c, c) for c in P)
    rhs = lamb * torch.eye(d, dtype=W0.dtype) + se * sum(torch.outer(c, c) for c in E) + sp * sum(torch.outer(c, c) for c in P)
    return lhs @ torch.inverse(rhs)


def test_uce_edit_matches_the_explicit_inverse():
    W0, E, G, P = _rand(6, 5, seed=0), _rand(3, 5, seed=1), _rand(3, 5, seed=2), _rand(2, 5, seed=3)
    want = _uce_by_hand(W0, E, G, P, 0.3, 1.5, 0.7)
    got = uce_edit(W0.float(), E.float(), G.float(), P.float(), lamb=0.3, erase_scale=1.5, preserve_scale=0.7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(uce_edit(W0, E, G, P, 0.3, 1.5, 0.7), want)  # float64 stays float64
    assert uce_edit(W0.half(), E, G, P, 0.3, 1.5, 0.7).dtype == torch.float16
    # The shared d×d map gives every layer the same edit: W0 @ T.
    T = uce_map(E, G, P, 0.3, 1.5, 0.7)
    torch.testing.assert_close(apply_map(W0, T), want)
    # No preserve set is allowed.
    torch.testing.assert_close(uce_edit(W0, E, G, None, 0.3, 1.5, 0.7), _uce_by_hand(W0, E, G, [], 0.3, 1.5, 0.7))


def test_uce_moves_erased_outputs_to_the_guide_and_keeps_preserved_ones():
    d = 16
    W0, E, G, P = _rand(8, d, seed=4), _rand(3, d, seed=5), _rand(3, d, seed=6), _rand(4, d, seed=7)
    for lamb, scale in ((1e-6, 1.0), (0.5, 1e5)):
        W = uce_edit(W0, E, G, P, lamb=lamb, erase_scale=scale, preserve_scale=scale)
        rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        assert rel(W @ E.T, W0 @ G.T) < 1e-4
        assert rel(W @ P.T, W0 @ P.T) < 1e-4
    # With a strong pull to W0 nothing moves; the erased outputs move more as the erase scale grows.
    far = [float((uce_edit(W0, E, G, P, 0.5, s, 1.0) @ E.T - W0 @ G.T).norm()) for s in (0.01, 1.0, 100.0)]
    assert far[0] > far[1] > far[2]


def test_rece_embedding_matches_a_hand_computation():
    edited = [_rand(4, 5, seed=8), _rand(3, 5, seed=9)]
    original = [_rand(4, 5, seed=10), _rand(3, 5, seed=11)]
    c_t = _rand(7, 5, seed=12)
    reg = 0.1
    A = reg * torch.eye(5, dtype=torch.float64) + sum(w.T @ w for w in edited)
    B = sum(we.T @ wo for we, wo in zip(edited, original))
    want = torch.stack([torch.inverse(A) @ B @ row for row in c_t])
    torch.testing.assert_close(rece_embedding(edited, original, c_t, reg), want)
    got32 = rece_embedding([w.float() for w in edited], [w.float() for w in original], c_t.float(), reg)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-5)
    # An unedited model with a vanishing ridge gives back the concept itself.
    torch.testing.assert_close(rece_embedding(original, original, c_t, 1e-9), c_t, rtol=1e-5, atol=1e-6)


def test_token_selection():
    emb = torch.arange(77.0)[:, None].repeat(1, 3)  # row i holds i
    mask = lambda n: (torch.arange(77) < n).long()  # noqa: E731 - BOS + words + EOS
    assert int(last_token_index(mask(5))) == 3 and int(last_token_index(mask(2))) == 0
    e, g = aligned_rows(emb, mask(5), emb + 100, mask(2), "last")
    assert e.tolist() == [[3.0] * 3] and g.tolist() == [[100.0] * 3]
    # last-to-end: the erase tail starts at 3, the guide's at 0; the guide's longer tail is cut to 74 rows.
    e, g = aligned_rows(emb, mask(5), emb + 100, mask(2), "last-to-end")
    assert e.shape == g.shape == (74, 3)
    assert e[0, 0] == 3 and e[-1, 0] == 76 and g[0, 0] == 100 and g[-1, 0] == 173
    e, g = aligned_rows(emb, mask(2), emb + 100, mask(6), "last-to-end")
    assert e.shape == g.shape == (73, 3) and e[0, 0] == 0 and e[-1, 0] == 72 and g[0, 0] == 104
    assert preserve_rows(emb, mask(4), "last").tolist() == [[2.0] * 3]
    assert preserve_rows(emb, mask(4), "last-to-end").shape == (77, 3)


def test_config_validation():
    cls = erase.get_method("uce")
    for bad in ({"lamb": 0.0}, {"erase_scale": -1.0}, {"tokens": "first"}, {"edit": "q"}):
        with pytest.raises(erase.EraseError):
            cls(cls.Config(**bad))
    rece = erase.get_method("rece")
    for bad in ({"epochs": 1.5}, {"reg": 0.0}, {"rece_preserve_scale": -0.1}):
        with pytest.raises(erase.EraseError):
            rece(rece.Config(**bad))


# -- whole runs on tiny pipelines ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("closed-form-models")
    os.environ["ERASE_CACHE"] = str(root / "cache")
    return {"sd1": tiny_sd(root / "sd1"), "sd2v": tiny_sd(root / "sd2v", v_prediction=True, sd2=True)}


def _unet(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("method,kind,extra,edited", [
    ("uce", "sd1", [], (".to_k.", ".to_v.")),
    ("uce", "sd2v", ["--tokens", "last-to-end", "--edit", "v", "--expand-prompts", "--guide", "church",
                     "--preserve", "parachute", "--preserve-scale", "-1"], (".to_v.",)),
    ("rece", "sd1", ["--epochs", "2", "--reg", "0.1"], (".to_k.", ".to_v.")),
    ("rece", "sd2v", [], (".to_k.", ".to_v.")),
])
def test_closed_form_run_edits_only_cross_attention_kv(models, tmp_path, method, kind, extra, edited):
    out = tmp_path / "run"
    args = ["--concept", "garbage truck", "--method", method, "--model", str(models[kind]), "--retain-concepts",
            "church,parachute", "--output-dir", str(out), *extra, *FAST]
    assert run_cli(train_main, args) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["steps"] == 0 and info["phases"] == []
    assert not (out / "log.jsonl").exists() and not (out / "checkpoints").exists()  # no optimiser step ran
    before, after = _unet(models[kind]), _unet(out / "model")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    should = {k for k in before if ".attn2." in k and k.endswith(".weight") and any(e in k for e in edited)}
    assert should and changed == should
    assert all(torch.isfinite(after[k]).all() for k in changed)


def test_rece_leaves_less_for_its_adversarial_embedding_than_uce(models, tmp_path):
    """RECE's target: after its rounds, the best embedding (its own closed form) reproduces the original
    model's K/V outputs for the concept worse than it does after the UCE edit alone."""
    from accelerate import Accelerator

    from erase.diffusion.task import DiffusionConfig, DiffusionTask
    from erase.engine import LoopSettings, RunContext, run_method
    from erase.methods.uce import kv_projections

    cfg = DiffusionConfig(model=str(models["sd1"]), concept="garbage truck", retain_concepts="church", n_forget=1,
                          n_retain=1, sample_steps=1)
    task = DiffusionTask(cfg)
    unet = task.build_model(False)
    lmap = task.layer_map(unet)
    original = [lin.weight.detach().clone() for _, lin in kv_projections(lmap, unet, "kv")]
    c_t = task.encode(["garbage truck"])[0]

    def residual(method, **kw):
        for (_, lin), w in zip(kv_projections(lmap, unet, "kv"), original):
            lin.weight.data.copy_(w)
        ctx = RunContext(accelerator=Accelerator(cpu=True), model=unet, task=task, views=task.views,
                         output_dir=tmp_path / method)
        cls = erase.get_method(method)
        run_method(cls(cls.Config(**kw)), ctx, LoopSettings(progress=False))
        edited = [lin.weight.detach() for _, lin in kv_projections(lmap, unet, "kv")]
        adv = rece_embedding(edited, original, c_t, 0.1)
        return sum(float((adv @ we.T - c_t @ wo.T).norm() ** 2) for we, wo in zip(edited, original))

    uce = residual("uce", tokens="last-to-end")
    assert residual("rece", epochs=0) == pytest.approx(uce)  # zero rounds: RECE is its UCE start
    assert residual("rece", epochs=2, reg=0.1) > 1.3 * uce > 0


def test_refusals(models, tmp_path, capsys):
    def err(args):
        code = run_cli(train_main, args + ["--output-dir", str(tmp_path / "o"), "--overwrite", *FAST])
        assert code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ")  # the CLI's one-line error
        return last

    ddpm = tiny_ddpm(tmp_path / "ddpm")
    assert "DDPM" in err(["--concept", "airplane", "--method", "uce", "--model", str(ddpm)])
    sd = ["--concept", "garbage truck", "--model", str(models["sd1"]), "--retain-concepts", "church"]
    assert "concepts the run keeps, not erased" in err([*sd, "--method", "uce", "--guide", "Garbage Truck"])
    assert "concepts the run keeps, not erased" in err([*sd, "--method", "rece", "--guide", "garbage truck"])
    assert "--guide names 2 concepts for 1" in err([*sd, "--method", "uce", "--guide", "church,parachute"])
    assert "--preserve includes" in err([*sd, "--method", "uce", "--preserve", "church,garbage truck"])
    assert "--lamb" in err([*sd, "--method", "uce", "--lamb", "0"])
    assert "--save-format" in err([*sd, "--method", "uce", "--save-format", "lora"])
