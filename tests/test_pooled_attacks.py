"""Token-level work on the pooled families (SDXL, SD3 without T5): the CLIP encoders as one (erase.diffusion.text_stack)
and every attack end to end on tiny random pipelines."""

from __future__ import annotations

import os

import pytest
import torch

import erase
from erase.attacks import get_attack, list_attacks
from erase.attacks.base import AttackContext, AttackResult
from erase.prompts import PromptRow
from tests.tiny_diffusion import tiny_sd3, tiny_sdxl

TINY = {"unlearndiffatk": {"timesteps": 2, "iterations": 2},
        "p4d": {"steps": 3, "check_every": 2, "images": 2, "length": 4},
        "concept-inversion": {"steps": 3, "train_images": 2, "batch_size": 2, "images": 2},
        "ring-a-bell": {"length": 4, "population": 8, "generations": 3, "images": 2}}
PROMPTS = ["a photo of a garbage truck", "", "church!!"]


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    root = tmp_path_factory.mktemp("pooled-models")
    os.environ["ERASE_CACHE"] = str(root / "cache")
    return {"sdxl": tiny_sdxl(root / "sdxl"), "sd3": tiny_sd3(root / "sd3")}


def _task(folder):
    from erase.diffusion.task import DiffusionConfig, DiffusionTask

    cfg = DiffusionConfig(model=str(folder), concept="garbage truck", n_forget=2, n_retain=2, sample_steps=2,
                          eval_images=2, retain_concepts="church")
    return DiffusionTask(cfg, seed=0, streams=())


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_token_level_methods_and_attacks_accept_the_pooled_families(pooled, kind):
    task = _task(pooled[kind])
    assert task.token_ids(["a photo"]).shape == (1, 77) and task.token_access_problem() is None
    cls = erase.get_method("advunlearn", "diffusion")
    cls(cls.Config()).check_task(task)
    for name in list_attacks():
        attack = get_attack(name)
        attack(attack.Config()).check_task(task)


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_ids_and_token_embeddings_give_the_pipelines_condition(pooled, kind):
    task = _task(pooled[kind])
    ids = task.token_ids(PROMPTS)
    table = task.token_table()
    widths = [e.get_input_embeddings().weight.shape[1] for e in (task.base.pipe.text_encoder, task.base.pipe.text_encoder_2)]
    assert table.shape == (49408, sum(widths))
    with torch.no_grad():
        want = task.encode(PROMPTS)
        for got in (task.encode_ids(ids), task.encode_ids(ids, table[ids])):
            torch.testing.assert_close(got.embeds, want.embeds)
            torch.testing.assert_close(got.pooled, want.pooled)
        # A replaced embedding reaches both encoders: changing only the second encoder's part changes the pooled output.
        emb = table[ids].clone()
        emb[:, 1, widths[0]:] += 1.0
        assert not torch.allclose(task.encode_ids(ids, emb).pooled, want.pooled)
    flat = task.condition_vector(want)
    assert flat.shape == (3, want.embeds[0].numel() + want.pooled.shape[1])
    back = task.vector_condition(flat)
    torch.testing.assert_close(back.embeds, want.embeds)
    torch.testing.assert_close(back.pooled, want.pooled)


