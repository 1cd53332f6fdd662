"""advunlearn — Defensive Unlearning with Adversarial Training (Zhang et al., NeurIPS 2024).

A bi-level problem (OPTML-Group/AdvUnlearn @ 9d23124, ``train-scripts/``):

    min_θ  ℓ_u(θ, δ*) + γ·ℓ_r(θ)   s.t.   δ* = argmin_δ ‖ε_θ(z_t, t | TE_θ([sot, δ, c, eot])) − ε₀(z_t, t | c)‖²

θ is the **text encoder** (``train_method text_encoder_full``: every ``text_model.encoder.*`` weight plus
``final_layer_norm``; token and position embeddings frozen, ``utils/util.py:L36-68``); ``--train
text-encoder+xattn`` also trains the UNet's cross-attention (what the model's layer map calls text
attention). ε₀ is the frozen original model reading the original text encoder's conditions (the task's
cached ones).

Each iteration (``AdvUnlearn.py:L72-163``):

1. **Inner attack** (from iteration ``--warmup-iters`` on, every iteration): k = ``--adv-prompt-num``
   continuous token embeddings δ inserted after the start token, ``[sot, δ, concept prompt, eot…]``
   (``attack_util.py:L224-234``, ``prefix_k``; the sequence keeps its length, the last k tokens fall off),
   optimised by Adam (``--attack-lr``) for ``--attack-steps`` steps, each on a fresh z_t, t and noise, to
   minimise MSE(ε_θ(z_t | TE_θ(adv)), ε₀(z_t | c)) (``attack_util.py:L175-212``). No projection to the
   vocabulary: δ is used as it is. ``--attack fast-at`` takes the sign of the gradient before the same Adam
   step (``L208-210``). ``--attack-init random`` starts from a random vocabulary token's embedding,
   ``latest`` from the previous round's δ (``L5-19``). As in the official loop the attack optimiser's
   gradient is never zeroed (``L175-212`` call ``backward`` and ``step`` only), so gradients add up over the
   inner steps (and fast-AT signs the running sum). The attack only differentiates δ (the text encoder and
   UNet get no gradient from it).
2. **Outer loss**: z_t from 50-step DDIM (η = 0) partial sampling under the concept prompt with the
   original text encoder's condition at guidance ``--start-guidance`` 3, by the UNet being trained
   (``get_loss.py:L299-325``; frozen in the default ``text-encoder`` mode), then the ESD loss
   ℓ_u = ‖ε_θ(z_t | TE_θ([sot, δ*, c])) − [ε₀(z_t|∅) − η(ε₀(z_t|c) − ε₀(z_t|∅))]‖² (η = ``--negative-guidance``),
   plus γ·ℓ_r with ℓ_r = ‖ε_θ(z^r_t | TE_θ(c_r)) − ε₀(z^r_t | c_r)‖² over ``--retain-batch`` retain prompts
   sampled at the same t (``retain_train reg``, ``get_loss.py:L349-361``). During warm-up δ* is absent: the
   plain ESD loss on the concept prompt through TE_θ.

Retain prompts: the task's retain prompts (the bundled models: the other classes in the training
templates); the official code draws ``coco_object``'s 243 "a photo of <object>" prompts without replacement,
resetting when fewer than a batch remain (``prompt_dataset.py``, ``AdvUnlearn.py:L77-78``) — so does this.

Defaults and their source: 1000 iterations, Adam lr 1e-5 (``AdvUnlearn.py:L249-251``; ``--lr`` there is
declared ``int``, so the default is the only usable value), warm-up 200, attack 30 steps at lr 1e-3,
k = 1, ``pgd`` (argparse ``L247-261``), start guidance 3, η = 1, 50 DDIM steps (``L226-234``), retain batch 5
(``L240``); γ = 0.3 and ``attack_init random`` from the README commands (argparse: γ 1.0 with
``retain_train iter``, ``attack_init latest``). Differences: t is the DDIM timestep the partial sample
stopped at (erase's ``esd`` convention, ``DiffusionTask.partial_sample``), not CompVis' separate draw in
[t_enc/50·1000, (t_enc+1)/50·1000); the concept is located by tokens, not by counting words
(``len(word.split())``), which differ only for multi-token words. ``--ddim-steps`` 50 is the partial-sampling
schedule, independent of the task's ``--sample-steps`` (which may be smaller for the bundled model's
evaluation). The erased model is saved with its text encoder (``--save-format pipeline``: ``model/text_encoder``;
``delta``: ``text_encoder.*`` tensors); LoRA is not offered.

SDXL and SD3 (erase's adaptation; the paper trains SD v1.4's one CLIP encoder): both CLIP encoders train, the
same weights of each (``text_encoder`` and ``text_encoder_2``), and δ is a token embedding of both side by side
(``erase.diffusion.text_stack``: a token's embedding in every encoder), inserted at the same position of the
ids both read; the condition is then built as the pipeline builds it (SD3: plus the pooled embeddings; SDXL:
the second encoder's pooled state). For flow models (SD3) ε is the velocity and the ESD target the same
linear combination of the teacher's predictions. SD3 loaded *with* T5 is refused (T5's own tokens cannot
carry δ; erase does not train T5).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from erase.engine.method import Method, MethodConfig, Phase
from erase.errors import EraseError
from erase.fields import below_minimum, opt
from erase.registry import register_method

# Text-encoder weights that train (util.py:L41-64, text_encoder_full with component 'all'): the transformer
# layers and the final layer norm; the token and position embeddings stay frozen. CLIPTextModel names them
# text_model.encoder.* in transformers 4 and encoder.* in 5.
# SDXL / SD3 train both CLIP encoders (text_encoder, text_encoder_2) the same way.
TEXT_TRAINED = tuple(f"{encoder}.{inner}{part}." for encoder in ("text_encoder", "text_encoder_2")
                     for inner in ("text_model.", "") for part in ("encoder", "final_layer_norm"))
STATE_PREFIX, STATE_UNSEEN = "advunlearn_prefix", "advunlearn_unseen_retain"


@dataclass
class AdvUnlearnConfig(MethodConfig):
    train: str = opt("text-encoder", "what trains: the text encoder's transformer layers and final layer norm "
                     "(official text_encoder_full), or those plus the UNet's cross-attention",
                     ("text-encoder", "text-encoder+xattn"))
    max_steps: int = opt(1000, "outer iterations (official --iterations 1000)")
    lr: float = opt(1e-5, "outer learning rate (official Adam 1e-5)")
    optimizer: str = opt("adam", "optimiser", ("sgd", "adamw", "adam"))
    weight_decay: float = opt(0.0, "weight decay")
    batch_size: int = opt(1, "concept images per iteration (official: one)")
    negative_guidance: float = opt(1.0, "η: how far the ESD target is pushed away from the concept (official 1)")
    retain_weight: float = opt(0.3, "γ: weight of the retain regulariser (official README command 0.3)")
    retain_batch: int = opt(5, "retain prompts per iteration, drawn without replacement (official 5)")
    warmup_iters: int = opt(200, "attack-free iterations before adversarial training starts (official 200)")
    attack_steps: int = opt(30, "inner attack steps per iteration (official 30)")
    attack_lr: float = opt(1e-3, "inner attack Adam learning rate (official 1e-3)")
    adv_prompt_num: int = opt(1, "k: adversarial prefix tokens (official 1)")
    attack_init: str = opt("random", "start of each attack: a random vocabulary token's embedding (official README) "
                           "or the previous round's prefix (official argparse default)", ("random", "latest"))
    attack: str = opt("pgd", "inner optimiser: Adam on the gradient (pgd) or on its sign (fast-at, the official "
                      "fast AT variant)", ("pgd", "fast-at"))
    start_guidance: float = opt(3.0, "classifier-free guidance while sampling z_t (official 3)")
    ddim_steps: int = opt(50, "DDIM steps of the partial-sampling schedule (official 50)")
    teacher_dtype: str = opt("auto", "precision of the frozen UNet copy kept with --train text-encoder+xattn: auto "
                             "(fp16 on GPU, fp32 on CPU), fp16, bf16 or fp32", ("auto", "fp16", "bf16", "fp32"))

    length_fields = ()  # runs exactly --max-steps iterations; --epochs is not used (checked below instead)

    def validate(self) -> None:
        super().validate()
        problems = (below_minimum(self, 1, "max_steps", "retain_batch", "attack_steps", "adv_prompt_num")
                    + below_minimum(self, 2, "ddim_steps")
                    + below_minimum(self, 0, "warmup_iters", "retain_weight", "start_guidance"))
        if not self.attack_lr > 0:
            problems.append(f"--attack-lr must be > 0, got {self.attack_lr}")
        if self.adv_prompt_num > 70:
            problems.append(f"--adv-prompt-num must leave room for the prompt in the 77-token sequence, got "
                            f"{self.adv_prompt_num}")
        if problems:
            raise EraseError("; ".join(problems))


@register_method("advunlearn")
class AdvUnlearn(Method):
    __doc__ = __doc__
    tasks = ("diffusion",)
    Config = AdvUnlearnConfig
    streams = ()
    trains_text_encoder = True
    default_weights = {"unlearn": 1.0, "retain": 0.3, "attack": 0.0}

    NO_TEXT = "advunlearn trains the text encoder; a class-conditional DDPM reads no text: use esd-u, salun, rl or ga"
    NO_LORA = ("advunlearn trains the text encoder's own weights; LoRA (--save-format lora, --lora-rank) holds UNet "
               "adapters only: use --save-format pipeline or delta (both carry the trained text encoder)")
    NO_TOKENS = "advunlearn trains the CLIP text encoders on adversarial token embeddings: {problem}"

    def __init__(self, config: AdvUnlearnConfig):
        super().__init__(config)
        # γ is a config field; "attack" is the last inner-attack loss, logged only (a detached number).
        self.default_weights = {"unlearn": 1.0, "retain": config.retain_weight, "attack": 0.0}

    # -- before any work ------------------------------------------------------------------------
    def check_task_config(self, task_cfg):
        if task_cfg.model_has_cross_attention() is False:
            raise EraseError(self.NO_TEXT)
        if task_cfg.trains_adapters():
            raise EraseError(self.NO_LORA)
        problem = getattr(task_cfg, "token_access_problem", lambda: None)()
        if problem:
            raise EraseError(self.NO_TOKENS.format(problem=problem))

    def check_task(self, task):
        if not task.has_cross_attention:
            raise EraseError(self.NO_TEXT)
        problem = task.token_access_problem() if hasattr(task, "token_access_problem") else None
        if problem:
            raise EraseError(self.NO_TOKENS.format(problem=problem))
        if task.trains_adapters:
            raise EraseError(self.NO_LORA)

    def setup(self, ctx):
        cfg, task, model = self.config, ctx.task, ctx.unwrapped
        if not getattr(model, "text_encoders", None):
            raise EraseError("advunlearn needs the model built with its text encoder (the runner does this for methods "
                             "with trains_text_encoder)")
        if cfg.train == "text-encoder":
            self.teacher = model.unet  # never trained in this mode: the original UNet itself
        else:
            dt = cfg.teacher_dtype
            dt = ("fp16" if ctx.device.type == "cuda" else "fp32") if dt == "auto" else dt
            self.teacher = copy.deepcopy(model.unet).eval().requires_grad_(False)
            if dt != "fp32":
                self.teacher.to({"fp16": torch.float16, "bf16": torch.bfloat16}[dt])
        dev = ctx.device
        # The concept prompt of each erased concept (its first training prompt, as esd), its ids, and the
        # original encoder's conditions ε₀ reads.
        self.concept_ids = [task.token_ids([task.forget_prompts[task.forget_concept.index(k)]]).to(dev)
                            for k in range(task.n_concepts)]
        retain = [p for _, p in task.retain_prompts]
        self.retain_ids = task.token_ids(retain).to(dev)
        self.retain_cond = task.condition(torch.tensor(task.prompt_indices(retain), device=dev))
        self.vocab = len(task.tokenizer)

    def parameter_masks(self, ctx):
        xattn = self.config.train == "text-encoder+xattn"
        text_attention = ctx.task.layer_map(ctx.model).is_text_attention

        def trains(name: str) -> bool:
            return name.startswith(TEXT_TRAINED) or (xattn and name.startswith("unet.") and text_attention(name))

        # 0-d masks expanded to each shape: uniform per tensor, so nothing of the model's size is allocated.
        masks = {n: torch.tensor(trains(n), device=p.device).expand(p.shape) for n, p in ctx.model.named_parameters()}
        if not any(trains(n) for n in masks if n.startswith("text_encoder")):
            raise EraseError("advunlearn: the text encoder has no text_model.encoder.* weights (a CLIP text model "
                             "is expected)")
        return masks

    def phases(self, ctx):
        return [Phase("advunlearn", self.config.max_steps, ())]

    # -- the inner attack -------------------------------------------------------------------------
    def prefixed_ids(self, k: int) -> torch.Tensor:
        """(1, L) [sot, k placeholders, prompt tokens, eot…], cut back to L. The placeholders' embeddings are
        replaced by δ; their id (the prompt's first token) only matters to encoders that read an attention
        mask, where an end-of-text id would mask the prompt out."""
        ids, n = self.concept_ids[k], self.config.adv_prompt_num
        return torch.cat([ids[:, :1], ids[:, 1:2].repeat(1, n), ids[:, 1:ids.shape[1] - n]], dim=1)

    def prefixed_embeds(self, model, ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """(1, L, D_tok) the encoder's token embeddings of ``ids`` with positions 1..k replaced by ``prefix``."""
        tok = model.token_embeddings(ids)
        return torch.cat([tok[:, :1], prefix.to(tok.dtype), tok[:, 1 + prefix.shape[1]:]], dim=1)

    def initial_prefix(self, ctx, model) -> torch.Tensor:
        """(1, k, D_tok): the previous round's δ (``latest``, once there is one) or random vocabulary tokens'
        embeddings (``attack_util.py:L5-19``)."""
        saved = ctx.state.get(STATE_PREFIX)
        if self.config.attack_init == "latest" and saved is not None:
            return torch.tensor(saved, device=ctx.device)
        ids = torch.randint(0, self.vocab, (1, self.config.adv_prompt_num), device=ctx.device)
        return model.token_embeddings(ids).float()

    def attack_loss(self, model, ids, prefix, x_t, t, target) -> torch.Tensor:
        """MSE(ε_θ(x_t | TE_θ([sot, δ, c])), target): the attack's objective at ``prefix``."""
        pred = model(x_t, t, ids=ids.expand(x_t.shape[0], -1),
                     token_embeds=self.prefixed_embeds(model, ids, prefix).expand(x_t.shape[0], -1, -1)).sample
        return F.mse_loss(pred.float(), target)

    def sample(self, ctx, model, k: int, stop: int, n: int):
        """(z_t, t, ε₀(z_t|c)) for concept k: z_t partially sampled by the model's UNet under the original condition."""
        cfg, task = self.config, ctx.task
        seeds = torch.randint(0, 2**31 - 1, (n,)).tolist()
        x_t, t = task.partial_sample(model, n, stop, cfg.ddim_steps, cfg.start_guidance, seeds, k)
        x_t = x_t.detach().to(ctx.device, torch.float32)
        t = torch.as_tensor(t, device=ctx.device).expand(n)
        with torch.no_grad():
            ep = self._teacher(task, x_t, t, task.concept_condition(n, ctx.device, k))
        return x_t, t, ep

    def adversarial_prefix(self, ctx, k: int, init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """δ* for concept k after ``--attack-steps`` steps (``attack_util.py:L126-222``), and the last step's loss."""
        cfg, model = self.config, ctx.unwrapped
        prefix = (self.initial_prefix(ctx, model) if init is None else init).detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([prefix], lr=cfg.attack_lr)
        ids = self.prefixed_ids(k)
        grad_sum = None
        was = model.training
        model.eval()  # as the official attack (L92-94); the text encoder is frozen there, here only δ is differentiated
        try:
            for _ in range(cfg.attack_steps):
                stop = int(torch.randint(0, cfg.ddim_steps, (1,)))
                x_t, t, ep = self.sample(ctx, model, k, stop, 1)
                with torch.enable_grad():
                    loss = self.attack_loss(model, ids, prefix, x_t, t, ep)
                    (grad,) = torch.autograd.grad(loss, [prefix])
                # The official loop never zeroes this gradient: it accumulates (fast-AT signs the running sum in place).
                grad_sum = grad if grad_sum is None else grad_sum + grad
                if cfg.attack == "fast-at":
                    grad_sum = grad_sum.sign()
                prefix.grad = grad_sum.clone()
                opt.step()
        finally:
            model.train(was)
        return prefix.detach(), loss.detach()

    # -- the outer loss ---------------------------------------------------------------------------
    def _teacher(self, task, x_t, t, cond) -> torch.Tensor:
        dtype = next(self.teacher.parameters()).dtype
        return task.predict(self.teacher, x_t.to(dtype), t, cond).float()

    def _retain_draw(self, ctx) -> list[int]:
        """Retain prompts without replacement; the pool resets when fewer than a batch remain (kept in ctx.state,
        so a resumed run draws what the uninterrupted one would)."""
        everything = list(range(len(self.retain_ids)))
        unseen = ctx.state.get(STATE_UNSEEN)
        if unseen is None or len(unseen) < self.config.retain_batch:
            unseen = everything
        take = min(self.config.retain_batch, len(unseen))
        chosen = [unseen[i] for i in torch.randperm(len(unseen))[:take].tolist()]
        drawn = set(chosen)
        ctx.state[STATE_UNSEEN] = [i for i in unseen if i not in drawn]
        return chosen

    def losses(self, batch, ctx):
        cfg, task, model = self.config, ctx.task, ctx.unwrapped
        dev, n = ctx.device, cfg.batch_size
        k = int(torch.randint(0, task.n_concepts, (1,))) if task.n_concepts > 1 else 0
        terms = {}
        if ctx.global_step >= cfg.warmup_iters:
            prefix, terms["attack"] = self.adversarial_prefix(ctx, k)
            if cfg.attack_init == "latest":
                ctx.state[STATE_PREFIX] = prefix.cpu().tolist()
            ids = self.prefixed_ids(k)
            embeds = self.prefixed_embeds(model, ids, prefix).expand(n, -1, -1)
        else:
            ids, embeds = self.concept_ids[k], None
        ids = ids.expand(n, -1)
        stop = int(torch.randint(0, cfg.ddim_steps, (1,)))  # one t for the concept and the retain images (official)
        x_c, t, ep = self.sample(ctx, model, k, stop, n)
        chosen = self._retain_draw(ctx)
        r_ids, r_cond = self.retain_ids[chosen], self.retain_cond[chosen]
        seeds = torch.randint(0, 2**31 - 1, (len(chosen),)).tolist()
        x_r, _ = task.partial_sample_under(model, r_cond, stop, cfg.ddim_steps, cfg.start_guidance, seeds)
        x_r = x_r.detach().to(dev, torch.float32)
        with torch.no_grad():
            e0 = self._teacher(task, x_c, t, task.null_condition(n, dev))
            target_u = e0 - cfg.negative_guidance * (ep - e0)
            target_r = self._teacher(task, x_r, t[:1].expand(len(chosen)), r_cond)
        # One call through the (possibly DDP-wrapped) model: the concept rows and the retain rows together.
        all_embeds = None if embeds is None else torch.cat([embeds, model.token_embeddings(r_ids)])
        pred = ctx.model(torch.cat([x_c, x_r]), torch.cat([t, t[:1].expand(len(chosen))]),
                         ids=torch.cat([ids, r_ids]), token_embeds=all_embeds).sample.float()
        terms["unlearn"] = F.mse_loss(pred[:n], target_u)
        terms["retain"] = F.mse_loss(pred[n:], target_r)
        return terms
