"""The optimizer: torch AdamW with weight decay on matrices only, and the learning rate as a function of the step.

The learning rate is set on the optimizer before every step (`lr_at`), so there is no scheduler state to save or
to lose in a universal checkpoint; torch AdamW (not DeepSpeed's fused or CPU Adam) resumes bitwise.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import OptimizerConfig


def lr_at(step: int, o: OptimizerConfig, max_steps: int) -> float:
    """Learning rate of the update that takes the model from `step` to step + 1: linear warmup from lr/warmup,
    then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model, weight_decay: float) -> tuple[list[dict], list[float]]:
    """Weight decay on matrices (linear and embedding weights), none on RMSNorm gains. Under zero.Init parameters
    are partitioned and report dim() == 1, so the shape comes from p.ds_shape. Also returns each group's weight
    decay (a universal checkpoint load loses them; trainer.resume puts them back)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        shape = getattr(p, "ds_shape", p.shape)
        (decay if len(shape) >= 2 else no_decay).append(p)
    return ([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            [weight_decay, 0.0])


def build_optimizer(model, o: OptimizerConfig, device: str):
    """(torch AdamW over param_groups, the groups' weight decays)."""
    import torch

    groups, weight_decays = param_groups(model, o.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  fused=True if device == "cuda" else None)
    return optimizer, weight_decays


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
