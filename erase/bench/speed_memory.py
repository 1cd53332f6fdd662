"""Memory of a training step estimated from parameter counts, and the guard that keeps a measurement inside it.

The full-size speed benchmark runs on a 24 GB CPU machine shared with other work, so every
measurement is first estimated (:func:`estimate_step`, :func:`estimate_uce`) and skipped when the
estimate is over the budget; a started one runs under an address-space limit (:func:`limit_memory`) so
that a wrong estimate fails the measurement, not the machine. The terms, in bytes per parameter
(D = the denoiser, P = every component the task loads, Tr = the parameters that train):

* ``weights`` 4 P — erase loads every component in fp32 (text encoders and VAE stay resident);
* ``teacher`` 4 D — ESD on full weights keeps a frozen copy (``ctx.frozen_copy``; ``teacher_dtype``
  auto is fp32 on CPU); with LoRA the teacher is the same model with its adapters off: 0;
* ``masks`` — ESD: none since its masks became one 0-dim bool per tensor (``engine.masking.whole``);
  until 2026-12-05 one bool per parameter (1 D, counted only with ``masks_held``: the SD-1.4
  measurements were taken with them); SalUn: its setup holds the saliency gradients and scores (8 D), its step 1 D of masks and 4 D of
  frozen values (``ParameterMask`` copies every partially masked tensor, which a global top-50 %
  makes nearly all);
* ``grads`` 4 Tr, ``adam`` 8 Tr (two fp32 moments);
* ``autocast`` 2 D with bf16: autocast casts each weight to bf16 for its matmul or convolution, and
  where the layer's input needs a gradient the bf16 copy is saved for backward (trained weights' copies
  are also cached for the step) — so up to every weight has a bf16 copy alive until backward. An upper
  bound: measured at full size (results/speed_fullsize.md), the SDXL UNet's LoRA step under autocast
  peaked 3.7 GiB above the same step's estimate without this term (2 B x 2.567 B = 4.8 GiB), SD3's
  LoRA and text-attention steps 1.5 and 0 GiB above;
* ``activations`` — the bytes autograd saves for backward, *counted*, not guessed:
  :func:`saved_activations` runs the denoiser on the meta device (shapes only, no memory) at the
  benchmark's resolution with every weight trainable (an upper bound for methods that train fewer)
  and sums the tensors its saved-tensor hooks see. Attention is counted as a fused kernel stores it
  (q, k, v, output, log-sum-exp), not as the math path's probability matrix, since CPU and GPU both
  run fused scaled-dot-product attention; with gradient checkpointing, what the checkpointed graph saves plus
  the largest checkpointed segment (recomputed during backward). Counted in fp32: with bf16 autocast
  the saved tensors are partly bf16, so the term is an upper bound there;
* ``prompts`` — the task's table of encoded prompts (for one concept with the default retain set, 41
  rows of tokens x width in fp32: 0.2 GiB for SD3's 333 x 4096);
* ``base`` 1.0 GiB — the interpreter, torch, diffusers and transformers (0.8 GiB resident after
  import, measured on this machine) and the allocator's slack.

Checked against the SD-1.4 measurements (``results/speed.json``, taken while the benchmark still held
ESD's masks through the step): the estimates cover the measured peaks of every ESD and UCE row there
(``calibration`` reports them); SalUn's is about 2 GiB under its measured peak (the estimate misses
part of what its two batches and masked optimiser steps hold), so SalUn estimates are lower bounds.
The denoiser-alone estimate (``estimate_denoiser``) against the v1.4 UNet's measured peaks (one thread,
256 px, 2026-12-05): LoRA 4.70 vs 4.86 GiB, LoRA with checkpointing 4.32 vs 4.61, esd-x's text
attention 5.18 vs 5.05 — within 0.3 GiB (backward's gradient buffers are not counted).

Sizes are GiB (2**30 bytes), as the measured peak RSS.

What the peak RSS holds: diffusers maps a folder's safetensors weights into memory (file-backed pages,
resident once touched; measured here: a loaded SD-1.4 UNet adds 3.3 GiB of ``RssFile`` and nothing to
``RssAnon`` once every weight is read). They count in the peak RSS and in the estimate, but the kernel
can drop them under pressure and read them again, so the memory that could push another process out
is the rest: ESD's teacher copy, masks, gradients, optimiser state, activations, and the trained
weights once the optimiser writes them (copy-on-write).
"""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import dataclass, field

import torch
from torch import nn

GIB = 2**30
BASE_GIB = 1.0
BUDGET_GIB = 14.0        # skip a measurement whose estimate is above this (the brief of issue 14: 24 GB machine)
LIMIT_GIB = 16.0         # the address-space ceiling of a started measurement
SEGMENTS = ("ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock", "FluxTransformerBlock",
            "FluxSingleTransformerBlock")  # the modules diffusers' gradient checkpointing wraps, one call each


