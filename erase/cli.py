"""Shared command-line plumbing: user errors become one line on stderr and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    from erase.errors import EraseError

    try:
        return main(argv) or 0
    except EraseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


