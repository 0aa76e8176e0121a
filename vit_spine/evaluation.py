"""Scoring a model on the validation shard(s): slice -> study aggregation, calibration, metrics, the metrics table.

`vit-spine evaluate CHECKPOINT --chunks DIR` prints and writes the metrics of any checkpoint.
The same `score_predictions` runs after every training shard and in `report`, on slice probabilities
from the same `vit_spine.inference` path, so all of them report the same numbers. `format_table` is the
one metrics table: plain text (the commands' output), markdown (the Hub model card) and HTML (report).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vit_spine import metrics, options
from vit_spine.aggregate import aggregate_studies, aggregator_names, make_aggregator
from vit_spine.artifacts import default_chunks, load_manifest, read_checkpoint_meta, resolve_checkpoint, train_shards, verify_checkpoint
from vit_spine.options import aliases, parse_config
from vit_spine.schema import EVAL_RESULTS_FILE, STUDY_TARGETS, VERTEBRAE

if TYPE_CHECKING:
    from vit_spine.data import ValidationSet


@dataclass
class PoolingConfig:
    slice_pool: str = field(
        default="max",
        metadata={"help": "the aggregator that turns a study's slice scores into its 8 probabilities (vit_spine.aggregate; "
                  f"built in: {', '.join(aggregator_names())})."},
    )
    patient_pool: str = field(
        default="max", metadata={"help": "the max aggregator's vertebra -> patient rule: max or noisy_or."}
    )
    calibration_folds: int = field(
        default=5,
        metadata={"help": "folds for the cross-fitted calibration of the reported score (0 = no calibration)."},
    )

    def __post_init__(self) -> None:
        make_aggregator(self)  # an unknown --slice_pool or --patient_pool is refused when it is parsed


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
    """Aggregate slice probabilities (n, 14) to studies (`pooling.slice_pool`) and score them.

    Returns (metrics row, calibrator fitted on all validation studies for use at predict time,
    arrays {uids, raw, calibrated, labels} for reports). The reported `weighted_log_loss` is the
    cross-fitted one: no study is scored by a calibrator that saw its own labels.
    """
    uids, raw = aggregate_studies(make_aggregator(pooling), validation.study_ids, slice_probs)
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
    return metrics.prevalence(per_study)


TABLE_STYLES = ("text", "markdown", "html")
TABLE_HEADER = ("shard", "global step", "val wll", "val wll raw", "baseline wll", "AUC patient_overall", "mean AUC C1-C7",
                "train loss")


def table_cells(row: dict) -> list[str]:
    """One metrics row as the table's cells (TABLE_HEADER order; n/a where a value is missing or undefined)."""
    def number(value, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    auc = row.get("auc") or {}
    vertebra_auc = [auc[v] for v in VERTEBRAE if auc.get(v) is not None]
    return [
        "-" if row.get("shard") is None else f"{row['shard']:05d}",
        str(row.get("global_step", "n/a")),
        number(row.get("weighted_log_loss"), 4),
        number(row.get("weighted_log_loss_uncalibrated"), 4),
        number(row.get("baseline_weighted_log_loss"), 4),
        number(auc.get(STUDY_TARGETS[0]), 3),
        number(float(np.mean(vertebra_auc)) if vertebra_auc else None, 3),
        number(row.get("train_loss"), 4),
    ]


def format_table(rows: list[dict], style: str = "text", best_shard: int | None = None, current_shard: int | None = None) -> str:
    """The metrics table, one row per metrics row (validation weighted log loss calibrated and raw, the
    prevalence baseline, AUCs, training loss): `style` text (aligned columns), markdown or html. The row
    of `best_shard` is marked "(best)"; the row of `current_shard` in bold, "(this checkpoint)"."""
    if style not in TABLE_STYLES:
        raise ValueError(f"style {style!r}: choose one of {', '.join(TABLE_STYLES)}")
    body = []
    for row in rows:
        cells = table_cells(row)
        if best_shard is not None and row.get("shard") == best_shard:
            cells[0] += " (best)"
        if current_shard is not None and row.get("shard") == current_shard:
            cells[0] = f"**{cells[0]}** (this checkpoint)" if style == "markdown" else f"{cells[0]} (this checkpoint)"
        body.append(cells)
    if style == "markdown":
        lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---:|" * len(TABLE_HEADER)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    if style == "html":
        import html

        def tr(cells, tag):
            return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

        return "\n".join(["<table>", tr(TABLE_HEADER, "th"), *(tr(cells, "td") for cells in body), "</table>"])
    widths = [max([len(h), *(len(cells[i]) for cells in body)]) for i, h in enumerate(TABLE_HEADER)]
    header = " ".join(h.rjust(w) for h, w in zip(TABLE_HEADER, widths))
    return "\n".join([header, "-" * len(header), *(" ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in body)])


@dataclass
class EvaluateConfig:
    checkpoint: str = field(
        metadata={"help": "a shard checkpoint folder, or a run folder (then its `best`).", "aliases": aliases("model_name_or_path")}
    )
    chunks: str | None = field(
        default=None,
        metadata={"help": "chunks folder whose validation shard(s) to score (default: the run's own, from run_config.json)."},
    )
    output_file: str | None = field(
        default=None,
        metadata={"help": "write the metrics as JSON here (default CHECKPOINT/eval_results.json).", "aliases": aliases("out")},
    )
    batch_size: int = field(default=64, metadata={"help": "slices per forward pass."})
    seed: int | None = field(
        default=None, metadata={"help": "seed of the cross-fitted calibration folds (default: the training run's --seed)."}
    )

    def __post_init__(self) -> None:
        options.at_least(self.batch_size, 1, "--batch_size")
        options.folder_path(self.checkpoint, "CHECKPOINT")
        options.folder_path(self.chunks, "--chunks")
        options.file_path(self.output_file, "--output_file")


def checkpoint_prevalence(meta: dict, chunks: Path, manifest: dict) -> np.ndarray:
    """The baseline's prevalence (8,): the training studies' as training logged it in the checkpoint, else
    (checkpoints saved before it was recorded) over every training shard of `chunks`."""
    from vit_spine.data import ShardDataset

    if "baseline_prevalence" in meta:
        return np.asarray(meta["baseline_prevalence"], dtype=np.float64)
    train_sets = [ShardDataset(chunks / e["path"]) for e in train_shards(manifest)]
    return train_prevalence(np.concatenate([s.study_labels for s in train_sets]), np.concatenate([s.study_ids for s in train_sets]))


def checkpoint_seed(meta: dict, seed: int | None = None) -> int:
    """The seed of the cross-fitted calibration folds: `seed` when given, else the training run's --seed
    (recorded in every checkpoint), so a re-score draws the folds the run's own score was computed on."""
    if seed is not None:
        return seed
    return int(meta.get("seed", 42))  # checkpoints saved before the seed was recorded: TrainingArguments' default


@dataclass
class Scored:
    """A checkpoint scored on validation shards: what `evaluate` prints and `report` draws."""

    row: dict  # the metrics row (score_predictions), with checkpoint, chunks, shard
    slice_probs: np.ndarray  # (n, 14) per validation slice, in manifest order
    validation: ValidationSet
    studies: dict[str, np.ndarray]  # {uids, raw, calibrated, labels}: the labelled studies


def matching_manifest(chunks: Path, checkpoint: Path, meta: dict) -> dict:
    """The manifest of `chunks`; ValueError when its shards were preprocessed otherwise than the checkpoint's."""
    from vit_spine.preprocess import PreprocessConfig

    manifest = load_manifest(chunks)
    if PreprocessConfig.from_dict(manifest["preprocess"]) != PreprocessConfig.from_dict(meta["preprocess"]):
        raise ValueError(f"{chunks} was preprocessed differently from what {checkpoint} was trained on")
    return manifest


def score_checkpoint(
    model, checkpoint: Path, meta: dict, chunks: Path, manifest: dict, batch_size: int, seed: int | None = None
) -> Scored:
    """Predict the validation shard(s) of `chunks` (its `matching_manifest`) with a loaded checkpoint
    (`vit_spine.inference`) and score them as training does: its pooling, its prevalence baseline, its seed.
    `evaluate` and `report` both run this."""
    from vit_spine.data import load_validation
    from vit_spine.inference import predict_probabilities

    validation = load_validation(chunks, manifest)
    probs = predict_probabilities(model, validation.dataset, batch_size, validation.study_ids)
    pooling = PoolingConfig(**meta.get("pooling", {}))
    row, _, studies = score_predictions(probs, validation, checkpoint_prevalence(meta, chunks, manifest), pooling,
                                        seed=checkpoint_seed(meta, seed))
    row = {"checkpoint": str(checkpoint), "chunks": str(chunks), "shard": meta.get("shard"), **row}
    return Scored(row, probs, validation, studies)


def evaluate_checkpoint(config: EvaluateConfig) -> dict:
    from accelerate import PartialState

    from vit_spine.models import load_model

    checkpoint = resolve_checkpoint(config.checkpoint)
    meta = read_checkpoint_meta(checkpoint)
    verify_checkpoint(checkpoint, meta)
    chunks = Path(config.chunks) if config.chunks else default_chunks(checkpoint)
    manifest = matching_manifest(chunks, checkpoint, meta)  # before the model: a bad --chunks fails at once
    model = load_model(checkpoint).to(PartialState().device)  # this process's GPU under `accelerate launch`
    return score_checkpoint(model, checkpoint, meta, chunks, manifest, config.batch_size, config.seed).row


def main(argv=None) -> int:
    from accelerate import PartialState

    (config,) = parse_config(
        EvaluateConfig, argv, prog="vit-spine evaluate", description=__doc__.split("\n")[0], positionals=("checkpoint",)
    )
    result = evaluate_checkpoint(config)
    if PartialState().is_main_process:
        out = Path(config.output_file) if config.output_file else Path(result["checkpoint"]) / EVAL_RESULTS_FILE
        out.write_text(json.dumps(result, indent=2))
        print(format_table([result]))
        print(f"\nwritten to {out}")
    return 0
