"""Two CPU processes through `accelerate launch` split each batch: the same run as one process, within noise.

accelerate 1.x starts ONE process for `accelerate launch --cpu --num_processes N` (its multi-CPU path
needs mpirun and --mpirun_hostfile); `--multi_gpu --num_processes N` goes through torchrun and, with
no GPU, gives N CPU processes (MULTI_CPU, gloo). The README documents that command; this test runs it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import needs_fmnist
from tests.test_cli import QUICK, original  # noqa: F401  (the tiny saved classifier fixture)

ROOT = Path(__file__).resolve().parents[1]
# No augmentation: its random flips are drawn per process, which would add noise of their own.
TRAIN = ["--method", "ft", "--forget", "class:3", "--max-steps", "30", "--lr", "0.01", "--batch-size", "64",
         "--weight-decay", "0", "--no-augment"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(launcher: list[str], out: Path, model: Path) -> tuple[dict, str]:
    cmd = [*launcher, str(ROOT / "erase" / "train.py"), *QUICK, *TRAIN, "--original", str(model),
           "--output-dir", str(out)]  # TRAIN after QUICK: its --batch-size wins
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "started only this one process" not in res.stderr
    return json.loads((out / "metrics.json").read_text()), json.loads((out / "run.json").read_text())["machine"]


@needs_fmnist
def test_accelerate_launch_runs_two_cpu_processes_that_match_one(tmp_path, original):  # noqa: F811
    one, machine_one = _run([sys.executable], tmp_path / "one", original)
    two, machine_two = _run([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port())],
                            tmp_path / "two", original)
    assert "2 processes" in machine_two and "processes" not in machine_one
    # The untrained original scores ~10 %; both runs learned, and they agree far closer than the ~17
    # points two seeds of the one-process run differ by here. They are not bit-identical: batch-norm
    # statistics come from each process's half batch (plain DDP, no SyncBatchNorm).
    assert one["TA"] > 30 and two["TA"] > 30, (one["TA"], two["TA"])
    for k in ("RA", "TA"):
        assert abs(one[k] - two[k]) <= 5.0, (k, one[k], two[k])


def test_a_launch_that_starts_one_process_of_several_says_so_and_names_the_command_that_works():
    cmd = [*ACCELERATE, "--cpu", "--num_processes", "2", "--main_process_port", str(_free_port()),
           str(ROOT / "erase" / "train.py"), "--list-methods"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "salun" in res.stdout
    warning = [line for line in res.stderr.splitlines() if "started only this one process" in line]
    assert len(warning) == 1 and "--multi_gpu --num_processes N" in warning[0] and "torchrun" in warning[0]


def test_the_one_process_signature_is_accelerates_plain_launcher_only():
    from erase.cli import one_process_of_many

    plain = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert one_process_of_many(plain) is not None
    assert one_process_of_many({**plain, "WORLD_SIZE": "2"}) is None  # torchrun (accelerate --multi_gpu)
    assert one_process_of_many({**plain, "PMI_SIZE": "2"}) is None  # mpirun
    assert one_process_of_many({"ACCELERATE_USE_CPU": "True"}) is None  # --num_processes 1: no port is set
    assert one_process_of_many({"MASTER_PORT": "29500"}) is None  # not launched by accelerate
