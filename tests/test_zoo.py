"""The bundled model zoo: offline loading, fast generation, the derived tokenizer, the check command."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from erase import captions
from erase.storage import ZOO_DIR
from erase.zoo.tokenizer import build_tokenizer, clean_text

SAMPLES = [
    "a photo of a trouser",
    "An IMAGE of a T-shirt/top!! (ankle-boot?) #42, 3.14 & more...",
    "don't it's we're I'll they've",
    "  lots   of\n\twhitespace  ",
    "über-große Schuhe ÄÖÜ, naïve café",
    "emoji 👟👖 and 中文 text",
    "",
    " ".join(["sneaker"] * 120),  # longer than 77 tokens: truncated, end-of-text kept last
]
UNICODE_SAMPLES = ["“curly” ‘quotes’ — ﬁne ＡＢＣ", "&amp; &lt;tag&gt;"]


def bundled(name: str):
    d = ZOO_DIR / name
    if not d.is_dir() or not any(d.iterdir()):
        pytest.skip(f"bundled model {name} is not present in {ZOO_DIR} (train it with erase.zoo.train_*)")
    return d


def _open_clip_ids(texts):
    open_clip = pytest.importorskip("open_clip")
    return open_clip.tokenizer.SimpleTokenizer()(texts)


def _compare(tok, texts, clean=False):
    ref = _open_clip_ids(texts)
    ours = tok([clean_text(t) if clean else t for t in texts], padding="max_length", max_length=77,
               truncation=True, return_tensors="pt").input_ids
    assert ours.shape == ref.shape == (len(texts), 77)
    for r, o, text in zip(ref, ours, texts):
        n = int((r == 49407).nonzero()[0]) + 1  # up to and including end-of-text
        assert o[:n].tolist() == r[:n].tolist(), text
        assert (o[n:] == 49407).all()  # SD 1.x padding (open_clip pads with 0)


def test_tokenizer_matches_open_clip():
    tok = build_tokenizer()
    assert tok.model_max_length == 77 and len(tok) == 49408
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    _compare(tok, SAMPLES)
    _compare(tok, SAMPLES + UNICODE_SAMPLES, clean=True)


def test_shipped_tokenizer_matches_open_clip():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(bundled("fmnist-tiny-sd") / "tokenizer")
    _compare(tok, SAMPLES)


def test_held_out_captions_are_never_trained_but_their_words_are():
    train = set(captions.all_training_captions())
    words = {w for c in train for w in re.findall(r"[a-z-]+", c)}
    for label in range(10):
        held = captions.held_out_captions(label)
        assert held and not set(held) & train
        assert {w for c in held for w in re.findall(r"[a-z-]+", c)} <= words
    assert any("pants" in c for c in captions.held_out_captions(1))
    assert captions.class_prompt(1) == "a photo of a trouser"
    ids = captions.sample_caption_ids([1] * 2000, __import__("random").Random(0))
    assert abs(sum(i == 0 for i in ids) / 2000 - captions.EMPTY_CAPTION_RATE) < 0.03


def _tiny_class_unet():
    """An 8x8 one-channel UNet2DModel with 3 class embeddings (2 classes + null), seeded."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=3, norm_num_groups=4).eval()


