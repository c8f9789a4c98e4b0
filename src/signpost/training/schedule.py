"""The optimisation plan: how many epochs and optimizer steps a run trains, with how much warm-up, and the optimizer.

``plan_schedule`` is a pure function of the config and the training split's size, so a resumed run plans the same one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Schedule:
    """How long a run trains, in epochs and optimizer steps, and whether ``train.min_steps`` lengthened it."""

    epochs: int
    steps_per_epoch: int
    warmup_steps: int
    configured_epochs: int
    min_steps: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def raised(self) -> bool:
        return self.epochs > self.configured_epochs

    def note(self) -> str:
        """One line saying what was done when the dataset was too small for the configured epochs ('' if not)."""
        if not self.raised:
            return ""
        return (
            f"the dataset is too small for the schedule: {self.configured_epochs} epochs of {self.steps_per_epoch} "
            f"optimizer steps would be {self.configured_epochs * self.steps_per_epoch} steps, under "
            f"train.min_steps={self.min_steps}; training {self.epochs} epochs ({self.total_steps} steps) instead, "
            f"with {self.warmup_steps} warm-up steps (lower train.batch_size for more steps per epoch, or set "
            "train.min_steps=0 to keep the epochs)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "configured_epochs": self.configured_epochs,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "min_steps": self.min_steps, "raised": self.raised,
                "note": self.note()}


def plan_schedule(epochs: int, steps_per_epoch: int, *, min_steps: int = 0, warmup_epochs: float = 0.0) -> Schedule:
    """The training schedule for a split that gives ``steps_per_epoch`` optimizer steps per epoch.

    ``epochs`` as configured, unless they give fewer than ``min_steps`` steps: then just enough epochs to reach it, so
    that one config trains a 3,000-image copy as long (in steps) as the 39,000-image original. The warm-up keeps its
    share of the schedule (``warmup_epochs / epochs``), so a lengthened run warms up over as many more steps.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"a schedule needs at least one optimizer step per epoch, not {steps_per_epoch}")
    raised = max(epochs, math.ceil(min_steps / steps_per_epoch))
    warmup = round(warmup_epochs * steps_per_epoch * (raised / epochs))  # exactly as before when not raised
    return Schedule(epochs=raised, steps_per_epoch=steps_per_epoch, warmup_steps=warmup, configured_epochs=epochs,
                    min_steps=min_steps)


def make_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD; no weight decay on biases and batch-norm parameters (1-D tensors)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)
