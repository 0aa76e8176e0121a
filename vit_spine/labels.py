"""Readers of the RSNA 2022 label files, with validation.

Every reader returns an index-free DataFrame with a fixed set of columns and raises `ValueError`
naming the file (and the column or the offending rows) on bad input, so that a wrong file fails
here, once, instead of as a silent label error during training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vit_spine.schema import STUDY_TARGETS, VERTEBRAE

TRAIN_COLUMNS = ("StudyInstanceUID", *STUDY_TARGETS)
BOX_COLUMNS = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number")
VERTEBRAE_TABLE_COLUMNS = ("StudyInstanceUID", "Slice", *VERTEBRAE)
TEST_COLUMNS = ("row_id", "StudyInstanceUID", "prediction_type")

# How many offending rows an error message lists before it says "and N more".
_SHOWN = 5


def read_train_labels(path: str | Path) -> pd.DataFrame:
    """Read `train.csv`: StudyInstanceUID, patient_overall, C1..C7 (int64 0/1) and, if present, fold (int64).

    Raises ValueError when a column is missing, a label is not 0/1, a study appears twice, a fold is
    not an integer, or patient_overall differs from any(C1..C7) in some row (those rows are listed):
    a study that is "positive" with no fractured vertebra (or the reverse) has no consistent target.
    """
    path = Path(path)
    df = _read_csv(path, TRAIN_COLUMNS)
    _require_unique(df, ["StudyInstanceUID"], path)
    for column in STUDY_TARGETS:
        df[column] = _binary_column(df, column, path)
    inconsistent = df["patient_overall"] != df[list(VERTEBRAE)].max(axis=1)
    if inconsistent.any():
        raise ValueError(
            f"{path}: patient_overall must equal any(C1..C7); {int(inconsistent.sum())} row(s) break it: "
            f"{_describe_rows(df, inconsistent)}"
        )
    columns = list(TRAIN_COLUMNS)
    if "fold" in df.columns:
        df["fold"] = _integer_column(df, "fold", path)
        columns.append("fold")
    return df[columns].reset_index(drop=True)


def read_bounding_boxes(path: str | Path) -> pd.DataFrame:
    """Read `train_bounding_boxes.csv`: StudyInstanceUID, x, y, width, height (float64, pixels), slice_number (int64).

    Several boxes on one slice are kept as separate rows. Raises ValueError on a missing column, a
    missing or non-numeric value, a negative coordinate or a non-positive width/height.
    """
    path = Path(path)
    df = _read_csv(path, BOX_COLUMNS)
    for column in ("x", "y", "width", "height"):
        values = pd.to_numeric(df[column], errors="coerce")
        bad = values.isna() | (values <= 0 if column in ("width", "height") else values < 0)
        if bad.any():
            raise ValueError(f"{path}: column {column!r} has {int(bad.sum())} bad value(s): {_describe_rows(df, bad)}")
        df[column] = values.astype("float64")
    df["slice_number"] = _integer_column(df, "slice_number", path)
    return df[list(BOX_COLUMNS)].reset_index(drop=True)


def read_vertebrae_table(path: str | Path, threshold: float = 0.5) -> pd.DataFrame:
    """Read a per-slice vertebra table in the Kaggle meta format: StudyInstanceUID, Slice, C1..C7.

    `Slice` is the slice number of the DICOM file (`<Slice>.dcm`). C1..C7 may be 0/1 or
    probabilities from a segmentation model; a vertebra counts as visible when its value is
    >= `threshold`. Returns StudyInstanceUID, slice_number (int64), C1..C7 (int64 0/1). Raises
    ValueError on a missing column, a value outside [0, 1] or a (study, slice) listed twice.
    """
    path = Path(path)
    df = _read_csv(path, VERTEBRAE_TABLE_COLUMNS)
    df["Slice"] = _integer_column(df, "Slice", path)
    _require_unique(df, ["StudyInstanceUID", "Slice"], path)
    for column in VERTEBRAE:
        values = pd.to_numeric(df[column], errors="coerce")
        bad = values.isna() | (values < 0) | (values > 1)
        if bad.any():
            raise ValueError(
                f"{path}: column {column!r} must be in [0, 1]; {int(bad.sum())} bad value(s): {_describe_rows(df, bad)}"
            )
        df[column] = (values >= threshold).astype("int64")
    df = df.rename(columns={"Slice": "slice_number"})
    return df[["StudyInstanceUID", "slice_number", *VERTEBRAE]].reset_index(drop=True)


def read_test_table(path: str | Path) -> pd.DataFrame:
    """Read `test.csv`: row_id, StudyInstanceUID, prediction_type (one of patient_overall, C1..C7).

    Raises ValueError on a missing column, an unknown prediction_type, a row_id that is not
    `<StudyInstanceUID>_<prediction_type>` or a row_id listed twice.
    """
    path = Path(path)
    df = _read_csv(path, TEST_COLUMNS)
    df["row_id"] = df["row_id"].astype(str)
    df["prediction_type"] = df["prediction_type"].astype(str)
    unknown = ~df["prediction_type"].isin(STUDY_TARGETS)
    if unknown.any():
        raise ValueError(
            f"{path}: prediction_type must be one of {', '.join(STUDY_TARGETS)}; "
            f"{int(unknown.sum())} row(s) are not: {_describe_rows(df, unknown)}"
        )
    mismatched = df["row_id"] != df["StudyInstanceUID"] + "_" + df["prediction_type"]
    if mismatched.any():
        raise ValueError(
            f"{path}: row_id must be <StudyInstanceUID>_<prediction_type>; "
            f"{int(mismatched.sum())} row(s) are not: {_describe_rows(df, mismatched)}"
        )
    _require_unique(df, ["row_id"], path)
    return df[list(TEST_COLUMNS)].reset_index(drop=True)


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        df = pd.read_csv(path, dtype={"StudyInstanceUID": str, "row_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable CSV file ({error})") from error
    missing = [column for column in required if column not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(required)} "
            f"(found {', '.join(map(str, df.columns))})"
        )
    uids = df["StudyInstanceUID"]
    blank = uids.isna() | (uids.astype(str).str.strip() == "")
    if blank.any():
        raise ValueError(f"{path}: {int(blank.sum())} row(s) have an empty StudyInstanceUID: {_describe_rows(df, blank)}")
    df["StudyInstanceUID"] = uids.astype(str).str.strip()
    return df


def _binary_column(df: pd.DataFrame, column: str, path: Path) -> pd.Series:
    values = pd.to_numeric(df[column], errors="coerce")
    bad = ~values.isin([0, 1])
    if bad.any():
        raise ValueError(f"{path}: column {column!r} must be 0 or 1; {int(bad.sum())} bad value(s): {_describe_rows(df, bad)}")
    return values.astype("int64")


def _integer_column(df: pd.DataFrame, column: str, path: Path) -> pd.Series:
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() | (values != np.round(values))
    if bad.any():
        raise ValueError(f"{path}: column {column!r} must be an integer; {int(bad.sum())} bad value(s): {_describe_rows(df, bad)}")
    return values.astype("int64")


def _require_unique(df: pd.DataFrame, key: list[str], path: Path) -> None:
    duplicated = df.duplicated(key, keep=False)
    if duplicated.any():
        raise ValueError(f"{path}: {' + '.join(key)} must be unique; {int(duplicated.sum())} row(s) repeat: {_describe_rows(df, duplicated)}")


def _describe_rows(df: pd.DataFrame, mask: pd.Series) -> str:
    """'line 3 (uid ...), line 7 (...)' with CSV line numbers (header = line 1)."""
    rows = df[mask.to_numpy()]
    shown = [f"line {index + 2} ({', '.join(f'{k}={v}' for k, v in row.items())})" for index, row in rows.head(_SHOWN).iterrows()]
    more = f" and {len(rows) - _SHOWN} more" if len(rows) > _SHOWN else ""
    return "; ".join(shown) + more
