"""``python -m erase.zoo check [--quick]`` and ``python -m erase.zoo list``."""

import sys

from erase.errors import EraseError


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n  check  quality check of the bundled generators (see `check --help`)\n"
              "  list   names of the bundled models")
        return 0
    try:
        if argv[0] == "check":
            # lazy: the command's --help answers without importing torch
            from erase.zoo.check import main as check

            check(argv[1:])
        elif argv[0] == "list":
            # lazy: the command's --help answers without importing torch
            from erase.storage import list_bundled_models

            print("\n".join(list_bundled_models()))
        else:
            raise EraseError(f"unknown command {argv[0]!r}; use `check` or `list`")
    except EraseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
