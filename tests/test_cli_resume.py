"""--resume continues a run only under the settings it started with, and starts fresh where nothing was saved."""

from __future__ import annotations

import json

import pytest

from erase.cli import run_cli
from erase.config import diff_configs, parse_cli
from erase.errors import EraseError
from erase.runner import prepare_output_dir
from erase.train import main as train_main
from tests.conftest import needs_fmnist
from tests.test_cli import QUICK, original  # noqa: F401  (the tiny saved classifier fixture)


def _resolved(out, *args):
    r, _ = parse_cli(["--method", "ga", "--original", "x", "--output-dir", str(out), *args])
    r.run.output_dir = str(out)  # as erase.runner.run does before preparing the folder
    return r


def _interrupted_run(out, *args):
    """A folder as an interrupted run leaves it: config.yaml and a checkpoint, no run.json."""
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "checkpoints" / "step-000002" / "state.json").write_text('{"step": 2}')
    _resolved(out, *args).save(out / "config.yaml")


def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    out = tmp_path / "run"
    _interrupted_run(out, "--lr", "0.01", "--seed", "3")
    with pytest.raises(EraseError) as err:
        prepare_output_dir(out, _resolved(out, "--lr", "0.02", "--seed", "3", "--resume"))
    msg = str(err.value)
    assert "method.lr: 0.01 -> 0.02" in msg and "--overwrite" in msg and "\n" not in msg
    assert "run.resume" not in msg and "run.seed" not in msg
    with pytest.raises(EraseError, match=r"run.seed: 3 -> 4"):
        prepare_output_dir(out, _resolved(out, "--lr", "0.01", "--seed", "4", "--resume"))


def test_resume_may_change_what_is_shown_and_how_often_it_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    _interrupted_run(out, "--lr", "0.01")
    same = _resolved(out, "--lr", "0.01", "--resume", "--no-progress", "--log-every", "1", "--checkpoint-every", "5",
                     "--keep-checkpoints", "4")
    prepare_output_dir(out, same)  # no error
    assert capsys.readouterr().err == ""


def test_resume_where_nothing_was_saved_says_it_starts_fresh(tmp_path, capsys):
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        prepare_output_dir(out, _resolved(out, "--resume"))
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "starting a fresh run" in err and str(out) in err


def test_diff_configs_compares_nested_sections_as_yaml_would_save_them():
    saved = {"run": {"seed": 0, "resume": False}, "method": {"lr": 0.1, "loss_weights": {}, "pad": [1, 2]}}
    new = {"run": {"seed": 0, "resume": True}, "method": {"lr": 0.1, "loss_weights": {"forget": -1.0}, "pad": (1, 2)}}
    assert diff_configs(saved, new) == ["method.loss_weights.forget: '<absent>' -> -1.0"]
    assert diff_configs(saved, saved) == []


@needs_fmnist
def test_resume_end_to_end_refuses_a_changed_lr_and_continues_with_the_same(tmp_path, original, capsys):  # noqa: F811
    out = tmp_path / "o"
    args = ["--method", "ga", "--original", str(original), "--output-dir", str(out), "--max-steps", "2",
            "--checkpoint-every", "1", "--lr", "0.01", *QUICK]
    assert run_cli(train_main, args) == 0
    (out / "run.json").unlink()  # as if interrupted after step 2's checkpoint
    assert run_cli(train_main, [*args[:-len(QUICK) - 1], "0.02", *QUICK, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "method.lr: 0.01 -> 0.02" in err and err.count("\n") == 1
    assert run_cli(train_main, [*args, "--resume"]) == 0
    assert json.loads((out / "run.json").read_text())["method"] == "ga"
