"""The ViT backbone (`transformers`' ViTForImageClassification) and its random-init presets."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

from vit_spine.models.registry import Backbone, ModelUnavailableError, label_maps, register_backbone

# Random-init sizes for tests and demos; "base" is ViT-B/16.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, patch_size=16),
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536, patch_size=16),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16),
}


def random_vit(sizes: Mapping[str, int], image_size: int) -> ViTForImageClassification:
    patch_size = sizes["patch_size"]
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(f"--patch_size {patch_size} does not divide the image size {image_size}: choose a "
                         f"divisor of {image_size}")
    config = ViTConfig(image_size=image_size, num_channels=3, **sizes, **label_maps())
    return ViTForImageClassification(config).to(memory_format=torch.contiguous_format)


def pretrained_vit(name: str, image_size: int) -> ViTForImageClassification:
    """The backbone of `name` (a Hub name found in the local cache, or a local folder) under a new
    14-output head."""
    try:
        config = ViTConfig.from_pretrained(name)
    except OSError as err:
        raise ModelUnavailableError(
            f"cannot load model {name!r}: {err.__class__.__name__}. It is neither a local directory nor in the "
            "Hugging Face cache, and this machine may be offline. Either download it once where the Hub is "
            f"reachable (`hf download {name}`, then copy ~/.cache/huggingface), pass --model_name_or_path PATH to a local "
            "copy, or train from random init with --model_config tiny|small|base."
        ) from err
    if config.image_size != image_size:
        raise ValueError(
            f"model {name!r} was pretrained at {config.image_size} px but the chunks are {image_size} px: "
            f"re-chunk with --image_size {config.image_size}"
        )
    model, loading = ViTForImageClassification.from_pretrained(
        name, ignore_mismatched_sizes=True, attn_implementation="sdpa", output_loading_info=True, **label_maps()
    )
    refuse_new_backbone_tensors(name, loading)
    return model


def refuse_new_backbone_tensors(name: str, loading: dict) -> None:
    """Only the 14-output head may be new. transformers re-initialises at random, with a log line only, every
    tensor a checkpoint lacks (names it cannot map) or holds at another size; for the backbone that would
    silently train from partly random weights. (Extra tensors, such as a `ViTModel`'s pooler, are dropped.)"""
    new = {*loading["missing_keys"], *(key for key, *_ in loading["mismatched_keys"])}
    backbone = sorted(key for key in new if not key.startswith("classifier."))
    if backbone:
        raise ValueError(
            f"--model_name_or_path {name}: its weights lack {len(backbone)} backbone tensor(s) of this ViT, or hold "
            f"them at another size ({', '.join(backbone[:3])}{', ...' if len(backbone) > 3 else ''}), so they would "
            "start at random; give a ViT saved with `save_pretrained`, or train from random init with "
            "--model_config tiny|small|base"
        )


def load_vit(folder: Path) -> ViTForImageClassification:
    return ViTForImageClassification.from_pretrained(str(folder), attn_implementation="sdpa")


VIT = register_backbone(
    Backbone(name="vit", presets=PRESETS, random_init=random_vit, load=load_vit, pretrained=pretrained_vit)
)
