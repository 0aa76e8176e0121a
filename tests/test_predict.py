"""`vit-spine predict`: Kaggle rows and order, streaming per study, bad slices, clear errors."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vit_spine import STUDY_TARGETS, VERTEBRAE, metrics
from vit_spine.artifacts import write_checkpoint_meta
from vit_spine.evaluation import PoolingConfig
from vit_spine.models import create_model
from vit_spine.schema import SLICE_TARGETS as LABEL_NAMES
from vit_spine.predict import EPS, main, predict_studies
from vit_spine.preprocess import PreprocessConfig

IMAGE_SIZE = 64
PRIOR = [0.48, 0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.2]  # the training prevalence a checkpoint stores


def write_checkpoint(folder: Path, calibration: dict | None, preprocess: PreprocessConfig | None = None) -> Path:
    """A tiny random-init ViT saved the way train saves a shard (weights + vit_spine.json)."""
    create_model(model_config="tiny", image_size=IMAGE_SIZE, seed=0).save_pretrained(folder)
    write_checkpoint_meta(folder, {
        "shard": 0,
        "preprocess": (preprocess or PreprocessConfig(image_size=IMAGE_SIZE)).to_dict(),
        "pooling": asdict(PoolingConfig(aggregator="max")),
        "calibration": calibration,
        "metrics": {},
        "baseline_prevalence": PRIOR,
    })
    return folder


def fitted_calibration() -> dict:
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 8)) < 0.3).astype(float)
    labels[:, 0] = labels[:, 1:].max(axis=1)
    raw = np.clip(0.6 * labels + 0.4 * rng.random((40, 8)), 0.01, 0.99)
    return metrics.Calibrator().fit(labels, raw).to_dict()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder whose `best` points at a calibrated tiny checkpoint."""
    run = tmp_path_factory.mktemp("run")
    write_checkpoint(run / "shard_00000", fitted_calibration())
    (run / "best").symlink_to("shard_00000")
    return run


@pytest.fixture(scope="module")
def uncalibrated(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("raw") / "shard_00000", calibration=None)


@pytest.fixture(scope="module")
def test_images(synth_data: Path) -> Path:
    return synth_data / "test_images"


@pytest.fixture(scope="module")
def folder_predictions(run_dir, test_images):
    return predict_studies(run_dir, [test_images], progress=False)


def test_studies_csv_gives_exactly_the_sample_submission_rows(run_dir, synth_data, tmp_path, folder_predictions):
    out = tmp_path / "submission.csv"
    code = main([str(run_dir), str(synth_data / "test_images"), "--out", str(out), "--studies", str(synth_data / "test.csv"), "--no-progress"])
    assert code == 0
    submission = pd.read_csv(out)
    sample = pd.read_csv(synth_data / "sample_submission.csv")
    assert list(submission.columns) == list(sample.columns) == ["row_id", "fractured"]
    assert submission["row_id"].tolist() == sample["row_id"].tolist()
    assert submission["fractured"].between(EPS, 1 - EPS).all()
    # the CSV keeps the values the library computed
    computed = folder_predictions.submission.set_index("row_id")["fractured"]
    np.testing.assert_array_equal(submission["fractured"].to_numpy(), computed.loc[submission["row_id"]].to_numpy())


def test_a_test_csv_asking_for_some_rows_gets_only_those_in_its_order(run_dir, synth_data, tmp_path):
    table = pd.read_csv(synth_data / "test.csv")
    subset = table[table["prediction_type"].isin(["C1", "patient_overall"])].iloc[::-1]  # Kaggle's test.csv asks for a few
    subset.to_csv(tmp_path / "test.csv", index=False)
    result = predict_studies(run_dir, [synth_data / "test_images"], studies=tmp_path / "test.csv", progress=False)
    assert result.submission["row_id"].tolist() == subset["row_id"].tolist()
    assert result.num_studies == subset["StudyInstanceUID"].nunique() == len(table["StudyInstanceUID"].unique())
    # a test.csv listing fewer studies than the folder holds: only those are predicted, the rest counted
    one_study = table[table["StudyInstanceUID"] == table["StudyInstanceUID"].iloc[0]]
    one_study.to_csv(tmp_path / "one.csv", index=False)
    result = predict_studies(run_dir, [synth_data / "test_images"], studies=tmp_path / "one.csv", progress=False)
    assert result.num_studies == 1 and result.submission["row_id"].tolist() == one_study["row_id"].tolist()
    assert sorted(result.unlisted) == sorted(set(table["StudyInstanceUID"]) - {one_study["StudyInstanceUID"].iloc[0]})


