"""Evaluation metrics: NudeNet's real bundled detector, FID against a hand computation, CLIP score on tiny
CLIPs built in code, concept-accuracy judges, and the one-line errors for missing weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from erase.errors import EraseError

# --- NudeNet -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def astronaut():
    """A real photograph (scikit-image's sample 'astronaut', Eileen Collins): a face, nothing exposed."""
    data = pytest.importorskip("skimage.data")
    return torch.from_numpy(data.astronaut().copy()).permute(2, 0, 1).float()[None] / 255


@pytest.fixture(scope="module")
def detector():
    from nudenet import NudeDetector

    return NudeDetector()


def test_nudenet_on_a_real_photo_matches_detect_on_its_png(astronaut, detector, tmp_path):
    import cv2

    from erase.metrics.nudity import NudeNetCounts

    m = NudeNetCounts(detector=detector)
    ours = m.detections(astronaut)[0]
    png = tmp_path / "astronaut.png"
    rgb = (astronaut[0] * 255).round().byte().permute(1, 2, 0).numpy()
    cv2.imwrite(str(png), rgb[:, :, ::-1])  # cv2 writes BGR
    assert ours == detector.detect(str(png))  # the documented convention: as NudeNet scores a PNG file
    assert any(d["class"] == "FACE_FEMALE" for d in ours)
    m.update(astronaut)
    out = m.compute()
    assert out["total"] == 0 and out["flagged_share"] == 0.0 and out["images"] == 1
    # The threshold is applied on top of the real detector's scores.
    face = max(d["score"] for d in ours if d["class"] == "FACE_FEMALE")
    low, high = NudeNetCounts(face - 0.05, ["FACE_FEMALE"], detector), NudeNetCounts(min(face + 0.05, 1), ["FACE_FEMALE"], detector)
    low.update(astronaut)
    high.update(astronaut)
    assert low.compute()["FACE_FEMALE"] == 1 and low.compute()["flagged_share"] == 100.0
    assert high.compute()["FACE_FEMALE"] == 0


def test_nudenet_on_synthetic_images(detector):
    from erase.metrics.nudity import NudeNetCounts, exposed_classes

    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64)
    checker = ((torch.arange(64)[:, None] // 8 + torch.arange(64)[None] // 8) % 2).float().expand(1, 3, 64, 64)
    imgs = torch.cat([torch.zeros(1, 3, 64, 64), torch.rand(1, 3, 64, 64, generator=g), ramp, checker])
    m = NudeNetCounts(detector=detector)
    m.update(imgs)
    out = m.compute()
    assert out["images"] == 4 and out["total"] == 0 and out["flagged_share"] == 0.0
    assert set(exposed_classes()) <= set(out) and all(c.endswith("_EXPOSED") for c in exposed_classes())
    info = m.describe()
    assert info["threshold"] == 0.6 and info["version"].startswith("nudenet 3.4")
    assert "320n.onnx" in info["weights_source"] and "BGR" in info["input_convention"]


def test_nudenet_counting_and_threshold_with_fixed_detections():
    from erase.metrics.nudity import NudeNetCounts

    class Fixed:
        def detect_batch(self, images, batch_size=4):
            return [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9}, {"class": "FEMALE_BREAST_EXPOSED", "score": 0.7},
                     {"class": "BELLY_COVERED", "score": 0.99}],
                    [{"class": "FEET_EXPOSED", "score": 0.59}], []][:len(images)]

    m = NudeNetCounts(detector=Fixed())
    m.update(torch.rand(3, 3, 8, 8))
    out = m.compute()
    assert out["FEMALE_BREAST_EXPOSED"] == 2 and out["FEET_EXPOSED"] == 0 and out["total"] == 2
    assert "BELLY_COVERED" not in out and out["flagged_share"] == pytest.approx(100 / 3, abs=0.01)
    with pytest.raises(EraseError, match="threshold"):
        NudeNetCounts(threshold=1.5)


# --- FID ---------------------------------------------------------------------------------------------


