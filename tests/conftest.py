"""Shared fixtures: a tiny in-memory task and model so engine tests run in milliseconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from erase.engine.streams import DataView

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ERASE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow real-data check: set ERASE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class TensorSet:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def get_batch(self, idx):
        idx = torch.as_tensor(idx)
        return {"image": self.x[idx], "label": self.y[idx], "index": idx}


class ToyTask:
    """A 4-class problem on 16-d inputs with the classifier task's vocabulary."""

    name = "classifier"
    eval_batch_size = 32
    trains_adapters = False

    def __init__(self, n=96, seed=0, num_classes=4):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % num_classes
        x = torch.randn(n, 16, generator=g) + 2.0 * F.one_hot(y, 16).float()
        self.num_classes = num_classes
        data = TensorSet(x, y)
        forget = torch.arange(0, n, 8)
        retain = torch.tensor([i for i in range(n) if i % 8])
        self.views = {"forget": DataView(data, forget), "retain": DataView(data, retain)}
        self.eval_views = dict(self.views)

    def iterate(self, name, augment=False):
        return self.eval_views[name].batches(self.eval_batch_size)

    def logits(self, model, batch):
        return model(batch["image"])

    def loss(self, model, batch, label_smoothing=0.0):
        return F.cross_entropy(model(batch["image"]), batch["label"], label_smoothing=label_smoothing)

    def relabel(self, batch):
        return {**batch, "label": torch.randint(0, self.num_classes, batch["label"].shape)}


def toy_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture
def toy_task():
    return ToyTask()


def make_ctx(task, model, tmp_path, grad_accum=1, seed=0):
    from accelerate import Accelerator

    from erase.engine import RunContext

    acc = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    return RunContext(accelerator=acc, model=model, task=task, views=task.views, output_dir=Path(tmp_path),
                      seed=seed, grad_accum=grad_accum)


needs_fmnist = pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST not installed (make data)")
