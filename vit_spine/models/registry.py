"""The backbone registry: which model `train` builds, and which class loads a saved checkpoint.

A backbone is a `transformers.PreTrainedModel` family with 14 sigmoid outputs (`schema.SLICE_TARGETS`)
and `config.image_size`, registered under the `model_type` its config.json records. So a checkpoint
names its backbone without any file of ours, `save_pretrained`/`from_pretrained` (what the Trainer and
every loader use) work unchanged, and `load_model` dispatches on that name. Random-init sizes are
presets (`--model_config NAME`), one flat namespace over all backbones; a pretrained `--model_name_or_path` folder
is built by the backbone its config.json names (a Hub name: the ViT).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel

from vit_spine.schema import SLICE_TARGETS

DEFAULT_BACKBONE = "vit"  # what a pretrained model that is not a local folder is (a Hub name)
DEFAULT_PRETRAINED = "google/vit-base-patch16-224-in21k"


class ModelUnavailableError(FileNotFoundError):
    """The requested pretrained model cannot be loaded (offline machine, wrong path)."""


@dataclass(frozen=True)
class Backbone:
    name: str = field(metadata={"help": "the registry name: the `model_type` in the config.json of its checkpoints."})
    presets: Mapping[str, Mapping[str, int]] = field(
        metadata={"help": "random-init sizes by --model_config name (names are unique over all backbones)."}
    )
    random_init: Callable[[Mapping[str, int], int], PreTrainedModel] = field(
        metadata={"help": "(preset sizes, image size) -> a new model with 14 outputs, weights from torch's RNG."}
    )
    load: Callable[[Path], PreTrainedModel] = field(
        metadata={"help": "a checkpoint folder (save_pretrained) -> the model, as saved."}
    )
    pretrained: Callable[[str, int], PreTrainedModel] | None = field(
        default=None,
        metadata={"help": "(Hub name or folder, image size) -> its pretrained weights under a new 14-output head; "
                  "None: random init only."},
    )


_BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone: Backbone) -> Backbone:
    """Make `backbone` (and its presets) available to `train` and to every checkpoint loader."""
    if _BACKBONES.get(backbone.name, backbone) is not backbone:
        raise ValueError(f"backbone {backbone.name!r} is already registered")
    taken = {preset: other.name for other in _BACKBONES.values() if other is not backbone for preset in other.presets}
    clashes = sorted(set(backbone.presets) & set(taken))
    if clashes:
        raise ValueError(f"backbone {backbone.name!r}: preset(s) {clashes} already belong to {taken[clashes[0]]!r}")
    _BACKBONES[backbone.name] = backbone
    return backbone


def get_backbone(name: str) -> Backbone:
    """The registered backbone `name`; ValueError listing the known ones."""
    try:
        return _BACKBONES[name]
    except KeyError:
        raise ValueError(f"backbone {name!r} is not registered; known: {', '.join(sorted(_BACKBONES))}") from None


def preset_names() -> list[str]:
    return [preset for backbone in _BACKBONES.values() for preset in backbone.presets]


def backbone_of_preset(preset: str) -> Backbone:
    """The backbone whose presets hold `preset`; ValueError naming --model_config and the known presets."""
    for backbone in _BACKBONES.values():
        if preset in backbone.presets:
            return backbone
    raise ValueError(f"--model_config {preset!r}: choose from {', '.join(preset_names())}")


def label_maps() -> dict:
    """The config fields every backbone's model sets: 14 labels in `schema.SLICE_TARGETS` order, multi-label."""
    id2label = dict(enumerate(SLICE_TARGETS))
    return dict(
        num_labels=len(SLICE_TARGETS),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        problem_type="multi_label_classification",
    )


