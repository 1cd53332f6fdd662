"""The classifier task adapter: data views, model loading, losses and metrics for unlearning.

It implements the Task contract (erase/engine/task.py) with the classification extension
(``logits``, ``num_classes``), so the same method file runs on a classifier and on a diffusion model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch.nn import functional as F

from erase.classifier.data import DATASET_STATS, DATASETS, dataset_key, load_dataset, parse_forget_spec
from erase.classifier.models import ResNet18, ResNetConfig, build_model, load_classifier, save_classifier
from erase.engine.streams import DataView, move_to
from erase.engine.task import ClassificationTask, TaskConfig
from erase.errors import EraseError
from erase.fields import opt
from erase.metrics.classifier import unlearning_metrics


@dataclass
class ClassifierConfig(TaskConfig):
    task_name: ClassVar[str] = "classifier"
    dataset: str = opt("fashion-mnist", "dataset: fashion-mnist, cifar10, cifar100 or face-age")
    data_root: str = opt("", "folder holding the dataset (default: Debian's Fashion-MNIST path, or ./data)")
    download: bool = opt(False, "download the dataset with torchvision if it is missing")
    forget: str = opt("class:1", "what to forget: random:FRACTION, class:INDEX[,INDEX] or indices:FILE")
    split_seed: int = opt(0, "seed of the random forget subset (random:FRACTION)")
    original: str = opt("", "the trained model to unlearn from: a folder saved by erase or a bundled name")
    width: int = opt(16, "ResNet-18 base width when training from scratch without --original")
    pad_to: int = opt(0, "zero-pad images to this size (0: keep; the bundled evaluator uses 32)")
    augment: bool = opt(True, "random flip + shift on training batches (as in the original recipe)")
    eval_batch_size: int = opt(512, "batch size for evaluation and gradient statistics")
    eval_max_retain: int = opt(0, "if > 0, estimate RA on this many random retain examples (MIA uses them all)")
    limit_train: int = opt(0, "if > 0, use only the first N training images (quick runs and tests)")
    limit_test: int = opt(0, "if > 0, use only the first N test images")

    def label(self) -> str:
        return self.forget or "run"

    def validate(self) -> None:
        """Range checks: a bad value fails while the config is resolved, before any data or model loads."""
        for name, low in (("width", 1), ("pad_to", 0), ("eval_batch_size", 1), ("eval_max_retain", 0),
                          ("limit_train", 0), ("limit_test", 0)):
            value = getattr(self, name)
            if value < low:
                raise EraseError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        if dataset_key(self.dataset) not in DATASETS:
            raise EraseError(f"unknown dataset {self.dataset!r} (--dataset); choose one of: {', '.join(DATASETS)}")
        if not self.forget.strip():
            raise EraseError("--forget is empty: use random:0.1, class:3 or indices:FILE")
        if self.data_root and not self.download and not Path(self.data_root).expanduser().is_dir():
            raise EraseError(f"--data-root {self.data_root} does not exist (or is not a folder); add --download "
                             "to fetch the dataset into it")


    def base_model(self) -> str:
        return self.original


class ClassifierTask(ClassificationTask):
    name = "classifier"

    def __init__(self, cfg: ClassifierConfig, seed: int = 0, device=None, streams: tuple[str, ...] = ()):
        # Every view is built whatever the method's ``streams``: they are index sets over data loaded once.
        self.cfg = cfg
        self.eval_batch_size = cfg.eval_batch_size
        kw = {"pad_to": cfg.pad_to or None}
        self.train_set = load_dataset(cfg.dataset, True, cfg.data_root or None, cfg.download, **kw)
        self.test_set = load_dataset(cfg.dataset, False, cfg.data_root or None, cfg.download, **kw)
        if cfg.limit_train:
            self.train_set = self.train_set.head(cfg.limit_train)
        if cfg.limit_test:
            self.test_set = self.test_set.head(cfg.limit_test)
        self.num_classes = self.train_set.num_classes
        self.split = parse_forget_spec(cfg.forget, self.train_set, self.test_set, seed=cfg.split_seed)
        self.seed = seed
        aug = self._augment if cfg.augment else None
        self.views = {
            "forget": DataView(self.train_set, self.split.forget, aug),
            "retain": DataView(self.train_set, self.split.retain, aug),
        }
        self.eval_views = {
            "forget": DataView(self.train_set, self.split.forget),
            "retain": DataView(self.train_set, self.split.retain),
            "test": DataView(self.test_set, self.split.test),
        }
        if len(self.split.test_forget):
            self.eval_views["test_forget"] = DataView(self.test_set, self.split.test_forget)

    # -- data -------------------------------------------------------------------------------------
    def _augment(self, batch: dict) -> dict:
        """Random horizontal flip and a random integer shift (2 px for 28-px data, 4 px otherwise)."""
        x = batch["image"]
        n, _, h, w = x.shape
        shift = 2 if h <= 28 or self.cfg.dataset.startswith("fashion") else 4
        flip = torch.rand(n) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        padded = F.pad(x, (shift,) * 4)
        dy, dx = torch.randint(0, 2 * shift + 1, (2, n))
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        return {**batch, "image": out}

    def iterate(self, name: str, augment: bool = False):
        """Every example of a view once, in order (with training augmentation if asked)."""
        views = self.views if augment and name in self.views else self.eval_views
        return views[name].batches(self.cfg.eval_batch_size)

    # -- models -----------------------------------------------------------------------------------
    def model_config(self) -> ResNetConfig:
        c, h, _ = self.train_set.image_shape
        mean, std = DATASET_STATS.get(self.cfg.dataset.lower(), ([0.5] * c, [0.5] * c))
        return ResNetConfig(num_classes=self.num_classes, in_channels=c, width=self.cfg.width,
                            mean=mean, std=std, image_size=h, class_names=self.train_set.class_names)

    def build_model(self, from_scratch: bool, text_encoder: bool = False) -> ResNet18:
        if text_encoder:
            raise EraseError("a classifier has no text encoder to train; this method is for text-to-image models")
        if self.cfg.original:
            original = load_classifier(self.cfg.original)
            oc = original.config
            c, h, _ = self.train_set.image_shape
            if oc.num_classes != self.num_classes or oc.in_channels != c:
                raise EraseError(
                    f"--original {self.cfg.original} was trained for {oc.num_classes} classes x {oc.in_channels} "
                    f"channel(s), but {self.cfg.dataset} has {self.num_classes} x {c}")
            if not from_scratch:
                return original
            config = oc
        elif from_scratch:
            config = self.model_config()
        else:
            raise EraseError("--original is required: the trained model to unlearn from (a folder saved by "
                             "erase, or a bundled name); train one with `python -m erase.classifier.pretrain`")
        torch.manual_seed(self.seed)
        return build_model(config)

    def save_model(self, model, directory: Path) -> None:
        save_classifier(model, directory)

    # -- the method vocabulary --------------------------------------------------------------------
    def logits(self, model, batch: dict) -> torch.Tensor:
        return model(batch["image"])

    def loss(self, model, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["label"], label_smoothing=label_smoothing)

    def relabel(self, batch: dict) -> dict:
        """Random labels drawn uniformly from all classes, fresh per batch.

        As SalUn's reference code does for CIFAR-10 (the true class is not excluded).
        """
        y = batch["label"]
        return {**batch, "label": torch.randint(0, self.num_classes, y.shape, device=y.device)}

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, model, view: DataView, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax probabilities, labels) over a view, in order."""
        was = model.training
        model.eval()
        probs, labels = [], []
        for batch in view.batches(self.cfg.eval_batch_size):
            batch = move_to(batch, device)
            probs.append(F.softmax(self.logits(model, batch).float(), dim=1).cpu())
            labels.append(batch["label"].cpu())
        model.train(was)
        return torch.cat(probs), torch.cat(labels)

    def evaluate(self, model, device="cpu") -> dict:
        views = {k: v for k, v in self.eval_views.items() if len(v)}
        ra_rows = None
        if self.cfg.eval_max_retain and len(views["retain"]) > self.cfg.eval_max_retain:
            g = torch.Generator().manual_seed(self.seed)
            pick = torch.randperm(len(views["retain"]), generator=g)[: self.cfg.eval_max_retain].sort().values
            if "forget" in views:  # MIA's members are every retain example: predict them all, RA reads its rows
                ra_rows = pick
            else:
                views["retain"] = DataView(self.train_set, self.split.retain[pick])
        preds = {name: self.probabilities(model, v, device) for name, v in views.items()}
        metrics = unlearning_metrics(preds, seed=self.seed, ra_rows=ra_rows)
        metrics["settings"] = {
            "dataset": self.cfg.dataset, "forget": self.split.spec,
            "n_forget": len(self.split.forget), "n_retain": len(self.split.retain),
            "n_test": len(self.split.test), "ra_examples": len(views["retain"]) if ra_rows is None else len(ra_rows),
            "test_set": "test examples of the kept classes" if self.split.forget_classes else "full test set",
        }
        if self.split.duplicates_dropped:
            metrics["settings"]["duplicate_ids_dropped"] = self.split.duplicates_dropped
        return metrics

    def describe(self) -> dict:
        return {"task": self.name, **asdict(self.cfg)}