def test_sample_ddpm_guidance_on_a_tiny_unet():
    from diffusers import DDIMScheduler

    from erase.zoo.sampling import sample_ddpm

    unet = _tiny_class_unet()
    sched = DDIMScheduler(num_train_timesteps=100)
    a = sample_ddpm(unet, sched, [0, 1], guidance=3.0, steps=4, generator=torch.Generator().manual_seed(1))
    b = sample_ddpm(unet, sched, [0, 1], guidance=3.0, steps=4, generator=torch.Generator().manual_seed(1))
    c = sample_ddpm(unet, sched, [0, 1], guidance=1.0, steps=4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_batch_indices_are_a_function_of_seed_and_step():
    from erase.zoo.loop import batch_indices

    assert torch.equal(batch_indices(100, 10, 13, 0), batch_indices(100, 10, 13, 0))
    epoch = torch.cat([batch_indices(100, 10, k, 0) for k in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_bundled_tiny_sd_loads_offline_and_generates(offline):
    from diffusers import StableDiffusionPipeline

    d = bundled("fmnist-tiny-sd")
    pipe = StableDiffusionPipeline.from_pretrained(d)  # the plain diffusers call, no erase code
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    out = pipe("a photo of a trouser", num_inference_steps=25, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert time.perf_counter() - t0 < 10
    assert out.images.shape == (1, 3, 32, 32)
    for cfg in d.rglob("*.json"):
        assert "_name_or_path" not in json.loads(cfg.read_text()), cfg


def test_bundled_tiny_flow_loads_offline_and_generates(offline):
    from diffusers import StableDiffusion3Pipeline

    d = bundled("fmnist-tiny-flow")
    # the plain diffusers call, no erase code: SD3 without T5 is loaded this way
    pipe = StableDiffusion3Pipeline.from_pretrained(d, text_encoder_3=None, tokenizer_3=None)
    assert {pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype, pipe.vae.dtype} == {torch.float32}
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.vae.config.shift_factor
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    out = pipe("a photo of a trouser", num_inference_steps=25, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert time.perf_counter() - t0 < 20
    assert out.images.shape == (1, 3, 32, 32)
    for cfg in d.rglob("*.json"):
        assert "_name_or_path" not in json.loads(cfg.read_text()), cfg


def test_ancestral_ddpm_sampling_depends_on_the_seed_only():
    """DDPM steps draw fresh noise: it must come from each image's own generator, not the global RNG."""
    from diffusers import DDPMScheduler

    from erase.diffusion.sampling import sample_ddpm

    unet = _tiny_class_unet()
    sched = DDPMScheduler(num_train_timesteps=100)
    pair, _ = sample_ddpm(unet, sched, [0, 1], [5, 6], 2.0, 4, 2)
    torch.manual_seed(123)  # a different global RNG state changes nothing
    alone, _ = sample_ddpm(unet, sched, [1], [6], 2.0, 4, 2)
    other, _ = sample_ddpm(unet, sched, [1], [7], 2.0, 4, 2)
    assert torch.allclose(pair[1:], alone, atol=1e-6) and not torch.allclose(alone, other)


def test_bundled_ddpm_loads_offline_and_generates(offline):
    from erase.zoo.sampling import DDPM_NULL_CLASS, load_ddpm, sample_ddpm

    bundled("fmnist-ddpm")
    unet, scheduler = load_ddpm("fmnist-ddpm")
    assert unet.config.num_class_embeds == DDPM_NULL_CLASS + 1
    t0 = time.perf_counter()
    x = sample_ddpm(unet, scheduler, [1], guidance=2.0, steps=50, generator=torch.Generator().manual_seed(0))
    assert time.perf_counter() - t0 < 10
    assert x.shape == (1, 1, 32, 32)


def test_bundled_classifier_loads_and_classifies(offline):
    from erase.classifier.models import load_classifier

    bundled("fmnist-classifier")
    model = load_classifier("fmnist-classifier").eval()
    assert next(model.parameters()).dtype == torch.float32
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.rand(1, 1, 32, 32))
    assert time.perf_counter() - t0 < 10 and logits.shape == (1, 10)


def test_bundle_is_small_fp16_and_carded():
    names = ["fmnist-classifier", "fmnist-tiny-sd", "fmnist-ddpm", "fmnist-tiny-flow"]
    for n in names:
        bundled(n)
    from safetensors import safe_open

    total = 0
    for n in names:
        d = ZOO_DIR / n
        assert (d / "README.md").is_file()
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        assert size <= 26 * 2**20, (n, size)  # each model: fp16 weights plus its tokenizer files
        total += size
        for f in d.rglob("*"):
            if f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as st:
                    dtypes = {st.get_slice(k).get_dtype() for k in st.keys()}
                assert dtypes <= {"F16", "I64"}, (f, dtypes)
    assert total <= 50 * 2**20


def test_check_quick(tmp_path, offline):
    generators = ("fmnist-tiny-sd", "fmnist-ddpm", "fmnist-tiny-flow")
    for n in ("fmnist-classifier", *generators):
        bundled(n)
    from erase.zoo.__main__ import main

    assert main(["check", "--quick", "--output", str(tmp_path / "zoo_check")]) == 0
    res = json.loads((tmp_path / "zoo_check.json").read_text())
    assert res["quick"] and set(res["generators"]) == set(generators)  # every bundled generator by default
    for r in res["generators"].values():
        assert len(r["per_class_accuracy"]) == 10 and r["fid_fmnist"] >= 0
    assert "FID-fmnist" in (tmp_path / "zoo_check.md").read_text()


def test_ddpm_scheduler_class_comes_from_the_folder(tmp_path):
    from diffusers import DDPMScheduler

    from erase.diffusion.loading import load_scheduler
    from erase.errors import EraseError

    DDPMScheduler(num_train_timesteps=10).save_pretrained(tmp_path)
    assert type(load_scheduler(tmp_path)) is DDPMScheduler
    cfg = tmp_path / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace("DDPMScheduler", "UNet2DModel"))
    with pytest.raises(EraseError, match="not a diffusers scheduler"):
        load_scheduler(tmp_path)
    with pytest.raises(EraseError, match="no scheduler_config.json"):
        load_scheduler(tmp_path / "missing")
