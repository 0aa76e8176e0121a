"""Scoring a model on the validation shard(s): slice -> study aggregation, calibration, metrics, the metrics table.

`vit-spine evaluate CHECKPOINT --chunks DIR` prints and writes the metrics of any checkpoint.
The same `score_predictions` runs after every training shard and in `report`, on slice probabilities
from the same `vit_spine.inference` path, so all of them report the same numbers. `format_table` is the
one metrics table: plain text (the commands' output), markdown (the Hub model card) and HTML (report).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vit_spine import metrics, options
from vit_spine.aggregate import Aggregator, aggregate_studies, aggregator_names, check_patient_pool, make_aggregator, saved_aggregators
from vit_spine.artifacts import default_chunks, load_manifest, read_checkpoint_meta, resolve_checkpoint, train_shards, verify_checkpoint
from vit_spine.options import aliases, parse_config
from vit_spine.schema import EVAL_RESULTS_FILE, STUDY_TARGETS, VERTEBRAE

if TYPE_CHECKING:
    from vit_spine.data import ValidationSet


@dataclass
class PoolingConfig:
    aggregator: str = field(
        default="sequence",
        metadata={"help": "the aggregator that turns a study's slice scores into its 8 probabilities and by which the best "
                  "shard is chosen and predict, evaluate, report and the model card work (vit_spine.aggregate; built in: "
                  f"{', '.join(aggregator_names())}). Every aggregator is scored after each shard (metrics.jsonl "
                  "`aggregators`).", "aliases": aliases("slice_pool")},
    )
    patient_pool: str = field(
        default="max", metadata={"help": "the max and topk aggregators' vertebra -> patient rule: max or noisy_or."}
    )
    topk: int = field(default=3, metadata={"help": "the topk aggregator's k: a vertebra is the mean of its k most suspicious slices."})
    sequence_hidden: int = field(default=16, metadata={"help": "the sequence aggregator's GRU size (per direction)."})
    sequence_members: int = field(
        default=3, metadata={"help": "the sequence aggregator is the mean of this many GRU heads fitted from different seeds."}
    )
    sequence_max_length: int = field(
        default=64, metadata={"help": "the sequence aggregator reads at most this many z bins (a longer study is max-pooled into them)."}
    )
    sequence_epochs: int = field(default=150, metadata={"help": "full-batch passes of the sequence aggregator's fit."})
    calibration_folds: int = field(
        default=5,
        metadata={"help": "folds for the cross-fitted calibration of the reported score (0 = no calibration)."},
    )

    def __post_init__(self) -> None:
        options.at_least(self.topk, 1, "--topk")
        options.at_least(self.sequence_hidden, 1, "--sequence_hidden")
        options.at_least(self.sequence_members, 1, "--sequence_members")
        options.at_least(self.sequence_max_length, 1, "--sequence_max_length")
        options.at_least(self.sequence_epochs, 1, "--sequence_epochs")
        check_patient_pool(self)  # a bad --patient_pool or --aggregator is refused when it is parsed
        make_aggregator(self)

    @classmethod
    def from_dict(cls, saved: dict) -> PoolingConfig:
        """The pooling a checkpoint recorded (`vit_spine.json` `pooling`); one saved before `aggregator` was the
        field's name recorded it as `slice_pool`, and one that recorded neither was pooled by `max`, the only
        aggregator then."""
        saved = dict(saved)
        saved.setdefault("aggregator", saved.pop("slice_pool", "max"))
        return cls(**saved)


def study_label_matrix(validation: ValidationSet, uids: np.ndarray) -> np.ndarray:
    """(m, 8) study labels in the order of `uids`."""
    first_row = {}
    for i, uid in enumerate(validation.study_ids):
        first_row.setdefault(uid, i)
    return validation.study_labels[[first_row[u] for u in uids]].astype(np.float64)


def score_studies(raw: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> tuple[dict, np.ndarray]:
    """One aggregator's study probabilities scored: ({weighted_log_loss (cross-fitted calibration),
    weighted_log_loss_uncalibrated, auc}, the calibrated probabilities)."""
    calibrated = metrics.cross_fitted_calibration(labels, raw, n_folds=folds, seed=seed) if folds > 1 else raw
    auc = metrics.per_vertebra_auc(labels, raw)
    scores = {
        "weighted_log_loss": float(metrics.weighted_log_loss(labels, calibrated)),
        "weighted_log_loss_uncalibrated": float(metrics.weighted_log_loss(labels, raw)),
        "auc": {k: (None if np.isnan(v) else float(v)) for k, v in auc.items()},
    }
    return scores, calibrated


def score_predictions(
    slice_probs: np.ndarray,
    validation: ValidationSet,
    baseline_prevalence: np.ndarray,
    pooling: PoolingConfig,
    seed: int = 0,
    aggregators: dict[str, Aggregator] | None = None,
) -> tuple[dict, "metrics.Calibrator | None", dict[str, np.ndarray]]:
    """Aggregate slice probabilities (n, 14) to studies with each of `aggregators` (default: `pooling.aggregator`
    alone) and score them.

    Returns (metrics row, calibrator of the chosen aggregator fitted on all validation studies for use at
    predict time, arrays {uids, raw, calibrated, labels} of the chosen one plus {NAME: raw} of every one, for
    reports). The row's top-level scores are the chosen aggregator's: `pooling.aggregator`, or `max` when
    that one is not among `aggregators` (a learned head not fitted yet); `aggregator` names it and
    `aggregators` holds every one's scores. The reported `weighted_log_loss` is the cross-fitted one: no study
    is scored by a calibrator that saw its own labels.
    """
    if aggregators is None:
        aggregators = {pooling.aggregator: make_aggregator(pooling)}
    chosen = pooling.aggregator if pooling.aggregator in aggregators else "max"
    if chosen not in aggregators:
        aggregators = {**aggregators, "max": make_aggregator(pooling, "max")}
    pooled = {name: aggregate_studies(aggregator, validation.study_ids, slice_probs) for name, aggregator in aggregators.items()}
    uids = pooled[chosen][0]
    labels = study_label_matrix(validation, uids)
    labelled = ~np.isnan(labels).any(axis=1)
    uids, labels = uids[labelled], labels[labelled]
    if len(uids) == 0:
        raise ValueError("the validation shards hold no labelled study: nothing to score")

    per_aggregator, arrays = {}, {"uids": uids, "labels": labels}
    for name, (_, raw) in pooled.items():
        per_aggregator[name], calibrated = score_studies(raw[labelled], labels, pooling.calibration_folds, seed)
        arrays[name] = raw[labelled]
        if name == chosen:
            arrays["raw"], arrays["calibrated"] = raw[labelled], calibrated
    calibrator = metrics.Calibrator().fit(labels, arrays["raw"]) if pooling.calibration_folds > 1 else None
    baseline = np.broadcast_to(baseline_prevalence, labels.shape)
    row = {
        **per_aggregator[chosen],
        "baseline_weighted_log_loss": float(metrics.weighted_log_loss(labels, baseline)),
        "aggregator": chosen,
        "aggregators": per_aggregator,
        "num_val_studies": int(len(uids)),
        "num_val_slices": int(len(slice_probs)),
    }
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
    return [
        "-" if row.get("shard") is None else f"{row['shard']:05d}",
        str(row.get("global_step", "n/a")),
        number(row.get("weighted_log_loss"), 4),
        number(row.get("weighted_log_loss_uncalibrated"), 4),
        number(row.get("baseline_weighted_log_loss"), 4),
        number(auc.get(STUDY_TARGETS[0]), 3),
        number(mean_vertebra_auc(auc), 3),
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
    return render_table(TABLE_HEADER, body, style)


def mean_vertebra_auc(auc: dict) -> float | None:
    """The mean of the C1-C7 AUCs that are defined (None when none is)."""
    values = [auc[v] for v in VERTEBRAE if auc.get(v) is not None]
    return float(np.mean(values)) if values else None


def format_aggregator_table(rows: list[dict], style: str = "text") -> str:
    """Every aggregator side by side, one row per shard: its validation weighted log loss (cross-fitted calibration)
    and mean C1-C7 AUC; "-" where it was not scored (a learned one before it had studies to learn from)."""
    names = list(dict.fromkeys(name for row in rows for name in row.get("aggregators", {})))
    header = ("shard", "chosen", *(f"{name} {what}" for name in names for what in ("wll", "AUC C1-C7")), "baseline wll")
    body = []
    for row in rows:
        cells = [f"{row['shard']:05d}", str(row.get("aggregator", "max"))]
        for name in names:
            scores = row.get("aggregators", {}).get(name)
            mean_auc = None if scores is None else mean_vertebra_auc(scores["auc"])
            cells += ["-", "-"] if scores is None else [f"{scores['weighted_log_loss']:.4f}", "n/a" if mean_auc is None else f"{mean_auc:.3f}"]
        body.append([*cells, f"{row['baseline_weighted_log_loss']:.4f}"])
    return render_table(header, body, style)


def render_table(header: Sequence[str], body: list[list[str]], style: str) -> str:
    """Cells as an aligned text table, a markdown table or an HTML table."""
    if style not in TABLE_STYLES:
        raise ValueError(f"style {style!r}: choose one of {', '.join(TABLE_STYLES)}")
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    if style == "html":
        import html

        def tr(cells, tag):
            return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

        return "\n".join(["<table>", tr(header, "th"), *(tr(cells, "td") for cells in body), "</table>"])
    widths = [max([len(h), *(len(cells[i]) for cells in body)]) for i, h in enumerate(header)]
    top = " ".join(h.rjust(w) for h, w in zip(header, widths))
    return "\n".join([top, "-" * len(top), *(" ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in body)])


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
    studies: dict[str, np.ndarray]  # {uids, raw, calibrated, labels, and NAME: raw of each aggregator}: the labelled studies


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
    pooling = PoolingConfig.from_dict(meta.get("pooling", {}))
    aggregators = saved_aggregators(pooling, checkpoint)
    if pooling.aggregator not in aggregators:
        make_aggregator(pooling, checkpoint=checkpoint)  # the chosen one must be there: this names what is missing
    row, _, studies = score_predictions(probs, validation, checkpoint_prevalence(meta, chunks, manifest), pooling,
                                        seed=checkpoint_seed(meta, seed), aggregators=aggregators)
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
        print("\nevery aggregator (validation weighted log loss, mean AUC C1-C7):")
        print(format_aggregator_table([result]))
        print(f"\nwritten to {out}")
    return 0
