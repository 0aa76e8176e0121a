"""The masked multi-label loss the Trainer uses, whatever the backbone (it reads only the logits)."""

from __future__ import annotations

import torch
from torch import nn

from vit_spine.schema import FRACTURES, NUM_SLICE_TARGETS

IGNORE_INDEX = -100.0  # unknown targets travel as -100 so the Trainer's item count skips them


def masked_bce_sum(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    """Sum of per-element BCE over the known targets (labels != IGNORE_INDEX)."""
    known = labels != IGNORE_INDEX
    targets = torch.where(known, labels, torch.zeros_like(labels))
    losses = nn.functional.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=pos_weight, reduction="none"
    )
    return (losses * known).sum()


class MaskedBCELoss:
    """`compute_loss_func` for the Trainer: BCE summed over known targets / known targets in the step.

    The Trainer counts `num_items_in_batch` as labels != -100 over every micro-batch of the
    optimizer step (and across processes), so dividing a sum by it gives the same loss and gradient
    for any gradient accumulation or world size. `pos_weight` up-weights the rare positive fracture
    targets.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None):
        self.pos_weight = pos_weight

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        total = masked_bce_sum(logits, labels, pos_weight)
        if num_items_in_batch is None:  # evaluation: the mean over this batch's known targets
            num_items_in_batch = (labels != IGNORE_INDEX).sum()
        return total / torch.clamp(torch.as_tensor(num_items_in_batch, device=total.device), min=1)


def fracture_pos_weight(positive_rate: float, max_weight: float) -> torch.Tensor:
    """pos_weight for the 14 outputs: fracture targets get (neg/pos) capped at max_weight; visibility 1."""
    weight = 1.0
    if 0 < positive_rate < 1:
        weight = min(max_weight, (1 - positive_rate) / positive_rate)
    weights = torch.ones(NUM_SLICE_TARGETS)
    weights[FRACTURES] = max(1.0, weight)
    return weights
