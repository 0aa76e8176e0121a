"""Slice scores of one study -> its 8 study probabilities: the aggregators and their registry.

An aggregator turns the slice probabilities of ONE study, (n, 14) in `schema.SLICE_TARGETS` order with
the rows ordered by z (volume order: a shard's rows, predict's decoded volume), into (8,) probabilities
in `schema.STUDY_TARGETS` order (patient_overall, C1..C7). Evaluation, training's per-shard score,
`report` and `predict` all pool through `aggregate_studies` / an aggregator from `make_aggregator`, so
a study gets the same probabilities whichever of them scores it.

Built in: `max` (a vertebra is its most suspicious slice; always scored and reported), `topk` (the mean of
its `--topk` most suspicious slices) and `sequence` (a learned head over the z-ordered slice logits,
`vit_spine.sequence`). A learned aggregator (one with `fit`) is fitted by training on out-of-sample slice
predictions only and saved in the checkpoint folder (`save`/`load`); see `train`.

`--aggregator NAME` (`PoolingConfig.aggregator`, stored in every checkpoint's `vit_spine.json` `pooling`)
names the one a checkpoint is judged and used by. `register_aggregator(name, cls)` adds one; `cls(pooling)`
is built with the run's PoolingConfig.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from vit_spine.schema import FRACTURES, NUM_SLICE_TARGETS, NUM_STUDY_TARGETS

PATIENT_POOLS = ("max", "noisy_or")  # the vertebra -> patient rule of max and topk (`--patient_pool`)


class PoolingOptions(Protocol):
    """What an aggregator is built from: `vit_spine.evaluation.PoolingConfig` (read its fields)."""

    aggregator: str
    patient_pool: str
    topk: int
    sequence_hidden: int
    sequence_members: int
    sequence_max_length: int
    sequence_epochs: int


class Aggregator(Protocol):
    """Slice probabilities (n, 14) of one study, rows ordered by z -> (8,) [patient_overall, C1..C7] in [0, 1]."""

    def __init__(self, pooling: PoolingOptions) -> None: ...

    def __call__(self, slice_probs: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class LearnedAggregator(Protocol):
    """An aggregator with parameters: fitted on studies the slice model never trained on, saved with a checkpoint."""

    file_name: str  # what `save` writes in a checkpoint folder

    def fit(self, studies: Sequence[np.ndarray], labels: np.ndarray, uids: Sequence[str], seed: int) -> None:
        """Learn from the slice probabilities (n_i, 14) of each study, its labels (m, 8) and its uid."""

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...

    def __call__(self, slice_probs: np.ndarray) -> np.ndarray: ...


def patient_of(vertebra: np.ndarray, patient_pool: str) -> np.ndarray:
    """[patient, C1..C7] from the 7 vertebra probabilities: their max, or 1 - prod(1 - p_v) (`noisy_or`)."""
    patient = vertebra.max() if patient_pool == "max" else 1.0 - np.prod(1.0 - vertebra)
    return np.concatenate([[patient], vertebra])


def check_patient_pool(pooling: PoolingOptions) -> str:
    if pooling.patient_pool not in PATIENT_POOLS:
        raise ValueError(f"--patient_pool {pooling.patient_pool!r}: choose one of {', '.join(PATIENT_POOLS)}")
    return pooling.patient_pool


class MaxPool:
    """A vertebra is as likely fractured as its most suspicious slice (the competition-standard max over
    a study's slices of fracture_Cv); the patient as its most likely vertebra (`patient_pool` max), or
    1 - prod(1 - p_v) (`noisy_or`: vertebrae independent)."""

    def __init__(self, pooling: PoolingOptions) -> None:
        self.patient_pool = check_patient_pool(pooling)

    def __call__(self, slice_probs: np.ndarray) -> np.ndarray:
        return patient_of(slice_probs[:, FRACTURES].max(axis=0), self.patient_pool)


class TopKMean:
    """A vertebra's probability is the mean of its `topk` most suspicious slices (all of them in a shorter
    study): one noisy slice counts less than under max. The patient as for max (`patient_pool`)."""

    def __init__(self, pooling: PoolingOptions) -> None:
        if pooling.topk < 1:
            raise ValueError(f"--topk must be at least 1, got {pooling.topk}")
        self.k = pooling.topk
        self.patient_pool = check_patient_pool(pooling)

    def __call__(self, slice_probs: np.ndarray) -> np.ndarray:
        fracture = np.sort(slice_probs[:, FRACTURES], axis=0)[::-1][: self.k]
        return patient_of(fracture.mean(axis=0), self.patient_pool)


class SequenceAggregator:
    """The learned sequence head (`vit_spine.sequence`): a bidirectional GRU over the study's z-ordered slice
    logits, sizes and schedule from PoolingConfig's `sequence_*` options. It must be fitted (training does,
    on out-of-sample studies) or loaded from a checkpoint folder before it is called."""

    file_name = "aggregator_sequence.safetensors"

    def __init__(self, pooling: PoolingOptions) -> None:
        from vit_spine.sequence import HeadConfig

        self.config = HeadConfig(hidden=pooling.sequence_hidden, members=pooling.sequence_members,
                                 max_length=pooling.sequence_max_length, epochs=pooling.sequence_epochs)
        self.head = None
        self.uids: list[str] = []  # the studies it was fitted on

    def fit(self, studies: Sequence[np.ndarray], labels: np.ndarray, uids: Sequence[str], seed: int) -> None:
        from vit_spine.sequence import fit_head, logits_of

        self.head = fit_head([logits_of(s) for s in studies], labels, self.config, seed)
        self.uids = [str(u) for u in uids]

    def save(self, folder: Path) -> None:
        from vit_spine.sequence import save_head

        save_head(self.head, Path(folder) / self.file_name, metadata={"studies": json.dumps(self.uids)})

    def load(self, folder: Path) -> None:
        from vit_spine.sequence import load_head

        self.head, metadata = load_head(Path(folder) / self.file_name, self.config)
        self.uids = json.loads(metadata.get("studies", "[]"))

    def __call__(self, slice_probs: np.ndarray) -> np.ndarray:
        from vit_spine.sequence import head_probabilities, logits_of

        if self.head is None:
            raise ValueError("the sequence aggregator is not fitted: it is fitted by `vit-spine train` and loaded from a checkpoint")
        return head_probabilities(self.head, [logits_of(slice_probs)], self.config.max_length)[0]


_AGGREGATORS: dict[str, type] = {}


def register_aggregator(name: str, cls: type) -> None:
    """Make `cls` the aggregator called `name` (`--aggregator NAME`); a taken name is refused."""
    if name in _AGGREGATORS:
        raise ValueError(f"aggregator {name!r} is already registered ({_AGGREGATORS[name].__qualname__})")
    _AGGREGATORS[name] = cls


def aggregator_names() -> tuple[str, ...]:
    return tuple(_AGGREGATORS)


def make_aggregator(pooling: PoolingOptions, name: str | None = None, checkpoint: Path | None = None) -> Aggregator:
    """The aggregator `name` (default `pooling.aggregator`), built with `pooling`; a learned one is loaded from
    `checkpoint` when given. ValueError listing the known ones, or naming the checkpoint that holds no such head."""
    name = pooling.aggregator if name is None else name
    cls = _AGGREGATORS.get(name)
    if cls is None:
        raise ValueError(f"--aggregator {name!r}: no such aggregator; known: {', '.join(_AGGREGATORS)}")
    aggregator = cls(pooling)
    if checkpoint is not None and is_learned(aggregator):
        if not (Path(checkpoint) / aggregator.file_name).is_file():
            raise ValueError(f"{checkpoint}: holds no fitted {name!r} aggregator ({aggregator.file_name}): its run had no "
                             "out-of-sample studies to fit it on; choose --aggregator max")
        aggregator.load(Path(checkpoint))
    return aggregator


def is_learned(aggregator: Aggregator) -> bool:
    return isinstance(aggregator, LearnedAggregator)


def saved_aggregators(pooling: PoolingOptions, checkpoint: Path) -> dict[str, Aggregator]:
    """Every registered aggregator that can score with `checkpoint`: the fixed ones, and the learned ones whose
    head the checkpoint holds (a shard with no out-of-sample studies yet has none). In registry order."""
    ready = {}
    for name, cls in _AGGREGATORS.items():
        aggregator = cls(pooling)
        if is_learned(aggregator):
            if not (Path(checkpoint) / aggregator.file_name).is_file():
                continue
            aggregator.load(Path(checkpoint))
        ready[name] = aggregator
    return ready


def aggregate_studies(aggregator: Aggregator, study_ids: np.ndarray, slice_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slice probabilities (n, 14) of many studies -> (uids (m,), study probabilities (m, 8)).

    uids in order of first appearance; each study's rows are handed on in the order given (shards and
    predict keep a study's slices in volume order).
    """
    ids = np.asarray(study_ids)
    probs = np.asarray(slice_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != NUM_SLICE_TARGETS or len(ids) != len(probs):
        raise ValueError(f"expected (n, {NUM_SLICE_TARGETS}) slice probabilities for {len(ids)} slices, got {probs.shape}")
    if not np.isfinite(probs).all() or (probs.size and (probs.min() < 0.0 or probs.max() > 1.0)):
        raise ValueError("slice probabilities must be finite and lie in [0, 1]")
    unique, first, codes = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rows_of = np.split(np.argsort(codes.reshape(-1), kind="stable"), np.cumsum(np.bincount(codes.reshape(-1)))[:-1])
    studies = np.array([aggregator(probs[rows_of[j]]) for j in order], dtype=np.float64).reshape(-1, NUM_STUDY_TARGETS)
    return unique[order], studies


register_aggregator("max", MaxPool)
register_aggregator("topk", TopKMean)
register_aggregator("sequence", SequenceAggregator)