@dataclass
class Estimate:
    """Terms in GiB and the arithmetic behind each: ``terms`` held throughout, plus the larger of two phases'
    extra terms (``setup``: what the method's setup and its masks hold; ``step``: what the training step adds)."""

    terms: dict[str, float] = field(default_factory=dict)
    setup: dict[str, float] = field(default_factory=dict)
    step: dict[str, float] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, gib: float, why: str, phase: str = "") -> None:
        {"": self.terms, "setup": self.setup, "step": self.step}[phase][name] = round(gib, 3)
        self.why[name] = why

    @property
    def total(self) -> float:
        return round(sum(self.terms.values()) + max(sum(self.setup.values()), sum(self.step.values())), 2)

    def _sum(self, terms: dict[str, float]) -> str:
        return " + ".join(f"{k} {v:.2f} ({self.why[k]})" for k, v in terms.items())

    def arithmetic(self) -> str:
        text = self._sum(self.terms)
        if self.setup or self.step:
            text += (f" + max(setup: {self._sum(self.setup) or 'nothing'} = {sum(self.setup.values()):.2f}; "
                     f"step: {self._sum(self.step)} = {sum(self.step.values()):.2f})")
        return f"{text} = {self.total:.2f} GiB"

    def to_dict(self) -> dict:
        return {"total_gib": self.total, "terms_gib": {**self.terms, **{f"setup {k}": v for k, v in self.setup.items()},
                                                       **{f"step {k}": v for k, v in self.step.items()}},
                "arithmetic": self.arithmetic()}


def _g(n: float) -> float:
    return n / GIB


def fmt_count(n: int) -> str:
    return f"{n:,}" if n < 1e5 else f"{n / 1e6:,.1f} M" if n < 1e9 else f"{n / 1e9:.3f} B"


def estimate_step(params: dict[str, int], denoiser: str, method: str, trained: int, activations: float,
                  lora: bool, bf16: bool, prompt_bytes: int = 0, masks_held: bool = False) -> Estimate:
    """Peak memory of one training step of ``method`` (esd-x, esd-u, salun) as erase runs it on CPU.

    ``params``: parameters per loaded component; ``denoiser``: which of them trains; ``trained``: Tr;
    ``activations``: GiB from :func:`saved_activations`; ``prompt_bytes``: the task's table of encoded
    prompts; ``masks_held``: ESD's former per-parameter masks kept through the step (as the SD-1.4
    measurements were taken; ESD's masks are 0-dim now). SalUn's masks live for the whole run."""
    d, p = params[denoiser], sum(params.values())
    e = Estimate()
    e.add("weights", _g(4 * p), f"4 B x {fmt_count(p)} loaded")
    if method.startswith("esd") and not lora:
        e.add("teacher", _g(4 * d), f"fp32 frozen copy, 4 B x {fmt_count(d)}")
    if prompt_bytes:
        e.add("prompts", _g(prompt_bytes), "the task's encoded prompt table, fp32")
    e.add("base", BASE_GIB, "interpreter and libraries")
    if method.startswith("esd") and masks_held:
        e.add("masks", _g(d), f"bool mask of every parameter, 1 B x {fmt_count(d)} (erase before 2026-12-05)")
    if method == "salun":
        e.add("saliency", _g(8 * d) + activations, f"gradients 4 B + scores 4 B, x {fmt_count(d)}, and activations", "setup")
        e.add("masks", _g(5 * d), f"bool mask 1 B + frozen values 4 B, x {fmt_count(d)}", "step")
    e.add("grads", _g(4 * trained), f"4 B x {fmt_count(trained)} trained", "step")
    e.add("adam", _g(8 * trained), f"8 B x {fmt_count(trained)}", "step")
    if bf16:
        e.add("autocast", _g(2 * d), f"bf16 weight copies saved for backward, 2 B x {fmt_count(d)}", "step")
    if method == "salun":  # a forget and a retain batch, each through the model with gradients
        e.add("activations", 2 * activations, "2 batches x saved for backward, counted on the meta device", "step")
    else:
        e.add("activations", activations, "saved for backward, counted on the meta device", "step")
    return e


def estimate_denoiser(d: int, trained: int, activations: float, bf16: bool) -> Estimate:
    """The denoiser alone (``speed_denoiser``): its weights, the trained parameters' state, activations."""
    e = Estimate()
    e.add("weights", _g(4 * d), f"4 B x {fmt_count(d)} denoiser")
    e.add("base", BASE_GIB, "interpreter and libraries")
    e.add("grads", _g(4 * trained), f"4 B x {fmt_count(trained)} trained", "step")
    e.add("adam", _g(8 * trained), f"8 B x {fmt_count(trained)}", "step")
    if bf16:
        e.add("autocast", _g(2 * d), f"bf16 weight copies saved for backward, 2 B x {fmt_count(d)}", "step")
    e.add("activations", activations, "saved for backward, counted on the meta device", "step")
    return e


