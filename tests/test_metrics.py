"""vit_spine.metrics: the competition metric by hand and on the real labels, AUC, pooling, calibration."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vit_spine import STUDY_TARGETS, metrics
from vit_spine.evaluation import train_prevalence

REPO_ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)


def random_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 8) labels with the real prevalences of C1..C7 and patient_overall = any vertebra."""
    vertebra = (rng.random((n, 7)) < [0.072, 0.141, 0.036, 0.054, 0.080, 0.137, 0.195]).astype(float)
    return np.column_stack([vertebra.max(axis=1), vertebra])


@pytest.fixture(scope="module")
def real_labels(shared_rsna: Path) -> np.ndarray:
    """The 2,019 real study labels (n, 8) [patient_overall, C1..C7], read with pandas directly."""
    frame = pd.read_csv(shared_rsna / "train.csv")
    assert len(frame) == 2019
    return frame[list(STUDY_TARGETS)].to_numpy(dtype=float)


# ---------------------------------------------------------------------------------- weighted log loss


def test_one_all_positive_study_at_half_scores_ln2():
    assert metrics.weighted_log_loss(np.ones((1, 8)), np.full((1, 8), 0.5)) == pytest.approx(LN2, abs=1e-12)


def test_hand_computed_weights_and_mean_over_studies():
    y = np.array([[1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]], dtype=float)
    p = np.array([[0.9, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], [0.2] * 8])
    # study 1: weights 14 (overall +), 2 (C1 +), 1 x 6 (C2..C7 -), sum 22:
    #   (14 * -ln 0.9 + 2 * -ln 0.8 + 6 * -ln 0.9) / 22 = (1.475047 + 0.446287 + 0.632163) / 22 = 0.116068064
    # study 2: every target negative at p = 0.2, so every BCE is -ln 0.8 = 0.223143551, whatever the weights
    expected = [0.11606806435, 0.22314355131]
    np.testing.assert_allclose(metrics.per_study_log_loss(y, p), expected, rtol=1e-10)
    assert metrics.weighted_log_loss(y, p) == pytest.approx((0.11606806435 + 0.22314355131) / 2, rel=1e-10)


def test_patient_overall_weight_is_seven_or_fourteen():
    # only patient_overall is uncertain; the vertebrae are predicted exactly right (loss ~0 after clipping)
    positive = metrics.weighted_log_loss([[1, 0, 0, 0, 0, 0, 0, 0]], [[0.5, 0, 0, 0, 0, 0, 0, 0]])
    negative = metrics.weighted_log_loss([[0, 0, 0, 0, 0, 0, 0, 0]], [[0.5, 0, 0, 0, 0, 0, 0, 0]])
    assert positive == pytest.approx(14 * LN2 / (14 + 7 * 1), rel=1e-9)  # 0.462098
    assert negative == pytest.approx(7 * LN2 / (7 + 7 * 1), rel=1e-9)  # 0.346574
    # a positive vertebra weighs 2 against 1 for each of the 6 negative ones and 14 for overall
    vertebra = metrics.weighted_log_loss([[1, 0, 0, 1, 0, 0, 0, 0]], [[1, 0, 0, 0.5, 0, 0, 0, 0]])
    assert vertebra == pytest.approx(2 * LN2 / (14 + 2 + 6), rel=1e-9)


def test_probabilities_of_zero_and_one_are_clipped_to_finite_losses():
    worst = metrics.weighted_log_loss(np.ones((1, 8)), np.zeros((1, 8)))
    assert worst == pytest.approx(-math.log(1e-15), rel=1e-12)  # 34.538776
    worst_negative = metrics.weighted_log_loss(np.zeros((1, 8)), np.ones((1, 8)))
    assert math.isfinite(worst_negative) and worst_negative == pytest.approx(34.5388, rel=1e-3)
    assert 0.0 <= metrics.weighted_log_loss(np.ones((2, 8)), np.ones((2, 8))) < 1e-12


