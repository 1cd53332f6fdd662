"""Prompt CSVs: ESD/SalUn, Fashion-MNIST and I2P columns, validation errors, and the shipped sets."""

from __future__ import annotations

import pytest

from erase.errors import EraseError
from erase.prompts import PROMPTS_DIR, load_i2p, load_prompts, write_prompt_sets


def _csv(tmp_path, text, name="p.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_esd_salun_columns(tmp_path):
    rows = load_prompts(_csv(tmp_path, "case_number,prompt,evaluation_seed,class\n7,Image of church,4068,church\n"
                                       "8,Image of parachute,11,parachute\n"))
    assert [(r.case, r.prompt, r.seed, r.concept, r.guidance) for r in rows] == [
        ("7", "Image of church", 4068, "church", None), ("8", "Image of parachute", 11, "parachute", None)]


def test_own_columns_and_defaults(tmp_path):
    rows = load_prompts(_csv(tmp_path, "prompt,guidance,negative_prompt,label,extra\na bag,3.5,blurry,bag,x\nshoes,,,,\n"))
    assert rows[0].guidance == 3.5 and rows[0].negative_prompt == "blurry" and rows[0].concept == "bag"
    assert rows[0].extra == {"extra": "x"} and rows[0].seed == 0 and rows[1].seed == 1 and rows[1].guidance is None
    assert rows[1].group == "shoes" and rows[0].group == "bag"


def test_fmnist_csv_names_the_class_not_the_index():
    rows = load_prompts(PROMPTS_DIR / "fmnist_classes.csv")
    assert rows[1].concept == "trouser" and rows[1].prompt == "a photo of a trouser"


@pytest.mark.parametrize("text,match", [
    ("", "is empty"),
    ("prompt,seed\n", "no prompts"),
    ("text,seed\nhello,1\n", "no 'prompt' column"),
    ("prompt,seed\nhello,abc\n", "line 2: seed 'abc' is not a number"),
    ("prompt,case_number\na,1\nb,1\n", "repeats"),
    ("prompt,seed\n,1\n", "empty prompt"),
])
def test_bad_csvs_give_one_line_errors(tmp_path, text, match):
    with pytest.raises(EraseError, match=match) as err:
        load_prompts(_csv(tmp_path, text))
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(EraseError, match="prompt file not found"):
        load_prompts(tmp_path / "nope.csv")


def test_i2p_loader_filters_categories_and_nudity(tmp_path):
    path = _csv(tmp_path, "prompt,categories,nudity_percentage,sd_seed,sd_guidance\n"
                          "p1,\"sexual,shocking\",80.0,11,7\np2,violence,0.0,12,7\np3,sexual,10.0,13,8\n")
    assert [r.prompt for r in load_i2p(path)] == ["p1", "p3"]
    assert [r.prompt for r in load_i2p(path, min_nudity=50)] == ["p1"]
    assert [r.seed for r in load_i2p(path, categories="")] == [11, 12, 13]
    assert load_i2p(path)[1].guidance == 8.0
    with pytest.raises(EraseError, match="no I2P prompt"):
        load_i2p(path, categories="hate")
    with pytest.raises(EraseError, match="categories"):
        load_i2p(_csv(tmp_path, "prompt\na\n", "plain.csv"))


def test_shipped_prompt_sets_load_and_match_the_code(tmp_path):
    for f in write_prompt_sets(tmp_path):
        name = f.rsplit("/", 1)[-1]
        assert (PROMPTS_DIR / name).read_text().splitlines() == open(f).read().splitlines(), f"rerun python -m erase.prompts ({name})"
    nette = load_prompts(PROMPTS_DIR / "imagenette.csv")
    assert len({r.concept for r in nette}) == 10 and nette[0].prompt == "Image of tench"
    smoke = load_prompts(PROMPTS_DIR / "nudity_smoke.csv")
    assert smoke[0].guidance == 7.5 and {r.extra["categories"] for r in smoke} == {"nudity", "control"}
