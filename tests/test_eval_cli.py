"""generate.py and evaluate.py end to end on tiny models built in code: images, resume, grids, two
processes, the report, run-folder detection, plain image folders, and the one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erase.cli import run_cli
from erase.evaluate import main as eval_main
from erase.generate import main as gen_main
from tests.test_eval_metrics import tiny_hf_clip  # noqa: F401  (fixture: a tiny transformers CLIP folder)
from tests.tiny_diffusion import tiny_ddpm, tiny_sd, write_class_names

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--no-progress"]
EVALUATOR_KEYS = {"name", "version", "weights_source", "threshold", "input_convention"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD, an 'erased' copy as an erase run folder (delta.safetensors + config.yaml), a judge, prompts."""
    import yaml
    from diffusers import UNet2DConditionModel

    from erase.classifier.data import FASHION_MNIST_CLASSES
    from erase.classifier.models import ResNetConfig, build_model, save_classifier
    from erase.diffusion.export import save_delta

    root = tmp_path_factory.mktemp("eval-world")
    sd = tiny_sd(root / "sd")
    unet = UNet2DConditionModel.from_pretrained(sd / "unet")
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)  # a visible change, standing in for an erasure
    run = root / "run"
    run.mkdir()
    save_delta(base_state, unet, run)
    (run / "config.yaml").write_text(yaml.safe_dump({"diffusion": {"model": str(sd), "concept": "pants",
                                                                   "guidance": 3.0, "sample_steps": 2}}))
    torch.manual_seed(0)
    save_classifier(build_model(ResNetConfig(num_classes=10, in_channels=1, width=2, image_size=16,
                                             class_names=list(FASHION_MNIST_CLASSES))), root / "clf")
    prompts = root / "prompts.csv"
    prompts.write_text("case_number,prompt,evaluation_seed,class\n0,a photo of a trouser,10,trouser\n"
                       "1,a photo of a bag,20,bag\n")
    return {"sd": sd, "run": run, "clf": root / "clf", "prompts": prompts, "root": root}


def _judge(world):
    return ["--fid-features", str(world["clf"]), "--classifier", str(world["clf"])]


def test_generate_writes_images_index_grids_and_resumes(world, tmp_path, capsys):
    from erase.storage import load_png

    out = tmp_path / "gen"
    args = ["--base", str(world["sd"]), "--erased", str(world["run"] / "delta.safetensors"), "--prompts",
            str(world["prompts"]), "--images-per-prompt", "2", "--output-dir", str(out), *FAST]
    assert run_cli(gen_main, args) == 0
    index = (out / "images.csv").read_text().splitlines()
    assert len(index) == 1 + 2 * 2 * 2 and index[1].startswith("base/0_0.png,base,0,0,a photo of a trouser,10,7.5")
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["bag.png", "trouser.png"]
    assert not torch.equal(load_png(out / "base" / "0_0.png"), load_png(out / "erased" / "0_0.png"))
    settings = json.loads((out / "generation.json").read_text())
    assert settings["models"]["erased"].endswith("delta.safetensors") and settings["steps"] == 2
    # Resume: nothing left to do; a removed image is regenerated identically.
    before = (out / "erased" / "1_1.png").read_bytes()
    (out / "erased" / "1_1.png").unlink()
    capsys.readouterr()
    assert run_cli(gen_main, args) == 0
    assert "this process wrote 1)" in capsys.readouterr().out
    assert (out / "erased" / "1_1.png").read_bytes() == before
    # Other settings into the same folder are refused.
    assert run_cli(gen_main, [*args[:-3], "--steps", "3", "--no-progress"]) == 2
    assert "other settings (differs in: steps)" in capsys.readouterr().err


