"""The classifier benchmark command in a tiny mode: files written, resume, failures recorded, budget rule."""

import json

import pytest

from erase.bench.classifier import BenchSettings, method_layer, registered_methods, tuned_fields
from erase.errors import EraseError
from tests.conftest import needs_fmnist


def test_budget_rule_scales_epochs_and_tunes_learning_rates():
    s = BenchSettings(epoch_scale=0.1)
    ft = method_layer("ft", s, 3.0)
    assert ft["epochs"] == pytest.approx(1.0) and ft["lr"] == pytest.approx(0.03)
    s.overrides = {"ft": {"lr": 0.5}}
    assert method_layer("ft", s, 3.0)["lr"] == 0.5  # explicit overrides win
    names = registered_methods(BenchSettings())
    assert "retrain" not in names and {"ft", "salun"} <= set(names)
    from erase.registry import get_method

    for name in names:  # every registered method gets a budget layer and something to tune
        layer = method_layer(name, BenchSettings(), 1.0)
        assert layer["epochs"] >= 0
        assert tuned_fields(name, get_method(name, "classifier").Config()), f"{name} has nothing to tune"


def test_methods_filter_rejects_unknown_names():
    from erase.errors import EraseError

    with pytest.raises(EraseError, match="unknown classifier method"):
        registered_methods(BenchSettings(methods=["ft", "nope"]))


@needs_fmnist
def test_benchmark_tiny_end_to_end(tmp_path):
    from erase.bench.classifier import main

    res = tmp_path / "results" / "bench"
    argv = ["--methods", "ft,ga", "--seeds", "1", "--scenarios", "random:0.1", "--limit-train", "300", "--limit-test", "200",
            "--eval-max-retain", "200", "--epochs", "0.5", "--lr-grid", "1,3", "--threads", "1",
            "--set", "ga.lr=1e30",  # a diverging run: recorded as failed, the benchmark goes on
            "--out-dir", str(tmp_path / "runs"), "--results", str(res)]
    assert main(argv) == 0
    data = json.loads(res.with_suffix(".json").read_text())
    rows = data["scenarios"]["random:0.1"]["rows"]
    assert rows["retrain"]["summary"]["avg_gap"]["mean"] == 0.0
    ft = rows["ft"]
    assert ft["status"] == "done" and len(ft["tuning"]) == 2 and ft["summary"]["n"] == 1
    assert {"UA", "RA", "TA", "MIA", "avg_gap", "RTE_s", "RTE_ratio"} <= set(ft["summary"])
    assert rows["ga"]["status"] == "failed" and rows["ga"]["error"]
    md = res.with_suffix(".md").read_text()
    assert "| ft |" in md and "failed" in md and "budget rule" in md
    assert (res.parent / "bench_gaps.png").stat().st_size > 1000
    # rerun: every run is read back, nothing is trained again
    assert main(argv) == 0
    again = json.loads(res.with_suffix(".json").read_text())
    assert again["new_runs_this_invocation"] == 0
    assert again["scenarios"]["random:0.1"]["rows"]["ft"]["summary"] == ft["summary"]


def test_diffusion_benchmark_shards_partition_the_plan():
    from erase.bench import diffusion

    args = diffusion.build_parser().parse_args(["--seeds", "2"])
    for key in ("concepts", "ddpm_concepts", "sd_methods", "ddpm_methods"):
        setattr(args, key, getattr(args, key).split(","))
    n = len(diffusion.plan(args))
    assert n == 2 * (2 * 6 + 1 * 4)
    assert diffusion.parse_shard("") is None and diffusion.parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "x", "1-2"):
        with pytest.raises(EraseError):
            diffusion.parse_shard(bad)
