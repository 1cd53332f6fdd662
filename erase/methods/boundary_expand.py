"""boundary_expand — Boundary Expanding (Chen et al., CVPR 2023): train Df into a shadow class, then prune it.

Reference code: TY-LEE-KR/Boundary-Unlearning-Code ``boundary_unlearning.py::boundary_expanding``
(a mirror of the authors' code):

1. ``setup``: the classifier head (the last ``nn.Linear`` of the model) is widened from C to C + 1
   outputs. The new layer is initialised like the original's ``init_params`` (xavier-normal weight,
   zero bias) and rows 0..C−1 are then overwritten with the trained head, so only the shadow row C
   is new: xavier-normal over the (C+1)×d matrix, bias 0.
2. The **whole network** (features and widened head) is trained on the forget set only, every
   example labelled with the shadow class C; CE loss.
3. ``finalize``: the shadow neuron is pruned — a C-way head is built from rows 0..C−1 of the
   *trained* widened head, so the model has its original outputs again and Df's mass now sits on
   a class that no longer exists.

OPTML-Group/Unlearn-Saliency ``Classification/unlearn/boundary_ex.py`` re-implements this with a
default-initialised shadow row and **never prunes** the extra neuron (its model keeps C + 1
outputs, so arg-max predictions can land on the shadow class). We follow the original paper's code.

Defaults from the original code: SGD lr 1e-5, momentum 0.9, no weight decay, batch 64
(``main.py``), 10 epochs over the forget set (``finetune_epochs = 10``). The shadow row is drawn
from a CPU generator seeded by the run's seed, so every process and every resume builds the same head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from erase.engine.method import Method, MethodConfig
from erase.errors import EraseError
from erase.fields import opt
from erase.methods._layers import classifier_head
from erase.registry import register_method


@dataclass
class BoundaryExpandConfig(MethodConfig):
    epochs: float = opt(10.0, "epochs over the forget set")
    lr: float = opt(1e-5, "learning rate")
    weight_decay: float = opt(0.0, "weight decay (the original code uses none)")
    batch_size: int = opt(64, "examples per optimiser step")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@register_method("boundary_expand")
class BoundaryExpand(Method):
    tasks = ("classifier",)
    Config = BoundaryExpandConfig
    streams = ("forget",)
    default_weights = {"forget_shadow_ce": 1.0}

    def setup(self, ctx):
        model = ctx.unwrapped
        name, head = classifier_head(model)
        classes = ctx.task.num_classes
        if head.out_features != classes:
            raise EraseError(f"boundary_expand: the last nn.Linear ({name}) has {head.out_features} outputs, "
                             f"but the task has {classes} classes")
        d, c = head.in_features, head.out_features
        wide = nn.Linear(d, c + 1, bias=head.bias is not None).to(head.weight.device, head.weight.dtype)
        g = torch.Generator().manual_seed(ctx.seed)
        std = math.sqrt(2.0 / (d + c + 1))  # xavier-normal (gain 1) of a (C+1)×d matrix
        with torch.no_grad():
            wide.weight[:c] = head.weight
            wide.weight[c] = (torch.randn(d, generator=g, dtype=torch.float64) * std).to(wide.weight)
            if head.bias is not None:
                wide.bias[:c] = head.bias
                wide.bias[c] = 0.0
        replace_module(model, name, wide)
        self.head_name, self.num_classes, self.head = name, c, wide

    def losses(self, batch, ctx):
        forget = batch["forget"]
        shadow = torch.full_like(forget["label"], self.num_classes)
        return {"forget_shadow_ce": ctx.task.loss(ctx.model, {**forget, "label": shadow})}

    def finalize(self, ctx):
        wide, c = self.head, self.num_classes
        pruned = nn.Linear(wide.in_features, c, bias=wide.bias is not None).to(wide.weight.device, wide.weight.dtype)
        with torch.no_grad():
            pruned.weight.copy_(wide.weight[:c])
            if wide.bias is not None:
                pruned.bias.copy_(wide.bias[:c])
        replace_module(ctx.unwrapped, self.head_name, pruned)
