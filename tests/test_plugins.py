"""A toy channel scheme, backbone and aggregator, registered from this file only, run chunk -> train -> predict.

Nothing outside this file knows them: the registries (`vit_spine.channels`, `vit_spine.models`,
`vit_spine.aggregate`) are the whole way in, as CONTRACTS.md "How to add ..." describes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from vit_spine import aggregate, channels, cli, models
from vit_spine.data import ShardDataset
from vit_spine.dicom import read_hu
from vit_spine.preprocess import PreprocessConfig, render_slice
from vit_spine.schema import FRACTURE_TARGETS, FRACTURES, SLICE_TARGETS, STUDY_TARGETS

IMAGE_SIZE = 32
SOFT_TISSUE = (40.0, 400.0)  # the toy's one window (center, width in HU), unlike any built-in scheme's


# ---------------------------------------------------------------- a one-window channel scheme

def render_soft_tissue(image: np.ndarray, options) -> np.ndarray:
    return channels.apply_window(image, *SOFT_TISSUE)[None]


ONE_WINDOW = channels.ChannelScheme(
    name="toy_one_window",
    description="the slice in a soft-tissue window, in all three channels",
    render=render_soft_tissue,
    layout=lambda options: ((0, 0), (0, 0), (0, 0)),
)


# ---------------------------------------------------------------- a tiny CNN backbone

class ToyCNNConfig(PretrainedConfig):
    model_type = "toy_cnn"

    def __init__(self, image_size: int = 32, width: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.width = width


class ToyCNN(PreTrainedModel):
    config_class = ToyCNNConfig
    main_input_name = "pixel_values"

    def __init__(self, config: ToyCNNConfig):
        super().__init__(config)
        w = config.width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * w, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # torch's default initialisation, from the RNG `create_model` seeds

    def forward(self, pixel_values: torch.Tensor, labels=None, **kwargs) -> ImageClassifierOutput:
        return ImageClassifierOutput(logits=self.classifier(self.features(pixel_values)))


TOY_CNN = models.Backbone(
    name="toy_cnn",
    presets={"toy-cnn": {"width": 4}},
    random_init=lambda sizes, image_size: ToyCNN(ToyCNNConfig(image_size=image_size, **sizes, **models.label_maps())),
    load=lambda folder: ToyCNN.from_pretrained(str(folder)),
)


# ---------------------------------------------------------------- a mean-pool aggregator

class MeanPool:
    """A vertebra's probability is the mean of its slices' fracture scores; the patient's their max."""

    def __init__(self, pooling) -> None:
        pass

    def __call__(self, slice_probs: np.ndarray) -> np.ndarray:
        vertebra = slice_probs[:, FRACTURES].mean(axis=0)
        return np.concatenate([[vertebra.max()], vertebra])


REGISTRIES = (channels._SCHEMES, models.registry._BACKBONES, aggregate._AGGREGATORS)


@pytest.fixture(scope="module")
def plugins():
    """The toy scheme, backbone and aggregator registered for this module's tests, removed again after them."""
    saved = [dict(registry) for registry in REGISTRIES]
    channels.register_channel_scheme(ONE_WINDOW)
    models.register_backbone(TOY_CNN)
    aggregate.register_aggregator("toy_mean", MeanPool)
    yield
    for registry, entries in zip(REGISTRIES, saved):
        registry.clear()
        registry.update(entries)


@pytest.fixture(scope="module")
def toy_run(plugins, synth_data: Path, tmp_path_factory) -> dict[str, Path]:
    """chunk -> train -> predict through the command line, with the toy scheme and the toy backbone."""
    root = tmp_path_factory.mktemp("plugins")
    paths = {"chunks": root / "chunks", "run": root / "run", "submission": root / "submission.csv",
             "slices": root / "slices.csv"}
    assert cli.main(["chunk", str(synth_data), "--output_dir", str(paths["chunks"]), "--channels", "toy_one_window",
                     "--image_size", str(IMAGE_SIZE), "--workers", "0", "--no_progress"]) == 0
    assert cli.main(["train", "--chunks", str(paths["chunks"]), "--output_dir", str(paths["run"]),
                     "--model_config", "toy-cnn", "--slice_pool", "toy_mean", "--calibration_folds", "0",
                     "--num_train_epochs", "1", "--per_device_train_batch_size", "32", "--save_steps", "1000",
                     "--seed", "0"]) == 0
    assert cli.main(["predict", str(paths["run"]), str(synth_data / "test_images"),
                     "--output_file", str(paths["submission"]), "--studies_csv", str(synth_data / "test.csv"),
                     "--slices_out", str(paths["slices"]), "--workers", "0", "--no_progress"]) == 0
    return paths


