"""Scoring a model on the validation shard(s): slice -> vertebra -> patient pooling, calibration, metrics.

`vit-spine evaluate CHECKPOINT --chunks DIR` prints and writes the metrics of any checkpoint.
The same `score_predictions` runs after every training shard, so both report the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vit_spine import STUDY_TARGETS, VERTEBRAE, metrics

CHECKPOINT_META = "vit_spine.json"  # saved beside the weights: preprocessing, calibration, metrics
METRICS_FILE = "metrics.jsonl"  # one row per finished shard, in the run folder


@dataclass
class PoolingConfig:
    slice_pool: str = field(default="max", metadata={"help": "slice -> vertebra pooling (see vit_spine.metrics)."})
    patient_pool: str = field(default="max", metadata={"help": "vertebra -> patient pooling (see vit_spine.metrics)."})
    calibration_folds: int = field(
        default=5,
        metadata={"help": "folds for the cross-fitted calibration of the reported score (0 = no calibration)."},
    )


@dataclass
class ValidationSet:
    """Everything scoring needs besides the model's outputs, one entry per validation slice."""

    study_ids: np.ndarray  # (n,) str
    study_labels: np.ndarray  # (n, 8) float, NaN if unlabeled


def study_label_matrix(validation: ValidationSet, uids: np.ndarray) -> np.ndarray:
    """(m, 8) study labels in the order of `uids`."""
    first_row = {}
    for i, uid in enumerate(validation.study_ids):
        first_row.setdefault(uid, i)
    return validation.study_labels[[first_row[u] for u in uids]].astype(np.float64)


def score_predictions(
    slice_probs: np.ndarray,
    validation: ValidationSet,
    baseline_prevalence: np.ndarray,
    pooling: PoolingConfig,
    seed: int = 0,
) -> tuple[dict, "metrics.Calibrator | None", dict[str, np.ndarray]]:
    """Pool slice probabilities (n, 14) to studies and score them.

    Returns (metrics row, calibrator fitted on all validation studies for use at predict time,
    arrays {uids, raw, calibrated, labels} for reports). The reported `weighted_log_loss` is the
    cross-fitted one: no study is scored by a calibrator that saw its own labels.
    """
    uids, vertebra_probs = metrics.pool_slices_to_studies(
        validation.study_ids, slice_probs[:, : len(VERTEBRAE)], how=pooling.slice_pool
    )
    patient_probs = metrics.vertebra_to_patient(vertebra_probs, how=pooling.patient_pool)
    raw = metrics.study_matrix(uids, vertebra_probs, patient_probs)
    labels = study_label_matrix(validation, uids)
    labelled = ~np.isnan(labels).any(axis=1)
    uids, raw, labels = uids[labelled], raw[labelled], labels[labelled]
    if len(uids) == 0:
        raise ValueError("the validation shards hold no labelled study: nothing to score")

    calibrator = None
    calibrated = raw
    if pooling.calibration_folds > 1:
        calibrated = metrics.cross_fitted_calibration(labels, raw, n_folds=pooling.calibration_folds, seed=seed)
        calibrator = metrics.Calibrator().fit(labels, raw)
    baseline = np.broadcast_to(baseline_prevalence, labels.shape)
    auc = metrics.per_vertebra_auc(labels, raw)
    row = {
        "weighted_log_loss": float(metrics.weighted_log_loss(labels, calibrated)),
        "weighted_log_loss_uncalibrated": float(metrics.weighted_log_loss(labels, raw)),
        "baseline_weighted_log_loss": float(metrics.weighted_log_loss(labels, baseline)),
        "auc": {k: (None if np.isnan(v) else float(v)) for k, v in auc.items()},
        "num_val_studies": int(len(uids)),
        "num_val_slices": int(len(slice_probs)),
    }
    arrays = {"uids": uids, "raw": raw, "calibrated": calibrated, "labels": labels}
    return row, calibrator, arrays


def train_prevalence(study_labels: np.ndarray, study_ids: np.ndarray) -> np.ndarray:
    """Per-target prevalence (8,) over the distinct labelled studies of the training shards."""
    _, first = np.unique(study_ids, return_index=True)
    per_study = study_labels[first]
    per_study = per_study[~np.isnan(per_study).any(axis=1)]
    if len(per_study) == 0:
        raise ValueError("the training shards hold no labelled study: cannot compute the prevalence baseline")
    return per_study.mean(axis=0)


