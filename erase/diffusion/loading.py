"""Load the diffusion model to erase from: a bundled name, a local folder, a single file or a hub id.

Supported: Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``; epsilon or v-prediction), SDXL
(``StableDiffusionXLPipeline``: two text encoders, a pooled embedding and size/crop time ids), SD 3 / 3.5
(``StableDiffusion3Pipeline``: a rectified-flow MMDiT, two CLIP encoders and an optional T5, a pooled
embedding), FLUX.1 dev / schnell (``FluxPipeline``: a rectified-flow transformer over 2x2-packed latents, T5
tokens plus a CLIP pooled embedding, and on the guidance-distilled dev model a guidance embedding; see
``erase.diffusion.flux``) and class-conditional pixel-space DDPMs (a ``UNet2DModel`` with class embeddings plus
a scheduler, in ``unet/`` + ``scheduler/`` folders). Anything else gets an error naming what is supported. The
network is touched only when the user names a hub id; the safety checker and SDXL's invisible
watermark are always off (erasure work must see what the model really generates).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from erase.diffusion.repeated_tokens import use_repeated_tokens
from erase.errors import EraseError
from erase.storage import ZOO_DIR, list_bundled_models

SUPPORTED = ("Stable Diffusion 1.x/2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline), SD 3/3.5 "
             "(StableDiffusion3Pipeline), FLUX.1 (FluxPipeline) and class-conditional DDPMs (UNet2DModel with class "
             "embeddings)")
UNSUPPORTED_HINTS = {
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner",
    "PixArtAlphaPipeline": "PixArt", "KandinskyPipeline": "Kandinsky", "DDPMPipeline": "an unconditional DDPM",
}


# The model_index.json class of each kind erase loads: "sd" (1.x/2.x), "sdxl", "sd3", "flux", a class-conditional
# "ddpm".
KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3",
         "FluxPipeline": "flux", "ClassConditionalDDPM": "ddpm"}
TEXT_KINDS = ("sd", "sdxl", "sd3", "flux")  # the kinds that read a prompt (through text attention)
FLOW_KINDS = ("sd3", "flux")  # rectified-flow models: velocity targets on a flow-matching schedule (erase.diffusion.flow)
POOLED_KINDS = ("sdxl", "sd3", "flux")  # conditions are PooledText: token embeddings plus a pooled embedding
# The pipeline attribute that holds the denoiser: a UNet, or an MMDiT / FLUX transformer.
DENOISER_ATTR = {"sd3": "transformer", "flux": "transformer"}
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline"}


def denoiser_attr(kind: str) -> str:
    return DENOISER_ATTR.get(kind, "unet")


FMNIST_MODELS = ("fmnist-tiny-sd", "fmnist-tiny-flow", "fmnist-ddpm")  # the bundled Fashion-MNIST generators


def is_fmnist(spec: str) -> bool:
    """Whether ``spec`` names a bundled Fashion-MNIST generator (or a folder of that name)."""
    return Path(spec).name in FMNIST_MODELS or spec in FMNIST_MODELS


def default_guidance(spec: str, kind: str) -> float:
    """Guidance when none is given: what the bundled models were checked with (4 for the tiny SD and the tiny flow
    model, 2 for the DDPM); for FLUX the *embedded* guidance of FluxPipeline's call (3.5, FLUX.1-dev's; schnell has
    no guidance embedding and ignores it); else SD's customary classifier-free 7.5."""
    if kind == "flux":
        return 3.5
    return 4.0 if is_fmnist(spec) and kind in ("sd", "sd3") else 2.0 if kind == "ddpm" else 7.5


