"""The learned aggregator in training: out-of-sample sequences only, per-aggregator scores, no leakage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import toy_run
from vit_spine import train
from vit_spine.artifacts import MANIFEST_FORMAT, load_manifest, read_checkpoint_meta, write_manifest
from vit_spine.data import ShardDataset, ValidationSet
from vit_spine.evaluation import PoolingConfig, score_checkpoint, score_studies, study_label_matrix
from vit_spine.inference import predict_logits
from vit_spine.models import load_model
from vit_spine.schema import OUT_OF_SAMPLE_FILE

SEQUENCE = PoolingConfig(aggregator="sequence", calibration_folds=2, sequence_epochs=20)


def head_studies(checkpoint: Path) -> list[str]:
    with safe_open(str(checkpoint / "aggregator_sequence.safetensors"), "pt") as stored:
        return json.loads(stored.metadata()["studies"])


def shard_studies(chunks: Path, k: int) -> list[str]:
    return list(dict.fromkeys(ShardDataset(chunks / f"shard_{k:05d}").study_ids))


@pytest.fixture(scope="module")
def sequence_run(toy_chunks: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    output = tmp_path_factory.mktemp("sequence") / "run"
    rows = toy_run.run(toy_chunks, output, pooling=SEQUENCE, patience=10, oos_fraction=1.0)
    return output, rows


def test_each_shard_predicts_the_next_shards_studies_and_the_head_learns_from_those_only(sequence_run, toy_chunks):
    output, rows = sequence_run
    assert [r["shard"] for r in rows] == [0, 1, 2, 3]
    # shard k's model predicts all 6 studies (36 slices) of training shard k + 1; the last shard has none after it
    assert [r["out_of_sample"] for r in rows] == [{"shard": 1, "studies": 6, "slices": 36}, {"shard": 2, "studies": 6, "slices": 36},
                                                  {"shard": 3, "studies": 6, "slices": 36}, {"shard": None, "studies": 0, "slices": 0}]
    assert [r["aggregator_fit"] for r in rows] == [{"studies": 6, "shards": [1]}, {"studies": 12, "shards": [1, 2]},
                                                   {"studies": 18, "shards": [1, 2, 3]}, {"studies": 18, "shards": [1, 2, 3]}]
    # what is stored is that model's logits of those slices, and the head of shard k names the studies it learned from
    first = output / "shard_00000"
    with np.load(first / OUT_OF_SAMPLE_FILE) as stored:
        np.testing.assert_array_equal(stored["rows"], np.arange(36))
        next_shard = ShardDataset(toy_chunks / "shard_00001")
        np.testing.assert_array_equal(stored["logits"], predict_logits(load_model(first), next_shard, 64, next_shard.study_ids))
    validation = set(ShardDataset(toy_chunks / "val_00000").study_ids)
    for k in range(4):
        learned_from = head_studies(output / f"shard_{k:05d}")
        assert learned_from == sum((shard_studies(toy_chunks, j) for j in range(1, min(k, 2) + 2)), [])
        assert not set(learned_from) & validation


def test_every_aggregator_is_scored_and_the_chosen_one_judges_the_shard(sequence_run, toy_chunks):
    output, rows = sequence_run
    for row in rows:
        assert list(row["aggregators"]) == ["max", "topk", "sequence"]
        assert row["aggregator"] == "sequence"
        chosen = row["aggregators"]["sequence"]
        assert (row["weighted_log_loss"], row["weighted_log_loss_uncalibrated"], row["auc"]) == (
            chosen["weighted_log_loss"], chosen["weighted_log_loss_uncalibrated"], chosen["auc"])
        assert set(row["seconds"]) == {"training", "out_of_sample_inference", "aggregator_fit"}
    assert rows[0]["aggregators"]["max"] != rows[0]["aggregators"]["sequence"]
    # evaluate re-scores a checkpoint to the same numbers, the head loaded from the checkpoint folder
    checkpoint = output / "shard_00002"
    meta = read_checkpoint_meta(checkpoint)
    assert meta["pooling"]["aggregator"] == "sequence"
    scored = score_checkpoint(load_model(checkpoint), checkpoint, meta, toy_chunks, load_manifest(toy_chunks), 64)
    assert scored.row["aggregators"] == rows[2]["aggregators"]


def test_without_out_of_sample_studies_the_run_is_judged_by_max(toy_chunks, tmp_path):
    rows = toy_run.run(toy_chunks, tmp_path / "run", pooling=SEQUENCE, max_shards=2, oos_fraction=0.0)
    assert [r["aggregator"] for r in rows] == ["max", "max"]
    assert [list(r["aggregators"]) for r in rows] == [["max", "topk"], ["max", "topk"]]
    assert read_checkpoint_meta(tmp_path / "run" / "shard_00000")["pooling"]["aggregator"] == "max"
    assert not (tmp_path / "run" / "shard_00000" / OUT_OF_SAMPLE_FILE).exists()


def test_oos_fraction_draws_whole_studies_and_defaults_to_about_15_percent_of_training():
    ids = np.repeat([f"s{i}" for i in range(10)], 3)
    rows = train.out_of_sample_rows(ids, 0.25, seed=1)
    assert len(rows) == 9 and len(set(ids[rows])) == 3  # ceil(2.5) whole studies
    assert (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(train.out_of_sample_rows(ids, 0.25, seed=1), rows)
    config = train.TrainConfig(chunks=".", model_config="tiny")
    assert train.oos_fraction(config, toy_run.make_args(output_dir="x", num_train_epochs=1.0)) == pytest.approx(0.45)
    assert train.oos_fraction(config, toy_run.make_args(output_dir="x", num_train_epochs=6.0)) == 1.0
    with pytest.raises(ValueError, match=r"--oos_fraction must be in \[0, 1\], got 1.5"):
        train.TrainConfig(chunks=".", model_config="tiny", oos_fraction=1.5)


def test_with_shuffled_validation_labels_the_learned_head_is_no_better_than_the_baseline(tmp_path, monkeypatch):
    """Were the head fitted on validation labels, it would beat the prevalence baseline on them even when
    they are shuffled across studies; fitted out of sample, it cannot."""
    rng = np.random.default_rng(3)
    root = tmp_path / "chunks"
    shards = [{**toy_run.write_toy_shard(root / f"shard_{k:05d}", [f"1.2.{k}.{i}" for i in range(8)], rng), "split": "train"}
              for k in range(3)]
    val = toy_run.write_toy_shard(root / "val_00000", [f"1.2.9.{i}" for i in range(200)], rng, split="val")
    write_manifest(root, {"format": MANIFEST_FORMAT, "preprocess": {"image_size": toy_run.SIZE},
                          "shards": [*shards, {**val, "split": "val"}], "problems": []})

    real_load = train.load_validation

    def shuffled(chunks, manifest):
        validation = real_load(chunks, manifest)
        uids = list(dict.fromkeys(validation.study_ids))
        first = {u: int(np.flatnonzero(validation.study_ids == u)[0]) for u in uids}
        moved = dict(zip(uids, np.random.default_rng(0).permutation(uids)))
        labels = np.stack([validation.study_labels[first[moved[u]]] for u in validation.study_ids])
        return ValidationSet(validation.shards, validation.study_ids, labels)

    monkeypatch.setattr(train, "load_validation", shuffled)
    pooling = PoolingConfig(aggregator="sequence", calibration_folds=5, sequence_epochs=60)
    rows = toy_run.run(root, tmp_path / "run", pooling=pooling, patience=10, oos_fraction=1.0,
                       args={"num_train_epochs": 3.0})
    # The baseline a score cannot beat without the labels: the training prevalence (what the baseline predicts)
    # through the same cross-fitted calibration, which learns the validation prevalence out of fold (so it
    # beats the plain baseline_weighted_log_loss when the two prevalences differ, as any calibrated score does).
    validation = shuffled(root, load_manifest(root))
    labels = study_label_matrix(validation, np.array(list(dict.fromkeys(validation.study_ids))))
    prevalence = read_checkpoint_meta(tmp_path / "run" / "shard_00000")["baseline_prevalence"]
    constant, _ = score_studies(np.tile(prevalence, (len(labels), 1)), labels, folds=5, seed=0)
    assert len(rows) == 3 and [r["aggregator_fit"]["studies"] for r in rows] == [8, 16, 16]
    for row in rows:
        assert row["aggregators"]["sequence"]["weighted_log_loss"] >= constant["weighted_log_loss"] - 0.002
