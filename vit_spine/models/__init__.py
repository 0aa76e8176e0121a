"""Models: the backbone registry (`registry`), the ViT backbone and its presets (`vit`), and the masked
loss (`loss`). Importing the package registers the built-in backbones."""

from vit_spine.models import vit
from vit_spine.models.loss import IGNORE_INDEX, MaskedBCELoss, fracture_pos_weight, masked_bce_sum
from vit_spine.models.registry import (
    DEFAULT_PRETRAINED,
    Backbone,
    ModelUnavailableError,
    backbone_of_preset,
    check_model_folder,
    create_model,
    get_backbone,
    label_maps,
    load_model,
    preset_names,
    pretrained_backbone,
    register_backbone,
)

__all__ = [
    "DEFAULT_PRETRAINED",
    "IGNORE_INDEX",
    "Backbone",
    "MaskedBCELoss",
    "ModelUnavailableError",
    "backbone_of_preset",
    "check_model_folder",
    "create_model",
    "fracture_pos_weight",
    "get_backbone",
    "label_maps",
    "load_model",
    "masked_bce_sum",
    "preset_names",
    "pretrained_backbone",
    "register_backbone",
    "vit",
]