@pytest.mark.parametrize(
    ("y_true", "y_prob", "message"),
    [
        (np.zeros((3, 7)), np.zeros((3, 7)), r"y_true: expected shape \(n, 8\)"),
        (np.zeros(8), np.zeros(8), r"y_true: expected shape \(n, 8\)"),
        (np.zeros((3, 8)), np.zeros((2, 8)), "3 studies but y_prob has 2"),
        (np.zeros((0, 8)), np.zeros((0, 8)), "no study"),
        (np.full((2, 8), np.nan), np.zeros((2, 8)), "y_true: 2 row"),
        (np.zeros((2, 8)), np.array([[np.nan] * 8, [0.5] * 8]), "y_prob: 1 row.*NaN"),
        (np.full((1, 8), 0.5), np.full((1, 8), 0.5), "labels must be 0 or 1"),
        (np.zeros((1, 8)), np.full((1, 8), 2.0), r"\[0, 1\].*logits"),
    ],
)
def test_bad_inputs_raise_clear_errors(y_true, y_prob, message):
    with pytest.raises(ValueError, match=message):
        metrics.weighted_log_loss(y_true, y_prob)


def baseline_loss(y: np.ndarray) -> float:
    """Weighted log loss of the constant prediction `prevalence(y)`, in-sample (as a metrics row's baseline)."""
    return metrics.weighted_log_loss(y, np.broadcast_to(metrics.prevalence(y), y.shape))


def test_the_baseline_prevalence_is_the_mean_over_distinct_labelled_training_studies():
    studies = np.array([[1, 1, 0, 0, 0, 0, 0, 1], [0] * 8, [1, 0, 1, 0, 0, 0, 0, 1], [0] * 8, [np.nan] * 8], dtype=float)
    # slice rows: study a has 3 slices, b 1, c 2, d 1, e (unlabelled) 2; rows of one study repeat its labels
    study_ids = np.array(["a", "a", "a", "b", "c", "c", "d", "e", "e"])
    rows = studies[[0, 0, 0, 1, 2, 2, 3, 4, 4]]
    np.testing.assert_array_equal(train_prevalence(rows, study_ids), [0.5, 0.25, 0.25, 0, 0, 0, 0, 0.5])
    with pytest.raises(ValueError, match="hold no labelled study"):
        train_prevalence(rows[7:], study_ids[7:])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        train_prevalence(np.full((1, 8), 0.5), np.array(["a"]))


def test_real_labels_reference_scores(real_labels):
    assert metrics.weighted_log_loss(real_labels, np.full(real_labels.shape, 0.5)) == pytest.approx(0.693147, abs=1e-6)
    assert baseline_loss(real_labels) == pytest.approx(0.563818, abs=1e-6)
    np.testing.assert_allclose(
        metrics.prevalence(real_labels), [0.476, 0.072, 0.141, 0.036, 0.053, 0.080, 0.137, 0.195], atol=1e-3
    )


# ------------------------------------------------------------------------------------------------ AUC


def test_per_vertebra_auc_matches_hand_cases():
    y = np.array([[1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0, 1], [0] * 8], dtype=float)
    p = np.zeros((4, 8))
    p[:, 0] = [0.9, 0.2, 0.8, 0.1]  # perfect ranking -> 1
    p[:, 1] = [0.1, 0.5, 0.5, 0.5]  # the positive ranks below every negative -> 0
    p[:, 2] = 0.3  # ties everywhere -> 0.5
    p[:, 7] = [0.1, 0.6, 0.4, 0.5]  # positives 0.6, 0.4 vs negatives 0.1, 0.5: 3 of 4 pairs right -> 0.75
    auc = metrics.per_vertebra_auc(y, p)
    assert list(auc) == list(STUDY_TARGETS)
    assert auc["patient_overall"] == 1.0 and auc["C1"] == 0.0 and auc["C2"] == 0.5 and auc["C7"] == 0.75
    assert all(math.isnan(auc[v]) for v in ("C3", "C4", "C5", "C6"))  # one class only


def test_auc_on_real_labels(real_labels):
    rng = np.random.default_rng(0)
    noise = rng.random(real_labels.shape)
    informative = np.clip(0.3 * real_labels + 0.7 * noise, 0, 1)
    auc_noise = metrics.per_vertebra_auc(real_labels, noise)
    auc_informative = metrics.per_vertebra_auc(real_labels, informative)
    for target in STUDY_TARGETS:
        assert abs(auc_noise[target] - 0.5) < 0.1  # 73 positives at worst (C3)
        assert auc_informative[target] > 0.75
    assert set(metrics.per_vertebra_auc(real_labels, np.full(real_labels.shape, 0.3)).values()) == {0.5}


