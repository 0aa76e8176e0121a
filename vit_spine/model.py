"""The model: a ViT with 14 sigmoid outputs, and the masked multi-label loss the Trainer uses.

Outputs (logits), in this order everywhere: fracture C1..C7, then visible C1..C7.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from vit_spine import VERTEBRAE

LABEL_NAMES = tuple(f"fracture_{v}" for v in VERTEBRAE) + tuple(f"visible_{v}" for v in VERTEBRAE)
NUM_LABELS = len(LABEL_NAMES)
IGNORE_INDEX = -100.0  # unknown targets travel as -100 so the Trainer's item count skips them (pitfall 2)
DEFAULT_PRETRAINED = "google/vit-base-patch16-224-in21k"

# Random-init sizes for tests and demos; "base" is ViT-B/16.
MODEL_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, patch_size=16),
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536, patch_size=16),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16),
}


class ModelUnavailableError(FileNotFoundError):
    """The requested pretrained model cannot be loaded (offline machine, wrong path)."""


def _label_maps() -> tuple[dict[int, str], dict[str, int]]:
    id2label = dict(enumerate(LABEL_NAMES))
    return id2label, {name: i for i, name in id2label.items()}


def create_model(
    model_name_or_path: str | None = None,
    model_config: str | None = None,
    image_size: int = 224,
    seed: int = 0,
    patch_size: int | None = None,
) -> ViTForImageClassification:
    """A ViT with 14 multi-label outputs: random-init from `model_config`, else pretrained weights.

    The classification head is always new (14 outputs); the backbone comes from `model_name_or_path`
    (a Hub name found in the local cache, or a local directory).
    """
    id2label, label2id = _label_maps()
    common = dict(
        num_labels=NUM_LABELS,
        id2label=id2label,
        label2id=label2id,
        problem_type="multi_label_classification",
    )
    if model_config is not None:
        if model_config not in MODEL_CONFIGS:
            raise ValueError(f"--model_config {model_config!r}: choose from {', '.join(MODEL_CONFIGS)}")
        sizes = dict(MODEL_CONFIGS[model_config])
        if patch_size is not None:
            if patch_size < 1 or image_size % patch_size:
                raise ValueError(f"--patch_size {patch_size} does not divide the image size {image_size}: choose a "
                                 f"divisor of {image_size}")
            sizes["patch_size"] = patch_size
        config = ViTConfig(image_size=image_size, num_channels=3, **sizes, **common)
        torch.manual_seed(seed)
        return ViTForImageClassification(config).to(memory_format=torch.contiguous_format)
    name = model_name_or_path or DEFAULT_PRETRAINED
    check_model_folder(name)
    try:
        config = ViTConfig.from_pretrained(name)
    except OSError as err:
        raise ModelUnavailableError(
            f"cannot load model {name!r}: {err.__class__.__name__}. It is neither a local directory nor in the "
            "Hugging Face cache, and this machine may be offline. Either download it once where the Hub is "
            f"reachable (`hf download {name}`, then copy ~/.cache/huggingface), pass --model PATH to a local "
            "copy, or train from random init with --model-config tiny|small|base."
        ) from err
    if config.image_size != image_size:
        raise ValueError(
            f"model {name!r} was pretrained at {config.image_size} px but the chunks are {image_size} px: "
            f"re-chunk with --image-size {config.image_size}"
        )
    torch.manual_seed(seed)
    return ViTForImageClassification.from_pretrained(
        name, ignore_mismatched_sizes=True, attn_implementation="sdpa", **common
    )


def check_model_folder(name: str) -> None:
    """A `--model` that is a local path must be a folder saved with `save_pretrained`. Without this, a
    folder lacking config.json fails in transformers as "not in the Hugging Face cache", or worse."""
    path = Path(name)
    if path.is_file():
        raise ValueError(f"--model {name}: a file; give a model folder (config.json + model.safetensors) or a Hub name")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {name}: no config.json in this folder; give a folder written by "
                                "`save_pretrained` (config.json + model.safetensors), or a Hub name in the local cache")


def load_model(checkpoint: str | Path) -> ViTForImageClassification:
    """Load a saved checkpoint with `from_pretrained`, which maps the saved parameter names correctly.

    (The Trainer's own `resume_from_checkpoint` loads with strict=False and silently skips the
    renamed ViT encoder weights in transformers 5.x: DESIGN.md pitfall 1.)
    A missing or damaged config.json or weights file is named with the fix, instead of transformers'
    messages (a missing config.json would load the default ViT-B config and report size mismatches).
    """
    from safetensors import SafetensorError

    folder = Path(checkpoint)
    fix = (f"use another shard's checkpoint, or delete {folder.name}/vit_spine.json and run the same "
           "`vit-spine train` command again to train it anew")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'}: missing, the checkpoint is incomplete: {fix}")
    if not any(folder.glob("*.safetensors")) and not (folder / "pytorch_model.bin").is_file():
        raise FileNotFoundError(f"{folder / 'model.safetensors'}: missing, the checkpoint has no weights: {fix}")
    try:
        return ViTForImageClassification.from_pretrained(str(folder), attn_implementation="sdpa")
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"checkpoint {folder}: its config.json or weights are damaged ({reason}): {fix}") from err


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
    for any gradient accumulation or world size (DESIGN.md pitfall 2). `pos_weight` up-weights the
    rare positive fracture targets.
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
    weights = torch.ones(NUM_LABELS)
    weights[: len(VERTEBRAE)] = max(1.0, weight)
    return weights
