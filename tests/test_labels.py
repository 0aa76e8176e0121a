"""Readers of the RSNA label files: hand-made CSVs for every check, and the real files when present."""

from __future__ import annotations

from pathlib import Path

import pytest

from vit_spine import STUDY_TARGETS, VERTEBRAE
from vit_spine.labels import (
    read_bounding_boxes,
    read_test_table,
    read_train_labels,
    read_vertebrae_table,
)

TRAIN_HEADER = "StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text.strip() + "\n")
    return path


# ---------------------------------------------------------------- train.csv


def test_train_labels_types_and_fold(tmp_path):
    path = write(
        tmp_path,
        "train.csv",
        f"""
{TRAIN_HEADER},fold,extra
1.2.3.10,1,0,1,0,0,0,0,1,3,x
1.2.3.20,0,0,0,0,0,0,0,0,0,y
""",
    )
    df = read_train_labels(path)
    assert list(df.columns) == ["StudyInstanceUID", *STUDY_TARGETS, "fold"]
    # UIDs stay strings ("1.2.3.10" must not become a float 1.2...)
    assert df["StudyInstanceUID"].tolist() == ["1.2.3.10", "1.2.3.20"]
    assert all(df[c].dtype == "int64" for c in (*STUDY_TARGETS, "fold"))
    assert df.loc[0, ["C2", "C7"]].tolist() == [1, 1]
    assert df["fold"].tolist() == [3, 0]


def test_train_labels_without_fold(tmp_path):
    path = write(tmp_path, "train.csv", f"{TRAIN_HEADER}\n1.2.3,0,0,0,0,0,0,0,0")
    assert list(read_train_labels(path).columns) == ["StudyInstanceUID", *STUDY_TARGETS]


def test_train_labels_missing_column_names_file_and_column(tmp_path):
    path = write(tmp_path, "train.csv", "StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6\n1.2.3,0,0,0,0,0,0,0")
    with pytest.raises(ValueError, match=r"train\.csv: missing column\(s\) C7"):
        read_train_labels(path)


def test_train_labels_inconsistent_overall_is_an_error_listing_rows(tmp_path):
    path = write(
        tmp_path,
        "train.csv",
        f"""
{TRAIN_HEADER}
1.2.3.1,1,0,1,0,0,0,0,0
1.2.3.2,1,0,0,0,0,0,0,0
1.2.3.3,0,0,0,1,0,0,0,0
""",
    )
    with pytest.raises(ValueError, match="patient_overall must equal any") as info:
        read_train_labels(path)
    message = str(info.value)
    assert "2 row(s)" in message and "1.2.3.2" in message and "1.2.3.3" in message
    assert "1.2.3.1" not in message
    assert "line 3" in message and "line 4" in message


@pytest.mark.parametrize("value", ["2", "0.5", "", "yes"])
def test_train_labels_non_binary_value(tmp_path, value):
    path = write(tmp_path, "train.csv", f"{TRAIN_HEADER}\n1.2.3,1,{value},1,0,0,0,0,0")
    with pytest.raises(ValueError, match="column 'C1' must be 0 or 1"):
        read_train_labels(path)


def test_train_labels_duplicate_study(tmp_path):
    path = write(tmp_path, "train.csv", f"{TRAIN_HEADER}\n1.2.3,0,0,0,0,0,0,0,0\n1.2.3,0,0,0,0,0,0,0,0")
    with pytest.raises(ValueError, match="StudyInstanceUID must be unique"):
        read_train_labels(path)