# ---------------------------------------------------------------------------------------- calibration


def test_cross_fitted_row_does_not_depend_on_its_own_labels():
    rng = np.random.default_rng(1)
    y = random_labels(60, rng)
    p = rng.random((60, 8))
    flipped = y.copy()
    flipped[5, 3] = 1 - flipped[5, 3]  # a vertebra label: folds (stratified on patient_overall) stay the same
    cross = metrics.cross_fitted_calibration(y, p, n_folds=5, seed=3)
    cross_flipped = metrics.cross_fitted_calibration(flipped, p, n_folds=5, seed=3)
    np.testing.assert_array_equal(cross[5], cross_flipped[5])
    assert not np.array_equal(cross, cross_flipped)  # other folds did see the change
    in_sample = metrics.Calibrator().fit(y, p).transform(p)
    in_sample_flipped = metrics.Calibrator().fit(flipped, p).transform(p)
    assert in_sample[5, 3] != in_sample_flipped[5, 3]  # an in-sample calibrator leaks it


def test_noise_predictor_cross_fitted_is_honest():
    rng = np.random.default_rng(2)
    y = random_labels(400, rng)
    p = rng.random((400, 8))  # pure noise, far from calibrated
    baseline = baseline_loss(y)  # itself in-sample, so slightly optimistic
    cross = metrics.weighted_log_loss(y, metrics.cross_fitted_calibration(y, p, seed=0))
    in_sample = metrics.weighted_log_loss(y, metrics.Calibrator().fit(y, p).transform(p))
    assert in_sample < cross - 1e-3  # fitting on the scored labels flatters
    assert cross > baseline - 2e-3  # no better than the constant prevalence, beyond noise
    assert cross < metrics.weighted_log_loss(y, p) - 0.2  # but far better than the raw noise


