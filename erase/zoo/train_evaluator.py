"""Train ``fmnist-classifier``, the evaluator that judges every bundled generator.

    python -m erase.zoo.train_evaluator --output erase/zoo/fmnist-classifier

Training is erase's own engine: ``python -m erase.classifier.pretrain`` (the ``retrain`` recipe
with nothing forgotten) with DESIGN.md §6's recipe: CIFAR-stem ResNet-18 at width 16 on the
60 k training images padded to 32x32, 4 epochs of one-cycle SGD (lr 0.1, momentum 0.9, weight
decay 5e-4, batch 128), label smoothing 0.1, flip + 2-px shift. This script then ships the result:
fp16 weights (they load into the fp32 model), class names in the config, test accuracy in the card.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from erase.classifier.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from erase.classifier.models import load_classifier, save_classifier
from erase.classifier.pretrain import main as pretrain
from erase.zoo.common import machine, read_json, write_record


@torch.no_grad()
def test_accuracy(model, test, batch: int = 1000) -> float:
    correct = 0
    for i in range(0, len(test), batch):
        b = test.get_batch(range(i, min(i + batch, len(test))))
        correct += (model(b["image"]).argmax(1) == b["label"]).sum().item()
    return round(100.0 * correct / len(test), 2)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="model folder to write (e.g. erase/zoo/fmnist-classifier)")
    p.add_argument("--work-dir", default="work/zoo/evaluator", help="the engine's run folder")
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)


    work = Path(args.work_dir)
    recipe = ["--dataset", "fashion-mnist", "--width", str(args.width), "--pad-to", "32", "--epochs", str(args.epochs),
              "--lr", "0.1", "--label-smoothing", "0.1", "--batch-size", "128", "--augment", "--seed", str(args.seed),
              "--output-dir", str(work), "--checkpoint-every", "200"]
    t0, trained = time.perf_counter(), False
    if not (work / "model.safetensors").is_file():
        trained = True
        resume = ["--resume"] if (work / "checkpoints").is_dir() else ["--overwrite"]
        rc = pretrain(recipe + resume)
        if rc:
            raise SystemExit(f"erase.classifier.pretrain failed with status {rc}")
    seconds = time.perf_counter() - t0
    if not trained:  # shipping an earlier run again: keep the wall time that run recorded
        seconds = (read_json(Path(args.output) / "card.json", {}).get("training") or {}).get("seconds", 0.0)

    model = load_classifier(work).eval()
    model.config = dataclasses.replace(model.config, class_names=list(FASHION_MNIST_CLASSES))
    save_classifier(model.half(), args.output)  # fp16 on disk; load_classifier loads into fp32 parameters
    shipped = load_classifier(args.output).eval()
    acc = test_accuracy(shipped, load_fashion_mnist(train=False, pad_to=32))
    write_record(args.output, "training", {
        "recipe": {"epochs": args.epochs, "width": args.width, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                   "weight_decay": 5e-4, "batch_size": 128, "lr_schedule": "onecycle", "label_smoothing": 0.1,
                   "augment": "flip + 2-px shift", "seed": args.seed},
        "params": sum(q.numel() for q in shipped.parameters()), "test_accuracy": acc,
        "seconds": round(seconds, 1), "machine": machine(),
        "where": "trained with erase's engine (python -m erase.classifier.pretrain)",
        "command": "python -m erase.zoo.train_evaluator " + " ".join(argv)})
    print(f"evaluator: test accuracy {acc} % (fp16 weights), {seconds:.0f} s")


if __name__ == "__main__":
    main()
