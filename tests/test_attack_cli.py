"""erase/attack.py end to end on a tiny SD-1.x run folder (uce: no training steps), and its one-line errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from erase.attack import main as attack_main
from erase.attacks.success import summarize
from erase.cli import run_cli
from erase.evaluate import main as evaluate_main
from erase.prompts import load_prompts
from erase.train import main as train_main
from tests.tiny_diffusion import tiny_sd

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "population=8", "--set", "generations=3", "--no-progress"]
# the gradient attacks' budgets cut to a few steps (their defaults are the official SD budgets)
GRADIENT_TINY = ["--set", "timesteps=1", "--set", "iterations=2", "--set", "steps=2", "--set", "train-images=2",
                 "--set", "concept-inversion.batch-size=2", "--set", "check-every=1", "--set", "p4d.images=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("attack-cli")
    os.environ["ERASE_CACHE"] = str(root / "cache")
    model = tiny_sd(root / "sd1")
    out = root / "run"
    args = ["--concept", "trouser", "--method", "uce", "--model", str(model), "--retain-concepts", "dress,bag",
            "--paraphrases", "a pair of pants", "--evaluator", "fmnist-classifier", "--output-dir", str(out),
            "--n-forget", "2", "--n-retain", "2", "--eval-images", "1", "--sample-steps", "2", "--grid-seeds", "1",
            "--no-progress"]
    assert run_cli(train_main, args) == 0
    return out


def _records(folder: Path) -> dict[str, dict]:
    return {r["case"]: r for r in (json.loads(f.read_text()) for f in sorted((folder / "records").glob("*.json")))}


def _mtimes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in (folder / "records").glob("*.json")}


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom erase.attack import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--attack" in out and "robustness.json" in out and out.strip().endswith("NO-TORCH")


def test_attack_run_writes_outputs_resumes_and_overwrites(run_dir, capsys):
    args = [str(run_dir), "--attack", "ring-a-bell", *TINY]
    assert run_cli(attack_main, args) == 0
    folder = run_dir / "attacks" / "ring-a-bell"
    for name in ("prompts.csv", "table.csv", "table.md", "grid.png", "robustness.json", "settings.json"):
        assert (folder / name).is_file(), name
    records = _records(folder)
    # the default prompt set of a one-concept run: the concept prompt and its held-out paraphrase
    assert [r["prompt"] for r in records.values()] == ["a photo of a trouser", "a pair of pants"]
    for r in records.values():
        assert isinstance(r["adversarial_prompt"], str) and r["adversarial_prompt"].strip()
        assert r["info"]["generations"] == 3 and r["seconds"] > 0
        for tag in ("base", "erased", "attacked"):
            assert (folder / "images" / f"{r['case']}_{tag}_0.png").is_file()
    # every number is success.summarize over the per-prompt records
    plain = {c: r["plain_judged"] for c, r in records.items()}
    want = summarize(plain, {"ring-a-bell": {c: r["attacked_judged"] for c, r in records.items()}})
    rob = json.loads((folder / "robustness.json").read_text())
    assert {k: rob[k] for k in ("pre_asr", "asr", "adversarial_asr")} == want["attacks"]["ring-a-bell"]
    assert rob["union"] == {"attacks": ["ring-a-bell"], **want["union"]} and rob["prompts"] == 2
    assert rob["budget"]["population"] == 8 and rob["budget_sources"]["flags"] == {"population": 8, "generations": 3}
    assert rob["judge"]["evaluator"] == "fmnist-classifier" and set(rob["seconds_per_prompt"]) == {"0", "1"}
    union = json.loads((run_dir / "attacks" / "robustness.json").read_text())
    assert union["union"] == want["union"] and union["pre_asr"] == want["pre_asr"]
    for r in records.values():
        assert r["success"] == (r["pre"] or r["adversarial"]) and r["adversarial"] == any(r["attacked_judged"])
    # the adversarial prompts replay as a prompt CSV
    replay = load_prompts(folder / "prompts.csv")
    assert [p.prompt for p in replay] == [r["adversarial_prompt"] for r in records.values()]
    assert [p.seed for p in replay] == [r["seed"] for r in records.values()] and replay[0].concept == "trouser"
    with open(folder / "table.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    card = (run_dir / "README.md").read_text()
    assert card.count("## Robustness") == 1 and "(attacks/ring-a-bell/grid.png)" in card
    assert card.index("## Robustness") < card.index("## Resolved configuration")
    assert "population 8, generations 3" in card

    # a rerun skips done prompts: only the missing record is attacked again
    before = _mtimes(folder)
    (folder / "records" / "1.json").unlink()
    assert run_cli(attack_main, args) == 0
    after = _mtimes(folder)
    assert after["0.json"] == before["0.json"] and "1.json" in after
    assert (run_dir / "README.md").read_text().count("## Robustness") == 1

    # other settings are refused without --overwrite, before any model loads
    capsys.readouterr()
    assert run_cli(attack_main, [str(run_dir), "--attack", "ring-a-bell", "--set", "population=9", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and "budget" in err and len(err.splitlines()) == 1

    # --overwrite redoes every prompt; the continuous variant writes its embedding
    before = _mtimes(folder)
    assert run_cli(attack_main, [*args, "--overwrite"]) == 0
    assert all(_mtimes(folder)[k] != v for k, v in before.items())
    assert run_cli(attack_main, [str(run_dir), "--attack", "all", "--set", "continuous=true", "--limit", "1",
                                 *GRADIENT_TINY, "--overwrite", "--no-progress"]) == 0
    rec = _records(folder)
    assert list(rec) == ["0"] and rec["0"]["adversarial_prompt"] is None
    emb = load_file(str(folder / rec["0"]["embedding_file"]))["embedding"]
    assert emb.shape == (77, 32)
    union = json.loads((run_dir / "attacks" / "robustness.json").read_text())
    assert union["prompts"] == 1 and set(union["attacks"]) == {"concept-inversion", "p4d", "ring-a-bell", "unlearndiffatk"}
    ci = _records(run_dir / "attacks" / "concept-inversion")["0"]  # the learned word, in diffusers' TI format
    word = load_file(str(run_dir / "attacks" / "concept-inversion" / "embeddings" / "0.concept.safetensors"))
    assert list(word) == ["<concept>"] and word["<concept>"].ndim == 1 and "<concept>" in ci["adversarial_prompt"]
    assert not (run_dir / "attacks" / "unlearndiffatk" / "work" / "unlearndiffatk" / "0").exists()  # cleaned up


def _one_line_error(capsys, main, argv) -> str:
    capsys.readouterr()
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_fail_in_one_line_before_any_model_loads(run_dir, tmp_path, capsys):
    run = str(run_dir)
    assert "unknown attack 'ringabell'; choose one of: concept-inversion, p4d, ring-a-bell, unlearndiffatk" in _one_line_error(
        capsys, attack_main, [run, "--attack", "ringabell"])
    assert "no such folder" in _one_line_error(capsys, attack_main, [str(tmp_path / "nope")])
    assert "RUN_DIR is required" in _one_line_error(capsys, attack_main, [])
    assert "no config.yaml" in _one_line_error(capsys, attack_main, [str(tmp_path)])
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "config.yaml", bare / "config.yaml")
    assert "holds no erased model" in _one_line_error(capsys, attack_main, [str(bare)])
    clf = tmp_path / "clf"
    clf.mkdir()
    (clf / "config.yaml").write_text(yaml.safe_dump({"run": {"task": "classifier"}, "classifier": {}}))
    assert "classifier run" in _one_line_error(capsys, attack_main, [str(clf)])
    assert "--population must be >= 2" in _one_line_error(capsys, attack_main, [run, "--set", "population=1"])
    assert "expected int" in _one_line_error(capsys, attack_main, [run, "--set", "population=many"])
    assert "no attack run here has a setting 'popsize'" in _one_line_error(capsys, attack_main, [run, "--set", "popsize=3"])
    assert "not among those run" in _one_line_error(capsys, attack_main, [run, "--set", "other.population=3"])
    assert "prompt file not found" in _one_line_error(capsys, attack_main, [run, "--prompts", str(tmp_path / "p.csv")])
    # evaluate.py --attacks plans (and so checks) the attacks before it generates anything
    assert "unknown attack 'ringabell'" in _one_line_error(capsys, evaluate_main, [run, "--attacks", "ringabell"])
    assert not (run_dir / "evaluation").exists()


def test_base_model_mode_attacks_the_unerased_model(run_dir, tmp_path, capsys):
    model = _base_of(run_dir)
    out = tmp_path / "base"
    args = [str(out), "--base-model", model, "--concept", "trouser", "--attack", "unlearndiffatk", "--limit", "1",
            "--evaluator", "fmnist-classifier", "--set", "timesteps=1", "--set", "iterations=2", "--no-progress"]
    assert run_cli(attack_main, args) == 0
    data = json.loads((out / "attacks" / "unlearndiffatk" / "robustness.json").read_text())
    settings = json.loads((out / "attacks" / "unlearndiffatk" / "settings.json").read_text())
    assert data["prompts"] == 1 and settings["erased_model"] == "the base model"
    assert run_cli(attack_main, args) == 0  # a rerun reads the folder's own config back and resumes
    assert "--concept goes with --base-model" in _one_line_error(capsys, attack_main, [str(run_dir), "--concept", "x"])
    assert "needs --concept" in _one_line_error(capsys, attack_main, [str(tmp_path / "b2"), "--base-model", model])
    assert "holds another run" in _one_line_error(
        capsys, attack_main, [str(out), "--base-model", model, "--concept", "dress"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in _one_line_error(
        capsys, attack_main, [str(tmp_path / "full"), "--base-model", model, "--concept", "trouser"])


def _base_of(run_dir: Path) -> str:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["diffusion"]["model"]


def test_two_processes_split_the_prompts_and_match_one(run_dir, tmp_path):
    """torchrun with 2 CPU processes: each attacks its share, and the records equal a one-process run's."""
    runs = {}
    for n in (1, 2):
        copy = tmp_path / f"run{n}"
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("attacks"))
        launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", "2"]  # standalone: a free port of its own
        cmd = [*launcher, str(ROOT / "erase" / "attack.py"), str(copy), "--attack", "ring-a-bell,unlearndiffatk",
               "--set", "population=6", "--set", "generations=2", "--set", "timesteps=1", "--set", "iterations=2",
               "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[n] = {a: _records(copy / "attacks" / a) for a in ("ring-a-bell", "unlearndiffatk")}
        assert json.loads((copy / "attacks" / "robustness.json").read_text())["prompts"] == 2
    for attack, records in runs[1].items():
        assert set(records) == set(runs[2][attack]) == {"0", "1"}
        for case, r in records.items():
            assert r["adversarial_prompt"] == runs[2][attack][case]["adversarial_prompt"]
        assert {r["process"] for r in records.values()} == {"0/1"}
        assert {case: r["process"] for case, r in runs[2][attack].items()} == {"0": "0/2", "1": "1/2"}