def test_without_studies_csv_every_study_gets_eight_rows_in_target_order(folder_predictions, synth_data, test_images):
    submission = folder_predictions.submission
    uids = sorted(p.name for p in test_images.iterdir())
    assert submission["row_id"].tolist() == [f"{uid}_{t}" for uid in uids for t in STUDY_TARGETS]
    assert set(submission["row_id"]) == set(pd.read_csv(synth_data / "sample_submission.csv")["row_id"])
    values = submission["fractured"].to_numpy()
    assert np.isfinite(values).all() and (values > 0).all() and (values < 1).all()
    assert folder_predictions.problems.empty and folder_predictions.fallbacks == []


def test_a_study_alone_or_in_a_folder_gets_identical_predictions(run_dir, test_images, folder_predictions):
    uid = sorted(p.name for p in test_images.iterdir())[1]
    alone = predict_studies(run_dir, [test_images / uid], progress=False)
    in_folder = folder_predictions.submission[folder_predictions.submission["row_id"].str.startswith(uid + "_")]
    assert alone.submission["row_id"].tolist() == in_folder["row_id"].tolist()
    np.testing.assert_array_equal(alone.submission["fractured"].to_numpy(), in_folder["fractured"].to_numpy())
    slices = folder_predictions.slices
    np.testing.assert_array_equal(
        alone.slices[list(LABEL_NAMES)].to_numpy(), slices.loc[slices["StudyInstanceUID"] == uid, list(LABEL_NAMES)].to_numpy()
    )


def test_slice_scores_are_z_sorted_and_max_pooled_without_calibration(uncalibrated, synth_data, tmp_path):
    test_images = synth_data / "test_images"
    result = predict_studies(uncalibrated, [test_images], progress=False)
    slices = result.slices
    assert list(slices.columns) == ["StudyInstanceUID", "slice_number", "z", *LABEL_NAMES]
    assert len(slices) == sum(len(list(p.glob("*.dcm"))) for p in test_images.iterdir()) == result.num_slices
    ground_truth = pd.read_csv(synth_data / "ground_truth.csv")
    for uid, group in slices.groupby("StudyInstanceUID", sort=False):
        assert group["z"].is_monotonic_increasing
        truth = ground_truth[ground_truth["StudyInstanceUID"] == uid].set_index("slice_number")["z"]
        np.testing.assert_allclose(group["z"].to_numpy(), truth.loc[group["slice_number"]].to_numpy())
        vertebra = group[[f"fracture_{v}" for v in VERTEBRAE]].max().to_numpy()
        expected = np.clip([vertebra.max(), *vertebra], EPS, 1 - EPS)  # the checkpoint's pooling: max, then max
        got = result.submission.set_index("row_id").loc[[f"{uid}_{t}" for t in STUDY_TARGETS], "fractured"]
        np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_slices_out_writes_csv_or_parquet(run_dir, test_images, tmp_path, suffix):
    uid = sorted(p.name for p in test_images.iterdir())[0]
    path = tmp_path / f"slices{suffix}"
    assert main([str(run_dir), str(test_images / uid), "--out", str(tmp_path / "s.csv"), "--slices-out", str(path), "--no-progress"]) == 0
    table = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    assert len(table) == len(list((test_images / uid).glob("*.dcm")))
    assert list(table.columns) == ["StudyInstanceUID", "slice_number", "z", *LABEL_NAMES]
    assert table[list(LABEL_NAMES)].to_numpy().min() > 0


