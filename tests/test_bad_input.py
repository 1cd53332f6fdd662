"""Hostile input: every bad value gets one line on stderr and exit status 2, before any work starts.

The CLIs run in-process (``run_cli`` + ``capsys``). Where "before any work" matters, the model
loaders are replaced by a function that fails the test if it is ever called, or the model named is
one that does not exist, so the error must come from the check under test and nothing else.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from erase.cli import run_cli
from erase.errors import EraseError
from erase.evaluate import main as eval_main
from erase.train import main as train_main
from tests.tiny_diffusion import tiny_ddpm, tiny_sd, write_class_names

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--n-forget", "2", "--n-retain", "2", "--eval-images", "1", "--sample-steps", "2", "--grid-seeds", "1",
        "--batch-size", "2", "--max-steps", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input-models")
    ddpm = tiny_ddpm(root / "ddpm", channels=1, size=8, classes=3)
    write_class_names(ddpm, ["cat", "dog", "fish"])
    return {"sd": tiny_sd(root / "sd"), "ddpm": ddpm}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    yield
    from erase.progress import set_progress

    set_progress(True)  # --no-progress is process-wide; later tests start from the default


def one_line_error(capsys, argv, main=train_main) -> str:
    """Run a CLI in-process; assert exit status 2 and exactly one line on stderr; return that line."""
    capsys.readouterr()
    try:
        code = run_cli(main, argv)
    except SystemExit as e:  # argparse's own errors print their usage text first: not one line
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def never(*_a, **_k):
    raise AssertionError("a model was loaded before the bad input was reported")


# -- 1. truncated / corrupt weights ----------------------------------------------------------------

def test_truncated_diffusion_weights_are_named(models, tmp_path, capsys):
    bad = shutil.copytree(models["sd"], tmp_path / "sd")
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    line = one_line_error(capsys, ["--model", str(bad), "--concept", "cat", "--output-dir", str(tmp_path / "o"), *FAST])
    assert str(weights) in line and "truncated or corrupt" in line


def test_corrupt_diffusion_config_is_one_line(models, tmp_path, capsys):
    bad = shutil.copytree(models["ddpm"], tmp_path / "ddpm")
    (bad / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel", ')
    line = one_line_error(capsys, ["--model", str(bad), "--concept", "cat", "--method", "esd-u",
                                   "--output-dir", str(tmp_path / "o"), *FAST])
    assert "config.json" in line


def test_corrupt_classifier_files_are_one_line(tmp_path):
    from erase.classifier.models import ResNetConfig, build_model, load_classifier, save_classifier

    save_classifier(build_model(ResNetConfig(num_classes=10, in_channels=1, width=2)), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"num_classes": 10,')
    with pytest.raises(EraseError, match=r"config.json is not readable JSON"):
        load_classifier(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"num_classes": 10, "colour": "red"}')
    with pytest.raises(EraseError, match=r"not an erase classifier config"):
        load_classifier(tmp_path / "m")
    save_classifier(build_model(ResNetConfig(num_classes=10, in_channels=1, width=2)), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(EraseError, match="not a readable safetensors file"):  # already worked; kept as a guard
        load_classifier(tmp_path / "m")


# -- 2. malformed YAML -----------------------------------------------------------------------------

def test_malformed_config_yaml_names_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("run:\n  seed: 1\nmethod:\n  lr: [0.1\n")
    line = one_line_error(capsys, ["--config", str(cfg)])
    assert str(cfg) in line and "line 5" in line


def test_malformed_yaml_flags_name_the_flag(capsys, tmp_path):
    out = ["--output-dir", str(tmp_path / "o"), "--original", str(tmp_path / "none")]
    line = one_line_error(capsys, ["--loss-weights", "{forget: [1", *out])
    assert "--loss-weights" in line and "line 1" in line
    line = one_line_error(capsys, ["--loss-weights", "3", *out])  # YAML, but not a mapping
    assert "--loss-weights" in line and "mapping" in line
    from erase.config import _yaml_flag, _yaml_list

    with pytest.raises(EraseError, match=r"--some-list: invalid YAML .*line 1"):
        _yaml_flag("--some-list", _yaml_list)("[1, {")


def test_malformed_model_recipe_names_the_file(models, tmp_path, capsys):
    model = shutil.copytree(models["sd"], tmp_path / "sd")
    (model / "erase.yaml").write_text("methods:\n  salun: {lr: 1e-3\n")
    line = one_line_error(capsys, ["--model", str(model), "--concept", "cat", "--output-dir", str(tmp_path / "o")])
    assert "erase.yaml" in line and "line" in line


# -- 3. a mask file of another model ---------------------------------------------------------------

def test_mask_file_of_another_model_is_one_line(models, tmp_path, capsys):
    from erase.saliency import save_masks

    mask = tmp_path / "other.safetensors"
    save_masks({"fc.weight": torch.ones(10, 64, dtype=torch.bool)}, mask)
    line = one_line_error(capsys, ["--model", str(models["sd"]), "--concept", "cat", "--method", "salun",
                                   "--mask-file", str(mask), "--output-dir", str(tmp_path / "o"), *FAST, "--no-progress"])
    assert str(mask) in line and "does not fit this model" in line
    line = one_line_error(capsys, ["--model", str(models["sd"]), "--concept", "cat", "--method", "salun",
                                   "--mask-file", str(tmp_path / "missing.safetensors"), "--output-dir", str(tmp_path / "p")])
    assert "--mask-file" in line and "not found" in line


# -- 4. an output folder that cannot be written ----------------------------------------------------

def test_output_dir_that_is_a_file(tmp_path, capsys):
    afile = tmp_path / "taken"
    afile.write_text("not a folder")
    # The model named does not exist: the output folder must be reported before anything loads.
    base = ["--original", str(tmp_path / "no-model"), "--max-steps", "1"]
    line = one_line_error(capsys, [*base, "--output-dir", str(afile)])
    assert "--output-dir" in line and "is a file" in line
    line = one_line_error(capsys, [*base, "--output-dir", str(afile / "run")])
    assert "--output-dir" in line and "not writable" in line
    assert afile.read_text() == "not a folder"


def test_read_only_output_dir(tmp_path, capsys, monkeypatch):
    import erase.storage

    def read_only(*_a, **_k):  # what mkstemp raises on a read-only mount
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(erase.storage.tempfile, "mkstemp", read_only)
    line = one_line_error(capsys, ["--original", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "o")])
    assert "--output-dir" in line and "Read-only file system" in line


# -- 5. a full disk, and the mode of written files -------------------------------------------------

def test_disk_full_while_writing_keeps_old_files_and_says_so(tmp_path):
    """A real write failure (RLIMIT_FSIZE: the kernel refuses to grow files past 64 KB) in a subprocess."""
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from erase.errors import EraseError
        from erase.storage import atomic_write_text, save_safetensors, save_torch
        root = {str(tmp_path)!r}
        save_safetensors({{"w": torch.zeros(4)}}, root + "/model.safetensors")
        save_torch({{"s": torch.zeros(4)}}, root + "/optimizer.pt")
        atomic_write_text("old", root + "/metrics.json")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        big = torch.zeros(100_000)
        for name, write in [("model.safetensors", lambda p: save_safetensors({{"w": big}}, p)),
                            ("optimizer.pt", lambda p: save_torch({{"s": big}}, p)),
                            ("metrics.json", lambda p: atomic_write_text("x" * 100_000, p))]:
            try:
                write(root + "/" + name)
                print("no error for", name)
            except EraseError as err:
                print(err)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 3, res.stdout
    for name, line in zip(["model.safetensors", "optimizer.pt", "metrics.json"], lines):
        assert line.startswith(f"could not write {tmp_path / name}: File too large"), line
        assert "free on that disk" in line and "checkpoints written before are kept" in line
    from erase.storage import load_safetensors, torch_load_safe

    assert load_safetensors(tmp_path / "model.safetensors")["w"].shape == (4,)
    assert torch_load_safe(tmp_path / "optimizer.pt")["s"].shape == (4,)
    assert (tmp_path / "metrics.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model.safetensors", "optimizer.pt"]


def test_disk_full_during_a_checkpoint_names_the_last_good_one(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import erase.storage
    from erase.engine.checkpoint import Checkpointer, latest_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = {"main": torch.optim.SGD(model.parameters(), lr=0.1)}
    checkpoints = Checkpointer(tmp_path, keep=2)
    checkpoints.save(1, model, opt, {})
    checkpoints.confirm()  # the next step's loss came out finite on these weights
    first = tmp_path / "step-000001"

    def full(*_a, **_k):  # safetensors' own report of ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(erase.storage, "save_file", full)
    with pytest.raises(EraseError) as info:
        checkpoints.save(2, model, opt, {})
    msg = str(info.value)
    assert "\n" not in msg
    assert "step-000002" in msg and "No space left on device" in msg and "free on that disk" in msg
    assert f"last good checkpoint {first} is kept" in msg and "--resume" in msg
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]  # no half-written folder left


def test_disk_full_in_a_run_is_one_line(models, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import erase.storage

    real = erase.storage.save_file
    out = tmp_path / "run"

    def full_under_run(tensors, path, metadata=None):  # the generated-data cache elsewhere still works
        if str(path).startswith(str(out)):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(erase.storage, "save_file", full_under_run)
    line = one_line_error(capsys, ["--model", str(models["sd"]), "--concept", "cat", "--method", "ga",
                                   "--output-dir", str(out), *FAST, "--no-progress"])
    assert "could not save checkpoint" in line and "No space left on device" in line and "--resume" in line


def test_generate_output_dir_that_is_a_file(tmp_path, capsys, monkeypatch):
    import erase.diffusion.generation
    from erase.generate import main as generate_main

    monkeypatch.setattr(erase.diffusion.generation, "load_generator", never)
    (tmp_path / "taken").write_text("")
    line = one_line_error(capsys, ["--base", "fmnist-tiny-sd", "--prompts", str(ROOT / "prompts" / "fmnist_classes.csv"),
                                   "--output-dir", str(tmp_path / "taken"), "--no-progress"], main=generate_main)
    assert "--output-dir" in line and "is a file" in line


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    from erase.storage import atomic_dir, atomic_write_text, save_safetensors, save_torch

    old = os.umask(umask)
    try:
        atomic_write_text("x", tmp_path / "a.txt")
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        save_torch({"w": torch.zeros(2)}, tmp_path / "o.pt")
        with atomic_dir(tmp_path / "model") as d:
            atomic_write_text("y", d / "config.json")
    finally:
        os.umask(old)
    for name in ("a.txt", "w.safetensors", "o.pt", "model/config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~umask


# -- 6. unknown sections and keys in a config file -------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("clasifier:\n  forget: class:1\n", ["unknown section(s) 'clasifier'", "run, diffusion, classifier, method"]),
    ("run:\n  sed: 1\n", ["Key 'sed' not in 'RunConfig'", "seed"]),  # already one line before; kept as a guard
    ("method: salun\n", ["section 'method' must be a mapping"]),
    ("- run\n", ["expected a mapping with sections"]),
])
def test_config_sections_and_keys_are_checked(tmp_path, capsys, text, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    line = one_line_error(capsys, ["--config", str(cfg), "--original", str(tmp_path / "no-model"),
                                   "--output-dir", str(tmp_path / "o")])
    for part in expected:
        assert part in line


# -- 7. --data-root that does not exist ------------------------------------------------------------

def test_missing_data_root_is_an_error_not_a_fallback(tmp_path, capsys):
    line = one_line_error(capsys, ["--data-root", str(tmp_path / "nowhere"), "--original", str(tmp_path / "no-model"),
                                   "--output-dir", str(tmp_path / "o")])
    assert "--data-root" in line and "does not exist" in line
    from erase.classifier.data import load_dataset

    (tmp_path / "empty").mkdir()
    with pytest.raises(EraseError, match="no Fashion-MNIST files .* in --data-root"):
        load_dataset("fashion-mnist", True, str(tmp_path / "empty"))


# -- 8. range checks, before any work --------------------------------------------------------------

CLASSIFIER_RANGES = [
    (["--epochs", "0", "--max-steps", "0"], ["nothing to train", "--epochs 0", "--max-steps 0"]),
    (["--max-steps", "-1"], ["--max-steps must be >= 0"]),
    (["--limit-train", "-5"], ["--limit-train must be >= 0"]),
    (["--pad-to", "-1"], ["--pad-to must be >= 0"]),
    (["--grad-accum", "0"], ["--grad-accum must be >= 1"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every must be >= 0"]),
    (["--keep-checkpoints", "0"], ["--keep-checkpoints must be >= 1"]),
    (["--lr", "nan"], ["--lr must be a finite number"]),
    (["--lr", "inf"], ["--lr must be a finite number"]),
    (["--batch-size", "0"], ["--batch-size must be >= 1"]),
    (["--loss-weights", "{forget_relabeled: .nan}"], ["--loss-weights", "finite"]),
    (["--mask-fraction", "0"], ["--mask-fraction must be in (0, 1]"]),
    (["--method", "salun_soft", "--prox-ratio", "2"], ["--prox-ratio must be in [0, 1]"]),
    (["--method", "grad_reinit", "--retain-subset", "-1"], ["--retain-subset must be >= 0"]),
    (["--retain-epochs", "2", "--pairing", "joint"], ["--retain-epochs applies to sequential", "--pairing joint"]),
    (["--method", "rl", "--retain-epochs", "2", "--max-steps", "5"], ["--retain-epochs", "(--max-steps)"]),
]


@pytest.mark.parametrize("args,expected", CLASSIFIER_RANGES, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_classifier_ranges_fail_before_any_work(tmp_path, capsys, args, expected):
    out = tmp_path / "o"
    line = one_line_error(capsys, ["--original", str(tmp_path / "no-model"), "--output-dir", str(out), *args])
    for part in expected:
        assert part in line
    assert not out.exists()  # nothing written: the config was refused while it was resolved


def test_stage_only_and_closed_form_methods_need_no_epochs(tmp_path):
    """--epochs 0 is a real run for kl_uniform (stage 1 only) and meaningless for closed-form edits."""
    from erase.config import resolve

    for method in ("kl_uniform", "ssd", "iu"):
        r = resolve({"method": method, "task": "classifier"}, {}, {"epochs": 0.0, "max_steps": 0}, {})
        assert r.method.epochs == 0
    with pytest.raises(EraseError, match="nothing to train: --cycle-epochs"):
        resolve({"method": "reinit_kp", "task": "classifier"}, {}, {"cycle_epochs": "0,0", "max_steps": 0}, {})


DIFFUSION_RANGES = [
    (["--n-forget", "0"], ["--n-forget must be >= 1"]),
    (["--eval-images", "0"], ["--eval-images must be >= 1"]),
    (["--sample-steps", "0"], ["--sample-steps must be >= 1"]),
    (["--guidance", "nan"], ["--guidance must be a finite number"]),
    (["--lora-rank", "-1"], ["--lora-rank must be >= 0"]),
    (["--method", "esd-u", "--ddim-steps", "1"], ["--ddim-steps must be at least 2"]),
    (["--method", "esd-u", "--max-steps", "0"], ["--max-steps must be at least 1"]),
    (["--method", "salun", "--save-format", "lora"], ["salun's saliency mask"]),
    # diffusion pairs forget and retain batches in every step: retain_epochs would be ignored silently
    (["--method", "salun", "--retain-epochs", "2"], ["--retain-epochs applies to sequential", "--pairing auto"]),
    (["--forget-images", "/no/such/folder"], ["--forget-images /no/such/folder is not a folder"]),
]


@pytest.mark.parametrize("args,expected", DIFFUSION_RANGES, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_diffusion_ranges_fail_before_any_work(tmp_path, capsys, monkeypatch, args, expected):
    import erase.diffusion.task

    monkeypatch.setattr(erase.diffusion.task, "load_base", never)
    out = tmp_path / "o"
    line = one_line_error(capsys, ["--model", "fmnist-tiny-sd", "--concept", "trouser", "--output-dir", str(out), *args])
    for part in expected:
        assert part in line
    assert not out.exists()


# -- 9. empty values -------------------------------------------------------------------------------

@pytest.mark.parametrize("args,flag", [
    (["--concept", ""], "--concept"),
    (["--concept", "  "], "--concept"),
    (["--forget", ""], "--forget"),
    (["--original", ""], "--original"),
    (["--concept", "trouser", "--model", ""], "--model"),
    (["--method", ""], "--method"),
    (["--config", ""], "--config"),
    (["--output-dir", ""], "--output-dir"),
])
def test_empty_values_are_named(tmp_path, capsys, monkeypatch, args, flag):
    import erase.diffusion.task

    monkeypatch.chdir(tmp_path)  # a default output folder would land here
    monkeypatch.setattr(erase.diffusion.task, "load_base", never)
    line = one_line_error(capsys, args)
    assert f"{flag} is empty" in line
    assert not any(tmp_path.iterdir())


# -- 10. --no-progress silences every bar ----------------------------------------------------------

def test_no_progress_silences_every_bar(models, tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert run_cli(train_main, ["--model", str(models["sd"]), "--concept", "cat", "--method", "ga", "--output-dir",
                                str(out), *FAST, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (out / "model" / "unet").is_dir()  # it loaded, generated, trained, evaluated and wrote the model
    assert err == "", err[-2000:]  # no "Loading weights", "forget data", "generating", "Writing model shards"


# -- 11. names and model kinds checked before the model loads or any image is generated ------------

def test_unknown_concept_fails_before_the_model_loads(models, tmp_path, capsys, monkeypatch):
    import erase.diffusion.task

    monkeypatch.setattr(erase.diffusion.task, "load_base", never)
    line = one_line_error(capsys, ["--model", "fmnist-tiny-sd", "--concept", "dragon", "--output-dir", str(tmp_path / "a")])
    assert "unknown Fashion-MNIST concept 'dragon'" in line
    line = one_line_error(capsys, ["--model", str(models["ddpm"]), "--concept", "dragon", "--method", "esd-u",
                                   "--output-dir", str(tmp_path / "b")])
    assert "unknown class 'dragon'" in line and "cat, dog, fish" in line


def test_esd_x_on_a_ddpm_fails_before_any_work(models, tmp_path, capsys, monkeypatch):
    import erase.diffusion.task

    monkeypatch.setattr(erase.diffusion.task, "load_base", never)
    for method in ("esd-x", "fmn"):
        out = tmp_path / method
        line = one_line_error(capsys, ["--model", str(models["ddpm"]), "--concept", "cat", "--method", method,
                                       "--output-dir", str(out)])
        assert "DDPM" in line
        assert not out.exists()


def test_evaluate_checks_the_concept_before_generating(tmp_path, capsys, monkeypatch):
    import erase.diffusion.generation

    monkeypatch.setattr(erase.diffusion.generation, "load_generator", never)
    line = one_line_error(capsys, ["model", "--base", "fmnist-tiny-sd", "--prompts", str(ROOT / "prompts" / "fmnist_classes.csv"),
                                   "--concept", "dragon", "--metrics", "concept", "--output-dir", str(tmp_path / "e"),
                                   "--no-progress"], main=eval_main)
    assert "does not know the erased concept 'dragon'" in line


# -- 12. duplicate ids in an indices file ----------------------------------------------------------

def test_duplicate_indices_are_reported(tmp_path, capsys):
    from erase.classifier.data import ImageTensorDataset, parse_forget_spec

    data = ImageTensorDataset(torch.zeros(20, 1, 4, 4, dtype=torch.uint8), torch.arange(20) % 2, ["a", "b"])
    ids = tmp_path / "ids.txt"
    ids.write_text("3\n5\n3\n7\n5\n3\n")
    split = parse_forget_spec(f"indices:{ids}", data, data)
    assert split.forget.tolist() == [3, 5, 7] and split.duplicates_dropped == 3
    err = capsys.readouterr().err
    assert "3 duplicate id(s)" in err and "forgetting 3 distinct examples" in err and len(err.splitlines()) == 1


# -- 13. evaluate.py on a missing path -------------------------------------------------------------

def test_evaluate_on_a_missing_path_does_not_advise_resume(tmp_path, capsys):
    line = one_line_error(capsys, [str(tmp_path / "nope")], main=eval_main)
    assert "not found" in line and "--resume" not in line
    (tmp_path / "half" / "checkpoints").mkdir(parents=True)  # an interrupted run: --resume is the right advice
    line = one_line_error(capsys, [str(tmp_path / "half")], main=eval_main)
    assert "--resume" in line
    (tmp_path / "other").mkdir()
    line = one_line_error(capsys, [str(tmp_path / "other")], main=eval_main)
    assert "--resume" not in line and "not a finished erase run" in line