def test_sdxl_second_tokenizer_pads_with_its_own_id(pooled):
    """Real SDXL's tokenizer_2 pads with '!' (id 0): the ids each encoder reads are re-padded after end-of-text."""
    task = _task(pooled["sdxl"])
    pipe = task.base.pipe
    pipe.tokenizer_2.pad_token = "!"
    task._text_stack = None
    ids = task.token_ids(PROMPTS)
    with torch.no_grad():
        want = task.encode(PROMPTS)
        got = task.encode_ids(ids)
    torch.testing.assert_close(got.pooled, want.pooled)
    torch.testing.assert_close(got.embeds, want.embeds)


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
@pytest.mark.parametrize("name", ["unlearndiffatk", "p4d", "concept-inversion", "ring-a-bell"])
def test_every_attack_runs_on_the_pooled_families(pooled, kind, name):
    assert name in list_attacks()
    task = _task(pooled[kind])
    model = task.base.unet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def judge(images, concept):
        seen.append(images.shape[0])
        return torch.zeros(images.shape[0], dtype=torch.bool)

    cls = get_attack(name)
    attack = cls(cls.Config(**TINY[name]))
    attack.check_task(task)
    ctx = AttackContext(task, model, "garbage truck", judge, progress=False, base=model)
    result = attack.run(PromptRow("0", "a photo of a garbage truck", 7, None), ctx)
    assert isinstance(result, AttackResult) and result.judged == [False] * attack.config.images
    assert result.images.shape[0] == attack.config.images and torch.isfinite(result.images).all()
    assert result.adversarial_prompt
    if name == "concept-inversion":
        assert result.tensors["<concept>"].shape == (task.token_table().shape[1],)
        assert result.adversarial_embedding.dim() == 1  # tokens and pooled, flat (task.condition_vector)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sd3_with_t5_refuses_attacks_in_one_line(pooled):
    task = _task(pooled["sd3"])
    task.base.pipe.text_encoder_3 = torch.nn.Linear(1, 1)  # stands for a loaded T5
    task._text_stack = None
    with pytest.raises(erase.EraseError, match="also has T5"):
        get_attack("p4d")(get_attack("p4d").Config()).check_task(task)


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_advunlearn_trains_both_clip_encoders_and_reloads(pooled, kind, tmp_path):
    """advunlearn on SDXL / SD3: both CLIP encoders train (nothing else), the pipeline folder carries both, a delta
    applies to the plain pipeline, and the attack command reads through the erased encoders."""
    from safetensors.torch import load_file

    from erase.attack import main as attack_main
    from erase.cli import run_cli
    from erase.diffusion.export import load_delta
    from erase.diffusion.loading import pipeline_class
    from erase.train import main as train_main

    folder = pooled[kind]
    fast = ["--n-forget", "2", "--n-retain", "2", "--eval-images", "1", "--sample-steps", "2", "--grid-seeds", "1",
            "--no-progress", "--max-steps", "2", "--warmup-iters", "1", "--attack-steps", "1", "--ddim-steps", "3",
            "--retain-batch", "1", "--lr", "1e-2"]
    out = tmp_path / "run"
    args = ["--concept", "trouser", "--method", "advunlearn", "--model", str(folder), "--retain-concepts", "dress",
            "--evaluator", "fmnist-classifier", "--output-dir", str(out), *fast]
    assert run_cli(train_main, args) == 0
    denoiser = "transformer" if kind == "sd3" else "unet"
    for part, trained in (("text_encoder", True), ("text_encoder_2", True), (denoiser, False)):
        name = "model.safetensors" if part.startswith("text") else "diffusion_pytorch_model.safetensors"
        before, after = load_file(str(folder / part / name)), load_file(str(out / "model" / part / name))
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert bool(changed) == trained, part
        assert not any("embeddings" in k for k in changed)  # token and position embeddings stay frozen
    kwargs = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    pipe = pipeline_class(kind).from_pretrained(out / "model", **kwargs)
    img = pipe("a photo of a dress", num_inference_steps=2, output_type="pt").images
    assert torch.isfinite(img).all()
    assert run_cli(attack_main, [str(out), "--attack", "ring-a-bell", "--set", "population=4", "--set", "generations=2",
                                 "--set", "images=1", "--limit", "1", "--no-progress"]) == 0
    delta_out = tmp_path / "delta"
    assert run_cli(train_main, [*args[:-len(fast) - 2], "--output-dir", str(delta_out), "--save-format", "delta",
                                *fast]) == 0
    base = pipeline_class(kind).from_pretrained(folder, **kwargs)
    assert load_delta(base, delta_out / "delta.safetensors") > 0
