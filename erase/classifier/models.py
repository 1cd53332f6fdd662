"""ResNet-18 with the CIFAR stem, the classifier every unlearning paper in this field uses.

The CIFAR stem is a 3x3 stride-1 convolution with no max-pool, so 28x28 and 32x32 images keep
their resolution through the first stage. ``width`` is the channel count of the first stage
(64 is the standard ResNet-18; 16 gives a 0.7 M-parameter model that trains on a laptop CPU).
Inputs are images in [0, 1]; normalisation lives inside the model as buffers, so a saved
checkpoint carries its own preprocessing and can judge generated images directly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from erase.errors import EraseError
from erase.storage import atomic_write_json, load_state_dict_strict, resolve_model_dir, save_safetensors


@dataclass
class ResNetConfig:
    num_classes: int = 10
    in_channels: int = 3
    width: int = 64
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    image_size: int = 32
    class_names: list[str] = field(default_factory=list)
    arch: str = "resnet18-cifar"

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError("num_classes must be at least 2")
        if self.width < 1 or self.in_channels < 1:
            raise ValueError("width and in_channels must be positive")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            # The projection shortcut: challenge methods (reinit_kp) exclude it from re-initialisation.
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        c, w = config.in_channels, config.width
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, -1, 1, 1))
        self.conv1 = nn.Conv2d(c, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        layers, in_planes = [], w
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = w * 2**i
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(in_planes, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled) features of images in [0, 1]."""
        x = (x - self.mean) / self.std
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_model(config: ResNetConfig) -> ResNet18:
    if config.arch != "resnet18-cifar":
        raise EraseError(f"unknown classifier architecture {config.arch!r}; supported: resnet18-cifar")
    return ResNet18(config)


def save_classifier(model: ResNet18, directory: str | Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` atomically into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), directory / "model.safetensors")
    atomic_write_json(asdict(model.config), directory / "config.json")


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> ResNet18:
    """Load a classifier folder (or a bundled zoo name) saved by :func:`save_classifier`."""
    directory = resolve_model_dir(path, kind="classifier")
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise EraseError(f"{directory} has no config.json; is it a classifier saved by erase?")
    try:
        fields = json.loads(cfg_file.read_text())
        config = ResNetConfig(**fields)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EraseError(f"{cfg_file} is not readable JSON ({str(err).splitlines()[0]}); copy the model again") from None
    except (TypeError, ValueError) as err:  # unknown or missing fields, impossible sizes
        raise EraseError(f"{cfg_file} is not an erase classifier config ({err})") from None
    model = build_model(config)
    load_state_dict_strict(model, directory / "model.safetensors", map_location=map_location)
    return model


@torch.no_grad()
def classify(evaluator, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Evaluator class ids for images in [0, 1] (any channel count or size; adapted to the evaluator)."""
    cfg = evaluator.config
    device = next(evaluator.parameters()).device
    preds = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float()
        if x.shape[1] != cfg.in_channels:
            x = x.mean(1, keepdim=True).expand(-1, cfg.in_channels, -1, -1)
        if x.shape[-1] != cfg.image_size:
            x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True, align_corners=False)
        preds.append(evaluator(x).argmax(1).cpu())
    return torch.cat(preds)
