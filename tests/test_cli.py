"""The command line end to end on real Fashion-MNIST slices, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erase.classifier.models import ResNetConfig, build_model, save_classifier
from erase.cli import run_cli
from erase.train import main as train_main
from tests.conftest import needs_fmnist

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--limit-train", "600", "--limit-test", "200", "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny (untrained) Fashion-MNIST classifier saved the way erase saves models."""
    d = tmp_path_factory.mktemp("original")
    torch.manual_seed(0)
    save_classifier(build_model(ResNetConfig(num_classes=10, in_channels=1, width=4, mean=[0.286], std=[0.353],
                                             image_size=28)), d)
    return d


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@needs_fmnist
def test_train_cli_writes_every_output(tmp_path, original):
    out = tmp_path / "salun"
    cmd = [sys.executable, str(ROOT / "erase" / "train.py"), "--method", "salun", "--forget", "class:1",
           "--original", str(original), "--max-steps", "2", "--output-dir", str(out), *QUICK]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("model.safetensors", "config.json", "config.yaml", "metrics.json", "report.md", "run.json",
                 "log.jsonl", "saliency_mask.safetensors"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"UA", "RA", "TA", "MIA", "forget_class_test_acc"} <= set(metrics)
    assert "method salun" in (out / "config.yaml").read_text() or "name: salun" in (out / "config.yaml").read_text()
    # The base model folder is untouched.
    assert sorted(p.name for p in original.iterdir()) == ["config.json", "model.safetensors"]


@needs_fmnist
def test_pretrain_retrain_and_evaluate(tmp_path, original, capsys):
    assert run_cli(lambda a: __import__("erase.classifier.pretrain", fromlist=["main"]).main(a),
                   ["--width", "4", "--max-steps", "2", "--output-dir", str(tmp_path / "orig"), *QUICK]) == 0
    assert (tmp_path / "orig" / "model.safetensors").is_file()
    for method in ("retrain", "ft"):
        assert run_cli(train_main, ["--method", method, "--forget", "random:0.1", "--original", str(tmp_path / "orig"),
                                    "--max-steps", "2", "--output-dir", str(tmp_path / method), *QUICK]) == 0
    from erase.evaluate import main as eval_main

    assert run_cli(eval_main, [str(tmp_path / "ft"), "--retrain", str(tmp_path / "retrain")]) == 0
    out = capsys.readouterr().out
    assert "avg_gap" in out and "RTE_ratio" in out
    rows = json.loads((tmp_path / "ft" / "comparison.json").read_text())["rows"]
    assert rows[0]["method"] == "retrain" and rows[0]["avg_gap"] == 0.0 and rows[1]["method"] == "ft"
    ft = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert rows[1]["UA"] == ft["UA"]  # the values themselves, not their gaps
    assert rows[1]["MIA_se"] == ft["MIA_se"] and "MIA_se" in out  # MIA's standard error sits beside it
    ret = json.loads((tmp_path / "retrain" / "metrics.json").read_text())
    assert rows[1]["gap_UA"] == pytest.approx(abs(ft["UA"] - ret["UA"]), abs=1e-3)


@needs_fmnist
def test_two_process_run_under_torchrun(tmp_path, original):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "erase" / "train.py"), "--method", "rl", "--forget", "class:3", "--original", str(original),
           "--max-steps", "2", "--output-dir", str(out), *QUICK]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in json.loads((out / "run.json").read_text())["machine"]
    assert (out / "metrics.json").is_file()


def test_help_explains_every_flag():
    res = subprocess.run([sys.executable, str(ROOT / "erase" / "train.py"), "--method", "salun", "--help"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 0
    for flag in ("--mask-fraction", "--forget", "--original", "--resume", "--overwrite", "--grad-accum", "--lr"):
        assert flag in res.stdout
    import re

    flags = re.findall(r"^\s+(--[a-z][a-z0-9-]*)", res.stdout, flags=re.M)
    assert len(flags) > 20


BAD = [
    (["--method", "salune"], "unknown method 'salune'; choose one of"),
    (["--dataset", "mnist-digits"], "unknown dataset"),
    (["--forget", "random:1.5"], "forget fraction must be in (0, 1)"),
    (["--forget", "random:0"], "forget fraction must be in (0, 1)"),
    (["--forget", "class:12"], "class 12 out of range"),
    (["--forget", "everything"], "unknown forget spec"),
    (["--optimizer", "lamb"], "invalid choice"),
]


@needs_fmnist
@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_gives_one_line_error(tmp_path, original, capsys, args, message):
    base = ["--original", str(original), "--output-dir", str(tmp_path / "o"), "--max-steps", "1", *QUICK]
    try:
        code = run_cli(train_main, base + args)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


@needs_fmnist
def test_indices_file_errors(tmp_path, original, capsys):
    base = ["--original", str(original), "--output-dir", str(tmp_path / "o"), "--max-steps", "1", *QUICK]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n5\n999999\n")
    assert run_cli(train_main, base + ["--forget", f"indices:{empty}"]) == 2
    assert "empty" in capsys.readouterr().err
    assert run_cli(train_main, base + ["--forget", f"indices:{bad}"]) == 2
    assert "outside 0..599" in capsys.readouterr().err
    assert run_cli(train_main, base + ["--forget", f"indices:{tmp_path / 'nope.txt'}"]) == 2
    assert "not found" in capsys.readouterr().err


@needs_fmnist
def test_wrong_checkpoints_are_refused(tmp_path, original, capsys):
    wrong = tmp_path / "wrong"
    save_classifier(build_model(ResNetConfig(num_classes=10, in_channels=1, width=8)), wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["width"] = 4  # config says width 4, weights are width 8
    (wrong / "config.json").write_text(json.dumps(cfg))
    base = ["--output-dir", str(tmp_path / "o"), "--max-steps", "1", *QUICK]
    assert run_cli(train_main, base + ["--original", str(wrong)]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    rgb = tmp_path / "rgb"
    save_classifier(build_model(ResNetConfig(num_classes=10, in_channels=3, width=4)), rgb)
    assert run_cli(train_main, base + ["--original", str(rgb)]) == 2
    assert "channel" in capsys.readouterr().err
    assert run_cli(train_main, base + ["--original", str(tmp_path / "missing")]) == 2
    assert "neither a folder nor a bundled" in capsys.readouterr().err


def test_missing_dataset_says_how_to_get_it(tmp_path, capsys):
    code = run_cli(train_main, ["--dataset", "cifar10", "--data-root", str(tmp_path), "--original", "x",
                                "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert "--download" in capsys.readouterr().err


@needs_fmnist
def test_finished_run_is_not_overwritten_without_flag(tmp_path, original, capsys):
    out = tmp_path / "o"
    args = ["--method", "ga", "--original", str(original), "--output-dir", str(out), "--max-steps", "1", *QUICK]
    assert run_cli(train_main, args) == 0
    before = (out / "model.safetensors").read_bytes()
    assert run_cli(train_main, args) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert run_cli(train_main, args + ["--overwrite"]) == 0
    assert run_cli(train_main, [*args[:-len(QUICK)], "--output-dir", str(original), *QUICK]) == 2
    assert "base model" in capsys.readouterr().err
