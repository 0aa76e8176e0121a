"""`vit-spine pretrain`: ViTMAE pretraining on the shards' pixels, and `train` starting from its encoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import TrainerCallback

from toy_run import SIZE, make_args
from vit_spine import cli, pretrain, train
from vit_spine.artifacts import MANIFEST_FORMAT, write_manifest, write_shard_meta
from vit_spine.evaluation import PoolingConfig
from vit_spine.schema import TRAINER_CHECKPOINT_COMPLETE_FILE
from vit_spine.shards import ARROW_FILE, record_batch, shard_schema, write_dataset_files

SLICES_PER_STUDY = 4
TRAIN_STUDIES = (5, 5)  # two training shards of 20 slices
VAL_STUDIES = 3  # one validation shard of 12 slices
BATCH = 8


def write_unlabelled_shard(path: Path, studies: list[str], rng: np.random.Generator, split: str) -> dict:
    """A shard in the chunker's format whose labels and study labels are all NaN (unknown)."""
    n = len(studies) * SLICES_PER_STUDY
    pixels = rng.integers(0, 255, size=(n, 3, SIZE, SIZE), dtype=np.uint8)
    pixels[:, :, 8:24, 8:24] //= 4  # some structure to reconstruct
    schema = shard_schema(SIZE, 3)
    ids = [uid for uid in studies for _ in range(SLICES_PER_STUDY)]
    batch = record_batch(pixels, np.full((n, 14), np.nan, np.float32), np.full((n, 8), np.nan, np.float32), ids,
                         np.tile(np.arange(1, SLICES_PER_STUDY + 1), len(studies)), np.zeros(n), schema)
    path.mkdir(parents=True)
    with pa.OSFile(str(path / ARROW_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    write_dataset_files(path, schema, split, fingerprint=path.name)
    write_shard_meta(path, {"num_slices": n, "problems": []})
    return {"path": path.name, "num_slices": n, "studies": studies, "split": split}


@pytest.fixture(scope="module")
def unlabelled_chunks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    shards = [write_unlabelled_shard(root / f"shard_{k:05d}", [f"9.{k}.{i}" for i in range(count)], rng, "train")
              for k, count in enumerate(TRAIN_STUDIES)]
    shards.append(write_unlabelled_shard(root / "val_00000", [f"9.9.{i}" for i in range(VAL_STUDIES)], rng, "val"))
    write_manifest(root, {"format": MANIFEST_FORMAT, "preprocess": {"image_size": SIZE}, "shards": shards, "problems": []})
    return root


def config(chunks: Path, **overrides) -> pretrain.PretrainConfig:
    return pretrain.PretrainConfig(chunks=str(chunks), **{"model_config": "tiny", "patch_size": 8, **overrides})


def args(output: Path, **overrides):
    return make_args(output_dir=str(output), learning_rate=1e-3, **overrides)


@pytest.fixture(scope="module")
def pretrained(unlabelled_chunks: Path, tmp_path_factory: pytest.TempPathFactory) -> pretrain.PretrainResult:
    """One epoch over the training shards of `unlabelled_chunks` (labels all NaN)."""
    return pretrain.pretrain(config(unlabelled_chunks), args(tmp_path_factory.mktemp("pretrain") / "run"))


def test_pretrains_on_the_training_pixels_without_labels(pretrained: pretrain.PretrainResult) -> None:
    train_slices = sum(TRAIN_STUDIES) * SLICES_PER_STUDY
    assert pretrained.num_slices == train_slices == 40
    assert pretrained.global_step == math.ceil(train_slices / BATCH) == 5  # one epoch, validation left out
    assert math.isfinite(pretrained.train_loss) and pretrained.train_loss > 0
    encoder = pretrained.encoder
    assert encoder == encoder.parent / pretrain.ENCODER_DIR
    saved = json.loads((encoder / "config.json").read_text())
    assert (saved["model_type"], saved["image_size"], saved["patch_size"], saved["hidden_size"]) == ("vit", SIZE, 8, 128)
    meta = json.loads((encoder / pretrain.PRETRAINING_FILE).read_text())
    assert (meta["mask_ratio"], meta["global_step"], meta["shards"]) == (0.75, 5, ["shard_00000", "shard_00001"])
    results = json.loads((encoder.parent / pretrain.RESULTS_FILE).read_text())
    assert (results["global_step"], results["num_slices"]) == (5, 40)
    # the fixed sin-cos position embeddings are set (transformers' own random init leaves them zero)
    assert pretrained.model.vit.embeddings.position_embeddings[0, 1:].abs().sum() > 0
    assert pretrained.model.decoder.decoder_pos_embed[0, 1:].abs().sum() > 0


def test_validation_pixels_only_with_include_validation(unlabelled_chunks: Path, tmp_path: Path) -> None:
    result = pretrain.pretrain(config(unlabelled_chunks, include_validation=True), args(tmp_path / "run"))
    slices = (sum(TRAIN_STUDIES) + VAL_STUDIES) * SLICES_PER_STUDY
    assert result.num_slices == slices == 52
    assert result.global_step == math.ceil(slices / BATCH) == 7


def test_train_starts_from_the_encoder_with_every_tensor_as_pretrained(
    pretrained: pretrain.PretrainResult, toy_chunks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = {}
    create_model = train.create_model

    def recording(*a, **k):
        model = create_model(*a, **k)
        built.update({name: tensor.detach().clone() for name, tensor in model.state_dict().items()})
        return model

    monkeypatch.setattr(train, "create_model", recording)
    cfg = train.TrainConfig(chunks=str(toy_chunks), model_name_or_path=str(pretrained.encoder), augment=False, max_shards=1)
    result = train.run_training(cfg, PoolingConfig(calibration_folds=2), args(tmp_path / "run", max_steps=1))
    assert [row["global_step"] for row in result.rows] == [1]

    encoder = {name: t for name, t in pretrained.model.state_dict().items() if name.startswith("vit.")}
    assert len(encoder) == 4 + 16 * 4 + 2  # embeddings (cls, position, patch weight+bias), 4 layers, final layernorm
    assert set(built) == set(encoder) | {"classifier.weight", "classifier.bias"}
    unequal = [name for name, tensor in encoder.items() if not torch.equal(built[name], tensor)]
    assert unequal == []
    assert tuple(built["classifier.weight"].shape) == (14, 128)


class StepsSeen(TrainerCallback):
    def __init__(self, fail_after: int | None = None):
        self.steps, self.fail_after = [], fail_after

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        if state.global_step == self.fail_after:
            raise RuntimeError("killed")  # before the Trainer saves this step: the last checkpoint is the one before


def test_a_stopped_run_continues_from_its_last_complete_checkpoint(unlabelled_chunks: Path, tmp_path: Path, capsys) -> None:
    run_args = dict(max_steps=5, save_strategy="steps", save_steps=2)
    whole = pretrain.pretrain(config(unlabelled_chunks), args(tmp_path / "whole", **run_args))

    output = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="killed"):
        pretrain.pretrain(config(unlabelled_chunks), args(output, **run_args), callbacks=[StepsSeen(fail_after=3)])
    trainer_dir = output / "trainer"
    assert sorted(p.name for p in trainer_dir.iterdir()) == ["checkpoint-2"]
    assert not (output / pretrain.ENCODER_DIR).exists()
    torn = trainer_dir / "checkpoint-4"  # a checkpoint cut short by a kill: no completion marker
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"cut")

    seen = StepsSeen()
    resumed = pretrain.pretrain(config(unlabelled_chunks), args(output, **run_args), callbacks=[seen])
    assert seen.steps == [3, 4, 5]
    assert resumed.global_step == 5
    out = capsys.readouterr().out
    assert "removing the torn Trainer checkpoint" in out and "resuming from" in out and "checkpoint-2" in out
    assert (trainer_dir / "checkpoint-4" / TRAINER_CHECKPOINT_COMPLETE_FILE).is_file()  # the real one, saved again
    # the same weights as the run that was never stopped (data order, masking RNG and optimizer restored)
    expected = whole.model.state_dict()
    assert [n for n, t in resumed.model.state_dict().items() if not torch.equal(t, expected[n])] == []

    again = StepsSeen()
    finished = pretrain.pretrain(config(unlabelled_chunks), args(output, **run_args), callbacks=[again])
    assert again.steps == [] and finished.global_step == 5


def test_another_mask_ratio_on_the_same_folder_is_refused(
    pretrained: pretrain.PretrainResult, unlabelled_chunks: Path, capsys
) -> None:
    output = pretrained.encoder.parent
    code = cli.main(["pretrain", "--chunks", str(unlabelled_chunks), "--output_dir", str(output), "--model_config", "tiny",
                     "--patch_size", "8", "--mask_ratio", "0.5", "--use_cpu", "True"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vit-spine pretrain: error: ")
    assert "mask_ratio: was 0.75, now 0.5" in err


def test_a_train_run_folder_is_refused(unlabelled_chunks: Path, tmp_path: Path) -> None:
    (tmp_path / "run_config.json").write_text(json.dumps({"chunks": str(unlabelled_chunks.resolve())}))
    with pytest.raises(ValueError, match="holds a `vit-spine train` run"):
        pretrain.pretrain(config(unlabelled_chunks), args(tmp_path))


def test_a_missing_chunks_folder_is_one_line_naming_the_option(tmp_path: Path, capsys) -> None:
    code = cli.main(["pretrain", "--chunks", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"vit-spine pretrain: error: --chunks {tmp_path / 'nope'}: no such folder; give the --output_dir of "
                   "`vit-spine chunk` (set VIT_SPINE_TRACEBACK=1 to see where)\n")
    assert not (tmp_path / "run").exists()


def test_help_lists_the_options(capsys) -> None:
    assert cli.main(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--chunks", "--output_dir", "--model_config", "--patch_size", "--mask_ratio", "--include_validation",
                   "--norm_pix_loss", "--max_steps"):
        assert option in out