def best_row(rows: list[dict], min_delta: float = 0.0) -> dict | None:
    """The run's best shard: in shard order, a shard is the new best when its validation weighted log loss
    is below the best so far by more than `min_delta` (train's --min_delta). The one rule for "best"."""
    best = None
    for row in sorted(rows, key=lambda r: r["shard"]):
        if best is None or row["weighted_log_loss"] < best["weighted_log_loss"] - min_delta:
            best = row
    return best


WEIGHT_FILES = ("config.json",)  # besides the *.safetensors: what `from_pretrained` needs


def checkpoint_weight_files(checkpoint: Path) -> list[str]:
    """The files of a checkpoint that hold the model: its safetensors (and index) and config.json."""
    names = sorted(p.name for p in Path(checkpoint).glob("*.safetensors*"))
    return names + [name for name in WEIGHT_FILES if (Path(checkpoint) / name).is_file()]


def verify_checkpoint(checkpoint: Path, meta: dict) -> None:
    """DamagedFile naming the checkpoint, what differs and how to repair it, unless its weight files have
    the sizes and checksums recorded when it was saved (checkpoints saved before the record: not checked)."""
    from vit_spine.fs import DamagedFile, check_files

    record = meta.get("files")
    if not record:
        return
    damage = check_files(Path(checkpoint), record, checksums=True)
    if damage:
        raise DamagedFile(
            f"checkpoint {checkpoint} is damaged ({'; '.join(damage)}): use another shard's checkpoint, or delete "
            f"{Path(checkpoint).name}/{CHECKPOINT_META} and run the same `vit-spine train` command again to train it anew"
        )


def load_json(path: Path, fix: str, text: str | None = None) -> Any:
    """JSON of a file this tool wrote (or `text`, one line of it); ValueError naming the file and `fix`
    when it is not valid JSON (cut short by a kill or a full disk, or edited by hand)."""
    try:
        return json.loads(Path(path).read_text() if text is None else text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}): {fix}") from err