def test_generate_ddpm_from_class_labels(tmp_path):
    ddpm = tiny_ddpm(tmp_path / "ddpm", channels=1, size=16)
    write_class_names(ddpm, ["zero", "one"] + [str(i) for i in range(2, 10)])
    csv = tmp_path / "p.csv"
    csv.write_text("label,seed\none,1\n5,2\n")
    assert run_cli(gen_main, ["--base", str(ddpm), "--prompts", str(csv), "--output-dir", str(tmp_path / "g"), *FAST]) == 0
    assert (tmp_path / "g" / "base" / "0_0.png").is_file() and (tmp_path / "g" / "base" / "1_0.png").is_file()
    csv.write_text("label,seed\nunicorn,1\n")
    assert run_cli(gen_main, ["--base", str(ddpm), "--prompts", str(csv), "--output-dir", str(tmp_path / "h"), *FAST]) == 2


def test_evaluate_model_writes_metrics_report_grids_and_plot(world, tmp_path):
    out = tmp_path / "eval"
    args = ["model", "--base", str(world["sd"]), "--erased", str(world["run"]), "--prompts", str(world["prompts"]),
            "--images-per-prompt", "3", "--concept", "trouser", "--output-dir", str(out), *FAST, *_judge(world)]
    assert run_cli(eval_main, args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["models"]) == {"base", "erased"} and m["models"]["erased"] == 6
    for block in ("fid", "concept_accuracy", "nudenet"):
        assert EVALUATOR_KEYS <= set(m[block]["evaluator"]), block
    assert m["fid"]["name"] == "FID-clf" and set(m["fid"]["values"]) == {"erased"}  # reference: the base images
    ca = m["concept_accuracy"]
    assert ca["concept"] == "trouser" and set(ca["per_concept"]["base"]) == {"trouser", "bag"}
    assert ca["UA"]["erased"] == pytest.approx(100 - ca["per_concept"]["erased"]["trouser"])
    assert m["nudenet"]["counts"]["base"]["images"] == 6 and m["nudenet"]["evaluator"]["threshold"] == 0.6
    assert {"UA", "retained_acc", "nudenet_exposed", "FID-clf"} <= set(m["summary"]["erased"])
    report = (out / "report.md").read_text()
    assert "![trouser](grids/trouser.png)" in report and "(plot.png)" in report and "FID-clf" in report
    assert (out / "plot.png").stat().st_size > 1000