@dataclass
class DiffusionBase:
    """What the task needs: the trainable denoiser plus frozen parts (text encoder, VAE, scheduler)."""

    kind: str                 # "sd", "sdxl", "sd3", "flux" or "ddpm"
    unet: torch.nn.Module     # the denoiser: a UNet, or SD3's / FLUX's transformer (the name predates transformers)
    scheduler: Any
    source: str               # where it came from, for model cards
    pipe: Any = None          # the diffusers pipeline of a text-to-image kind
    folder: Path | None = None
    shipped_scheduler: Any = None  # the folder's own scheduler where erase samples with another (SDXL), for exports

    @property
    def fingerprint(self) -> str:
        """Identifies these weights for caches: the source plus the size and mtime of its weight files."""
        root = self.folder or (Path(self.source) if Path(self.source).exists() else None)
        if root is None:
            return self.source
        files = [root] if root.is_file() else sorted(root.rglob("*.safetensors")) + sorted(root.rglob("*.bin"))
        return self.source + "|" + ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)

    @property
    def prediction_type(self) -> str:
        if self.kind in FLOW_KINDS:  # flow-matching schedulers have no prediction_type: the model predicts noise - x0
            return "flow velocity"
        return self.scheduler.config.get("prediction_type", "epsilon")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EraseError(f"{path} is not readable JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EraseError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _class_name(folder: Path) -> str | None:
    index = folder / "model_index.json"
    name = _read_json(index).get("_class_name") if index.is_file() else None
    unet_cfg = folder / "unet" / "config.json"
    if name in (None, "DDPMPipeline") and unet_cfg.is_file() and (folder / "scheduler").is_dir():
        # A DDPMPipeline folder whose UNet has class embeddings is a class-conditional DDPM.
        cfg = _read_json(unet_cfg)
        if cfg.get("_class_name") == "UNet2DModel" and cfg.get("num_class_embeds"):
            return "ClassConditionalDDPM"
    return name


def check_weight_files(root: Path) -> None:
    """Read the header of every safetensors file under ``root`` (a folder or one file).

    A truncated or corrupt download then gets one line naming the file, instead of diffusers'
    chain of three exceptions that ends in "Unable to load weights". Only headers are read (they
    hold every tensor's offset, so a short file is caught), never the tensors themselves.
    """
    files = [root] if root.is_file() else sorted(root.rglob("*.safetensors"))
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise EraseError(f"{f} is truncated or corrupt ({str(err).splitlines()[0]}); copy or download it again") from None


def _load_error(where, err: Exception) -> EraseError:
    """diffusers' loading errors (bad config.json, missing or unreadable files) as one line naming ``where``."""
    text = str(err).strip()
    return EraseError(f"could not load the model in {where}: {text.splitlines()[0] if text else type(err).__name__}")


def model_kind(spec: str) -> str | None:
    """"sd", "sdxl", "sd3", "flux" or "ddpm" for a local or bundled model folder, from its JSON files alone (no weights read).

    None when that cannot be told without loading (a single file, a hub id, an unsupported folder),
    so config-time checks can refuse a method early and leave the rest to ``load_base``.
    """
    folder = local_folder(spec)
    if folder is None:
        return None
    return KINDS.get(_class_name(folder) or "")


def local_folder(spec: str) -> Path | None:
    """The folder ``load_base`` would read for ``spec`` (a local folder or a bundled name), else None."""
    if not spec or not spec.strip():
        return None
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    return ZOO_DIR / spec if (ZOO_DIR / spec).is_dir() and not p.exists() else None


def ddpm_num_classes(folder: Path) -> int:
    """Classes of a class-conditional DDPM folder, from unet/config.json (its last class embedding is the null class)."""
    return int(_read_json(folder / "unet" / "config.json")["num_class_embeds"]) - 1


def _check_supported(name: str | None, where: str) -> None:
    if name in KINDS:
        return
    what = UNSUPPORTED_HINTS.get(name or "", name or "an unrecognised folder")
    raise EraseError(f"{where} holds {what}, which erase does not support; supported: {SUPPORTED}")


def pipeline_class(kind: str):
    """The plain diffusers pipeline class of a text-to-image kind (what an erased ``model/`` reloads with)."""
    # lazy: diffusers takes seconds to import
    import diffusers

    return getattr(diffusers, PIPELINES.get(kind, "StableDiffusionPipeline"))


def absent_components(folder: Path | None) -> dict:
    """``{name: None}`` for the components a local folder's model_index.json lists as null (an SD3 saved
    without T5: ``text_encoder_3``/``tokenizer_3``), which diffusers only accepts when passed explicitly."""
    index = folder / "model_index.json" if folder is not None else None
    if index is None or not index.is_file():
        return {}
    return {k: None for k, v in _read_json(index).items()
            if k in ("text_encoder_3", "tokenizer_3") and isinstance(v, list) and v[:1] == [None]}


def folder_has_t5(folder: Path | None) -> bool:
    """Whether a local SD3 folder's model_index.json lists a T5 encoder (``text_encoder_3`` not null)."""
    index = folder / "model_index.json" if folder is not None else None
    if index is None or not index.is_file():
        return False
    entry = _read_json(index).get("text_encoder_3")
    return isinstance(entry, list) and entry[:1] != [None]


def _pipe_kwargs(kind: str, folder: Path | None = None) -> dict:
    # SD ships a safety checker, SDXL an invisible watermark: both change what the model generates. SD3 and FLUX
    # have neither.
    if kind == "sd3":
        return absent_components(folder)
    if kind == "flux":
        return {}
    return {"add_watermarker": False} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}