def read_checkpoint_meta(checkpoint: Path) -> dict:
    path = Path(checkpoint) / CHECKPOINT_META
    fix = (f"use another shard's checkpoint, or delete {Path(checkpoint).name}/{CHECKPOINT_META} and run the same "
           "`vit-spine train` command again to train it anew")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing: {fix}")
    meta = load_json(path, fix)
    if not isinstance(meta, dict) or not isinstance(meta.get("shard"), int) or not isinstance(meta.get("metrics"), dict):
        raise ValueError(f"{path}: expected integer `shard` and a `metrics` object: {fix}")
    return meta


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl ([] when there is none yet)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    fix = "run the same `vit-spine train` command again to rewrite it from the shards' checkpoints"
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            row = load_json(path, f"line {number} is damaged: {fix}", text=line)
            if not isinstance(row, dict) or "shard" not in row or "weighted_log_loss" not in row:
                raise ValueError(f"{path}: line {number} is not a metrics row: {fix}")
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Per shard: validation weighted log loss (calibrated and raw), baseline, AUCs."""
    header = f"{'shard':>5} {'step':>6} {'wll':>7} {'wll_raw':>8} {'baseline':>8} {'auc_any':>7} {'auc_mean_C':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        auc = row.get("auc", {})
        vert = [auc.get(v) for v in VERTEBRAE if auc.get(v) is not None]
        overall = auc.get(STUDY_TARGETS[0])
        lines.append(
            f"{row.get('shard', '-'):>5} {row.get('global_step', '-'):>6} {row['weighted_log_loss']:7.4f} "
            f"{row['weighted_log_loss_uncalibrated']:8.4f} {row['baseline_weighted_log_loss']:8.4f} "
            f"{'   n/a' if overall is None else f'{overall:7.3f}'} "
            f"{'      n/a' if not vert else f'{np.mean(vert):10.3f}'}"
        )
    return "\n".join(lines)


@dataclass
class EvaluateConfig:
    checkpoint: str = field(metadata={"help": "a shard checkpoint folder, or a run folder (then its `best`)."})
    chunks: str | None = field(
        default=None,
        metadata={"help": "chunks folder whose validation shard(s) to score (default: the run's own, from run_config.json)."},
    )
    out: str | None = field(default=None, metadata={"help": "write the metrics as JSON here (default CHECKPOINT/eval_results.json)."})
    batch_size: int = field(default=64, metadata={"help": "slices per forward pass."})
    seed: int | None = field(
        default=None, metadata={"help": "seed of the cross-fitted calibration folds (default: the training run's --seed)."}
    )

    def __post_init__(self) -> None:
        from vit_spine import options

        options.at_least(self.batch_size, 1, "--batch_size")
        options.folder_path(self.checkpoint, "CHECKPOINT")
        options.folder_path(self.chunks, "--chunks")
        options.file_path(self.out, "--out")


def resolve_checkpoint(path: str | Path) -> Path:
    """A shard checkpoint folder; a run folder stands for its `best` shard."""
    path = Path(path).resolve()
    if (path / CHECKPOINT_META).is_file():
        return path
    if (path / "best" / CHECKPOINT_META).is_file():
        return (path / "best").resolve()
    raise FileNotFoundError(
        f"{path} is neither a vit-spine checkpoint ({CHECKPOINT_META}) nor a run folder with a `best` checkpoint"
    )


def default_chunks(checkpoint: Path) -> Path:
    run_config = checkpoint.parent / "run_config.json"
    if not run_config.is_file():
        raise FileNotFoundError(f"{run_config} not found: pass --chunks DIR")
    saved = load_json(run_config, "pass --chunks DIR (the next `vit-spine train` of this run rewrites it)")
    if not isinstance(saved, dict) or not isinstance(saved.get("chunks"), str):
        raise ValueError(f"{run_config}: names no `chunks` folder: pass --chunks DIR")
    return Path(saved["chunks"])


def predict_slices(model, dataset, batch_size: int) -> np.ndarray:
    """Sigmoid probabilities (n, 14) for every slice of `dataset`, in order (all processes get all rows).

    Runs through `Trainer.predict`, which shards the work across processes under `accelerate launch`
    and gathers the predictions with the distributed sampler's padding removed.
    """
    import tempfile

    import torch
    from transformers import TrainingArguments

    from vit_spine.train import ShardTrainer, collate

    with tempfile.TemporaryDirectory() as scratch:  # the Trainer wants an output folder; it writes nothing we keep
        args = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=batch_size,
            report_to="none",
            remove_unused_columns=False,
            bf16_full_eval=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        )
        logits = ShardTrainer(model=model, args=args, data_collator=collate).predict(dataset).predictions
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def evaluate_checkpoint(config: EvaluateConfig) -> dict:
    from vit_spine import chunk as chunking
    from vit_spine.data import ShardDataset
    from vit_spine.model import load_model
    from vit_spine.train import load_validation

    checkpoint = resolve_checkpoint(config.checkpoint)
    meta = read_checkpoint_meta(checkpoint)
    verify_checkpoint(checkpoint, meta)
    chunks = Path(config.chunks) if config.chunks else default_chunks(checkpoint)
    manifest = chunking.load_manifest(chunks)
    if manifest["preprocess"] != meta["preprocess"]:
        raise ValueError(f"{chunks} was preprocessed differently from what {checkpoint} was trained on")
    val_dataset, validation = load_validation(chunks, manifest)
    if "baseline_prevalence" in meta:  # the training studies' prevalence, as logged during training
        prevalence = np.asarray(meta["baseline_prevalence"], dtype=np.float64)
    else:
        train_sets = [ShardDataset(chunks / e["path"]) for e in chunking.train_shards(manifest)]
        prevalence = train_prevalence(
            np.concatenate([s.study_labels for s in train_sets]), np.concatenate([s.study_ids for s in train_sets])
        )
    probs = predict_slices(load_model(checkpoint), val_dataset, config.batch_size)
    pooling = PoolingConfig(**meta.get("pooling", {}))
    seed = config.seed if config.seed is not None else meta.get("seed", 42)
    row, _, _ = score_predictions(probs, validation, prevalence, pooling, seed=seed)
    return {"checkpoint": str(checkpoint), "chunks": str(chunks), "shard": meta.get("shard"), **row}


def main(argv=None) -> int:
    from accelerate import PartialState

    from vit_spine.cli import parse_config

    (config,) = parse_config(
        EvaluateConfig, argv, prog="vit-spine evaluate", description=__doc__.split("\n")[0], positionals=("checkpoint",)
    )
    result = evaluate_checkpoint(config)
    if PartialState().is_main_process:
        out = Path(config.out) if config.out else Path(result["checkpoint"]) / "eval_results.json"
        out.write_text(json.dumps(result, indent=2))
        print(format_table([result]))
        print(f"\nwritten to {out}")
    return 0