def test_the_manifest_names_the_scheme_and_shards_store_its_one_channel(toy_run, synth_data):
    manifest = json.loads((toy_run["chunks"] / "manifest.json").read_text())
    assert manifest["preprocess"]["channels"] == "toy_one_window" and manifest["stored_channels"] == 1
    entry = manifest["shards"][0]
    meta = json.loads((toy_run["chunks"] / entry["path"] / "vit_spine_shard.json").read_text())
    assert meta["channel_layout"] == [[0, 0], [0, 0], [0, 0]]
    shard = ShardDataset(toy_run["chunks"] / entry["path"])
    pixels = shard.read_uint8([0])[0]
    # the first row is the first slice of the shard's first study, rendered in the toy's window ...
    table = pd.read_parquet(toy_run["chunks"] / "slice_table.parquet")
    first = table[(table["StudyInstanceUID"] == shard.study_ids[0]) & (table["slice_index"] == 0)].iloc[0]
    config = PreprocessConfig(image_size=IMAGE_SIZE, channels="toy_one_window")
    expected = render_slice(read_hu(first["path"], frame=int(first["frame"])), config)[0]
    # ... in all three channels: the toy's layout, assembled by the shard reader
    assert all(np.array_equal(channel, expected) for channel in pixels)


def test_the_checkpoint_names_the_toy_backbone_and_loads_as_it(toy_run):
    best = toy_run["run"] / "best"
    assert json.loads((best / "config.json").read_text())["model_type"] == "toy_cnn"
    assert type(models.load_model(best)) is ToyCNN
    assert json.loads((best / "vit_spine.json").read_text())["preprocess"]["channels"] == "toy_one_window"
    with pytest.raises(ValueError, match="the 'toy_cnn' backbone has no pretrained weights; give --model_config"):
        models.create_model(model_name_or_path=str(best))


def test_predict_gives_every_study_its_eight_rows_pooled_by_the_toy_aggregator(toy_run, synth_data):
    assert json.loads((toy_run["run"] / "best" / "vit_spine.json").read_text())["pooling"]["aggregator"] == "toy_mean"  # given as the old --slice_pool
    submission = pd.read_csv(toy_run["submission"]).set_index("row_id")["fractured"]
    studies = pd.read_csv(synth_data / "test.csv")["StudyInstanceUID"].unique()
    assert len(studies) == 3 and len(submission) == 3 * 8
    slices = pd.read_csv(toy_run["slices"])
    assert list(slices.columns) == ["StudyInstanceUID", "slice_number", "z", *SLICE_TARGETS]
    for uid in studies:
        # the mean of the study's slice fracture probabilities; no calibration (--calibration_folds 0)
        vertebra = slices.loc[slices["StudyInstanceUID"] == uid, list(FRACTURE_TARGETS)].to_numpy().mean(axis=0)
        expected = np.concatenate([[vertebra.max()], vertebra])
        got = submission[[f"{uid}_{target}" for target in STUDY_TARGETS]].to_numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


def test_unknown_names_are_refused_with_the_known_ones(plugins, tmp_path):
    with pytest.raises(ValueError, match="^--channels 'rgb': not a channel scheme; known: bone25d, toy_one_window, windows$"):
        PreprocessConfig(channels="rgb")
    with pytest.raises(ValueError, match="^--model_config 'huge': choose from tiny, small, base, toy-cnn$"):
        models.create_model(model_config="huge")
    with pytest.raises(ValueError, match="already registered"):
        channels.register_channel_scheme(channels.ChannelScheme("windows", "", render_soft_tissue, ONE_WINDOW.layout))
    checkpoint = tmp_path / "shard_00000"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "resnet_3d"}))
    (checkpoint / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=f"^checkpoint {checkpoint}: backbone 'resnet_3d' is not registered; "
                                         "known: toy_cnn, vit; import the module that registers it first$"):
        models.load_model(checkpoint)
    with pytest.raises(ValueError, match=f"^--model_name_or_path {checkpoint}: backbone 'resnet_3d' is not registered; "
                                         "known: toy_cnn, vit$"):
        models.create_model(model_name_or_path=str(checkpoint))
