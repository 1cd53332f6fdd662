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
