"""`vit-spine scan`: the target rules on hand-made arrays, then end to end on the synthetic dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from vit_spine import VERTEBRAE
from vit_spine.scan import (
    COLUMNS,
    FRACTURE_COLUMNS,
    VISIBLE_COLUMNS,
    ScanConfig,
    SegmentationMismatch,
    fracture_targets,
    main,
    read_scan_metadata,
    scan,
    segmentation_presence,
    segmentation_visibility,
)

NAN = np.nan


# ---------------------------------------------------------------- fracture targets on hand-made arrays


def labels(*fractured: int) -> np.ndarray:
    """[patient_overall, C1..C7] with the given vertebrae (1..7) fractured."""
    vertebrae = [1.0 if v in fractured else 0.0 for v in range(1, 8)]
    return np.array([float(bool(fractured)), *vertebrae])


def visibility(*rows: str) -> np.ndarray:
    """One string per slice: the visible vertebrae as digits, or '?' for unknown ('' = none)."""
    out = np.zeros((len(rows), 7))
    for i, row in enumerate(rows):
        if row == "?":
            out[i] = NAN
        for digit in row.replace("?", ""):
            out[i, int(digit) - 1] = 1
    return out


def test_unlabeled_study_is_unknown():
    fracture, source = fracture_targets(visibility("12", "?"), None, None)
    assert source == "unknown" and np.isnan(fracture).all() and fracture.shape == (2, 7)


def test_negative_study_is_zero_even_with_unknown_visibility_or_boxes():
    for boxes in (None, np.array([True, False])):
        fracture, source = fracture_targets(visibility("12", "?"), labels(), boxes)
        assert source == "negative" and (fracture == 0).all()


def test_positive_study_without_boxes_is_label_times_visibility():
    fracture, source = fracture_targets(visibility("12", "23", "?", ""), labels(2, 5), None)
    assert source == "label_x_visibility"
    expected = np.zeros((4, 7))
    expected[0, 1] = expected[1, 1] = 1  # C2 fractured and visible on slices 0 and 1
    expected[2, [1, 4]] = NAN  # unknown visibility: fractured vertebrae unknown, the others 0
    np.testing.assert_array_equal(fracture, expected)


def test_boxed_study_marks_fractured_visible_vertebrae_on_box_slices_only():
    visible = visibility("12", "23", "23", "?", "3")
    boxes = np.array([False, True, True, True, False])
    fracture, source = fracture_targets(visible, labels(2, 3, 6), boxes)
    assert source == "boxes"
    expected = np.zeros((5, 7))
    expected[1, [1, 2]] = 1  # C2 and C3 fractured and visible on box slices 1 and 2
    expected[2, [1, 2]] = 1
    expected[3, [1, 2, 5]] = 1  # box slice of unknown visibility: every fractured vertebra
    # slice 0 shows fractured C2 and slice 4 fractured C3, but they carry no box: 0
    np.testing.assert_array_equal(fracture, expected)


# ---------------------------------------------------------------- segmentation -> visibility


def write_segmentation(path: Path, labels_per_slice: list[list[int]], size: int = 6) -> np.ndarray:
    """A (size, size, slices) uint8 label map with the given labels somewhere on each slice (third axis)."""
    seg = np.zeros((size, size, len(labels_per_slice)), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for k, present in enumerate(labels_per_slice):
        for label in present:
            i, j = rng.integers(0, size, 2)
            seg[i, j, k] = label
    nibabel.save(nibabel.Nifti1Image(seg, np.eye(4)), path)
    return seg


def design_rule_visibility(seg: np.ndarray, z_decreases: bool) -> np.ndarray:
    """DESIGN.md's rule, written out literally: (slice, row, col) mask with slices sorted by slice_number."""
    mask = seg[:, ::-1, ::-1].transpose(2, 1, 0) if z_decreases else seg[:, ::-1].transpose(2, 1, 0)
    return np.array([[float((m == v).any()) for v in range(1, 8)] for m in mask])


def study_rows(slice_numbers: list[int], z: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"slice_number": slice_numbers, "z": z})


@pytest.mark.parametrize("z_decreases", [False, True])
def test_segmentation_orientation_follows_the_design_rule(tmp_path, z_decreases):
    per_slice = [[1], [1, 2], [2], [], [3, 9], [4], [5, 6], [7]]
    seg = write_segmentation(tmp_path / "s.nii", per_slice)
    n = len(per_slice)
    z = [100.0 - 2 * i for i in range(n)] if z_decreases else [-50.0 + 2 * i for i in range(n)]
    rows = study_rows(list(range(1, n + 1)), z)
    visible = segmentation_visibility(tmp_path / "s.nii", rows)
    np.testing.assert_array_equal(visible, design_rule_visibility(seg, z_decreases))
    # and the rule really differs between the two directions on this volume
    assert not np.array_equal(design_rule_visibility(seg, True), design_rule_visibility(seg, False))


def test_segmentation_with_gaps_in_slice_numbers_and_a_bad_file_name(tmp_path):
    seg = write_segmentation(tmp_path / "s.nii", [[1], [2], [3]])
    rows = study_rows([-1, 10, 20, 30], [NAN, 5.0, 3.0, 1.0])  # -1: file name was not <n>.dcm
    visible = segmentation_visibility(tmp_path / "s.nii", rows)
    assert np.isnan(visible[0]).all()
    np.testing.assert_array_equal(visible[1:], design_rule_visibility(seg, z_decreases=True))


def test_segmentation_slice_count_mismatch_raises(tmp_path):
    write_segmentation(tmp_path / "s.nii", [[1], [2], [3]])
    with pytest.raises(SegmentationMismatch, match="has 3 slices but the study has 4") as info:
        segmentation_visibility(tmp_path / "s.nii", study_rows([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0]))
    assert info.value.kind == "segmentation_mismatch"


def test_segmentation_with_flat_z_cannot_be_oriented(tmp_path):
    write_segmentation(tmp_path / "s.nii", [[1], [2]])
    with pytest.raises(SegmentationMismatch, match="cannot tell"):
        segmentation_visibility(tmp_path / "s.nii", study_rows([1, 2], [4.0, 4.0]))


def test_segmentation_presence_across_slabs_and_float_maps(tmp_path):
    per_slice = [[(k % 7) + 1] if k % 3 else [] for k in range(70)]  # 70 slices: three slabs of 32
    seg = write_segmentation(tmp_path / "s.nii", per_slice, size=3)
    expected = np.array([[v + 1 in present for v in range(7)] for present in per_slice])
    np.testing.assert_array_equal(segmentation_presence(tmp_path / "s.nii"), expected)
    nibabel.save(nibabel.Nifti1Image(seg.astype(np.float32), np.eye(4)), tmp_path / "f.nii.gz")
    np.testing.assert_array_equal(segmentation_presence(tmp_path / "f.nii.gz"), expected)
