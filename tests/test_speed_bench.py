"""The SD-scale speed benchmark, run on tiny configs: every measurement comes out in the JSON and the table."""

from __future__ import annotations

import json

import pytest

from erase.bench import speed
from erase.errors import EraseError


def test_tiny_benchmark_writes_json_and_markdown(tmp_path):
    assert speed.main(["--tiny", "--in-process", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "speed_tiny.json").read_text())
    assert data["scale"] == "tiny" and data["torch_threads"] == 1 and data["machine"]["torch"]
    assert list(data["measurements"]) == speed.MEASUREMENTS
    for name, r in data["measurements"].items():
        assert "error" not in r, (name, r.get("error"))
        assert r["main_s"] > 0 and r["peak_rss_gb"] > 0 and all(v >= 0 for v in r["times"].values())
    uce = data["measurements"]["uce-100"]
    assert uce["matrices"] == 8 and uce["erase_rows"] == 100  # 4 attn2 (down, mid, 2 up) × {to_k, to_v}; 1 token each
    assert uce["times"]["load_to_saved_s"] >= uce["times"]["edit_s"]
    for name in ("esd-x", "esd-u", "esd-x+gc"):
        assert "esd_iter_s" in data["measurements"][name]["times"]
    esd_x, esd_u = data["measurements"]["esd-x"], data["measurements"]["esd-u"]
    assert 0 < esd_x["trainable_params"] < esd_u["trainable_params"]
    md = (tmp_path / "speed_tiny.md").read_text()
    assert "# Speed at tiny scale" in md
    assert all(f"\n| {n} | " in md for n in speed.MEASUREMENTS)
    assert "cumulative" in md  # in-process peaks are not per measurement, and the report says so


def test_a_measurement_in_its_own_process(tmp_path):
    assert speed.main(["--tiny", "--only", "uce-1", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "speed_tiny.json").read_text())
    r = data["measurements"]["uce-1"]
    assert "error" not in r and r["process_s"] > 0 and r["peak_rss_gb"] > 0
    assert "each measurement's own process" in (tmp_path / "speed_tiny.md").read_text()


def test_unknown_measurement_is_refused(tmp_path):
    with pytest.raises(EraseError, match="--only"):
        speed.main(["--tiny", "--only", "uce-7", "--out-dir", str(tmp_path)])


def test_sd14_configs_match_the_published_architecture():
    from diffusers import UNet2DConditionModel

    cfg = speed.SD14["unet"]
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280) and cfg["cross_attention_dim"] == 768
    # Built on the meta device: the SD-1.4 UNet has its known 859.5 M parameters and 16 attn2 blocks.
    with __import__("torch").device("meta"):
        unet = UNet2DConditionModel(**cfg)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 859.5
    assert sum(1 for n, _ in unet.named_modules() if n.endswith("attn2")) == 16


# -- SDXL / SD3 at full size (erase.bench.speed_fullsize): the tiny plan, the estimate and its skip rule --------

def _rows(path):
    return json.loads(path.read_text())


