"""Shared command-line plumbing: user errors become one line on stderr and exit status 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    # lazy: the command's --help answers without importing torch
    from erase.errors import EraseError

    if (note := one_process_of_many()) is not None:
        print(note, file=sys.stderr)
    try:
        return main(argv) or 0
    except EraseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130




_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def one_process_of_many(env=None) -> str | None:
    """A warning when ``accelerate launch --num_processes N`` (N > 1) started this as its only process.

    accelerate's simple launcher (``--cpu``, or fewer than two GPUs) runs the script once; it sets
    MASTER_PORT for N > 1 but no world size, which only torchrun (``--multi_gpu``) or mpirun set.
    """
    env = os.environ if env is None else env
    if "ACCELERATE_USE_CPU" not in env or "MASTER_PORT" not in env or any(v in env for v in _WORLD_SIZE_VARS):
        return None
    return ("warning: accelerate launch started only this one process although more were asked for (its plain "
            "launcher, used with --cpu or under two GPUs, starts one); for N processes on CPU or GPUs use "
            "`accelerate launch --multi_gpu --num_processes N ...` or `torchrun --nproc_per_node N ...`")
