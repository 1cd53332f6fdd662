"""Classifier datasets held in memory as tensors, and forget/retain splits.

Every dataset here is small enough to keep as one uint8 tensor, so batches are gathered by
indexing (fast on a CPU, no worker processes) and a batch is fully determined by its indices,
which is what makes resumed runs bit-identical.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from erase.errors import EraseError

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEFAULT_AGE_BINS = (0, 13, 20, 30, 45, 60)


class ImageTensorDataset(Dataset):
    """Images as uint8 (N, C, H, W) plus integer labels; items are float images in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], pad_to: int | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        self.images, self.labels, self.class_names = images, labels.long(), list(class_names)
        self.pad_to = pad_to

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        if self.pad_to:
            h = w = self.pad_to
        return (c, h, w)

    def head(self, n: int) -> ImageTensorDataset:
        """The first ``n`` examples (the stored datasets are already shuffled across classes)."""
        return ImageTensorDataset(self.images[:n], self.labels[:n], self.class_names, self.pad_to)

    def get_batch(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx].float().div_(255)
        if self.pad_to and x.shape[-1] < self.pad_to:
            p = (self.pad_to - x.shape[-1]) // 2
            x = torch.nn.functional.pad(x, (p, self.pad_to - x.shape[-1] - p) * 2)
        return {"image": x, "label": self.labels[idx], "index": idx}

    def __getitem__(self, i):
        b = self.get_batch([i])
        return {k: v[0] for k, v in b.items()}


# --- loaders -------------------------------------------------------------------------------------

def _read_idx_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist_files(root: Path | None) -> Path | None:
    # A root the user named is the only place looked at: falling back to Debian's copy behind their
    # back would train on other data than they pointed to.
    candidates = [root, root / "FashionMNIST" / "raw"] if root is not None else [FASHION_MNIST_DEBIAN]
    for d in candidates:
        if (Path(d) / "train-images-idx3-ubyte.gz").is_file():
            return Path(d)
    return None


@functools.lru_cache(maxsize=4)
def _read_fashion_mnist(directory: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 1, 28, 28), int64 labels) of one split, decoded once per process and folder."""
    prefix = "train" if train else "t10k"
    images = torch.from_numpy(_read_idx_gz(directory / f"{prefix}-images-idx3-ubyte.gz").copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx_gz(directory / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
    return images, labels


def load_fashion_mnist(train: bool, root: str | None = None, download: bool = False, pad_to: int | None = None):
    """Fashion-MNIST from ``root``, the Debian package's folder, or a torchvision download.

    The decoded files are cached per process (a benchmark builds hundreds of tasks from them, and a
    diffusion run reads the test set for FID): every call returns a new dataset object around the
    same image and label tensors, so callers must treat ``images`` and ``labels`` as read-only
    (``head``, ``get_batch`` and the tasks only slice, index and copy them).
    """
    root_p = Path(root).expanduser() if root else None
    if root_p is not None and not root_p.is_dir() and not download:
        raise EraseError(f"--data-root {root} does not exist (or is not a folder); leave it out to use "
                         f"{FASHION_MNIST_DEBIAN}, or add --download to fetch Fashion-MNIST into it")
    d = _fashion_mnist_files(root_p)
    if d is None and download:
        # lazy: torchvision's model zoo is only needed for this judge
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root_p or "data"), train=True, download=True)
        FashionMNIST(str(root_p or "data"), train=False, download=True)
        d = _fashion_mnist_files(root_p or Path("data"))
    if d is None and root_p is not None:
        raise EraseError(f"no Fashion-MNIST files (train-images-idx3-ubyte.gz ...) in --data-root {root}; add "
                         f"--download to fetch them there, or leave --data-root out to use {FASHION_MNIST_DEBIAN}")
    if d is None:
        raise EraseError(
            "Fashion-MNIST not found: install it with `apt-get install dataset-fashion-mnist` "
            f"(files land in {FASHION_MNIST_DEBIAN}), or pass --data-root DIR --download"
        )
    images, labels = _read_fashion_mnist(d.resolve(), train)
    return ImageTensorDataset(images, labels, FASHION_MNIST_CLASSES, pad_to=pad_to)


# Cached per process like Fashion-MNIST's files (callers share the returned dataset: read-only).
@functools.lru_cache(maxsize=4)
def _load_cifar(cls_name: str, train: bool, root: str | None, download: bool):
    # lazy: torchvision's model zoo is only needed for this judge
    import torchvision.datasets as tvd

    root = root or "data"
    try:
        ds = getattr(tvd, cls_name)(root, train=train, download=download)
    except RuntimeError as err:
        raise EraseError(f"{cls_name} not found under {root!r}: pass --data-root DIR, or add --download") from err
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ImageTensorDataset(images, torch.tensor(ds.targets), list(ds.classes))


def load_utkface(train: bool, root: str | None, age_bins=DEFAULT_AGE_BINS, image_size: int = 32,
                 test_fraction: float = 0.2, seed: int = 0):
    """A face-age folder in UTKFace naming: ``{age}_{gender}_{race}_{date}.jpg``.

    Ages are binned by ``age_bins`` (left edges); the train/test split is a fixed seeded shuffle.
    """
    if not root or not Path(root).is_dir():
        raise EraseError("face-age data needs --data-root pointing at a folder of UTKFace-named images "
                         "(e.g. 26_0_2_20170104023102422.jpg)")
    pat = re.compile(r"^(\d+)_(\d)_(\d)_\d+.*\.(jpg|jpeg|png)$", re.I)
    files = sorted(p for p in Path(root).rglob("*") if pat.match(p.name))
    if not files:
        raise EraseError(f"no UTKFace-named images (age_gender_race_date.jpg) under {root}")
    bins = list(age_bins)
    names = [f"{a}-{b - 1}" for a, b in zip(bins, bins[1:])] + [f"{bins[-1]}+"]
    perm = np.random.default_rng(seed).permutation(len(files))
    n_test = int(round(test_fraction * len(files)))
    chosen = perm[n_test:] if train else perm[:n_test]
    imgs, labels = [], []
    for i in sorted(chosen):
        age = int(pat.match(files[i].name).group(1))
        labels.append(int(np.searchsorted(bins, age, side="right") - 1))
        with Image.open(files[i]) as im:
            imgs.append(np.asarray(im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)))
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return ImageTensorDataset(images, torch.tensor(labels), names)


DATASETS = {
    "fashion-mnist": lambda train, root, download, **kw: load_fashion_mnist(train, root, download, kw.get("pad_to")),
    "cifar10": lambda train, root, download, **kw: _load_cifar("CIFAR10", train, root, download),
    "cifar100": lambda train, root, download, **kw: _load_cifar("CIFAR100", train, root, download),
    "face-age": lambda train, root, download, **kw: load_utkface(
        train, root, **{k: v for k, v in kw.items() if k in ("age_bins", "image_size")}),
}

# Means/stds of the training images, stored inside every model (see models.py).
DATASET_STATS = {
    "fashion-mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "face-age": ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]),
}


def dataset_key(name: str) -> str:
    """``--dataset`` spelled as DATASETS keys it ("Fashion_MNIST" -> "fashion-mnist")."""
    return name.strip().lower().replace("_", "-")


def load_dataset(name: str, train: bool, root: str | None = None, download: bool = False, **kwargs) -> ImageTensorDataset:
    key = dataset_key(name)
    if key not in DATASETS:
        raise EraseError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[key](train, root or os.environ.get("ERASE_DATA_ROOT"), download, **kwargs)


# --- forget specifications -----------------------------------------------------------------------

@dataclass
class ForgetSplit:
    """Which training examples to forget, and the test examples that measure generalisation.

    For class forgetting the test set is split too: ``test`` holds the kept classes (TA) and
    ``test_forget`` the forgotten ones (reported separately; a retrained model scores ~0 there).
    """

    spec: str
    forget: torch.Tensor
    retain: torch.Tensor
    test: torch.Tensor
    test_forget: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    forget_classes: list[int] = field(default_factory=list)
    duplicates_dropped: int = 0  # ids an indices file listed more than once (each example is forgotten once)


def parse_forget_spec(spec: str, train: ImageTensorDataset, test: ImageTensorDataset, seed: int = 0) -> ForgetSplit:
    """``random:0.1`` | ``class:3`` (or ``class:3,5`` / ``class:trouser``) | ``indices:FILE`` | ``none``."""
    n = len(train)
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    all_idx = torch.arange(n)
    test_idx = torch.arange(len(test))
    if kind == "none":
        return ForgetSplit(spec, torch.zeros(0, dtype=torch.long), all_idx, test_idx)
    if kind == "random":
        try:
            frac = float(arg)
        except ValueError:
            raise EraseError(f"forget spec {spec!r}: expected random:FRACTION, e.g. random:0.1") from None
        if not 0 < frac < 1:
            raise EraseError(f"forget fraction must be in (0, 1), got {frac}")
        k = int(round(frac * n))
        if k == 0:
            raise EraseError(f"forget spec {spec!r} selects no example out of {n}")
        g = torch.Generator().manual_seed(seed)
        forget = torch.randperm(n, generator=g)[:k].sort().values
        return ForgetSplit(spec, forget, _complement(forget, n), test_idx)
    if kind == "class":
        classes = []
        for tok in filter(None, (t.strip() for t in arg.split(","))):
            if tok.isdigit():
                c = int(tok)
            elif tok.lower() in [c.lower() for c in train.class_names]:
                c = [c.lower() for c in train.class_names].index(tok.lower())
            else:
                raise EraseError(f"unknown class {tok!r}; classes are 0..{train.num_classes - 1} or names: "
                                 f"{', '.join(train.class_names)}")
            if not 0 <= c < train.num_classes:
                raise EraseError(f"class {c} out of range: this dataset has classes 0..{train.num_classes - 1}")
            classes.append(c)
        if not classes:
            raise EraseError(f"forget spec {spec!r}: expected class:INDEX, e.g. class:3")
        cls = torch.tensor(classes)
        in_forget = torch.isin(train.labels, cls)
        forget = all_idx[in_forget]
        if len(forget) == 0:
            raise EraseError(f"forget spec {spec!r} selects no training example")
        test_in = torch.isin(test.labels, cls)
        return ForgetSplit(spec, forget, all_idx[~in_forget], test_idx[~test_in], test_idx[test_in], classes)
    if kind == "indices":
        path = Path(arg).expanduser()
        if not path.is_file():
            raise EraseError(f"indices file not found: {path}")
        try:
            with warnings.catch_warnings():  # an empty file gets our own error below, not numpy's warning too
                warnings.simplefilter("ignore", UserWarning)
                raw = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.int64, delimiter=",", ndmin=1)
        except ValueError as err:
            raise EraseError(f"{path}: expected integer indices, one per line or comma-separated ({err})") from None
        listed = np.asarray(raw, dtype=np.int64).ravel()
        forget = torch.as_tensor(np.unique(listed))
        if len(forget) == 0:
            raise EraseError(f"indices file {path} is empty: the forget set would be empty")
        bad = forget[(forget < 0) | (forget >= n)]
        if len(bad):
            raise EraseError(f"indices file {path} has {len(bad)} id(s) outside 0..{n - 1}, e.g. {int(bad[0])}")
        dropped = len(listed) - len(forget)
        if dropped:  # said out loud: the forget set is smaller than the file's line count suggests
            print(f"note: indices file {path} lists {dropped} duplicate id(s); dropped them, forgetting "
                  f"{len(forget)} distinct examples", file=sys.stderr)
        return ForgetSplit(spec, forget, _complement(forget, n), test_idx, duplicates_dropped=dropped)
    raise EraseError(f"unknown forget spec {spec!r}; use random:0.1, class:3 or indices:FILE")


def _complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    return torch.arange(n)[keep]