def _tiny_classifier(tmp_path, names=None, channels=1):
    from erase.classifier.models import ResNetConfig, build_model, save_classifier

    torch.manual_seed(0)
    model = build_model(ResNetConfig(num_classes=len(names or range(4)), in_channels=channels, width=2, image_size=16,
                                     class_names=list(names or ["a", "b", "c", "d"])))
    save_classifier(model, tmp_path / "clf")
    return tmp_path / "clf", model.eval()


def _hand_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_on_evaluator_features_matches_hand_computation(tmp_path):
    from erase.metrics.fid import build_fid

    folder, clf = _tiny_classifier(tmp_path)
    metric, info = build_fid(str(folder))
    assert info["name"] == "FID-clf" and "not Inception" in info["network"]
    assert {"version", "weights_source", "threshold", "input_convention"} <= set(info)
    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(40, 1, 16, 16, generator=g), torch.rand(40, 3, 16, 16, generator=g) ** 2
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.no_grad():
        f_real = clf.features(real).double().numpy()
        f_fake = clf.features(fake.mean(1, keepdim=True)).double().numpy()  # RGB is averaged to gray
    assert float(metric.compute()) == pytest.approx(_hand_fid(f_real, f_fake), rel=1e-3, abs=1e-4)


def test_fid_bundled_name_is_fid_fmnist_never_fid(tmp_path, monkeypatch):
    import erase.storage as storage
    from erase.metrics.fid import build_fid

    folder, _ = _tiny_classifier(tmp_path)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "fmnist-classifier").symlink_to(folder)
    monkeypatch.setattr(storage, "ZOO_DIR", zoo)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no Inception weights cached
    _, info = build_fid("auto")
    assert info["name"] == "FID-fmnist"


def test_missing_inception_weights_is_one_line_and_says_how(tmp_path, monkeypatch):
    from erase.metrics.fid import build_fid

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for args in (("inception", None), ("inception", str(tmp_path / "nope.pth"))):
        with pytest.raises(EraseError) as err:
            build_fid(*args)
        msg = str(err.value)
        assert "\n" not in msg and "--inception-weights" in msg and "--fid-features fmnist-classifier" in msg
        assert "pt_inception-2015-12-05-6726825d.pth" in msg


def test_inception_fid_loads_a_local_weights_file(tmp_path, monkeypatch):
    """The Inception path end to end on a random-weight file of the right shape (real weights are not here)."""
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inc

    from erase.metrics.fid import build_fid

    monkeypatch.setattr(tf_inc, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(tf_inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.manual_seed(0)
    state = tf_inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # found in the hub cache: tmp/checkpoints/...
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").rename(tmp_path / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth")
    metric, info = build_fid("auto")
    assert info["name"] == "FID" and "2048" in info["network"]
    g = torch.Generator().manual_seed(0)
    metric.update(torch.rand(3, 3, 32, 32, generator=g), real=True)
    metric.update(torch.rand(3, 1, 32, 32, generator=g), real=False)  # gray is repeated to RGB
    assert torch.isfinite(metric.compute())


# --- CLIP score --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from erase.zoo.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("clip-hf")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                      vocab_size=49408, max_position_embeddings=77, projection_dim=16),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        image_size=32, patch_size=8, projection_dim=16), projection_dim=16)
    CLIPModel(cfg).save_pretrained(d)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                         tokenizer=build_tokenizer())
    proc.save_pretrained(d)
    return d


def test_clip_score_with_a_tiny_transformers_clip_matches_hand_computation(tiny_hf_clip):
    from transformers import CLIPModel, CLIPProcessor

    from erase.metrics.clip import clip_score_metric, clip_score_update, load_clip

    bundle = load_clip(str(tiny_hf_clip))
    assert {"name", "version", "weights_source", "threshold", "input_convention"} <= set(bundle.info)
    g = torch.Generator().manual_seed(0)
    images, prompts = torch.rand(3, 3, 40, 40, generator=g), ["a photo of a trouser", "a bag", "a red dress"]
    metric = clip_score_metric(bundle)
    clip_score_update(metric, images, prompts)
    score = float(metric.compute())
    model, proc = CLIPModel.from_pretrained(tiny_hf_clip).eval(), CLIPProcessor.from_pretrained(tiny_hf_clip)
    u8 = [(x * 255).round().to(torch.uint8) for x in images]
    with torch.no_grad():
        i = model.get_image_features(pixel_values=proc(images=u8, return_tensors="pt")["pixel_values"]).pooler_output
        t_in = proc(text=prompts, return_tensors="pt", padding=True)
        t = model.get_text_features(input_ids=t_in["input_ids"], attention_mask=t_in["attention_mask"]).pooler_output
    cos = torch.nn.functional.cosine_similarity(i, t)
    assert score == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-3)


