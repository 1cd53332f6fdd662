"""Concept accuracy: does a judge classifier still see the concept in the generated images?

Judges (``--classifier``):

- an erase classifier folder or bundled name (``fmnist-classifier`` judges Fashion-MNIST concepts);
- ``torchvision:ARCH`` (default ``torchvision:resnet50``) with ImageNet weights from a local file
  (``--classifier-weights``, or torchvision's file already in the torch hub cache): ImageNet-class
  concepts such as the Imagenette classes, matched to ImageNet indices by torchvision's category names;
- ``clip``: open_clip / transformers CLIP zero-shot over the prompt set's concepts ("a photo of a {c}").

Accuracy for a concept = share of the images generated for it that the judge assigns to it, x100;
UA (unlearning accuracy) of the erased concept = 100 - its accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch.nn import functional as F
from torchmetrics import Metric

from erase.captions import CLASS_NAMES
from erase.classifier.models import classify, load_classifier
from erase.errors import EraseError
from erase.metrics.clip import HOW
from erase.metrics.fid import _sha256
from erase.storage import list_bundled_models, load_safetensors, resolve_model_dir, torch_load_safe

ZERO_SHOT_TEMPLATE = "a photo of a {}"


@dataclass
class Judge:
    class_names: list[str]
    predict: Callable[[torch.Tensor], torch.Tensor]   # float RGB/gray [0, 1] (N, C, H, W) -> class ids (N,)
    info: dict
    aliases: dict[str, str] | None = None             # other names -> a class name (e.g. "pants" -> "trouser")

    def index(self, concept: str) -> int | None:
        c = concept.strip().lower()
        c = (self.aliases or {}).get(c, c)
        lower = [n.lower() for n in self.class_names]
        if c in lower:
            return lower.index(c)
        if c.isdigit() and int(c) < len(self.class_names):
            return int(c)
        return None


class ConceptAccuracy(Metric):
    """update(preds (N,), targets (N,) judge class ids); compute() -> per-class accuracy x100 (NaN: no images)."""

    full_state_update = False
    higher_is_better = None  # higher for retained concepts, lower for the erased one

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        k = self.total.numel()
        self.total += torch.bincount(targets, minlength=k)
        self.correct += torch.bincount(targets[preds == targets], minlength=k)

    def compute(self) -> torch.Tensor:
        acc = 100.0 * self.correct.double() / self.total.double()
        return torch.where(self.total > 0, acc, torch.full_like(acc, float("nan")))


def _sha(path: Path) -> str:
    return _sha256(path)[:16]


def erase_classifier_judge(spec: str, device="cpu") -> Judge:
    folder = resolve_model_dir(spec, kind="classifier")
    clf = load_classifier(folder).to(device).eval()
    cfg = clf.config
    aliases = {}
    if Path(spec).name == "fmnist-classifier" or cfg.class_names[:2] == ["t-shirt", "trouser"]:
        aliases = {s: name for name, syn in CLASS_NAMES.items() for s in syn}
    info = {"name": f"{spec} ({cfg.arch}, width {cfg.width}, {cfg.num_classes} classes)",
            "version": f"erase {version('erase') if _installed('erase') else 'source'}",
            "weights_source": str(folder / "model.safetensors"), "weights_sha256": _sha(folder / "model.safetensors"),
            "threshold": "argmax over classes",
            "input_convention": f"float [0, 1]; RGB averaged to gray when the classifier reads 1 channel (it reads "
                                f"{cfg.in_channels}); bilinear resize to {cfg.image_size}x{cfg.image_size}"}
    return Judge(list(cfg.class_names), lambda x: classify(clf, x), info, aliases)


def _installed(pkg: str) -> bool:
    try:
        version(pkg)
        return True
    except PackageNotFoundError:
        return False


def imagenet_judge(arch: str, weights: str | None, device="cpu") -> Judge:
    """A torchvision ImageNet classifier from a local weights file (never downloaded)."""
    # lazy: torchvision's model zoo is only needed for this judge
    import torchvision
    from torchvision.models import get_model, get_model_weights

    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError) as err:
        raise EraseError(f"torchvision has no ImageNet classifier {arch!r} (e.g. resnet50, vit_b_16)") from err
    default = enum.DEFAULT
    file_name = Path(default.url).name
    path = Path(weights).expanduser() if weights else Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not path.is_file():
        raise EraseError(f"no ImageNet classifier weights{f' at {path}' if weights else ''}: pass --classifier-weights "
                         f"{file_name} (torchvision's {default}; download from {default.url}) or use --classifier clip "
                         "with --clip-model")

    state = load_safetensors(path) if path.suffix == ".safetensors" else torch_load_safe(path)
    model = get_model(arch, weights=None)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise EraseError(f"{path} does not fit torchvision {arch} ({str(err).splitlines()[1][:120]})") from err
    model.to(device).eval()
    tf = default.transforms()
    mean, std = torch.tensor(tf.mean).view(1, 3, 1, 1), torch.tensor(tf.std).view(1, 3, 1, 1)

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=tf.resize_size[0], mode="bilinear", antialias=True, align_corners=False)
        c = tf.crop_size[0]
        top, left = (x.shape[-2] - c) // 2, (x.shape[-1] - c) // 2
        x = (x[..., top:top + c, left:left + c] - mean) / std
        return model(x.to(device)).argmax(1).cpu()

    info = {"name": f"torchvision {arch} (ImageNet-1k, 1000 classes)", "version": f"torchvision {torchvision.__version__}",
            "weights_source": str(path), "weights_sha256": _sha(path), "threshold": "argmax over 1000 ImageNet classes",
            "input_convention": f"float RGB [0, 1]; resize shorter side to {tf.resize_size[0]}, centre crop "
                                f"{tf.crop_size[0]}, ImageNet mean/std ({default} transforms)"}
    return Judge(list(default.meta["categories"]), predict, info)


def clip_judge(bundle, class_names: list[str], template: str = ZERO_SHOT_TEMPLATE) -> Judge:
    """Zero-shot: the class whose prompt ``template.format(name)`` has the highest cosine similarity."""
    if len(class_names) < 2:
        raise EraseError("CLIP zero-shot needs at least two concepts in the prompt set (a 'class' or 'label' column)")
    text = bundle.text_features([template.format(c) for c in class_names])

    def predict(x: torch.Tensor) -> torch.Tensor:
        return (bundle.image_features(x) @ text.T).argmax(1).cpu()

    info = dict(bundle.info, name=f"{bundle.info['name']} zero-shot over {len(class_names)} concepts",
                threshold=f"argmax of cosine similarity to '{template}'")
    return Judge(list(class_names), predict, info)


def build_judge(spec: str, concepts: list[str], weights: str | None = None, clip_bundle=None, device="cpu") -> Judge | None:
    """``spec``: "auto" | "clip" | "torchvision:ARCH" | an erase classifier folder or bundled name.

    "auto" picks the bundled Fashion-MNIST evaluator for Fashion-MNIST concepts, a torchvision
    ResNet-50 for ImageNet concepts when its weights are here (or ``weights`` is given), CLIP
    zero-shot when a CLIP checkpoint was given, and otherwise returns None (no concept accuracy).
    """
    if spec == "clip":
        if clip_bundle is None:
            raise EraseError("--classifier clip needs a CLIP checkpoint: " + HOW)
        return clip_judge(clip_bundle, concepts)
    if spec.startswith("torchvision:"):
        return imagenet_judge(spec.split(":", 1)[1] or "resnet50", weights, device)
    if spec != "auto":
        return erase_classifier_judge(spec, device)
    if not concepts:
        return None

    fmnist = {s for syn in CLASS_NAMES.values() for s in syn}
    if all(c.lower() in fmnist for c in concepts):
        if "fmnist-classifier" in list_bundled_models():
            return erase_classifier_judge("fmnist-classifier", device)
    # lazy: torchvision's model zoo is only needed for this judge
    from torchvision.models import ResNet50_Weights

    imagenet = {n.lower() for n in ResNet50_Weights.DEFAULT.meta["categories"]}
    local = Path(torch.hub.get_dir()) / "checkpoints" / Path(ResNet50_Weights.DEFAULT.url).name
    if all(c.lower() in imagenet for c in concepts) and (weights or local.is_file()):
        return imagenet_judge("resnet50", weights, device)
    if clip_bundle is not None:
        return clip_judge(clip_bundle, concepts)
    return None