def create_model(
    model_name_or_path: str | None = None,
    model_config: str | None = None,
    image_size: int = 224,
    seed: int = 0,
    patch_size: int | None = None,
) -> PreTrainedModel:
    """A model with 14 multi-label outputs: random-init from the preset `model_config` (with `patch_size`
    for a backbone whose preset has one), else pretrained weights from `model_name_or_path` (default the
    ViT's `DEFAULT_PRETRAINED`) under a new head. The backbone is the preset's, or the folder's model_type."""
    torch.manual_seed(seed)
    if model_config is not None:
        backbone = backbone_of_preset(model_config)
        sizes = dict(backbone.presets[model_config])
        if patch_size is not None:
            if "patch_size" not in sizes:
                raise ValueError(f"--patch_size: the {backbone.name!r} backbone of --model_config {model_config} "
                                 "has no patch size")
            sizes["patch_size"] = patch_size
        return backbone.random_init(sizes, image_size)
    name = model_name_or_path or DEFAULT_PRETRAINED
    return pretrained_backbone(name).pretrained(name, image_size)


def pretrained_backbone(name: str) -> Backbone:
    """The backbone that builds a model from pretrained `name` (a local folder's config.json model_type; a Hub
    name: the ViT); ValueError naming --model_name_or_path when none can."""
    check_model_folder(name)
    try:
        backbone = get_backbone(folder_model_type(Path(name)))
    except ValueError as err:
        raise ValueError(f"--model_name_or_path {name}: {err}") from None
    if backbone.pretrained is None:
        raise ValueError(f"--model_name_or_path {name}: the {backbone.name!r} backbone has no pretrained weights; "
                         "give --model_config instead")
    return backbone


def folder_model_type(path: Path) -> str:
    """The backbone a local model folder holds (its config.json's model_type); a Hub name: the default."""
    config = path / "config.json"
    if not config.is_file():
        return DEFAULT_BACKBONE
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{config}: not a readable model config ({error})") from error
    if not isinstance(model_type, str):
        raise ValueError(f"{config}: has no model_type; give a folder written by `save_pretrained`")
    return model_type


def check_model_folder(name: str) -> None:
    """A `--model_name_or_path` that is a local path must be a folder saved with `save_pretrained`. Without this, a
    folder lacking config.json fails in transformers as "not in the Hugging Face cache", or worse."""
    path = Path(name)
    if path.is_file():
        raise ValueError(f"--model_name_or_path {name}: a file; give a model folder (config.json + model.safetensors) or a Hub name")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model_name_or_path {name}: no config.json in this folder; give a folder written by "
                                "`save_pretrained` (config.json + model.safetensors), or a Hub name in the local cache")


def load_model(checkpoint: str | Path) -> PreTrainedModel:
    """Load a saved checkpoint with its backbone's `load` (`from_pretrained`, which maps the saved
    parameter names correctly), chosen by the model_type its config.json records.

    (The Trainer's own `resume_from_checkpoint` loads with strict=False and silently skips the
    renamed ViT encoder weights in transformers 5.x.)
    A missing or damaged config.json or weights file is named with the fix, instead of transformers'
    messages (a missing config.json would load the default ViT-B config and report size mismatches).
    """
    folder = Path(checkpoint)
    fix = (f"use another shard's checkpoint, or delete {folder.name}/vit_spine.json and run the same "
           "`vit-spine train` command again to train it anew")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'}: missing, the checkpoint is incomplete: {fix}")
    if not any(folder.glob("*.safetensors")) and not (folder / "pytorch_model.bin").is_file():
        raise FileNotFoundError(f"{folder / 'model.safetensors'}: missing, the checkpoint has no weights: {fix}")
    try:
        model_type = folder_model_type(folder)
    except ValueError as err:
        raise ValueError(f"checkpoint {folder}: its config.json is damaged ({err}): {fix}") from err
    try:
        backbone = get_backbone(model_type)
    except ValueError as err:  # a plugin's checkpoint, loaded where its module was not imported
        raise ValueError(f"checkpoint {folder}: {err}; import the module that registers it first") from None
    try:
        return backbone.load(folder)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"checkpoint {folder}: its config.json or weights are damaged ({reason}): {fix}") from err