def test_evaluate_a_run_folder_reads_its_settings(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    args = [str(run), "--prompts", str(world["prompts"]), "--images-per-prompt", "1", "--metrics", "concept",
            "--classifier", str(world["clf"]), "--no-progress"]
    assert run_cli(eval_main, args) == 0
    m = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert m["concept_accuracy"]["concept"] == "trouser"  # "pants" in the run's config, by the judge's synonyms
    assert m["generation"]["guidance"] == 3.0 and m["generation"]["steps"] == 2


def test_evaluate_a_plain_image_folder(world, tmp_path):
    from erase.diffusion.generation import save_png

    g = torch.Generator().manual_seed(0)
    for model in ("a", "b"):
        for i in range(3):
            save_png(torch.rand(3, 16, 16, generator=g), tmp_path / "imgs" / model / f"{i}.png")
    args = ["images", str(tmp_path / "imgs"), "--label", "bag", "--metrics", "concept,nudenet,fid", "--fid-reference",
            str(tmp_path / "imgs" / "a"), *_judge(world), "--output-dir", str(tmp_path / "out")]
    assert run_cli(eval_main, args) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(m["models"]) == {"a", "b"} and set(m["concept_accuracy"]["per_concept"]["a"]) == {"bag"}
    assert m["fid"]["values"]["a"] == pytest.approx(0.0, abs=1e-3)  # a folder against itself


def _one_line_error(capsys, args) -> str:
    capsys.readouterr()
    assert run_cli(eval_main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_clear_errors(world, tmp_path, capsys):
    gen = tmp_path / "gen"
    assert run_cli(gen_main, ["--base", str(world["sd"]), "--prompts", str(world["prompts"]), "--output-dir", str(gen),
                              *FAST]) == 0
    err = _one_line_error(capsys, ["images", str(gen), "--fid-features", "inception", "--inception-weights",
                                   str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")])
    assert "--inception-weights" in err and "--fid-features fmnist-classifier" in err
    err = _one_line_error(capsys, ["images", str(gen), "--clip-model", str(tmp_path / "clip"), "--metrics", "clip"])
    assert "CLIP checkpoint not found" in err and "--clip-model" in err
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    base = ["model", "--base", str(world["sd"]), "--output-dir", str(tmp_path / "x"), *FAST]
    assert "is empty" in _one_line_error(capsys, [*base, "--prompts", str(empty)])
    cols = tmp_path / "cols.csv"
    cols.write_text("text,seed\na bag,1\n")
    assert "no 'prompt' column" in _one_line_error(capsys, [*base, "--prompts", str(cols)])
    assert "unknown metric" in _one_line_error(capsys, ["images", str(gen), "--metrics", "fid,lpips"])


def test_generate_splits_across_two_processes(world, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           str(ROOT / "erase" / "generate.py"), "--base", str(world["sd"]), "--prompts", str(world["prompts"]),
           "--images-per-prompt", "3", "--output-dir", str(out), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((out / "base").glob("*.png"))) == 6
    assert json.loads((out / "generation.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_bundled_sd_before_and_after_an_erasure_in_ten_minutes(tmp_path):
    """The issue's done-when: evaluate the bundled tiny SD before and after an erasure on 2 CPU cores."""
    import time

    from erase.storage import list_bundled_models

    if not {"fmnist-tiny-sd", "fmnist-classifier"} <= set(list_bundled_models()):
        pytest.skip("bundled fmnist-tiny-sd / fmnist-classifier not trained yet")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    run = tmp_path / "esd-trouser"
    train = [sys.executable, str(ROOT / "erase" / "train.py"), "--concept", "trouser", "--method", "esd-x", "--max-steps",
             "20", "--save-format", "delta", "--n-forget", "8", "--n-retain", "8", "--eval-images", "2", "--no-progress",
             "--output-dir", str(run)]
    res = subprocess.run(train, capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(ROOT / "erase" / "evaluate.py"), str(run), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=900)
    seconds = time.perf_counter() - t0
    print(f"bundled SD evaluation (base and erased): {seconds:.0f} s")
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert m["fid"]["name"] == "FID-fmnist" and m["concept_accuracy"]["concept"] == "trouser" and "nudenet" in m
    assert set(m["fid"]["values"]) == {"base", "erased"}
    assert seconds <= 600, f"evaluation took {seconds:.0f} s"


def test_fid_fmnist_is_not_offered_for_photographs(tmp_path, capsys, monkeypatch):
    """Without Inception weights, 'auto' FID falls back to FID-fmnist only for Fashion-MNIST-like images."""
    from erase.diffusion.generation import save_png

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for i in range(2):
        save_png(torch.rand(3, 16, 16), tmp_path / "imgs" / f"{i}.png")
    err = _one_line_error(capsys, ["images", str(tmp_path / "imgs"), "--label", "garbage truck", "--metrics", "fid"])
    assert "--inception-weights" in err and "--metrics concept,nudenet" in err and "fmnist-classifier" not in err


def test_clip_score_and_zero_shot_accuracy_on_generated_images(world, tmp_path, tiny_hf_clip):  # noqa: F811
    out = tmp_path / "gen"
    assert run_cli(gen_main, ["--base", str(world["sd"]), "--prompts", str(world["prompts"]), "--output-dir", str(out),
                              *FAST]) == 0
    args = ["images", str(out), "--metrics", "concept", "--clip-model", str(tiny_hf_clip), "--classifier", "clip"]
    assert run_cli(eval_main, args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["clip_score"]["values"]["base"] <= 100 and EVALUATOR_KEYS <= set(m["clip_score"]["evaluator"])
    assert "zero-shot" in m["concept_accuracy"]["evaluator"]["name"]
    assert set(m["concept_accuracy"]["per_concept"]["base"]) == {"trouser", "bag"}
