"""Many concepts in one run, and a task that prepares only the data its method reads."""

from __future__ import annotations

import json

import pytest
import torch

import erase.diffusion.task as task_mod
from erase.cli import run_cli
from erase.diffusion.concepts import make_concepts, read_concept_file, split_concepts
from erase.errors import EraseError
from erase.train import main as train_main
from tests.test_diffusion import FAST, _task, models  # noqa: F401  (the session fixture of tiny models)


def test_concept_lists_parse_and_bad_lists_are_refused(tmp_path):
    assert split_concepts(" trouser, sneaker ,bag") == ["trouser", "sneaker", "bag"]
    with pytest.raises(EraseError, match="empty entry"):
        split_concepts("trouser,,bag")
    with pytest.raises(EraseError, match="--concept is empty"):
        split_concepts("  ")
    with pytest.raises(EraseError, match="twice"):
        make_concepts(["trouser", "pants"], "", "", fmnist=True)  # a synonym of the same class
    with pytest.raises(EraseError, match="twice"):
        make_concepts(["Church", "church"], "", "", fmnist=False)
    with pytest.raises(EraseError, match="includes a concept being erased"):
        make_concepts(["trouser", "bag"], "bag,coat", "", fmnist=True)
    f = tmp_path / "concepts.txt"
    f.write_text("# artists to erase\ntrouser\n\nsneaker  # shoes\n")
    assert read_concept_file(str(f)) == ["trouser", "sneaker"]
    cs = make_concepts(read_concept_file(str(f)), "", "", fmnist=True)
    assert cs.concepts == ["trouser", "sneaker"] and "trouser" not in cs.retain and len(cs.retain) == 8
    assert set(cs.paraphrases) == {"trouser", "sneaker"}


def test_forget_prompts_and_conditions_cover_every_concept(models):  # noqa: F811
    task = _task(models["bundled"], concept="trouser,sneaker", streams=("forget",))
    assert task.n_concepts == 2 and {task.forget_concept[i] for i in range(len(task.forget_prompts))} == {0, 1}
    labels = set(task.forget_set.label.tolist())
    assert labels == {1, 7}  # forget images of both classes
    c0, c1 = task.concept_condition(1, "cpu", 0), task.concept_condition(1, "cpu", 1)
    assert torch.equal(c0, task.encode([task.concepts.prompt("trouser", task.concepts.templates[0])]))
    assert not torch.equal(c0, c1)
    mask = task.concept_token_mask()
    assert mask[: len(task.forget_prompts)].any(1).all()  # every forget prompt marks its own concept's tokens


def test_ddpm_relabel_skips_erased_classes(models):  # noqa: F811
    task = _task(models["ddpm"], concept="airplane,automobile", streams=("forget",))
    b = task.relabel({"prompt": torch.tensor([0, 1]), "latents": torch.zeros(2, 3, 32, 32)})
    assert b["target_prompt"].tolist() == [2, 2]  # airplane -> automobile is erased too -> bird


def test_only_the_streams_a_method_reads_are_generated(models, monkeypatch, tmp_path):  # noqa: F811
    asked = []
    real = task_mod.cached

    def counting(key, make):
        asked.append(key)
        return real(key, make)

    monkeypatch.setattr(task_mod, "cached", counting)
    _task(models["sd1"], streams=())
    assert asked == []
    _task(models["sd1"], streams=("forget",))
    assert len(asked) == 1
    asked.clear()
    out = tmp_path / "esd"
    assert run_cli(train_main, ["--model", str(models["sd1"]), "--concept", "garbage truck", "--retain-concepts",
                                "church", "--method", "esd-x", "--max-steps", "1", "--output-dir", str(out), *FAST]) == 0
    assert asked == []  # ESD samples its own x_t: no forget/retain images


def test_multi_concept_run_reports_each_concept_and_their_mean(models, tmp_path):  # noqa: F811
    out = tmp_path / "multi"
    rc = run_cli(train_main, ["--model", "fmnist-tiny-sd", "--concept", "trouser,sneaker", "--method", "esd-x",
                              "--max-steps", "2", "--output-dir", str(out), *FAST])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    per = m["after"]["concept_acc_per_concept"]
    assert set(per) == {"trouser", "sneaker"}
    assert m["concept_acc"] == pytest.approx(sum(per.values()) / 2, abs=0.01)
    assert set(m["after"]["paraphrase_acc_per_concept"]) == {"trouser", "sneaker"}
    assert "sneaker" not in m["after"]["other_per_class"] and len(m["after"]["other_per_class"]) == 8
    card = (out / "README.md").read_text()
    assert "'trouser, sneaker' erased" in card
    assert (out / "grid.png").is_file()
