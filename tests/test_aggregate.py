"""Slice -> study aggregation (`vit_spine.aggregate`) and the one metrics table (`evaluation.format_table`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vit_spine import aggregate, metrics
from vit_spine.aggregate import MaxPool, aggregate_studies, make_aggregator, register_aggregator
from vit_spine.evaluation import PoolingConfig, format_table


def slice_probs(rows: list[list[float]]) -> np.ndarray:
    """(n, 14): the given fracture C1..C7 per slice, visibility 1."""
    return np.hstack([np.asarray(rows, dtype=float), np.ones((len(rows), 7))])


def test_max_pool_takes_each_vertebras_most_suspicious_slice_and_the_patient_its_max_vertebra():
    probs = slice_probs([[0.5, 0.5, 0, 0, 0, 0, 0.1], [0.1, 0.2, 0, 0, 0, 0, 0.8]])
    np.testing.assert_array_equal(MaxPool(PoolingConfig(aggregator="max"))(probs), [0.8, 0.5, 0.5, 0, 0, 0, 0, 0.8])
    noisy = MaxPool(PoolingConfig(aggregator="max", patient_pool="noisy_or"))(probs)
    assert noisy[0] == pytest.approx(1 - 0.5 * 0.5 * 0.2)
    np.testing.assert_array_equal(noisy[1:], [0.5, 0.5, 0, 0, 0, 0, 0.8])


def test_studies_come_in_order_of_first_appearance_each_from_its_own_slices():
    rng = np.random.default_rng(0)
    ids = np.array(["b", "a", "b", "c", "a", "b", "c", "a"])
    probs = rng.random((len(ids), 14))
    uids, studies = aggregate_studies(make_aggregator(PoolingConfig(aggregator="max")), ids, probs)
    assert uids.tolist() == ["b", "a", "c"]
    for uid, row in zip(uids, studies):
        vertebra = probs[ids == uid, :7].max(axis=0)
        np.testing.assert_array_equal(row, [vertebra.max(), *vertebra])


def test_an_aggregator_gets_one_studys_slices_in_the_order_given():
    seen = []

    class Record:
        def __init__(self, pooling):
            pass

        def __call__(self, probs):
            seen.append(probs[:, 0].tolist())
            return np.zeros(8)

    ids = np.array(["x", "y", "x", "x"])
    probs = slice_probs([[0.1] + [0] * 6, [0.2] + [0] * 6, [0.3] + [0] * 6, [0.4] + [0] * 6])
    aggregate_studies(Record(None), ids, probs)
    assert seen == [[0.1, 0.3, 0.4], [0.2]]


def test_the_registry_builds_the_named_aggregator_and_refuses_unknown_or_taken_names(monkeypatch):
    monkeypatch.setattr(aggregate, "_AGGREGATORS", dict(aggregate._AGGREGATORS))

    class MeanPool:
        def __init__(self, pooling):
            self.pooling = pooling

        def __call__(self, probs):
            vertebra = probs[:, :7].mean(axis=0)
            return np.concatenate([[vertebra.max()], vertebra])

    register_aggregator("mean", MeanPool)
    pooling = PoolingConfig(aggregator="mean")
    built = make_aggregator(pooling)
    assert type(built) is MeanPool and built.pooling is pooling
    with pytest.raises(ValueError, match="aggregator 'max' is already registered"):
        register_aggregator("max", MeanPool)
    with pytest.raises(ValueError, match=r"--aggregator 'median': no such aggregator; known: max, topk, sequence, mean"):
        PoolingConfig(aggregator="median")
    with pytest.raises(ValueError, match="--patient_pool 'sum': choose one of max, noisy_or"):
        PoolingConfig(patient_pool="sum")


def test_aggregation_refuses_bad_slice_probabilities():
    pool = make_aggregator(PoolingConfig(aggregator="max"))
    with pytest.raises(ValueError, match=r"expected \(n, 14\) slice probabilities for 2 slices, got \(2, 7\)"):
        aggregate_studies(pool, np.array(["a", "a"]), np.zeros((2, 7)))
    with pytest.raises(ValueError, match="for 2 slices, got \\(3, 14\\)"):
        aggregate_studies(pool, np.array(["a", "a"]), np.zeros((3, 14)))
    with pytest.raises(ValueError, match="finite and lie in"):
        aggregate_studies(pool, np.array(["a"]), np.full((1, 14), np.nan))
    uids, studies = aggregate_studies(pool, np.array([], dtype=object), np.zeros((0, 14)))
    assert uids.shape == (0,) and studies.shape == (0, 8)


def test_slices_to_study_scores_end_to_end():
    ids = np.array(["s2", "s1", "s2", "s1"])
    probs = np.zeros((4, 14))  # the model's 14 outputs: fracture C1..C7, visible C1..C7
    probs[:, 2] = [0.7, 0.1, 0.2, 0.3]  # C3
    uids, studies = aggregate_studies(make_aggregator(PoolingConfig(aggregator="max")), ids, probs)
    assert uids.tolist() == ["s2", "s1"]
    y = np.array([[1, 0, 0, 1, 0, 0, 0, 0], [0] * 8], dtype=float)
    assert metrics.weighted_log_loss(y, studies) == pytest.approx(
        # s2: overall and C3 positive at 0.7 (weights 14 + 2 of 22), the rest right; s1: overall and C3
        # negative at 0.3 (weights 7 + 1 of 14), the rest right
        ((14 + 2) * -math.log(0.7) / 22 + (7 + 1) * -math.log(0.7) / 14) / 2,
        rel=1e-9,
    )


ROWS = [
    {"shard": 0, "global_step": 10, "weighted_log_loss": 0.6, "weighted_log_loss_uncalibrated": 0.61,
     "baseline_weighted_log_loss": 0.5638, "auc": {"patient_overall": 0.7, "C1": 0.6, "C2": 0.8, "C3": None},
     "train_loss": 0.25},
    {"shard": 1, "global_step": 20, "weighted_log_loss": 0.55, "weighted_log_loss_uncalibrated": 0.57,
     "baseline_weighted_log_loss": 0.5638, "auc": {"patient_overall": None}},
]


def test_one_table_in_text_markdown_and_html():
    text = format_table(ROWS).splitlines()
    assert text[0].split() == ["shard", "global", "step", "val", "wll", "val", "wll", "raw", "baseline", "wll", "AUC",
                               "patient_overall", "mean", "AUC", "C1-C7", "train", "loss"]
    assert text[2].split() == ["00000", "10", "0.6000", "0.6100", "0.5638", "0.700", "0.700", "0.2500"]
    assert text[3].split() == ["00001", "20", "0.5500", "0.5700", "0.5638", "n/a", "n/a", "n/a"]
    assert len({len(line) for line in text}) == 1  # aligned columns

    markdown = format_table(ROWS, "markdown", best_shard=1, current_shard=0).splitlines()
    assert markdown[1] == "|" + "---:|" * 8
    assert markdown[2] == "| **00000** (this checkpoint) | 10 | 0.6000 | 0.6100 | 0.5638 | 0.700 | 0.700 | 0.2500 |"
    assert markdown[3] == "| 00001 (best) | 20 | 0.5500 | 0.5700 | 0.5638 | n/a | n/a | n/a |"

    page = format_table(ROWS, "html", best_shard=0)
    assert page.splitlines()[2] == ("<tr><td>00000 (best)</td><td>10</td><td>0.6000</td><td>0.6100</td><td>0.5638</td>"
                                    "<td>0.700</td><td>0.700</td><td>0.2500</td></tr>")
    assert page.startswith("<table>\n<tr><th>shard</th>") and page.endswith("</table>")
    with pytest.raises(ValueError, match="style 'latex'"):
        format_table(ROWS, "latex")


# ---------------------------------------------------------------- topk and the learned sequence head


def test_topk_takes_the_mean_of_each_vertebras_k_most_suspicious_slices():
    probs = slice_probs([[0.9, 0.1, 0, 0, 0, 0, 0], [0.5, 0.3, 0, 0, 0, 0, 0], [0.1, 0.2, 0, 0, 0, 0, 0.6]])
    pooled = make_aggregator(PoolingConfig(aggregator="topk", topk=2))(probs)
    np.testing.assert_allclose(pooled, [0.7, 0.7, 0.25, 0, 0, 0, 0, 0.3])
    everything = make_aggregator(PoolingConfig(aggregator="topk", topk=10))(probs)  # k beyond the study: all slices
    np.testing.assert_allclose(everything[1:3], [0.5, 0.2])
    with pytest.raises(ValueError, match="--topk must be at least 1, got 0"):
        PoolingConfig(aggregator="topk", topk=0)


def test_a_checkpoint_saved_with_the_old_slice_pool_name_is_read():
    assert PoolingConfig.from_dict({"slice_pool": "max", "patient_pool": "noisy_or"}) == PoolingConfig(aggregator="max", patient_pool="noisy_or")
    assert PoolingConfig.from_dict({}).aggregator == "max"  # recorded nothing: max was the only one
    assert PoolingConfig().aggregator == "sequence"  # the default: it measured best on the demo (README)


def shared_slice_studies(count: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Studies of 30 slices where C2 shows on slices 0-14 and C3 on 10-24. A break of C2 (or C3) makes both
    fracture scores fire (p 0.95) on the five slices they share, and its own score a little (p 0.6) on the
    slices where it alone shows: each vertebra's max is the same whichever one is broken."""
    rng = np.random.default_rng(seed)
    studies, labels = [], []
    for i in range(count):
        broken = i % 3  # 0 none, 1 C2, 2 C3
        probs = np.full((30, 14), 0.02)
        probs[0:15, 7 + 1] = probs[10:25, 7 + 2] = 0.98  # visible C2, visible C3
        if broken:
            probs[10:15, 1] = probs[10:15, 2] = 0.95
            own = slice(5, 10) if broken == 1 else slice(15, 20)
            probs[own, broken] = 0.6
        probs = np.clip(probs + rng.normal(0, 0.01, probs.shape), 0.001, 0.999)
        studies.append(probs)
        labels.append([int(broken > 0), 0, int(broken == 1), int(broken == 2), 0, 0, 0, 0])
    return studies, np.array(labels, dtype=np.float64)


