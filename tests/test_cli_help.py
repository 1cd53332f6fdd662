"""What a newcomer meets first: --help of train.py (both tasks, the flagship first), evaluate.py and generate.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _help(script: str, *args: str) -> str:
    res = subprocess.run([sys.executable, str(ROOT / "erase" / script), *args, "--help"], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _has_flag(text: str, flag: str) -> bool:
    return re.search(rf"^[ \t]+{flag}[ ,\n]", text, flags=re.M) is not None  # --forget, not --forget-images


def _groups(text: str) -> list[str]:
    return re.findall(r"^(\S[^\n]*):$", text, flags=re.M)


def test_plain_help_shows_both_tasks_diffusion_first_and_the_methods_of_each():
    text = _help("train.py")
    for flag in ("--concept", "--model", "--save-format", "--forget", "--original", "--resume", "--method"):
        assert _has_flag(text, flag), flag
    groups = _groups(text)
    diffusion = next(i for i, g in enumerate(groups) if g.startswith("diffusion task"))
    classifier = next(i for i, g in enumerate(groups) if g.startswith("classifier task"))
    assert diffusion < classifier
    assert re.search(r"^methods for diffusion: .*esd-x", text, flags=re.M)
    assert re.search(r"^methods for classifier: .*retrain", text, flags=re.M)
    assert "--method NAME" in text and "accelerate launch erase/train.py --concept trouser" in text
    # The flagship example comes before the classifier ones.
    assert text.index("--concept trouser") < text.index("--forget class:1")


def test_method_help_adds_its_group_for_the_tasks_it_supports():
    esd = _help("train.py", "--method", "esd-x")
    assert "method esd-x:" in esd and "--negative-guidance" in esd
    assert _has_flag(esd, "--concept") and not _has_flag(esd, "--forget")  # esd-x is diffusion-only
    salun = _help("train.py", "--concept", "trouser", "--method", "salun")
    assert "method salun:" in salun and "--mask-fraction" in salun
    assert "on diffusion these defaults apply instead: --optimizer adam" in salun
    assert not _has_flag(salun, "--original")  # the task is chosen: only its flags


def test_evaluate_and_generate_help_answer_without_loading_torch():
    for script in ("evaluate.py", "generate.py"):
        res = subprocess.run([sys.executable, "-c", f"import sys, runpy; sys.argv = ['{script}', '--help']\n"
                              f"try:\n    runpy.run_path('{ROOT / 'erase' / script}', run_name='__main__')\n"
                              "except SystemExit as e:\n    assert not e.code\n"
                              "print('torch loaded:', 'torch' in sys.modules)"],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "--output-dir" in res.stdout and res.stdout.strip().endswith("torch loaded: False"), script