def test_a_corrupt_slice_is_reported_and_the_study_still_predicted(run_dir, test_images, tmp_path, capsys, folder_predictions):
    import pydicom

    uid = sorted(p.name for p in test_images.iterdir())[0]
    study = tmp_path / "images" / uid
    shutil.copytree(test_images / uid, study)
    junk = study / "999.dcm"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))  # not DICOM at all: left out
    ds = pydicom.dcmread(study / "1.dcm")  # a slice of its own position whose pixel data is cut short
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 500]
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.save_as(study / "cut.dcm", enforce_file_format=True)
    cut = study / "cut.dcm"
    cut.write_bytes(cut.read_bytes()[:-2000])
    out = tmp_path / "submission.csv"
    assert main([str(run_dir), str(tmp_path / "images"), "--out", str(out), "--no-progress"]) == 0
    stderr = capsys.readouterr().err
    assert f"skipped slice {cut}" in stderr and "1 slice(s) could not be decoded" in stderr
    assert "1 file(s)/frame(s) left out by the study assembly (not_dicom 1)" in stderr
    submission = pd.read_csv(out)
    assert submission["row_id"].tolist() == [f"{uid}_{t}" for t in STUDY_TARGETS]
    # the bad files are skipped, not rendered: the study scores as without them
    expected = folder_predictions.submission.set_index("row_id").loc[submission["row_id"], "fractured"].to_numpy()
    np.testing.assert_array_equal(submission["fractured"].to_numpy(), expected)
    problems = pd.read_csv(tmp_path / "submission.problems.csv", keep_default_na=False)
    assert list(problems.columns) == ["StudyInstanceUID", "level", "path", "frame", "reason"]
    assert problems[["level", "path"]].values.tolist() == [["slice", str(cut)], ["left_out", str(junk)]]
    assert problems["reason"].str.len().min() > 10  # each says why


def test_a_listed_study_without_images_gets_the_prior_and_strict_refuses(run_dir, synth_data, tmp_path, capsys):
    table = pd.read_csv(synth_data / "test.csv")
    unknown = "1.2.826.0.1.3680043.99999"
    extra = pd.DataFrame(
        {"row_id": [f"{unknown}_{t}" for t in STUDY_TARGETS], "StudyInstanceUID": unknown, "prediction_type": list(STUDY_TARGETS)}
    )
    pd.concat([table, extra]).to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "submission.csv"
    args = [str(run_dir), str(synth_data / "test_images"), "--out", str(out), "--studies", str(tmp_path / "test.csv")]
    assert main([*args, "--no-progress"]) == 3  # complete, with fallbacks
    assert f"{unknown}: listed in --studies_csv, but no folder" in capsys.readouterr().err
    submission = pd.read_csv(out).set_index("row_id")["fractured"]
    assert len(submission) == len(table) + 8
    np.testing.assert_allclose(submission.loc[extra["row_id"]].to_numpy(), PRIOR)
    problems = pd.read_csv(tmp_path / "submission.problems.csv", keep_default_na=False)
    assert problems[problems["level"] == "study"]["StudyInstanceUID"].tolist() == [unknown]
    out.unlink()
    assert main([*args, "--no-progress", "--strict"]) == 1
    assert "--strict: 1 study(ies) could not be predicted; no submission written" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "submission.problems.csv").exists()