def _load_sd_folder(folder: Path | str, local_only: bool, device, kind: str = "sd") -> DiffusionBase:
    if local_only:
        check_weight_files(Path(folder))
    try:
        pipe = pipeline_class(kind).from_pretrained(folder, local_files_only=local_only,
                                                    **_pipe_kwargs(kind, Path(folder) if local_only else None))
    except (OSError, ValueError) as err:  # a bad config.json, a missing part, an unreadable .bin
        raise _load_error(folder, err) from err
    return _wrap_pipe(pipe, str(folder), device, Path(folder) if local_only else None, kind)


def _wrap_pipe(pipe, source: str, device, folder, kind: str = "sd") -> DiffusionBase:
    shipped = None
    if kind == "sd":
        pipe.safety_checker = None
    elif kind == "sdxl":
        # SDXL ships EulerDiscreteScheduler, whose latents are x0 + sigma * noise and whose add_noise only takes
        # timesteps of its current inference schedule. The methods noise training latents at any timestep and
        # read ESD's partial samples as DDPM-space x_t, so erase samples SDXL with DDIM on the same betas and
        # timestep spacing (SD's own PNDM/DDIM already work in that space); exports keep the shipped scheduler.
        # lazy: diffusers takes seconds to import
        from diffusers import DDIMScheduler

        shipped = pipe.scheduler
        pipe.scheduler = DDIMScheduler.from_config(shipped.config, clip_sample=False, set_alpha_to_one=False)
    elif kind == "sd3":
        use_repeated_tokens(pipe.transformer)  # exact and faster without T5 (erase/diffusion/repeated_tokens.py)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for part in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), getattr(pipe, "text_encoder_3", None), pipe.vae):
        if part is not None:
            part.requires_grad_(False).eval()
    return DiffusionBase(kind, getattr(pipe, denoiser_attr(kind)), pipe.scheduler, source, pipe, folder, shipped)


def single_file_kind(path: Path) -> str:
    """"sdxl", "sd3", "flux" or "sd" for a single checkpoint file, from its tensor names (a safetensors header; no
    tensor is read).

    SDXL's original checkpoints hold the second text encoder under ``conditioner.embedders.1``, SD3's MMDiT has
    ``joint_blocks``, FLUX's transformer ``double_blocks`` (Black Forest Labs' names, bare or under
    ``model.diffusion_model.``). A ``.ckpt`` (pickle) cannot be read without loading it: it is taken for SD
    1.x/2.x, as before."""
    if path.suffix != ".safetensors":
        return "sd"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys):
        return "sd3"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "flux"
    return "sdxl" if any(k.startswith("conditioner.embedders.1.") for k in keys) else "sd"


def load_scheduler(folder: Path):
    """The diffusers scheduler class that a folder's ``scheduler_config.json`` names (e.g. DDPMScheduler)."""
    # lazy: diffusers takes seconds to import
    import diffusers
    from diffusers import SchedulerMixin

    config = Path(folder) / "scheduler_config.json"
    if not config.is_file():
        raise EraseError(f"{folder}: no scheduler_config.json; a DDPM folder needs scheduler/ beside unet/")
    name = _read_json(config).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise EraseError(f"{config}: _class_name {name!r} is not a diffusers scheduler (e.g. DDPMScheduler, DDIMScheduler)")
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise _load_error(folder, err) from err


