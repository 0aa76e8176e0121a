"""Scoring: the competition's weighted log loss, AUCs, calibration (slice -> study pooling: `vit_spine.aggregate`).

Column orders used throughout:
- study arrays (labels, predictions): (n_studies, 8), columns `[patient_overall, C1, ..., C7]`
  (`schema.STUDY_TARGETS`).

Calibration is fitted on validation studies. The score we report is cross-fitted (every study is
calibrated by a calibrator that never saw its labels); the calibrator saved with a checkpoint is
fitted on all validation studies and used at predict time.

`sklearn` and `evaluate` are imported only where needed: `evaluate` alone takes seconds to import
and `predict` imports this module. `WeightedLogLoss` (an `evaluate.Metric`, offline) is built on
first access.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vit_spine.schema import STUDY_TARGETS, VERTEBRAE

N_TARGETS = len(STUDY_TARGETS)  # 8
N_VERTEBRAE = len(VERTEBRAE)  # 7

# Competition weights per target, [patient_overall, C1..C7], for a negative and a positive label.
NEGATIVE_WEIGHTS = np.array([7.0] + [1.0] * N_VERTEBRAE)
POSITIVE_WEIGHTS = np.array([14.0] + [2.0] * N_VERTEBRAE)
METRIC_EPS = 1e-15  # the competition clips p to [1e-15, 1 - 1e-15]
CALIBRATED_EPS = 1e-6  # calibrated outputs stay in [1e-6, 1 - 1e-6]: a confident miss costs at most 13.8



# --------------------------------------------------------------------------------------------- checks


def _as_matrix(values: Any, name: str, n_columns: int, columns: Sequence[str]) -> np.ndarray:
    """float64 (n, n_columns) copy of `values`; ValueError naming `name` on a wrong shape or NaN/inf."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != n_columns:
        raise ValueError(
            f"{name}: expected shape (n, {n_columns}) with columns [{', '.join(columns)}], got {array.shape}"
        )
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise ValueError(f"{name}: {bad} row(s) hold NaN or inf")
    return array


def _check_probabilities(array: np.ndarray, name: str) -> None:
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise ValueError(
            f"{name}: probabilities must lie in [0, 1], got values in [{array.min():g}, {array.max():g}] "
            "(logits passed by mistake?)"
        )


def _check_binary(array: np.ndarray, name: str) -> None:
    if not np.isin(array, (0.0, 1.0)).all():
        raise ValueError(f"{name}: labels must be 0 or 1, got {np.unique(array[~np.isin(array, (0.0, 1.0))])[:5]}")