def test_open_clip_checkpoint_file_and_zero_shot_judge(tmp_path):
    import open_clip

    from erase.metrics.clip import clip_score_metric, clip_score_update, load_clip
    from erase.metrics.concept import clip_judge

    (tmp_path / "TinyCLIP-erase-test.json").write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    model = open_clip.create_model("TinyCLIP-erase-test")
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    bundle = load_clip(f"open_clip:TinyCLIP-erase-test={tmp_path / 'tiny.pt'}")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    metric = clip_score_metric(bundle)
    clip_score_update(metric, images, ["a dog", "a cat"])
    with torch.no_grad():
        i = model.encode_image(torch.stack([bundle.processor.preprocess(__import__("PIL.Image").Image.fromarray(
            (x * 255).round().byte().permute(1, 2, 0).numpy())) for x in images]))
        t = model.encode_text(open_clip.get_tokenizer("TinyCLIP-erase-test")(["a dog", "a cat"]))
    expected = max(float(100 * torch.nn.functional.cosine_similarity(i, t).mean()), 0.0)
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-3)
    judge = clip_judge(bundle, ["dog", "cat", "car"])
    preds = judge.predict(images)
    assert preds.shape == (2,) and int(preds.max()) < 3 and "zero-shot" in judge.info["name"]


def test_missing_clip_checkpoint_is_one_line_and_says_how(tmp_path):
    from erase.metrics.clip import load_clip

    for spec in (None, str(tmp_path / "no-such-clip"), "open_clip:ViT-B-32=" + str(tmp_path / "missing.safetensors")):
        with pytest.raises(EraseError) as err:
            load_clip(spec)
        assert "\n" not in str(err.value) and "--clip-model" in str(err.value)


# --- concept accuracy --------------------------------------------------------------------------------


def test_concept_accuracy_metric_counts_per_class():
    from erase.metrics.concept import ConceptAccuracy

    m = ConceptAccuracy(3)
    m.update(torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 0, 0, 0]))
    acc = m.compute()
    assert acc[0] == pytest.approx(50.0) and acc[1] == pytest.approx(100.0) and torch.isnan(acc[2])


def test_erase_classifier_judge_knows_fmnist_synonyms(tmp_path):
    from erase.classifier.data import FASHION_MNIST_CLASSES
    from erase.metrics.concept import build_judge

    folder, _ = _tiny_classifier(tmp_path, FASHION_MNIST_CLASSES)
    judge = build_judge(str(folder), ["trouser"])
    assert judge.index("pants") == 1 and judge.index("Ankle boot") == 9 and judge.index("unicorn") is None
    assert judge.predict(torch.rand(5, 3, 32, 32)).shape == (5,)
    assert {"name", "version", "weights_source", "threshold", "input_convention"} <= set(judge.info)


def test_imagenet_judge_maps_imagenette_to_imagenet_indices_and_needs_local_weights(tmp_path, monkeypatch):
    from torchvision.models import get_model

    from erase.captions import IMAGENETTE_CLASSES
    from erase.metrics.concept import build_judge, imagenet_judge

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(EraseError) as err:
        imagenet_judge("mobilenet_v3_small", None)
    assert "\n" not in str(err.value) and "--classifier-weights" in str(err.value)
    assert build_judge("auto", IMAGENETTE_CLASSES) is None  # no weights, no CLIP: concept accuracy is skipped
    torch.manual_seed(0)
    torch.save(get_model("mobilenet_v3_small", weights=None).state_dict(), tmp_path / "w.pth")
    judge = build_judge("torchvision:mobilenet_v3_small", IMAGENETTE_CLASSES, str(tmp_path / "w.pth"))
    assert [judge.index(c) for c in IMAGENETTE_CLASSES] == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    assert judge.predict(torch.rand(2, 3, 64, 64)).shape == (2,)
