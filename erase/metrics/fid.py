"""FID with torchmetrics ``FrechetInceptionDistance``: Inception when its weights are here, else a named network.

- **FID** (the number papers report): the 2048-d pool features of torch-fidelity's Inception-v3
  (``pt_inception-2015-12-05-6726825d.pth``, the TF-FID port). Only when the weights file is given
  (``--inception-weights``) or already sits in the torch hub cache: erase never downloads it.
- **FID-<name>** (e.g. FID-fmnist): the same Frechet distance on another network's features, here
  the penultimate features of an erase classifier (the bundled ``fmnist-classifier``). Comparable
  only with itself, so it never carries the bare name "FID".

Input convention for ``update``: float images in [0, 1], (N, C, H, W), RGB or gray. For Inception
they are converted to uint8 RGB (gray repeated to 3 channels) and resized inside torchmetrics to
299 x 299; for an evaluator they are averaged to gray when it reads one channel and resized to its
input size.
"""

from __future__ import annotations

import hashlib
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from erase.classifier.models import load_classifier
from erase.errors import EraseError
from erase.storage import resolve_model_dir, torch_load_safe

INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
NO_INCEPTION = ("no Inception weights: pass --inception-weights pt_inception-2015-12-05-6726825d.pth (download from "
                f"{INCEPTION_URL}) or use --fid-features fmnist-classifier")


class EvaluatorFeatures(nn.Module):
    """An erase classifier's penultimate features as a torchmetrics FID feature network.

    Input: images in [0, 1], float, (N, 1 or 3, H, W); output (N, d). RGB is averaged to gray for a
    one-channel classifier, and images are resized to the classifier's input size.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.fc.in_features

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs.float()
        cfg = getattr(self.classifier, "config", None)
        channels = cfg.in_channels if cfg is not None else 1
        if x.shape[1] != channels:
            x = x.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
        if cfg is not None and x.shape[-1] != cfg.image_size:
            x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True, align_corners=False)
        return self.classifier.features(x)


def fid_metric(classifier: nn.Module):
    """FID on an erase classifier's features; update() takes images in [0, 1] (``normalize=True``)."""
    # lazy: torchmetrics' image/multimodal metrics pull in heavy extras
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=EvaluatorFeatures(classifier), normalize=True)


def fit_reference(metric, images: torch.Tensor, device="cpu", batch_size: int = 500):
    """Feed the real side of an FID metric once; it survives ``reset()``, so one reference serves many models."""
    metric.reset_real_features = False
    for i in range(0, len(images), batch_size):
        metric.update(images[i:i + batch_size].float().to(device), real=True)
    return metric


def find_inception_weights(path: str | None = None) -> Path | None:
    """The weights file named by ``path``, else one already in the torch hub cache, else None."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise EraseError(f"Inception weights file not found: {p}; " + NO_INCEPTION.split(": ", 1)[1])
        return p
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return next((cache / n for n in INCEPTION_FILES if (cache / n).is_file()), None)


class _Uint8Inception(nn.Module):
    """torchmetrics' Inception wrapper reads uint8; this feeds it from [0, 1] floats (gray -> RGB)."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception
        self.num_features = 2048

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.inception((x.float().clamp(0, 1) * 255).round().to(torch.uint8))


def inception_fid(weights: Path):
    """torchmetrics' 2048-d Inception FID from a local weights file (checked to hold tensors only)."""
    try:
        # lazy: torchmetrics' image/multimodal metrics pull in heavy extras
        from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    except ImportError as err:  # pragma: no cover - torchmetrics always has it
        raise EraseError("torchmetrics has no FrechetInceptionDistance; upgrade torchmetrics") from err
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception port lives there)
    except ImportError as err:
        raise EraseError("Inception FID needs torch-fidelity: pip install 'erase[inception]' (or torch-fidelity) "
                         "(or use --fid-features fmnist-classifier)") from err
    try:
        torch_load_safe(weights)  # torch-fidelity unpickles freely; only let plain tensor files through
    except Exception as err:
        raise EraseError(f"{weights} is not a plain PyTorch state dict of the FID Inception network: {err}") from err
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(weights))
    except RuntimeError as err:
        raise EraseError(f"{weights} does not fit the FID Inception network ({str(err).splitlines()[0]}); "
                         f"expected {INCEPTION_FILES[0]}") from err
    return FrechetInceptionDistance(feature=_Uint8Inception(net), normalize=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_fid(features: str = "auto", inception_weights: str | None = None, device="cpu", fmnist_images: bool = True):
    """``features``: "auto" | "inception" | an erase classifier folder or bundled name.

    Returns (metric, evaluator record). "auto" is Inception when its weights are available, else
    the bundled ``fmnist-classifier`` — but only for Fashion-MNIST-like images (``fmnist_images``):
    its features say nothing about photographs, so there "auto" without Inception is an error.
    An explicit "inception" without weights is an error too.
    """
    if features in ("auto", "inception"):
        weights = find_inception_weights(inception_weights)
        if weights is not None:
            info = {"name": "FID", "network": "Inception-v3 (torch-fidelity port of TF-FID), 2048-d pool features",
                    "version": f"torchmetrics {version('torchmetrics')}, torch-fidelity {version('torch-fidelity')}",
                    "weights_source": str(weights), "weights_sha256": _sha256(weights)[:16], "threshold": None,
                    "input_convention": "float RGB in [0, 1] -> uint8 RGB, resized to 299x299 (gray repeated to RGB)"}
            return inception_fid(weights).to(device), info
        if features == "inception":
            raise EraseError(NO_INCEPTION)
        if not fmnist_images:
            raise EraseError(NO_INCEPTION.split(" or use ")[0] + " or leave FID out with --metrics concept,nudenet "
                             "(FID-fmnist only suits Fashion-MNIST-like images)")
        features = "fmnist-classifier"

    try:
        folder = resolve_model_dir(features, kind="classifier")
    except EraseError as err:
        raise EraseError(f"{err}; FID needs a feature network: pass --inception-weights FILE or --fid-features "
                         "CLASSIFIER_DIR") from err
    clf = load_classifier(folder).to(device)
    short = "fmnist" if Path(features).name == "fmnist-classifier" else Path(features).name
    cfg = clf.config
    info = {"name": f"FID-{short}", "network": f"{features} ({cfg.arch}, width {cfg.width}) penultimate features, "
            f"{clf.fc.in_features}-d; not Inception FID", "version": f"torchmetrics {version('torchmetrics')}",
            "weights_source": str(folder / "model.safetensors"),
            "weights_sha256": _sha256(folder / "model.safetensors")[:16], "threshold": None,
            "input_convention": f"float in [0, 1]; RGB averaged to gray when the network reads 1 channel "
                                f"(it reads {cfg.in_channels}), resized to {cfg.image_size}x{cfg.image_size}"}
    return fid_metric(clf).to(device), info
