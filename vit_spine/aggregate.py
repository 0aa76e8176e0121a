"""Slice scores of one study -> its 8 study probabilities: the aggregators and their registry.

An aggregator turns the slice probabilities of ONE study, (n, 14) in `schema.SLICE_TARGETS` order with
the rows ordered by z (volume order: a shard's rows, predict's decoded volume), into (8,) probabilities
in `schema.STUDY_TARGETS` order (patient_overall, C1..C7). Evaluation, training's per-shard score,
`report` and `predict` all pool through `aggregate_studies` / an aggregator from `make_aggregator`, so
a study gets the same probabilities whichever of them scores it.

The aggregator is chosen by name: `PoolingConfig.slice_pool` (`--slice_pool`), stored in every
checkpoint's `vit_spine.json` `pooling`, so a checkpoint is scored the way it was trained.
`register_aggregator(name, cls)` adds one; `cls(pooling)` is built with the run's PoolingConfig.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from vit_spine.schema import FRACTURES, NUM_SLICE_TARGETS, NUM_STUDY_TARGETS

PATIENT_POOLS = ("max", "noisy_or")  # MaxPool's vertebra -> patient rule (`--patient_pool`)


class PoolingOptions(Protocol):
    """What an aggregator is built from: `vit_spine.evaluation.PoolingConfig` (read its fields)."""

    slice_pool: str
    patient_pool: str


class Aggregator(Protocol):
    """Slice probabilities (n, 14) of one study, rows ordered by z -> (8,) [patient_overall, C1..C7] in [0, 1]."""

    def __init__(self, pooling: PoolingOptions) -> None: ...

    def __call__(self, slice_probs: np.ndarray) -> np.ndarray: ...


class MaxPool:
    """A vertebra is as likely fractured as its most suspicious slice (the competition-standard max over
    a study's slices of fracture_Cv); the patient as its most likely vertebra (`patient_pool` max), or
    1 - prod(1 - p_v) (`noisy_or`: vertebrae independent)."""

    def __init__(self, pooling: PoolingOptions) -> None:
        if pooling.patient_pool not in PATIENT_POOLS:
            raise ValueError(f"--patient_pool {pooling.patient_pool!r}: choose one of {', '.join(PATIENT_POOLS)}")
        self.patient_pool = pooling.patient_pool

    def __call__(self, slice_probs: np.ndarray) -> np.ndarray:
        vertebra = slice_probs[:, FRACTURES].max(axis=0)
        patient = vertebra.max() if self.patient_pool == "max" else 1.0 - np.prod(1.0 - vertebra)
        return np.concatenate([[patient], vertebra])


_AGGREGATORS: dict[str, type] = {}


def register_aggregator(name: str, cls: type) -> None:
    """Make `cls` the aggregator called `name` (`--slice_pool NAME`); a taken name is refused."""
    if name in _AGGREGATORS:
        raise ValueError(f"aggregator {name!r} is already registered ({_AGGREGATORS[name].__qualname__})")
    _AGGREGATORS[name] = cls


def aggregator_names() -> tuple[str, ...]:
    return tuple(_AGGREGATORS)


def make_aggregator(pooling: PoolingOptions) -> Aggregator:
    """The aggregator `pooling.slice_pool` names, built with `pooling`; ValueError listing the known ones."""
    cls = _AGGREGATORS.get(pooling.slice_pool)
    if cls is None:
        raise ValueError(f"--slice_pool {pooling.slice_pool!r}: no such aggregator; known: {', '.join(_AGGREGATORS)}")
    return cls(pooling)


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