def test_calibration_improves_an_informative_miscalibrated_predictor():
    rng = np.random.default_rng(3)
    y = random_labels(300, rng)
    score = y + rng.normal(0.0, 0.8, y.shape)
    raw = 1.0 / (1.0 + np.exp(-(3.0 * score + 0.5)))  # ranks well, far too confident and too high
    raw_loss = metrics.weighted_log_loss(y, raw)
    baseline = baseline_loss(y)
    calibrated = metrics.cross_fitted_calibration(y, raw, seed=0)
    calibrated_loss = metrics.weighted_log_loss(y, calibrated)
    assert calibrated_loss < raw_loss - 0.3
    assert calibrated_loss < baseline - 0.1
    assert calibrated.min() >= metrics.CALIBRATED_EPS and calibrated.max() <= 1 - metrics.CALIBRATED_EPS
    # one calibrator is a monotone map per target: it keeps every AUC (cross-fitted ones differ per fold)
    in_sample = metrics.Calibrator().fit(y, raw).transform(raw)
    for target, auc in metrics.per_vertebra_auc(y, raw).items():
        assert metrics.per_vertebra_auc(y, in_sample)[target] == pytest.approx(auc, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_tiny_validation_sets_never_crash(n):
    rng = np.random.default_rng(n)
    y = np.zeros((n, 8))
    y[0, [0, 2]] = 1  # C1, C3..C7 have one class only; with n = 1 every target has
    p = rng.random((n, 8))
    calibrated = metrics.cross_fitted_calibration(y, p, n_folds=5, seed=0)
    assert calibrated.shape == (n, 8)
    assert np.isfinite(calibrated).all()
    assert calibrated.min() >= 1e-6 and calibrated.max() <= 1 - 1e-6
    assert math.isfinite(metrics.weighted_log_loss(y, calibrated))
    metrics.Calibrator().fit(y, p).transform(p)


def test_one_class_target_moves_toward_that_class_and_no_data_is_identity():
    p = np.full((6, 8), 0.4)
    y = np.zeros((6, 8))
    calibrator = metrics.Calibrator().fit(y, p)
    out = calibrator.transform(p)
    assert (out < 0.4).all() and (out > 1 / 8 - 1e-9).all()  # not past Platt's smoothed target 1 / (6 + 2)
    identity = metrics.Calibrator().fit(np.zeros((0, 8)), np.zeros((0, 8)))
    probe = np.linspace(0.0, 1.0, 16).reshape(2, 8)
    np.testing.assert_allclose(identity.transform(probe), np.clip(probe, 1e-6, 1 - 1e-6), rtol=1e-12)


def test_calibrator_round_trips_through_json():
    rng = np.random.default_rng(4)
    y = random_labels(50, rng)
    p = np.clip(0.5 * y + 0.5 * rng.random((50, 8)), 0, 1)
    calibrator = metrics.Calibrator().fit(y, p)
    restored = metrics.Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    probe = rng.random((20, 8))
    np.testing.assert_array_equal(restored.transform(probe), calibrator.transform(probe))
    assert restored.to_dict() == calibrator.to_dict()
    assert calibrator.to_dict()["n_positive"] == y.sum(axis=0).astype(int).tolist()


def test_calibrator_errors():
    with pytest.raises(ValueError, match="before fit"):
        metrics.Calibrator().transform(np.zeros((1, 8)))
    with pytest.raises(ValueError, match="method"):
        metrics.Calibrator.from_dict({"format": 1, "method": "isotonic"})
    good = metrics.Calibrator().fit(np.zeros((2, 8)), np.full((2, 8), 0.5)).to_dict()
    with pytest.raises(ValueError, match="`slope` must hold 8"):
        metrics.Calibrator.from_dict({**good, "slope": [1.0] * 7})
    with pytest.raises(ValueError, match="y_true"):
        metrics.Calibrator().fit(np.full((2, 8), np.nan), np.zeros((2, 8)))
    with pytest.raises(ValueError, match="at least 2 folds"):
        metrics.cross_fitted_calibration(np.zeros((4, 8)), np.zeros((4, 8)), n_folds=1)


def test_calibration_folds_are_stratified_and_deterministic():
    y = random_labels(103, np.random.default_rng(5))
    folds = metrics.calibration_folds(y, n_folds=5, seed=7)
    np.testing.assert_array_equal(folds, metrics.calibration_folds(y, n_folds=5, seed=7))
    assert not np.array_equal(folds, metrics.calibration_folds(y, n_folds=5, seed=8))
    positives = np.bincount(folds[y[:, 0] == 1], minlength=5)
    sizes = np.bincount(folds, minlength=5)
    assert positives.max() - positives.min() <= 1 and sizes.max() - sizes.min() <= 1
    assert sorted(set(metrics.calibration_folds(y[:3], n_folds=5))) == [0, 1, 2]


def test_cross_fitted_constant_prediction_learns_the_real_prevalence(real_labels):
    calibrated = metrics.cross_fitted_calibration(real_labels, np.full(real_labels.shape, 0.5), seed=0)
    # held-out folds are scored with the other folds' prevalence: close to, not below, the in-sample 0.563818
    assert metrics.weighted_log_loss(real_labels, calibrated) == pytest.approx(0.563818, abs=5e-4)


# ------------------------------------------------------------------------------------- evaluate.Metric


@pytest.mark.slow  # a fresh interpreter imports `evaluate` (seconds)
def test_evaluate_metric_offline_matches_the_function(tmp_path):
    rng = np.random.default_rng(6)
    y = random_labels(12, rng)
    p = rng.random((12, 8))
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "p.npy", p)
    # a fresh process: HF_HUB_OFFLINE is read when huggingface_hub is imported, and the endpoint goes nowhere
    script = f"""
import json, numpy as np
from vit_spine.metrics import WeightedLogLoss
y, p = np.load({str(tmp_path / 'y.npy')!r}), np.load({str(tmp_path / 'p.npy')!r})
whole = WeightedLogLoss(cache_dir={str(tmp_path / 'cache')!r}).compute(predictions=p, references=y)
batched = WeightedLogLoss(cache_dir={str(tmp_path / 'cache')!r}, experiment_id="batched")
for start in range(0, len(y), 5):
    batched.add_batch(predictions=p[start:start + 5], references=y[start:start + 5])
print(json.dumps({{"whole": whole, "batched": batched.compute(), "name": WeightedLogLoss.__module__}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = metrics.weighted_log_loss(y, p)
    assert result["whole"] == {"weighted_log_loss": pytest.approx(expected, rel=1e-12)}
    assert result["batched"] == {"weighted_log_loss": pytest.approx(expected, rel=1e-12)}
    assert result["name"] == "vit_spine.metrics"
