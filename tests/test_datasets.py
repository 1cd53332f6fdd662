"""Dataset loaders and forget specifications on small real or synthetic files."""

import numpy as np
import pytest
import torch
from PIL import Image

from erase.classifier.data import load_dataset, parse_forget_spec
from erase.errors import EraseError
from tests.conftest import needs_fmnist


def _utkface(folder, ages):
    rng = np.random.default_rng(0)
    for i, age in enumerate(ages):
        arr = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{age}_{i % 2}_{i % 5}_2017010402310{i:04d}.jpg.chip.jpg")


def test_face_age_folder_bins_ages(tmp_path):
    ages = [1, 5, 12, 13, 19, 20, 29, 30, 44, 45, 59, 60, 80, 99, 3, 33, 50, 70, 15, 25]
    _utkface(tmp_path, ages)
    (tmp_path / "notes.txt").write_text("not an image")
    train = load_dataset("face-age", True, str(tmp_path), image_size=16)
    test = load_dataset("face-age", False, str(tmp_path), image_size=16)
    assert len(train) + len(test) == len(ages) and len(test) == 4
    assert train.images.shape[1:] == (3, 16, 16)
    assert train.class_names == ["0-12", "13-19", "20-29", "30-44", "45-59", "60+"]
    all_labels = sorted(torch.cat([train.labels, test.labels]).tolist())
    expected = sorted(int(np.searchsorted([0, 13, 20, 30, 45, 60], a, side="right") - 1) for a in ages)
    assert all_labels == expected


def test_face_age_errors(tmp_path):
    with pytest.raises(EraseError, match="--data-root"):
        load_dataset("face-age", True, None)
    with pytest.raises(EraseError, match="no UTKFace-named images"):
        load_dataset("face-age", True, str(tmp_path))


@needs_fmnist
def test_fashion_mnist_and_forget_specs(tmp_path):
    train = load_dataset("fashion-mnist", True)
    test = load_dataset("fashion-mnist", False)
    assert len(train) == 60000 and len(test) == 10000 and train.images.dtype == torch.uint8
    assert train.get_batch([0, 1])["image"].shape == (2, 1, 28, 28)
    assert load_dataset("fashion-mnist", True, pad_to=32).get_batch([0])["image"].shape == (1, 1, 32, 32)
    s = parse_forget_spec("random:0.1", train, test, seed=3)
    assert len(s.forget) == 6000 and len(s.retain) == 54000 and not set(s.forget.tolist()) & set(s.retain.tolist())
    assert torch.equal(s.forget, parse_forget_spec("random:0.1", train, test, seed=3).forget)
    c = parse_forget_spec("class:trouser", train, test)
    assert c.forget_classes == [1] and (train.labels[c.forget] == 1).all() and (test.labels[c.test] != 1).all()
    f = tmp_path / "ids.txt"
    f.write_text("5\n3\n5\n")
    assert parse_forget_spec(f"indices:{f}", train, test).forget.tolist() == [3, 5]
