"""Deterministic, resumable data streams.

A stream walks a view of a dataset in epochs; epoch ``e`` is a permutation drawn from a generator
seeded by (seed, stream name, e). Its whole state is the number of batches drawn, so a resumed
run continues with exactly the batches an uninterrupted run would have seen. Under several
processes every global batch is split by rank (like accelerate's ``split_batches=True``), so the
global batch size does not depend on the number of processes.
"""

from __future__ import annotations

import math
import zlib

import torch


class DataView:
    """A subset of an in-memory dataset (anything with ``get_batch(indices)`` and ``__len__``)."""

    def __init__(self, dataset, indices: torch.Tensor | None = None, transform=None):
        self.dataset = dataset
        self.indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, positions: torch.Tensor) -> dict:
        batch = self.dataset.get_batch(self.indices[positions])
        return self.transform(batch) if self.transform else batch

    def batches(self, batch_size: int):
        """Every example once, in order (for evaluation and statistics)."""
        for start in range(0, len(self), batch_size):
            yield self.get_batch(torch.arange(start, min(start + batch_size, len(self))))


class Stream:
    def __init__(self, view: DataView, batch_size: int, seed: int, name: str,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if len(view) == 0:
            raise ValueError(f"stream {name!r} is empty")
        self.view, self.batch_size, self.name = view, batch_size, name
        self.seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.batches_per_epoch = math.ceil(len(view) / batch_size)
        self.position = 0  # batches drawn so far: the stream's whole state
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(len(self.view), generator=g)
            else:
                self._perm = torch.arange(len(self.view))
            self._epoch = epoch
        return self._perm

    def next(self) -> dict:
        epoch, k = divmod(self.position, self.batches_per_epoch)
        chunk = self._permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        self.position += 1
        if self.world_size > 1:
            chunk = chunk[self.rank::self.world_size]
        return self.view.get_batch(chunk)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def move_to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch
