"""vit-spine synth: layout, determinism, realism of labels and DICOM, and that the written files
carry exactly the ground truth that was planted."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from vit_spine import STUDY_TARGETS, VERTEBRAE
from vit_spine.synth import (
    REAL_FRACTURE_PATTERNS,
    SynthConfig,
    draw_split_labels,
    draw_study_labels,
    main,
    plan_studies,
    render_study,
    synthesize,
)

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
GROUND_TRUTH_COLUMNS = [
    "StudyInstanceUID", "slice_number", "z", "split",
    *(f"visible_{v}" for v in VERTEBRAE), *(f"fracture_{v}" for v in VERTEBRAE),
]
# Real RSNA 2022 figures (train.csv of the competition).
REAL_OVERALL = 0.476
REAL_VERTEBRA_PREVALENCE = dict(zip(VERTEBRAE, (0.072, 0.141, 0.036, 0.054, 0.080, 0.137, 0.195)))
REAL_FRACTURES_PER_POSITIVE = {1: 623, 2: 239, 3: 64, 4: 26, 5: 7, 6: 2}


def tiny_config(out: Path, **changes) -> SynthConfig:
    options = dict(output_dir=str(out), num_studies=3, num_test_studies=1, num_slices=24, size=64, seed=0)
    return SynthConfig(**{**options, **changes})


def files_by_name(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return apply_modality_lut(ds.pixel_array, ds)


def slice_headers(folder: Path) -> dict[int, pydicom.Dataset]:
    return {int(p.stem): pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm")}


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1


@pytest.fixture(scope="module")
def ground_truth(synth_data: Path) -> pd.DataFrame:
    return pd.read_csv(synth_data / "ground_truth.csv")


@pytest.fixture(scope="module")
def plans(synth_config: SynthConfig) -> dict:
    return {plan.uid: plan for plan in plan_studies(synth_config)}


# ----------------------------------------------------------------------------- determinism, CLI

def test_same_seed_same_bytes_any_workers_and_other_seed_differs(tmp_path):
    first = synthesize(tmp_path / "a", tiny_config(tmp_path / "a"))
    synthesize(tmp_path / "b", tiny_config(tmp_path / "b", workers=2))
    synthesize(tmp_path / "c", tiny_config(tmp_path / "c", seed=1))
    a, b, c = (files_by_name(tmp_path / name) for name in "abc")
    assert len(a) == 3 * 24 + 1 + 6  # slices, one segmentation, six tables
    assert a == b
    assert first.slices == 72 and first.train_studies == 2 and first.test_studies == 1
    assert set(a) != set(c)  # other UIDs
    assert a["train.csv"] != c["train.csv"]


def test_cli_writes_summary_refuses_to_overwrite_and_checks_arguments(tmp_path, capsys):
    out = tmp_path / "data"
    args = [str(out), "--studies", "3", "--test_studies", "1", "--slices", "24", "--size", "64"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 studies (2 train, 1 test), 72 slices" in printed
    assert "JPEG Lossless SV1" in printed
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        main(args)
    assert main([*args, "--overwrite"]) == 0
    with pytest.raises(ValueError, match="--num_test_studies must be in"):
        main([str(out), "--studies", "3", "--test_studies", "3"])
    with pytest.raises(ValueError, match="--num_slices must be at least 24"):
        SynthConfig(output_dir=str(out), num_slices=10)


# ----------------------------------------------------------------------------- labels

def test_label_draws_match_real_prevalence_and_co_occurrence():
    labels = draw_study_labels(4000, np.random.default_rng(123))
    positive = labels.any(axis=1)
    assert abs(positive.mean() - REAL_OVERALL) < 0.03
    for k, vertebra in enumerate(VERTEBRAE):
        assert abs(labels[:, k].mean() - REAL_VERTEBRA_PREVALENCE[vertebra]) < 0.02, vertebra
    per_positive = Counter(labels[positive].sum(axis=1).tolist())
    total_real = sum(REAL_FRACTURES_PER_POSITIVE.values())
    for count in (1, 2, 3):
        drawn = per_positive[count] / positive.sum()
        assert abs(drawn - REAL_FRACTURES_PER_POSITIVE[count] / total_real) < 0.04, count
    # neighbours break together: C6 is far more likely fractured when C7 is
    c6, c7 = labels[:, 5].astype(bool), labels[:, 6].astype(bool)
    assert c6[c7].mean() > 2 * c6.mean()


def test_every_split_of_two_or_more_holds_both_classes():
    for seed in range(200):
        labels = draw_split_labels(2, np.random.default_rng(seed))
        assert sorted(labels.any(axis=1).tolist()) == [False, True], seed
    for seed in range(20):
        plans = plan_studies(SynthConfig(output_dir="unused", num_studies=4, num_test_studies=2, seed=seed))
        for split in ("train", "test"):
            assert {any(p.labels) for p in plans if p.split == split} == {False, True}, (seed, split)


def test_pattern_table_is_the_real_train_csv(shared_rsna):
    real = pd.read_csv(shared_rsna / "train.csv")
    patterns = real[list(VERTEBRAE)].astype(str).agg("".join, axis=1).value_counts()
    assert patterns.to_dict() == REAL_FRACTURE_PATTERNS


# ----------------------------------------------------------------------------- layout

def test_layout_and_tables(synth_data, synth_config, ground_truth):
    train = pd.read_csv(synth_data / "train.csv")
    test_labels = pd.read_csv(synth_data / "test_labels.csv")
    assert list(train.columns) == ["StudyInstanceUID", *STUDY_TARGETS, "fold"]
    assert list(test_labels.columns) == ["StudyInstanceUID", *STUDY_TARGETS]
    assert len(train) == 7 and len(test_labels) == 3
    for table in (train, test_labels):
        assert (table["patient_overall"] == table[list(VERTEBRAE)].max(axis=1)).all()
        assert set(table["patient_overall"]) == {0, 1}
        assert table["StudyInstanceUID"].str.fullmatch(r"1\.2\.826\.0\.1\.3680043\.\d+").all()
    assert set(train["fold"]) == {0, 1, 2, 3, 4}
    for split, table in (("train", train), ("test", test_labels)):
        folders = sorted(p.name for p in (synth_data / f"{split}_images").iterdir())
        assert folders == sorted(table["StudyInstanceUID"])
        for uid in folders:
            names = sorted(int(p.stem) for p in (synth_data / f"{split}_images" / uid).glob("*.dcm"))
            assert names == list(range(1, synth_config.num_slices + 1))

    test_rows = pd.read_csv(synth_data / "test.csv")
    assert list(test_rows.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    assert len(test_rows) == 8 * 3
    assert (test_rows["row_id"] == test_rows["StudyInstanceUID"] + "_" + test_rows["prediction_type"]).all()
    for _, rows in test_rows.groupby("StudyInstanceUID"):
        assert tuple(rows["prediction_type"]) == STUDY_TARGETS
    submission = pd.read_csv(synth_data / "sample_submission.csv")
    assert list(submission.columns) == ["row_id", "fractured"]
    assert submission["row_id"].tolist() == test_rows["row_id"].tolist() and (submission["fractured"] == 0.5).all()

    boxes = pd.read_csv(synth_data / "train_bounding_boxes.csv")
    assert list(boxes.columns) == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    positives = set(train.loc[train["patient_overall"] == 1, "StudyInstanceUID"])
    assert len(boxes) > 0 and set(boxes["StudyInstanceUID"]) <= positives

    segmentations = sorted(p.stem for p in (synth_data / "segmentations").glob("*.nii"))
    assert 1 <= len(segmentations) < 7 and set(segmentations) <= set(train["StudyInstanceUID"])

    assert list(ground_truth.columns) == GROUND_TRUTH_COLUMNS
    assert len(ground_truth) == 10 * synth_config.num_slices
    split_of = {**dict.fromkeys(train["StudyInstanceUID"], "train"), **dict.fromkeys(test_labels["StudyInstanceUID"], "test")}
    assert (ground_truth["split"] == ground_truth["StudyInstanceUID"].map(split_of)).all()


def test_ground_truth_is_consistent_with_study_labels_and_anatomy(synth_data, ground_truth):
    labels = pd.concat([pd.read_csv(synth_data / "train.csv"), pd.read_csv(synth_data / "test_labels.csv")])
    visible = ground_truth[[f"visible_{v}" for v in VERTEBRAE]].to_numpy()
    fractured = ground_truth[[f"fracture_{v}" for v in VERTEBRAE]].to_numpy()
    assert set(np.unique(visible)) == {0, 1} and set(np.unique(fractured)) == {0, 1}
    assert not (fractured & (1 - visible)).any()  # a break lies inside a visible vertebra
    per_slice = visible.sum(axis=1)
    assert per_slice.max() == 2 and (per_slice == 0).any() and (per_slice == 1).any()
    by_study = ground_truth.groupby("StudyInstanceUID")
    planted = by_study[[f"fracture_{v}" for v in VERTEBRAE]].max()
    planted.columns = list(VERTEBRAE)
    expected = labels.set_index("StudyInstanceUID")[list(VERTEBRAE)].loc[planted.index]
    pd.testing.assert_frame_equal(planted, expected, check_dtype=False)
    assert (by_study[[f"visible_{v}" for v in VERTEBRAE]].max() == 1).all().all()  # C1..C7 in every study


# ----------------------------------------------------------------------------- DICOM realism

def test_headers_vary_like_real_data_and_are_complete(synth_data, ground_truth):
    syntaxes, formats, directions = Counter(), set(), set()
    for folder in sorted((synth_data / "train_images").iterdir()) + sorted((synth_data / "test_images").iterdir()):
        headers = slice_headers(folder)
        first, last = headers[1], headers[len(headers)]
        syntaxes[str(first.file_meta.TransferSyntaxUID)] += 1
        formats.add((int(first.BitsStored), int(first.PixelRepresentation), float(first.RescaleIntercept)))
        directions.add(float(first.ImagePositionPatient[2]) > float(last.ImagePositionPatient[2]))
        assert first.Modality == "CT" and first.StudyInstanceUID == folder.name
        assert first.SeriesInstanceUID.startswith(folder.name + ".")
        assert len({h.SOPInstanceUID for h in headers.values()}) == len(headers)
        assert all(int(h.InstanceNumber) == n for n, h in headers.items())
        assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(first.RescaleSlope) == 1 and float(first.PixelSpacing[0]) > 0 and "WindowCenter" in first
        zs = np.array([float(headers[n].ImagePositionPatient[2]) for n in sorted(headers)])
        assert np.allclose(np.abs(np.diff(zs)), float(first.SliceThickness), atol=2e-3)
        study_truth = ground_truth[ground_truth["StudyInstanceUID"] == folder.name].sort_values("slice_number")
        assert np.allclose(study_truth["z"].to_numpy(), zs)
    assert set(syntaxes) == {JPEG_LOSSLESS, "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1"}
    assert syntaxes.most_common(1)[0][0] == JPEG_LOSSLESS
    assert formats == {(12, 0, -1024.0), (16, 1, 0.0), (16, 0, -1024.0)}
    assert directions == {True, False}


def test_pixels_decode_to_the_planted_hounsfield_units(synth_data, plans):
    for uid, plan in plans.items():
        rendered = render_study(plan)
        folder = synth_data / f"{plan.split}_images" / uid
        for number in (1, plan.num_slices // 2, plan.num_slices):
            hu = read_hu(folder / f"{number}.dcm")
            np.testing.assert_array_equal(hu, rendered.hu[number - 1], err_msg=f"{uid} slice {number}")
        # planted values are CT-like: air (or -2000 padding outside the field of view), soft tissue, bone
        middle = plan.num_slices // 2
        hu = read_hu(folder / f"{middle}.dcm")
        corner = hu[:4, :4]
        assert (corner == -2000).all() if plan.pixel_format.signed else abs(corner.mean() + 1000) < 60
        bone = rendered.labels[middle - 1] > 0
        assert np.median(hu[bone]) > 200 and hu[bone].max() > 700 and np.median(hu[~bone & (hu > -500)]) < 100


# ----------------------------------------------------------------------------- segmentations, boxes

def test_segmentations_follow_the_rsna_orientation_rule(synth_data, plans, ground_truth):
    for path in sorted((synth_data / "segmentations").glob("*.nii")):
        uid = path.stem
        seg = np.asanyarray(nib.load(path).dataobj)
        headers = slice_headers(synth_data / "train_images" / uid)
        zs = [float(headers[n].ImagePositionPatient[2]) for n in sorted(headers)]
        z_decreasing = zs[0] > zs[-1]
        # the rule public RSNA 2022 solutions use, written independently of synth's inverse:
        mask = seg[:, ::-1, ::-1].transpose(2, 1, 0) if z_decreasing else seg[:, ::-1].transpose(2, 1, 0)
        assert mask.shape == (len(headers), headers[1].Rows, headers[1].Columns)
        assert set(np.unique(mask)) >= set(range(0, 8)) and mask.max() <= 19
        truth = ground_truth[ground_truth["StudyInstanceUID"] == uid].sort_values("slice_number")
        for k, vertebra in enumerate(VERTEBRAE, start=1):
            np.testing.assert_array_equal((mask == k).any(axis=(1, 2)).astype(int), truth[f"visible_{vertebra}"], vertebra)
        np.testing.assert_array_equal(mask, render_study(plans[uid]).labels)
        # and the labels sit on the bone of the image, row for row and column for column
        middle = len(headers) // 2
        hu = read_hu(synth_data / "train_images" / uid / f"{middle + 1}.dcm")
        assert np.median(hu[mask[middle] > 0]) > 200 and np.median(hu[mask[middle] == 0]) < 100


def test_boxes_enclose_the_planted_breaks(synth_data, plans, ground_truth):
    boxes = pd.read_csv(synth_data / "train_bounding_boxes.csv")
    truth = ground_truth.set_index(["StudyInstanceUID", "slice_number"])
    studies_with_boxes = set(boxes["StudyInstanceUID"])
    assert studies_with_boxes == {uid for uid, p in plans.items() if p.with_boxes}
    for uid in studies_with_boxes:
        rendered = render_study(plans[uid])
        study_boxes = boxes[boxes["StudyInstanceUID"] == uid]
        fractured_slices = truth.loc[uid].filter(like="fracture_").max(axis=1)
        assert set(study_boxes["slice_number"]) == set(fractured_slices[fractured_slices == 1].index)
        for box in study_boxes.itertuples():
            breaks = rendered.fracture_masks[box.slice_number - 1]
            assert breaks, f"box on slice {box.slice_number} of {uid} without a planted break"
            tight = [k for k, gap in breaks.items() if tight_box(gap) == (box.x, box.y, box.width, box.height)]
            assert tight, f"box {box} is not the bounds of a break planted on that slice"
            vertebra = tight[0]
            assert truth.loc[(uid, box.slice_number), f"fracture_{VERTEBRAE[vertebra - 1]}"] == 1
            # the break is a dark cut through that vertebra's bone
            gap = breaks[vertebra]
            labels = rendered.labels[box.slice_number - 1]
            assert (labels[gap] == vertebra).all()
            hu = read_hu(synth_data / "train_images" / uid / f"{box.slice_number}.dcm")
            assert hu[gap].mean() < 200 and np.median(hu[(labels == vertebra) & ~gap]) > 300