def test_every_export_layout_is_predicted_and_a_hopeless_study_gets_the_prior(run_dir, export_studies, tmp_path, capsys):
    """A folder of studies as PACS exports write them: nested trees, extension-less and UID-named files,
    Enhanced CT, no preamble, no positions; and one study with no axial CT at all. Every study gets its rows."""
    root = next(iter(export_studies.values())).folder.parent
    out = tmp_path / "submission.csv"
    assert main([str(run_dir), str(root), "--out", str(out), "--slices-out", str(tmp_path / "slices.csv"), "--no-progress"]) == 3
    stderr = capsys.readouterr().err
    hopeless = export_studies["hopeless"].uid
    assert "1 study(ies) got the checkpoint's prior instead of a prediction" in stderr and hopeless in stderr
    submission = pd.read_csv(out).set_index("row_id")["fractured"]
    uids = sorted(s.uid for s in export_studies.values())
    assert submission.index.tolist() == [f"{uid}_{t}" for uid in uids for t in STUDY_TARGETS]
    np.testing.assert_allclose(submission.loc[[f"{hopeless}_{t}" for t in STUDY_TARGETS]].to_numpy(), PRIOR)
    slices = pd.read_csv(tmp_path / "slices.csv")
    for name, study in export_studies.items():
        if study.volume is not None:  # predicted from exactly its volume's slices
            assert (slices["StudyInstanceUID"] == study.uid).sum() == study.volume.spec.num_slices, name
    problems = pd.read_csv(tmp_path / "submission.problems.csv", keep_default_na=False)
    fallback = problems[problems["level"] == "study"]
    assert fallback["StudyInstanceUID"].tolist() == [hopeless]
    assert "no usable axial CT slice among 2 file(s): 1 localizer, 1 secondary_capture" in fallback["reason"].iloc[0]
    left_out = problems[problems["level"] == "left_out"]
    expected = sum(sum(s.left_out.values()) for s in export_studies.values())
    assert len(left_out) == expected and (problems["level"] != "slice").all()


def test_bad_paths_and_mismatched_checkpoints_are_clear_errors(run_dir, synth_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        predict_studies(run_dir, [tmp_path / "no-such-folder"], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a study folder"):
        predict_studies(run_dir, [tmp_path / "empty"], progress=False)
    with pytest.raises(FileNotFoundError, match="vit_spine.json"):
        predict_studies(tmp_path, [synth_data / "test_images"], progress=False)
    wrong = write_checkpoint(tmp_path / "wrong", None, PreprocessConfig(image_size=32))
    with pytest.raises(ValueError, match="64 px"):
        predict_studies(wrong, [synth_data / "test_images"], progress=False)


def test_decoding_in_worker_processes_gives_the_same_predictions(run_dir, test_images, folder_predictions):
    result = predict_studies(run_dir, [test_images], workers=1, progress=False)
    assert result.submission["row_id"].tolist() == folder_predictions.submission["row_id"].tolist()
    np.testing.assert_array_equal(result.submission["fractured"].to_numpy(), folder_predictions.submission["fractured"].to_numpy())
    assert result.decode_seconds > 0 and result.num_slices == folder_predictions.num_slices


@pytest.mark.parametrize("stored", [PreprocessConfig(image_size=IMAGE_SIZE, crop=0.6),
                                    PreprocessConfig(image_size=IMAGE_SIZE, pixel_spacing=2.5)], ids=["crop", "pixel_spacing"])
def test_predict_preprocesses_with_the_checkpoints_crop_or_pixel_spacing(stored, synth_data, tmp_path):
    """The crop or pixel spacing chunk used (stored in vit_spine.json) is applied to new studies too."""
    import torch

    from vit_spine.data import normalize
    from vit_spine.dicom import read_hu
    from vit_spine.models import load_model
    from vit_spine.preprocess import preprocess_study
    from vit_spine.study import assemble_folder

    folder = sorted((synth_data / "test_images").iterdir())[0]
    checkpoint = write_checkpoint(tmp_path / "stored", calibration=None, preprocess=stored)
    whole = write_checkpoint(tmp_path / "whole", calibration=None)
    got = predict_studies(checkpoint, [folder], progress=False).slices[list(LABEL_NAMES)].to_numpy()

    headers = assemble_folder(folder).slices
    spacings = [(h.pixel_spacing, h.pixel_spacing_column) for h in headers]
    pixels = preprocess_study([read_hu(h.path) for h in headers], stored, spacings)
    with torch.no_grad():
        logits = load_model(checkpoint)(pixel_values=normalize(torch.from_numpy(pixels))).logits
    np.testing.assert_allclose(got, torch.sigmoid(logits).numpy(), atol=1e-5)
    uncropped = predict_studies(whole, [folder], progress=False).slices[list(LABEL_NAMES)].to_numpy()
    assert np.abs(got - uncropped).max() > 1e-3
