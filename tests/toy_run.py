"""Toy shards and a toy training run, shared by the training, resume, reliability and distributed tests.

The shards are written through the project's own shard writer (`vit_spine.shards`); fractured slices
carry a bright square, so the tiny ViT learns something in a few steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from transformers import TrainingArguments

from vit_spine import train
from vit_spine.artifacts import MANIFEST_FORMAT, write_manifest, write_shard_meta
from vit_spine.evaluation import PoolingConfig
from vit_spine.shards import ARROW_FILE, record_batch, shard_schema, write_dataset_files

SIZE = 32


def write_toy_shard(path: Path, studies: list[str], rng: np.random.Generator, slices: int = 6, split: str = "train") -> dict:
    """A 3-channel shard in the chunker's format, `slices` per study; returns its manifest entry."""
    pixels, labels, study_labels, ids, numbers, zs = [], [], [], [], [], []
    for uid in studies:
        vert = rng.random(7) < 0.3
        study = np.array([float(vert.any()), *vert.astype(float)], dtype=np.float32)
        for n in range(slices):
            visible = np.zeros(7, dtype=np.float32)
            visible[n % 7] = 1
            fracture = visible * vert
            image = rng.integers(0, 60, size=(3, SIZE, SIZE), dtype=np.uint8)
            if fracture.any():
                image[:, 8:24, 8:24] = 250
            row_labels = np.concatenate([fracture, visible]).astype(np.float32)
            if n == 0:
                row_labels[7:] = np.nan  # unknown visibility must be masked, not learned as 0
            pixels.append(image)
            labels.append(row_labels)
            study_labels.append(study)
            ids.append(uid)
            numbers.append(n + 1)
            zs.append(float(n))
    path.mkdir(parents=True)
    schema = shard_schema(SIZE, 3)
    batch = record_batch(np.stack(pixels), np.stack(labels), np.stack(study_labels), ids, np.array(numbers), np.array(zs), schema)
    with pa.OSFile(str(path / ARROW_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    write_dataset_files(path, schema, split, fingerprint=path.name)
    write_shard_meta(path, {"num_slices": len(ids), "problems": []})
    return {"path": path.name, "num_slices": len(ids), "studies": studies}


def write_toy_chunks(root: Path) -> Path:
    """Four training shards of 6 studies x 6 slices and a validation shard of 10 studies."""
    rng = np.random.default_rng(0)
    shards = []
    for k in range(4):
        entry = write_toy_shard(root / f"shard_{k:05d}", [f"1.2.3.{k}.{i}" for i in range(6)], rng)
        shards.append({**entry, "split": "train"})
    val = write_toy_shard(root / "val_00000", [f"1.2.3.9.{i}" for i in range(10)], rng, split="val")
    shards.append({**val, "split": "val"})
    write_manifest(root, {"format": MANIFEST_FORMAT, "preprocess": {"image_size": SIZE}, "shards": shards, "problems": []})
    return root


def make_args(**overrides) -> TrainingArguments:
    values = train.training_defaults()
    values.update(
        per_device_train_batch_size=8, logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0
    )
    values.update(overrides)
    return TrainingArguments(**values)


def run(chunks: Path, output: Path, callbacks=(), pooling=None, **config) -> list[dict]:
    """`train.run_training` of a tiny random-init ViT on `chunks`; returns the metrics rows."""
    args_overrides = config.pop("args", {})
    cfg = train.TrainConfig(chunks=str(chunks), model_config="tiny", augment=False, **config)
    args = make_args(output_dir=str(output), **args_overrides)
    return train.run_training(cfg, pooling or PoolingConfig(calibration_folds=2), args, callbacks).rows
