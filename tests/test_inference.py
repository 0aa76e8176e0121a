"""The one inference path: batches, precision, and evaluate = report = predict on the same checkpoint and studies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vit_spine import metrics, report
from vit_spine.artifacts import RunDir, read_checkpoint_meta, resolve_checkpoint
from vit_spine.data import ShardDataset
from vit_spine.evaluation import EvaluateConfig, evaluate_checkpoint, matching_manifest, score_checkpoint
from vit_spine.inference import autocast_dtype, batch_plan, predict_logits, read_pixels, sigmoid
from vit_spine.models import create_model, load_model
from vit_spine.predict import EPS, load_predictor, predict_studies
from vit_spine.schema import FRACTURE_TARGETS, SLICE_TARGETS, STUDY_TARGETS


def test_batches_never_hold_two_studies_and_cut_each_study_from_its_first_slice():
    ids = np.array(["a"] * 5 + ["b"] * 2 + ["c"] * 3)
    assert [b.tolist() for b in batch_plan(10, 2, ids)] == [[0, 1], [2, 3], [4], [5, 6], [7, 8], [9]]
    assert [b.tolist() for b in batch_plan(5, 2)] == [[0, 1], [2, 3], [4]]  # one study: a decoded volume
    assert batch_plan(0, 4) == [] and batch_plan(0, 4, np.array([])) == []
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        batch_plan(3, 0)


def test_the_precision_rule_is_fp32_off_cuda():
    assert autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("meta")) is None


def test_sigmoid_in_float64():
    probs = sigmoid(np.array([[0.0, 40.0, -40.0]], dtype=np.float32))
    assert probs.dtype == np.float64
    np.testing.assert_array_equal(probs, 1.0 / (1.0 + np.exp(-np.array([[0.0, 40.0, -40.0]]))))


def test_logits_equal_the_models_own_forward_and_the_mode_is_restored():
    torch.manual_seed(0)
    model = create_model(model_config="tiny", image_size=32, seed=0).train()
    pixels = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    logits = predict_logits(model, pixels, batch_size=2)
    assert logits.shape == (5, len(SLICE_TARGETS)) and logits.dtype == np.float32
    assert model.training  # given back in the mode it came in
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model(pixel_values=torch.from_numpy(pixels[s : s + 2]).float() / 127.5 - 1).logits
                              for s in (0, 2, 4)])
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)


def test_a_concatenation_of_shards_reads_each_batch_from_its_shard(toy_chunks):
    shards = [ShardDataset(path) for path in sorted(toy_chunks.glob("shard_*"))[:2]]
    both = torch.utils.data.ConcatDataset(shards)
    rows = np.arange(len(shards[0]), len(shards[0]) + 3)
    np.testing.assert_array_equal(np.asarray(read_pixels(both, rows)), shards[1].read_uint8(rows - len(shards[0])))
    straddling = np.arange(len(shards[0]) - 1, len(shards[0]) + 1)  # items one by one, still right
    expected = np.concatenate([shards[0].read_uint8([len(shards[0]) - 1]), shards[1].read_uint8([0])])
    np.testing.assert_array_equal(np.asarray(read_pixels(both, straddling)), expected)


# ------------------------------------------------------------------------- parity on a trained checkpoint


@pytest.fixture(scope="module")
def best(trained_run: Path) -> tuple[Path, dict, Path]:
    checkpoint = resolve_checkpoint(trained_run)
    return checkpoint, read_checkpoint_meta(checkpoint), trained_run.parent / "chunks"


def test_evaluate_report_and_predict_give_identical_study_probabilities(best, synth_data, tmp_path):
    checkpoint, meta, chunks = best
    manifest = matching_manifest(chunks, checkpoint, meta)
    evaluated = score_checkpoint(load_model(checkpoint), checkpoint, meta, chunks, manifest, batch_size=16)
    reported = report.predict_validation(load_predictor(checkpoint, "cpu"), chunks, 16, seed=meta["seed"])
    for key in ("uids", "raw", "calibrated", "labels"):
        np.testing.assert_array_equal(reported.studies[key], evaluated.studies[key])
    np.testing.assert_array_equal(reported.slice_probs, evaluated.slice_probs)
    assert reported.scores == evaluated.row
    assert evaluate_checkpoint(EvaluateConfig(checkpoint=str(checkpoint), chunks=str(chunks), batch_size=16)) == evaluated.row

    uids = evaluated.studies["uids"]
    predicted = predict_studies(checkpoint, [synth_data / "train_images" / uid for uid in uids], batch_size=16,
                                device="cpu", progress=False)
    assert predicted.fallbacks == []
    # slice by slice: the same logits from the DICOM files as from the shard
    for uid in uids:
        shard_rows = evaluated.slice_probs[evaluated.validation.study_ids == uid]
        np.testing.assert_array_equal(predicted.slices.loc[predicted.slices["StudyInstanceUID"] == uid, list(SLICE_TARGETS)]
                                      .to_numpy(), shard_rows)
    # study by study: evaluate's pooled probabilities through the checkpoint's calibrator are predict's
    calibrator = metrics.Calibrator.from_dict(meta["calibration"])
    expected = np.clip(calibrator.transform(evaluated.studies["raw"]), EPS, 1 - EPS)
    submission = predicted.submission.set_index("row_id")["fractured"]
    got = np.array([[submission[f"{uid}_{target}"] for target in STUDY_TARGETS] for uid in uids])
    np.testing.assert_array_equal(got, expected)
    assert set(FRACTURE_TARGETS) < set(predicted.slices.columns)


def test_report_rescoring_uses_the_runs_seed_and_matches_the_runs_score(best, trained_run, tmp_path, monkeypatch):
    checkpoint, meta, _ = best
    assert meta["seed"] == 0  # the run's --seed (the fixture's); not the 42 report used to hard-code
    seeds = []
    cross_fitted = metrics.cross_fitted_calibration

    def spy(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return cross_fitted(*args, **kwargs)

    monkeypatch.setattr(metrics, "cross_fitted_calibration", spy)
    config = report.ReportConfig(run_dir=str(trained_run), output_dir=str(tmp_path / "report"), num_studies=0,
                                 num_saliency_slices=0, batch_size=16)
    report.build_report(config)
    assert seeds == [0, 0, 0]  # max, topk, sequence: each aggregator's score calibrated on the run's folds
    page = (tmp_path / "report" / "index.html").read_text()
    run_row = next(row for row in RunDir(trained_run).read_rows() if row["shard"] == meta["shard"])
    assert f"Re-scored here on {run_row['num_val_studies']} validation studies" in page
    assert f": {run_row['weighted_log_loss']:.4f} (raw {run_row['weighted_log_loss_uncalibrated']:.4f})." in page