def check_study_arrays(y_true: Any, y_prob: Any, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Validate study labels and probabilities, both (n_studies, 8) `[patient_overall, C1..C7]`.

    Returns float64 copies. ValueError on a wrong shape, different lengths, NaN/inf, labels other
    than 0/1, probabilities outside [0, 1], or no study at all (unless `allow_empty`).
    """
    labels = _as_matrix(y_true, "y_true", N_TARGETS, STUDY_TARGETS)
    probs = _as_matrix(y_prob, "y_prob", N_TARGETS, STUDY_TARGETS)
    if labels.shape != probs.shape:
        raise ValueError(f"y_true has {len(labels)} studies but y_prob has {len(probs)}")
    if not allow_empty and len(labels) == 0:
        raise ValueError("y_true and y_prob hold no study")
    _check_binary(labels, "y_true")
    _check_probabilities(probs, "y_prob")
    return labels, probs


# --------------------------------------------------------------------------------------------- metric


def study_weights(y_true: np.ndarray) -> np.ndarray:
    """(n, 8) competition weights of each label: patient_overall 7 / 14, each vertebra 1 / 2 (negative / positive)."""
    return np.where(np.asarray(y_true) == 1, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS)


def per_study_log_loss(y_true: Any, y_prob: Any) -> np.ndarray:
    """(n,) weighted log loss of each study: sum_j w_j * BCE(y_j, p_j) / sum_j w_j over the 8 targets.

    y_true, y_prob: (n_studies, 8), columns [patient_overall, C1..C7]; p clipped to [1e-15, 1 - 1e-15].
    """
    labels, probs = check_study_arrays(y_true, y_prob)
    probs = np.clip(probs, METRIC_EPS, 1.0 - METRIC_EPS)
    bce = -(labels * np.log(probs) + (1.0 - labels) * np.log1p(-probs))
    weights = study_weights(labels)
    return (weights * bce).sum(axis=1) / weights.sum(axis=1)


def weighted_log_loss(y_true: Any, y_prob: Any) -> float:
    """The RSNA 2022 competition metric: the mean over studies of each study's weighted log loss.

    y_true: (n_studies, 8) labels 0/1; y_prob: (n_studies, 8) probabilities; columns
    [patient_overall, C1, ..., C7]. Per study sum_j w_j * BCE(y_j, p_j) / sum_j w_j with weights
    patient_overall 7 (negative) / 14 (positive) and each vertebra 1 / 2; p is clipped to
    [1e-15, 1 - 1e-15]. ValueError on wrong shapes, NaN, labels other than 0/1 or p outside [0, 1].
    """
    return float(per_study_log_loss(y_true, y_prob).mean())


def prevalence(y: Any) -> np.ndarray:
    """(8,) per-target mean of a label matrix (n_studies, 8) `[patient_overall, C1..C7]`: the constant
    prediction any model must beat (the baseline of every metrics row; the metric clips a 0 or a 1)."""
    labels = _as_matrix(y, "y", N_TARGETS, STUDY_TARGETS)
    if len(labels) == 0:
        raise ValueError("y holds no study: the prevalence is undefined")
    _check_binary(labels, "y")
    return labels.mean(axis=0)


def per_vertebra_auc(y_true: Any, y_prob: Any) -> dict[str, float]:
    """ROC AUC per target {patient_overall, C1, ..., C7}; NaN where a target has only one class.

    y_true, y_prob: (n_studies, 8), columns [patient_overall, C1..C7].
    """
    from sklearn.metrics import roc_auc_score

    labels, probs = check_study_arrays(y_true, y_prob)
    aucs = {}
    for j, target in enumerate(STUDY_TARGETS):
        one_class = len(np.unique(labels[:, j])) < 2
        aucs[target] = float("nan") if one_class else float(roc_auc_score(labels[:, j], probs[:, j]))
    return aucs


# -------------------------------------------------------------------------------------- calibration


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, CALIBRATED_EPS, 1.0 - CALIBRATED_EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def fit_platt(
    x: np.ndarray, y: np.ndarray, prior_strength: float = 1.0, max_iter: int = 100, tol: float = 1e-10
) -> tuple[float, float]:
    """(slope, intercept) of p = sigmoid(slope * x + intercept) fitted to labels y (0/1) on logits x.

    Platt's target smoothing (positives aim at (N+ + 1)/(N+ + 2), negatives at 1/(N- + 2)) and an L2
    penalty `prior_strength / 2 * ((slope - 1)^2 + intercept^2)` toward the identity make the problem
    strictly convex, so it has one finite solution for any data: no study -> the identity; a single
    class -> a shift toward the smoothed prevalence; many studies -> plain Platt scaling.
    Newton's method with step halving.
    """
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    target = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    features = np.column_stack([x, np.ones_like(x)])
    prior = np.array([1.0, 0.0])

    def objective(theta: np.ndarray) -> float:
        z = features @ theta
        # cross-entropy of sigmoid(z) against the smoothed targets, written stably
        nll = np.sum(np.logaddexp(0.0, z) - target * z)
        return float(nll + 0.5 * prior_strength * np.sum((theta - prior) ** 2))

    theta = prior.copy()
    value = objective(theta)
    for _ in range(max_iter):
        p = _sigmoid(features @ theta)
        gradient = features.T @ (p - target) + prior_strength * (theta - prior)
        hessian = (features * (p * (1.0 - p))[:, None]).T @ features + prior_strength * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-8:
            candidate = theta - scale * step
            new_value = objective(candidate)
            if new_value <= value:
                break
            scale *= 0.5
        else:
            break
        theta, improvement, value = candidate, value - new_value, new_value
        if improvement < tol and np.max(np.abs(scale * step)) < 1e-8:
            break
    return float(theta[0]), float(theta[1])


class Calibrator:
    """Per-target Platt scaling on the logit of a pooled probability, 8 targets [patient_overall, C1..C7].

    `fit(y_true, y_prob)` on validation studies, `transform(y_prob)` anywhere; outputs are clipped to
    [1e-6, 1 - 1e-6]. Tiny or one-class validation sets never fail: see `fit_platt` (no study keeps
    the identity, one class shifts toward the smoothed prevalence). `to_dict()` / `from_dict()` give
    plain JSON for the checkpoint's vit_spine.json.
    """

    FORMAT = 1
    METHOD = "platt_logit"

    def __init__(self, prior_strength: float = 1.0) -> None:
        if prior_strength <= 0:
            raise ValueError(f"prior_strength={prior_strength}: must be > 0 (it keeps the fit finite)")
        self.prior_strength = float(prior_strength)
        self.slope: np.ndarray | None = None
        self.intercept: np.ndarray | None = None
        self.n_studies = 0
        self.n_positive: np.ndarray | None = None

    @property
    def is_fitted(self) -> bool:
        return self.slope is not None

    def fit(self, y_true: Any, y_prob: Any) -> Calibrator:
        """Fit one (slope, intercept) per target on studies (n, 8); n may be 0 (then the identity)."""
        labels, probs = check_study_arrays(y_true, y_prob, allow_empty=True)
        x = _logit(probs)
        params = [fit_platt(x[:, j], labels[:, j], self.prior_strength) for j in range(N_TARGETS)]
        self.slope = np.array([a for a, _ in params])
        self.intercept = np.array([b for _, b in params])
        self.n_studies = len(labels)
        self.n_positive = labels.sum(axis=0).astype(int)
        return self

    def transform(self, y_prob: Any) -> np.ndarray:
        """Calibrated (m, 8) probabilities [patient_overall, C1..C7], clipped to [1e-6, 1 - 1e-6]."""
        if not self.is_fitted:
            raise ValueError("Calibrator.transform called before fit (or from_dict)")
        probs = _as_matrix(y_prob, "y_prob", N_TARGETS, STUDY_TARGETS)
        _check_probabilities(probs, "y_prob")
        calibrated = _sigmoid(self.slope * _logit(probs) + self.intercept)
        return np.clip(calibrated, CALIBRATED_EPS, 1.0 - CALIBRATED_EPS)

    def to_dict(self) -> dict:
        if not self.is_fitted:
            raise ValueError("Calibrator.to_dict called before fit")
        return {
            "format": self.FORMAT,
            "method": self.METHOD,
            "targets": list(STUDY_TARGETS),
            "prior_strength": self.prior_strength,
            "slope": [float(v) for v in self.slope],
            "intercept": [float(v) for v in self.intercept],
            "n_studies": int(self.n_studies),
            "n_positive": [int(v) for v in self.n_positive],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibrator:
        """Inverse of `to_dict`; ValueError naming the problem for a dict this version cannot use."""
        if data.get("format") != cls.FORMAT or data.get("method") != cls.METHOD:
            raise ValueError(
                f"calibration: expected format {cls.FORMAT} / method {cls.METHOD!r}, "
                f"got {data.get('format')!r} / {data.get('method')!r}"
            )
        if list(data.get("targets", [])) != list(STUDY_TARGETS):
            raise ValueError(f"calibration: targets {data.get('targets')} differ from {list(STUDY_TARGETS)}")
        calibrator = cls(prior_strength=data["prior_strength"])
        for key in ("slope", "intercept", "n_positive"):
            values = np.asarray(data[key], dtype=np.float64)
            if values.shape != (N_TARGETS,) or not np.isfinite(values).all():
                raise ValueError(f"calibration: `{key}` must hold {N_TARGETS} finite numbers, got {data[key]!r}")
        calibrator.slope = np.asarray(data["slope"], dtype=np.float64)
        calibrator.intercept = np.asarray(data["intercept"], dtype=np.float64)
        calibrator.n_positive = np.asarray(data["n_positive"], dtype=int)
        calibrator.n_studies = int(data["n_studies"])
        return calibrator


def calibration_folds(y_true: Any, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """(n,) fold index of each study, stratified on patient_overall, deterministic for a seed.

    Uses min(n_folds, n) folds, so every fold holds at least one study.
    """
    labels = _as_matrix(y_true, "y_true", N_TARGETS, STUDY_TARGETS)
    if n_folds < 2:
        raise ValueError(f"n_folds={n_folds}: cross-fitting needs at least 2 folds")
    n_used = min(n_folds, len(labels))
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=int)
    offset = 0
    for value in (0.0, 1.0):
        members = rng.permutation(np.flatnonzero(labels[:, 0] == value))
        folds[members] = (offset + np.arange(len(members))) % max(n_used, 1)
        offset += len(members)  # continue the round robin so small classes spread over folds
    return folds


def cross_fitted_calibration(
    y_true: Any, y_prob: Any, n_folds: int = 5, seed: int = 0, prior_strength: float = 1.0
) -> np.ndarray:
    """Calibrated (n, 8) [patient_overall, C1..C7] where each study's row comes from a `Calibrator`
    fitted on the other folds only, so scoring it does not reward the calibrator for seeing the labels
    it is scored on. This is the validation score we report; the calibrator saved with a checkpoint is
    `Calibrator().fit` on all validation studies. Works for any n >= 1 (one study: its calibrator saw
    no data and is the identity).
    """
    labels, probs = check_study_arrays(y_true, y_prob)
    folds = calibration_folds(labels, n_folds, seed)
    calibrated = np.empty_like(probs)
    for fold in np.unique(folds):
        held_out = folds == fold
        calibrator = Calibrator(prior_strength).fit(labels[~held_out], probs[~held_out])
        calibrated[held_out] = calibrator.transform(probs[held_out])
    return calibrated


# ------------------------------------------------------------------------------- evaluate.Metric


_METRIC_DESCRIPTION = """RSNA 2022 Cervical Spine Fracture Detection weighted log loss. Per study, the weighted
binary cross-entropy over 8 targets [patient_overall, C1..C7] (weights 7/14 for patient_overall, 1/2 for
each vertebra, negative/positive), divided by the sum of weights, then averaged over studies."""


def _build_weighted_log_loss_metric() -> type:
    import datasets
    import evaluate

    class WeightedLogLoss(evaluate.Metric):
        """`evaluate.Metric` for the competition score; works offline (no `evaluate.load` from the Hub).

        predictions, references: sequences of 8 floats per study, [patient_overall, C1..C7].
        `WeightedLogLoss().compute(predictions=p, references=y)` -> {"weighted_log_loss": float}.
        """

        def _info(self) -> evaluate.MetricInfo:
            row = datasets.Sequence(datasets.Value("float64"), length=N_TARGETS)
            return evaluate.MetricInfo(
                description=_METRIC_DESCRIPTION,
                citation="RSNA 2022 Cervical Spine Fracture Detection (Kaggle competition)",
                inputs_description="predictions: (n, 8) probabilities; references: (n, 8) labels 0/1; "
                "columns [patient_overall, C1..C7]",
                features=datasets.Features({"predictions": row, "references": row}),
            )

        def _compute(self, predictions=None, references=None) -> dict[str, float]:
            return {"weighted_log_loss": weighted_log_loss(references, predictions)}

    WeightedLogLoss.__module__ = __name__
    WeightedLogLoss.__qualname__ = "WeightedLogLoss"
    return WeightedLogLoss


def __getattr__(name: str) -> Any:
    # WeightedLogLoss subclasses evaluate.Metric; building it on first access keeps `evaluate` out of
    # the import of this module (predict and the CLI import it).
    if name == "WeightedLogLoss":
        cls = _build_weighted_log_loss_metric()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