def test_train_labels_bad_fold(tmp_path):
    path = write(tmp_path, "train.csv", f"{TRAIN_HEADER},fold\n1.2.3,0,0,0,0,0,0,0,0,1.5")
    with pytest.raises(ValueError, match="column 'fold' must be an integer"):
        read_train_labels(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_train_labels(tmp_path / "nope.csv")


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("")
    with pytest.raises(ValueError, match=r"train\.csv: not a readable CSV"):
        read_train_labels(path)


# ---------------------------------------------------------------- bounding boxes


def test_bounding_boxes(tmp_path):
    path = write(
        tmp_path,
        "train_bounding_boxes.csv",
        """
StudyInstanceUID,x,y,width,height,slice_number
1.2.3,219.27,216.71,17.3,20.38,133
1.2.3,10,20,30,40,133
1.2.4,1,2,3,4,7
""",
    )
    df = read_bounding_boxes(path)
    assert list(df.columns) == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    assert len(df) == 3  # two boxes on one slice stay two rows
    assert df["slice_number"].dtype == "int64" and df["x"].dtype == "float64"
    assert df["slice_number"].tolist() == [133, 133, 7]


def test_bounding_boxes_missing_column(tmp_path):
    path = write(tmp_path, "boxes.csv", "StudyInstanceUID,x,y,width,height\n1.2.3,1,2,3,4")
    with pytest.raises(ValueError, match=r"boxes\.csv: missing column\(s\) slice_number"):
        read_bounding_boxes(path)


@pytest.mark.parametrize(
    ("row", "column"),
    [("1,2,0,4,5", "width"), ("1,2,3,,5", "height"), ("-1,2,3,4,5", "x"), ("1,2,3,4,5.5", "slice_number")],
)
def test_bounding_boxes_bad_values(tmp_path, row, column):
    path = write(tmp_path, "boxes.csv", f"StudyInstanceUID,x,y,width,height,slice_number\n1.2.3,{row}")
    with pytest.raises(ValueError, match=f"column '{column}'"):
        read_bounding_boxes(path)


# ---------------------------------------------------------------- per-slice vertebra table


def test_vertebrae_table_binary_and_probabilities(tmp_path):
    path = write(
        tmp_path,
        "train_segmented.csv",
        """
StudyInstanceUID,Slice,C1,C2,C3,C4,C5,C6,C7
1.2.3,1,1,0,0,0,0,0,0
1.2.3,2,0.9,0.5,0.49,0,0,0,0.01
""",
    )
    df = read_vertebrae_table(path)
    assert list(df.columns) == ["StudyInstanceUID", "slice_number", *VERTEBRAE]
    assert df["slice_number"].tolist() == [1, 2]
    assert df.loc[1, list(VERTEBRAE)].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert read_vertebrae_table(path, threshold=0.95).loc[1, "C1"] == 0


def test_vertebrae_table_errors(tmp_path):
    header = "StudyInstanceUID,Slice,C1,C2,C3,C4,C5,C6,C7"
    with pytest.raises(ValueError, match=r"t\.csv: missing column\(s\) Slice"):
        read_vertebrae_table(write(tmp_path, "t.csv", "StudyInstanceUID,C1,C2,C3,C4,C5,C6,C7\n1.2,0,0,0,0,0,0,0"))
    with pytest.raises(ValueError, match=r"column 'C3' must be in \[0, 1\]"):
        read_vertebrae_table(write(tmp_path, "t.csv", f"{header}\n1.2,1,0,0,1.5,0,0,0,0"))
    with pytest.raises(ValueError, match="StudyInstanceUID \\+ Slice must be unique"):
        read_vertebrae_table(write(tmp_path, "t.csv", f"{header}\n1.2,1,0,0,0,0,0,0,0\n1.2,1,0,0,0,0,0,0,0"))


# ---------------------------------------------------------------- test.csv


def test_test_table(tmp_path):
    path = write(
        tmp_path,
        "test.csv",
        """
row_id,StudyInstanceUID,prediction_type
1.2.3_C1,1.2.3,C1
1.2.3_patient_overall,1.2.3,patient_overall
""",
    )
    df = read_test_table(path)
    assert list(df.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    assert df["prediction_type"].tolist() == ["C1", "patient_overall"]


def test_test_table_errors(tmp_path):
    header = "row_id,StudyInstanceUID,prediction_type"
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        read_test_table(write(tmp_path, "test.csv", f"{header}\n1.2_C8,1.2,C8"))
    with pytest.raises(ValueError, match="row_id must be <StudyInstanceUID>_<prediction_type>"):
        read_test_table(write(tmp_path, "test.csv", f"{header}\n1.2_C1,1.3,C1"))
    with pytest.raises(ValueError, match=r"test\.csv: missing column\(s\) prediction_type"):
        read_test_table(write(tmp_path, "test.csv", "row_id,StudyInstanceUID\n1.2_C1,1.2"))


# ---------------------------------------------------------------- the real competition files


def test_real_train_labels(shared_rsna):
    df = read_train_labels(shared_rsna / "train.csv")
    assert len(df) == 2019 and df["StudyInstanceUID"].is_unique
    prevalence = (df[list(STUDY_TARGETS)].mean() * 100).tolist()
    assert prevalence == pytest.approx([47.6, 7.2, 14.1, 3.6, 5.4, 8.0, 13.7, 19.5], abs=0.06)
    assert sorted(df["fold"].unique()) == [0, 1, 2, 3, 4]
    per_positive = df.loc[df["patient_overall"] == 1, list(VERTEBRAE)].sum(axis=1).value_counts().sort_index()
    assert per_positive.to_dict() == {1: 623, 2: 239, 3: 64, 4: 26, 5: 7, 6: 2}


def test_real_bounding_boxes_are_on_positive_studies(shared_rsna):
    boxes = read_bounding_boxes(shared_rsna / "train_bounding_boxes.csv")
    assert len(boxes) == 7217
    assert boxes["StudyInstanceUID"].nunique() == 235
    labels = read_train_labels(shared_rsna / "train.csv").set_index("StudyInstanceUID")
    assert labels.loc[boxes["StudyInstanceUID"].unique(), "patient_overall"].eq(1).all()


def test_real_test_table(shared_rsna):
    df = read_test_table(shared_rsna / "test.csv")
    assert len(df) == 3
    assert df["prediction_type"].isin(STUDY_TARGETS).all()
