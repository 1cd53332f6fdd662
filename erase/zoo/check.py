"""Quality check of the bundled generators, judged by the bundled evaluator.

    python -m erase.zoo check            # full: 64 images per class per generator, cards updated
    python -m erase.zoo check --quick    # reduced: a smoke test in well under a minute

For each Fashion-MNIST class the tiny SD (and the tiny flow model) gets the class prompt ("a photo of a trouser") and the
DDPM the class label; every class uses its own fixed seed (``--seed`` + label). Generated images
(gray = mean of RGB, in [0, 1]) are classified by ``fmnist-classifier``; the report has per-class
and mean conditional accuracy and FID-fmnist: the Frechet distance between the evaluator's
penultimate features of the generated images and of the Fashion-MNIST test set (torchmetrics
``FrechetInceptionDistance`` with the evaluator as its feature network). It is not an Inception
FID and is never reported as one. For the SD it also reports accuracy on held-out paraphrases
(:mod:`erase.captions`) and the evaluator's accuracy on VAE reconstructions.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erase import captions
from erase.classifier.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from erase.classifier.models import classify, load_classifier
from erase.diffusion.loading import model_kind
from erase.metrics.fid import EvaluatorFeatures, fid_metric, fit_reference  # noqa: F401  (one FID implementation)
from erase.storage import ZOO_DIR, atomic_write_json, atomic_write_text, resolve_model_dir
from erase.zoo.cards import write_readme
from erase.zoo.common import machine, to_gray01, write_record
from erase.zoo.sampling import load_ddpm, load_tiny_flow, load_tiny_sd, sample_ddpm, sample_sd

# Documented sampling settings of the check (also written into results and model cards).
SD_SETTINGS = {"scheduler": "DDIM", "steps": 25, "guidance": 4.0}
FLOW_SETTINGS = {"scheduler": "FlowMatchEuler", "steps": 25, "guidance": 4.0}
# The bundled generators that are installed (the flow model is the newest; a checkout without it checks the others).
GENERATORS = tuple(g for g in ("fmnist-tiny-sd", "fmnist-ddpm", "fmnist-tiny-flow") if (ZOO_DIR / g).is_dir())
DDPM_SETTINGS = {"scheduler": "DDPM (ancestral)", "steps": 50, "guidance": 2.0}


def _summary(per_class: dict[str, float]) -> dict:
    vals = list(per_class.values())
    return {"mean_accuracy": round(sum(vals) / len(vals), 2), "min_class_accuracy": round(min(vals), 2),
            "per_class_accuracy": per_class}


def check_generator(name: str, generate, classifier, test_images, n_per_class: int, seed: int,
                    grid_path: str | None = None) -> dict:
    """``generate(label, n, generator) -> images in [0, 1]``; returns accuracies and FID-fmnist.

    With ``grid_path``, the first 8 images of every class are saved as one PNG (a row per class).
    """
    fid = fit_reference(fid_metric(classifier), test_images)
    per_class, rows, t0 = {}, [], time.perf_counter()
    for label, cls in enumerate(tqdm(FASHION_MNIST_CLASSES, desc=f"check {name}", mininterval=5)):
        imgs = generate(label, n_per_class, torch.Generator().manual_seed(seed + label))
        per_class[cls] = round(100.0 * (classify(classifier, imgs) == label).float().mean().item(), 2)
        fid.update(imgs, real=False)
        rows.append(imgs[:8].float().mean(dim=1, keepdim=True))
    if grid_path:
        # lazy: torchvision's model zoo is only needed for this judge
        from torchvision.utils import save_image

        save_image(torch.cat(rows), grid_path, nrow=min(8, n_per_class), padding=1)
    out = _summary(per_class)
    out.update(fid_fmnist=round(fid.compute().item(), 3), images_per_class=n_per_class, seed=seed,
               generation_seconds=round(time.perf_counter() - t0, 1))
    if grid_path:
        out["grid"] = grid_path
    return out


def held_out_accuracy(pipe, classifier, n_per_prompt: int, settings: dict, seed: int) -> dict:
    """Accuracy on paraphrases never used in training (captions.held_out_captions)."""
    per_class = {}
    for label, cls in enumerate(FASHION_MNIST_CLASSES):
        prompts = [p for p in captions.held_out_captions(label) for _ in range(n_per_prompt)]
        imgs = sample_sd(pipe, prompts, settings["guidance"], settings["steps"], torch.Generator().manual_seed(seed + label))
        per_class[cls] = round(100.0 * (classify(classifier, imgs) == label).float().mean().item(), 2)
    out = _summary(per_class)
    out["images_per_prompt"] = n_per_prompt
    return out


@torch.no_grad()
def vae_reconstruction_accuracy(vae, classifier, test, n: int) -> float:
    x = test.get_batch(range(n))
    recon = vae(x["image"].expand(-1, 3, -1, -1) * 2 - 1).sample
    return round(100.0 * (classify(classifier, to_gray01(recon)) == x["label"]).float().mean().item(), 2)


def markdown(results: dict) -> str:
    lines = ["# Bundled model check (`python -m erase.zoo check`)", "",
             f"Evaluator: `{results['evaluator']}` (test accuracy {results['evaluator_test_accuracy']} %). "
             "FID-fmnist = Frechet distance of the evaluator's penultimate features, generated vs the "
             f"{results['fid_reference_images']} Fashion-MNIST test images (not Inception FID). "
             f"Machine: {results['machine']}. Mode: {'quick' if results['quick'] else 'full'}.", ""]
    gens = list(results["generators"])
    header = "| class | " + " | ".join(gens) + " |"
    lines += [header, "|" + "---|" * (len(gens) + 1)]
    for cls in FASHION_MNIST_CLASSES:
        lines.append(f"| {cls} | " + " | ".join(f"{results['generators'][g]['per_class_accuracy'][cls]:.1f}" for g in gens) + " |")
    for key, label in (("mean_accuracy", "**mean**"), ("min_class_accuracy", "min class"), ("fid_fmnist", "FID-fmnist")):
        lines.append(f"| {label} | " + " | ".join(f"{results['generators'][g][key]}" for g in gens) + " |")
    lines.append("")
    for g in gens:
        r = results["generators"][g]
        lines.append(f"- `{g}`: {r['images_per_class']} images per class, sampler {r['settings']}, seed {r['seed']} + label, "
                     f"{r['generation_seconds']} s.")
    for g in gens:
        r = results["generators"][g]
        if "held_out" in r:
            lines.append(f"- `{g}` on held-out paraphrases: mean accuracy {r['held_out']['mean_accuracy']} % "
                         f"(min class {r['held_out']['min_class_accuracy']} %).")
        if "vae_reconstruction_accuracy" in r:
            lines.append(f"- `{g}`: evaluator on VAE reconstructions of test images: {r['vae_reconstruction_accuracy']} %.")
    for g in gens:
        if results["generators"][g].get("grid"):
            lines += ["", f"`{g}` samples (first 8 per class, one row per class):", "",
                      f"![{g}]({Path(results['generators'][g]['grid']).name})"]
    targets = results["targets"]
    lines += ["", f"Targets: mean >= {targets['mean']} %, every class >= {targets['min_class']} %: "
              + ", ".join(f"{g} {'met' if results['generators'][g]['meets_targets'] else 'NOT met'}" for g in gens), ""]
    return "\n".join(lines)


def run_check(quick: bool = False, output: str | None = "results/zoo_check", seed: int = 1234,
              update_cards: bool | None = None, generators=None,
              classifier_name: str = "fmnist-classifier", threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    generators = GENERATORS if generators is None else generators
    classifier = load_classifier(classifier_name).eval()
    test = load_fashion_mnist(train=False, pad_to=32)
    n_ref = 200 if quick else len(test)
    ref = test.get_batch(range(n_ref))
    with torch.no_grad():
        test_acc = round(100.0 * (classify(classifier, ref["image"]) == ref["label"]).float().mean().item(), 2)
    n = 2 if quick else 64
    results = {"quick": quick, "evaluator": classifier_name, "evaluator_test_accuracy": test_acc,
               "fid_reference_images": n_ref, "machine": machine(), "targets": {"mean": 80.0, "min_class": 50.0},
               "generators": {}}
    for name in generators:
        kind = model_kind(str(resolve_model_dir(name)))
        if kind in ("sd", "sd3"):
            base = SD_SETTINGS if kind == "sd" else FLOW_SETTINGS
            settings = dict(base, steps=3) if quick else dict(base)
            pipe = load_tiny_sd(name) if kind == "sd" else load_tiny_flow(name)

            def gen(label, k, g, pipe=pipe, s=settings):
                return sample_sd(pipe, [captions.class_prompt(label)] * k, s["guidance"], s["steps"], g)

            r = check_generator(name, gen, classifier, ref["image"], n, seed, _grid(output, name, quick))
            r["prompt_template"] = captions.CHECK_TEMPLATE
            if not quick:
                r["held_out"] = held_out_accuracy(pipe, classifier, 8, settings, seed)
            r["vae_reconstruction_accuracy"] = vae_reconstruction_accuracy(pipe.vae, classifier, test, 100 if quick else 2000)
        else:
            settings = dict(DDPM_SETTINGS, steps=3) if quick else dict(DDPM_SETTINGS)
            unet, scheduler = load_ddpm(name)

            def gen(label, k, g, unet=unet, scheduler=scheduler, s=settings):
                x = sample_ddpm(unet, scheduler, [label] * k, s["guidance"], s["steps"], g)
                return (x + 1) / 2

            r = check_generator(name, gen, classifier, ref["image"], n, seed, _grid(output, name, quick))
        r["settings"] = settings
        r["meets_targets"] = r["mean_accuracy"] >= 80.0 and r["min_class_accuracy"] >= 50.0
        results["generators"][name] = r
        print(f"{name}: mean accuracy {r['mean_accuracy']} %, min class {r['min_class_accuracy']} %, "
              f"FID-fmnist {r['fid_fmnist']}")
    md = markdown(results)
    print(md)
    if output:
        atomic_write_json(results, f"{output}.json")
        atomic_write_text(md, f"{output}.md")
    if update_cards if update_cards is not None else not quick:
        _update_cards(results)
    return results


def _grid(output: str | None, name: str, quick: bool) -> str | None:
    if not output or quick:
        return None

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    return f"{output}_{Path(name).name}.png"


def _update_cards(results: dict) -> None:
    common = {k: results[k] for k in ("evaluator", "evaluator_test_accuracy", "fid_reference_images", "machine")}
    for name, r in results["generators"].items():
        d = resolve_model_dir(name)
        write_record(d, "quality", dict(common, **r))
        write_readme(d)
    d = resolve_model_dir(results["evaluator"])
    write_record(d, "quality", {"test_accuracy": results["evaluator_test_accuracy"], "test_images": results["fid_reference_images"]})
    write_readme(d)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m erase.zoo check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced mode: 2 images per class, 3 sampling steps, 200 reference images")
    p.add_argument("--output", default="results/zoo_check", help="writes OUTPUT.json and OUTPUT.md ('' to skip)")
    p.add_argument("--seed", type=int, default=1234, help="class c uses seed SEED + c")
    p.add_argument("--generators", nargs="+", default=list(GENERATORS),
                   help="bundled names or folders (default: every bundled generator)")
    p.add_argument("--update-cards", action=argparse.BooleanOptionalAction, default=None,
                   help="write the numbers into the model cards (default: in full mode)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    a = p.parse_args(argv)
    run_check(a.quick, a.output or None, a.seed, a.update_cards, tuple(a.generators), threads=a.threads)