def test_the_sequence_head_names_the_broken_vertebra_where_max_pooling_cannot(tmp_path):
    train, train_labels = shared_slice_studies(90, seed=0)
    test, test_labels = shared_slice_studies(60, seed=1)
    head = make_aggregator(PoolingConfig(aggregator="sequence"))
    head.fit(train, train_labels, [f"train{i}" for i in range(len(train))], seed=0)
    sequence = metrics.per_vertebra_auc(test_labels, np.array([head(s) for s in test]))
    maxpool = metrics.per_vertebra_auc(test_labels, np.array([make_aggregator(PoolingConfig(aggregator="max"))(s) for s in test]))
    # max-pooling ties a broken C2's neighbour with it: half of C2's negatives (the broken C3s) score as high,
    # the noise orders the ties (0.75 expected)
    assert maxpool["C2"] < 0.8 and maxpool["C3"] < 0.8
    assert sequence["C2"] > 0.97 and sequence["C3"] > 0.97

    head.save(tmp_path)  # the checkpoint's copy scores alike and names the studies it learned from
    loaded = make_aggregator(PoolingConfig(aggregator="sequence"), checkpoint=tmp_path)
    np.testing.assert_array_equal(loaded(test[1]), head(test[1]))
    assert loaded.uids == [f"train{i}" for i in range(len(train))]


def test_a_checkpoint_without_a_fitted_head_is_refused_for_the_sequence_aggregator(tmp_path):
    with pytest.raises(ValueError, match=r"holds no fitted 'sequence' aggregator \(aggregator_sequence.safetensors\)"):
        make_aggregator(PoolingConfig(aggregator="sequence"), checkpoint=tmp_path)
    with pytest.raises(ValueError, match="the sequence aggregator is not fitted"):
        make_aggregator(PoolingConfig(aggregator="sequence"))(slice_probs([[0.5] * 7]))