def estimate_uce(params: dict[str, int], shard_bytes: int, prompt_bytes: int = 0) -> Estimate:
    """Load, closed-form edit (a few d x d matrices) and save of the whole pipeline."""
    p = sum(params.values())
    e = Estimate()
    e.add("weights", _g(4 * p), f"4 B x {fmt_count(p)} loaded")
    if prompt_bytes:
        e.add("prompts", _g(prompt_bytes), "the task's encoded prompt table, fp32")
    e.add("save", _g(shard_bytes), "one shard copied while saving")
    e.add("base", BASE_GIB, "interpreter and libraries")
    return e


# -- activations, counted on the meta device ---------------------------------------------------------------

@contextlib.contextmanager
def _fused_attention():
    """Inside: scaled-dot-product attention runs as the fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``,
    which has a meta implementation), so autograd saves what a fused kernel keeps (q, k, v, output, log-sum-exp)
    instead of the math decomposition's probability matrix. Calls with a mask or dropout keep the default path."""
    F = torch.nn.functional
    original = F.scaled_dot_product_attention
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    calls = {"fused": 0, "other": 0}

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is None and dropout_p == 0.0 and not enable_gqa and query.dim() == 4:
            calls["fused"] += 1
            return fused(query, key, value, 0.0, is_causal, scale=scale)[0]
        calls["other"] += 1
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = sdpa
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


def _count(model: nn.Module, run) -> tuple[int, int, int]:
    """(bytes saved for backward, the largest checkpoint segment's share, attention calls fused / not) of ``run()``."""
    params = {id(p) for p in model.parameters()}
    tally = {"bytes": 0}
    seen: dict[int, torch.Tensor] = {}
    seg = {"depth": 0, "start": 0, "max": 0}

    def pack(t):
        if id(t) not in params and (t._base is None or id(t._base) not in params) \
                and id(t) not in seen:
            seen[id(t)] = t  # held, so the id stays unique while counting
            tally["bytes"] += t.numel() * t.element_size()
        return t

    def pre(_module, _args):
        if seg["depth"] == 0:
            seg["start"] = tally["bytes"]
        seg["depth"] += 1

    def post(_module, _args, _out):
        seg["depth"] -= 1
        if seg["depth"] == 0:
            seg["max"] = max(seg["max"], tally["bytes"] - seg["start"])

    handles = [h for m in model.modules() if type(m).__name__ in SEGMENTS
               for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with _fused_attention() as calls, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in handles:
            h.remove()
    return tally["bytes"], seg["max"], calls


def saved_activations(model: nn.Module, run, checkpointing: bool) -> dict:
    """GiB autograd saves for backward in ``run()`` (the meta-device ``model``'s forward), every weight trainable.

    With ``checkpointing``: what the checkpointed forward saves plus the largest segment, recomputed (and
    held) while its backward runs."""
    model.requires_grad_(True).train()
    plain, segment, calls = _count(model, run)
    out = {"plain_gib": round(_g(plain), 3), "largest_segment_gib": round(_g(segment), 3), "attention_calls": calls}
    if checkpointing:
        model.enable_gradient_checkpointing()
        try:
            saved, _, _ = _count(model, run)
        finally:
            model.disable_gradient_checkpointing()
        out["checkpointed_gib"] = round(_g(saved), 3)
        out["gib"] = round(_g(saved + segment), 3)
    else:
        out["gib"] = out["plain_gib"]
    return out


def lora_params(model: torch.nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """Adapter parameters peft adds for ``targets`` (a module matches when its name is a target or ends in
    '.' + target): r x (in + out) per targeted Linear."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total



# -- the guard -------------------------------------------------------------------------------------------

def available_gib() -> float | None:
    """MemAvailable from /proc/meminfo, or None where there is none."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def _status_kib(key: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def limit_memory(gib: float) -> dict:
    """Cap this process's address space so it cannot hold more than ``gib`` GiB.

    RLIMIT_AS counts reserved address space, and after importing torch, diffusers and transformers
    several GiB of it are mappings never touched (the CUDA libraries of a CUDA build), so a bare
    RLIMIT_AS of ``gib`` would fail far below ``gib`` of real memory. The ceiling is therefore
    ``gib`` plus what is reserved but not resident when this is called (right after those imports,
    before any model): every later allocation counts in full, so the process's resident memory
    cannot pass ``gib``. Returns what was set."""
    vm, rss = _status_kib("VmSize"), _status_kib("VmRSS")
    untouched = max((vm or 0) - (rss or 0), 0) * 1024
    limit = int(gib * GIB) + untouched
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return {"limit_gib": round(limit / GIB, 2), "resident_cap_gib": gib, "untouched_at_start_gib": round(untouched / GIB, 2),
            "pid": os.getpid()}