def test_fullsize_families_tiny_rows_refusals_and_merge(tmp_path):
    only = "esd-x,esd-x+bf16,esd-u+lora+gc,salun+lora,uce-1,den:lora+gc,den:esd-x+bf16"
    for family in ("sd3", "sdxl"):
        assert speed.main(["--family", family, "--tiny", "--in-process", "--only", only, "--out-dir", str(tmp_path)]) == 0
    data = _rows(tmp_path / "speed_fullsize_tiny.json")
    assert set(data["families"]) == {"sd3", "sdxl"}  # the second run kept the first family's section
    for family, section in data["families"].items():
        rows = section["measurements"]
        assert list(rows) == only.split(",")
        for name in ("esd-x", "esd-x+bf16", "esd-u+lora+gc", "den:lora+gc", "den:esd-x+bf16"):
            r = rows[name]["result"]
            assert "error" not in r, (family, name, r.get("error"))
            assert r["main_s"] > 0 and r["peak_rss_gb"] > 0 and r["trainable_params"] > 0
        assert "bfloat16" in rows["esd-x+bf16"]["result"]["autocast_dtypes"]  # autocast really ran in bf16
        # counted in coordinates, also where the masks speak for whole tensors
        assert rows["esd-x"]["result"]["trainable_params"] == section["text_attention_params"]
        assert "bfloat16" in rows["den:esd-x+bf16"]["result"]["autocast_dtypes"]
        assert rows["esd-u+lora+gc"]["result"]["lora_rank"] == 4
        assert "saliency mask" in rows["salun+lora"]["refused"] and "result" not in rows["salun+lora"]
        for r in rows.values():
            assert r["estimate"]["total_gib"] > 0 and "= " in r["estimate"]["arithmetic"]
    sd3_uce = data["families"]["sd3"]["measurements"]["uce-1"]["result"]  # the context embedder, and the pooled edit
    assert sd3_uce["matrices"] == 1 and sd3_uce["times"]["pooled_s"] > 0
    assert data["families"]["sdxl"]["measurements"]["uce-1"]["result"]["matrices"] > 0
    assert "pooled_s" not in data["families"]["sdxl"]["measurements"]["uce-1"]["result"]["times"]
    assert data["families"]["sd3"]["t5"]["params"] > 4.7e9 and data["families"]["sdxl"]["t5"] is None
    md = (tmp_path / "speed_fullsize_tiny.md").read_text()
    assert "## SDXL base 1.0 (tiny size)" in md and "## SD3-medium (without T5) (tiny size)" in md
    assert all(f"\n| {n} | " in md for n in only.split(","))
    assert "refused by the method" in md and "an estimate of GPU memory, not a measurement" in md
    # A later --only run replaces its own rows and keeps the family's others, each naming the run it came from.
    assert speed.main(["--family", "sdxl", "--tiny", "--in-process", "--only", "uce-1", "--budget-gib", "0.5",
                       "--out-dir", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "speed_fullsize_tiny.json")["families"]["sdxl"]["measurements"]
    assert list(rows) == only.split(",") and "skipped" in rows["uce-1"] and "run" not in rows["uce-1"]
    assert rows["esd-x"]["result"]["main_s"] > 0 and rows["esd-x"]["run"]["budget_gib"] == 14
    assert "(earlier run: " in (tmp_path / "speed_fullsize_tiny.md").read_text()


def test_skip_rule_runs_nothing_over_budget(tmp_path):
    # Every tiny estimate carries the 1 GiB base: a 0.5 GiB budget leaves nothing to run (and nothing is built).
    assert speed.main(["--family", "sdxl", "--tiny", "--in-process", "--only", "esd-x,den:lora,salun+lora",
                       "--budget-gib", "0.5", "--out-dir", str(tmp_path)]) == 0
    section = _rows(tmp_path / "speed_fullsize_tiny.json")["families"]["sdxl"]
    rows = section["measurements"]
    for name in ("esd-x", "den:lora"):
        assert rows[name]["skipped"].startswith("not run: estimated") and "0.5 GiB budget" in rows[name]["skipped"]
        assert "result" not in rows[name]
    assert "refused" in rows["salun+lora"]  # a refusal is reported as such, whatever the budget
    assert section["build"] == {"skipped": "nothing to measure"}
    assert "| esd-x | " in (tmp_path / "speed_fullsize_tiny.md").read_text()


def test_full_size_plan_counts_and_estimates():
    """The published configs build the published parameter counts; the estimate skips what cannot fit in 14 GiB."""
    from erase.bench import speed_fullsize as fs
    from erase.bench.speed_configs import FULL

    names = ["esd-x", "esd-u", "esd-x+lora", "uce-1", "den:lora+gc", "den:esd-u"]
    sdxl_facts, sdxl = fs.plan("sdxl", FULL["sdxl"], 256, names, 14.0)
    assert all(v["match"] for v in fs.published_check("sdxl", sdxl_facts["params"]).values())
    assert sdxl_facts["params"]["unet"] == 2_567_463_684
    # Full-weight ESD-u on SDXL: weights + teacher + Adam on 2 B parameters, ~47 GiB: not run.
    assert sdxl["esd-u"]["estimate"]["total_gib"] > 40 and sdxl["esd-u"]["skipped"].startswith("not run")
    assert "esd-x" in sdxl and "skipped" in sdxl["esd-x"]
    assert "skipped" not in sdxl["den:lora+gc"] and sdxl["den:lora+gc"]["estimate"]["total_gib"] < 14
    sd3_facts, sd3 = fs.plan("sd3", FULL["sd3"], 256, names, 14.0)
    assert all(v["match"] for v in fs.published_check("sd3", sd3_facts["params"]).values())
    assert "refused" not in sd3["uce-1"]  # UCE edits SD3's context embedder
    assert sd3_facts["activations_gib"]["gib"] < sd3_facts["activations_gib"]["plain_gib"]  # checkpointing saves
    # The arithmetic adds up: the terms held throughout plus the larger phase.
    e = sd3["esd-x"]["estimate"]
    held = sum(v for k, v in e["terms_gib"].items() if not k.startswith(("setup ", "step ")))
    phase = max(sum(v for k, v in e["terms_gib"].items() if k.startswith(p)) for p in ("setup ", "step "))
    assert abs(held + phase - e["total_gib"]) < 0.02


def test_estimate_covers_the_sd14_measurements():
    from pathlib import Path

    from erase.bench.speed_fullsize import calibration

    rows = {r["measurement"]: r for r in calibration(Path(__file__).parents[1] / "results" / "speed.json")}
    for name in ("esd-x", "esd-x+gc", "esd-u", "esd-u+gc", "uce-1"):
        assert rows[name]["covers"], rows[name]


def test_prompt_rows_match_the_task(tmp_path):
    from erase.bench.speed_fullsize import PROMPT_ROWS
    from erase.bench.speed_measure import _task
    from tests.tiny_diffusion import tiny_sd3

    assert len(_task(tiny_sd3(tmp_path / "m")).embeds) == PROMPT_ROWS


def test_memory_limit_fails_the_process_not_the_machine():
    import subprocess
    import sys

    code = ("from erase.bench.speed_memory import limit_memory; import torch; limit_memory({gib}); "
            "torch.ones(2**28, dtype=torch.uint8); torch.ones(2**30, dtype=torch.uint8)")
    over = subprocess.run([sys.executable, "-c", code.format(gib=0.5)], capture_output=True, text=True)
    assert over.returncode != 0 and ("alloc" in over.stderr.lower() or "memory" in over.stderr.lower())
    under = subprocess.run([sys.executable, "-c", code.format(gib=4)], capture_output=True, text=True)
    assert under.returncode == 0, under.stderr[-500:]


def test_flux_estimate_counts_from_the_architecture():
    from erase.bench.speed_flux import flux_estimate, text_attention_by_hand

    f = flux_estimate()
    assert f["params"]["transformer"] == f["published_transformer"] == 11_901_408_320
    assert f["text_attention"] == text_attention_by_hand() == 717_464_320
    assert f["lora_params"]["16"] == 4 * f["lora_params"]["4"] > 0
    lo, hi = f["activation_range_gib"]
    assert 0 < lo < hi
    assert f["kind"] == "estimate, not a measurement"


def test_unknown_fullsize_measurement_is_refused(tmp_path):
    with pytest.raises(EraseError, match="--only"):
        speed.main(["--family", "sd3", "--tiny", "--only", "uce-1+gc", "--out-dir", str(tmp_path)])
    with pytest.raises(EraseError, match="--only"):
        speed.main(["--family", "sd3", "--tiny", "--only", "den:lora+lora", "--out-dir", str(tmp_path)])


def test_reestimate_keeps_results_and_flags_rows_now_over_budget(tmp_path):
    assert speed.main(["--family", "sd3", "--tiny", "--in-process", "--only", "den:lora+bf16,salun+lora",
                       "--out-dir", str(tmp_path)]) == 0
    path = tmp_path / "speed_fullsize_tiny.json"
    data = _rows(path)
    section = data["families"]["sd3"]
    row = section["measurements"]["den:lora+bf16"]
    measured = row["result"]
    row["estimate"]["total_gib"] = 0.01  # as if an older formula had estimated it
    section["budget_gib"] = 0.5  # and the budget were lower than the current estimate
    path.write_text(json.dumps(data))
    assert speed.main(["--family", "sd3", "--tiny", "--reestimate", "--out-dir", str(tmp_path)]) == 0
    row = _rows(path)["families"]["sd3"]["measurements"]["den:lora+bf16"]
    assert row["result"] == measured and row["estimate_at_run"]["total_gib"] == 0.01
    assert row["estimate"]["total_gib"] > 0.5 and "autocast" in row["estimate"]["arithmetic"]
    assert "a rerun would not run it" in row["note"]
    assert "(at run: 0.0)" in (tmp_path / "speed_fullsize_tiny.md").read_text()