def _load_ddpm_folder(folder: Path, device) -> DiffusionBase:
    # lazy: diffusers takes seconds to import
    from diffusers import UNet2DModel

    check_weight_files(folder)
    try:
        unet = UNet2DModel.from_pretrained(folder / "unet", local_files_only=True).to(device)
    except (OSError, ValueError) as err:
        raise _load_error(folder / "unet", err) from err
    if not unet.config.get("num_class_embeds"):
        raise EraseError(f"{folder}: the UNet2DModel has no class embeddings; erase needs a class-conditional DDPM")
    scheduler = load_scheduler(folder / "scheduler")
    return DiffusionBase("ddpm", unet, scheduler, str(folder), None, folder)


def load_base(spec: str, device: str | torch.device = "cpu", original_config: str = "") -> DiffusionBase:
    """``spec``: bundled name | local folder | ``.safetensors``/``.ckpt`` file | hub id (``org/name``)."""
    # lazy: diffusers takes seconds to import
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # config-upgrade notices are noise for erasure runs
    diffusers_logging.disable_progress_bar()
    if not spec or not spec.strip():
        raise EraseError("--model is empty: give a bundled name (e.g. fmnist-tiny-sd), a folder, a .safetensors/.ckpt file or a hub id")
    p = Path(spec).expanduser()
    bundled = ZOO_DIR / spec
    if p.is_dir() or (bundled.is_dir() and not p.exists()):
        folder = p if p.is_dir() else bundled
        name = _class_name(folder)
        _check_supported(name, str(folder))
        if name == "ClassConditionalDDPM":
            return _load_ddpm_folder(folder, device)
        return _load_sd_folder(folder, True, device, KINDS[name])
    if p.suffix in (".safetensors", ".ckpt"):
        if not p.is_file():
            raise EraseError(f"checkpoint file not found: {p}")
        if p.suffix == ".safetensors":
            check_weight_files(p)
        kind = single_file_kind(p)
        kwargs = {"original_config": original_config} if original_config else {}
        try:
            pipe = pipeline_class(kind).from_single_file(str(p), **_pipe_kwargs(kind), **kwargs)
        except (OSError, ValueError) as err:
            what = {"sdxl": "an SDXL", "sd3": "an SD3", "flux": "a FLUX"}.get(kind, "a Stable Diffusion 1.x/2.x")
            if kind in ("sd3", "flux"):  # diffusers reads their component configs from the hub: no YAML to pass
                lacks = " (and fetches the text encoders and VAE a transformer-only FLUX file lacks)" if kind == "flux" else ""
                raise EraseError(f"could not load {p} as {what} checkpoint ({str(err).splitlines()[0]}); diffusers "
                                 f"builds {kind.upper()} from a single file with the hub's configs{lacks}: go online "
                                 "once, or pass the model's diffusers folder") from err
            yaml = "sd_xl_base.yaml" if kind == "sdxl" else "v1-inference.yaml"
            raise EraseError(f"could not load {p} as {what} checkpoint ({str(err).splitlines()[0]}); "
                             f"offline, pass --original-config with the model's {yaml}") from err
        return _wrap_pipe(pipe, str(p), device, None, kind)
    if p.exists():
        raise EraseError(f"{p} is neither a model folder nor a .safetensors/.ckpt file")
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        # lazy: diffusers takes seconds to import
        from diffusers import DiffusionPipeline

        try:
            name = DiffusionPipeline.load_config(spec).get("_class_name")
        except Exception as err:  # network or hub errors come in many types
            raise EraseError(f"could not fetch {spec!r} from the model hub: {str(err).splitlines()[0]}") from err
        _check_supported(name, f"hub model {spec!r}")
        return _load_sd_folder(spec, False, device, KINDS[name])

    raise EraseError(f"model {spec!r} not found: not a folder, a .safetensors/.ckpt file, a hub id (org/name) or a "
                     f"bundled model ({', '.join(list_bundled_models()) or 'none installed'})")
