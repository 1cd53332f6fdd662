"""Train an original classifier with the documented recipe (the ``retrain`` method, nothing forgotten).

    python -m erase.classifier.pretrain --dataset fashion-mnist --width 16 --epochs 4 --output-dir runs/original

Takes every flag of ``erase/train.py --method retrain``; the result is a folder usable as ``--original``.
"""

import sys


def main(argv=None) -> int:
    # lazy: the command's --help answers without importing torch
    from erase.train import main as train_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--method" or a.startswith("--method=") for a in argv):
        # lazy: the command's --help answers without importing torch
        from erase.errors import EraseError

        raise EraseError("pretrain always uses the retrain recipe; drop --method")
    return train_main(["--method", "retrain", "--forget", "none", *argv])


if __name__ == "__main__":
    from erase.cli import run_cli

    sys.exit(run_cli(main))
