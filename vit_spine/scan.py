"""`vit-spine scan DATA_DIR --output_file FILE.parquet`: every DICOM header of a dataset into one slice table.

Each folder under `train_images/` and `test_images/` is one study, whatever lies inside it. Its files
are found by content at any depth and assembled into one axial volume by `vit_spine.study.assemble`
(the rule `chunk` and `predict` share). The table has one row per DICOM image frame found (columns:
`COLUMNS`, described in CONTRACTS.md): the slices of the chosen volume carry `slice_index` 0..n-1 in
order along the slice normal; every other frame keeps its row with `slice_index` -1, `left_out` naming
the reason and `problem` saying it in words. Headers are read in parallel processes, one study per
task; pixel data is not read. Each slice of a volume gets vertebra visibility (from the study's
segmentation, else from an external per-slice table, else unknown) and per-vertebra fracture targets
(see `fracture_targets`). Nothing is dropped silently: files that are not DICOM are counted and named
in the report, an unreadable file keeps its row with `problem` set, and every inconsistency of the
dataset (labelled studies without images, folders without labels, duplicate slice numbers, a
segmentation that does not fit its study, boxes of unknown studies, ...) is listed in a report that is
printed and stored in the Parquet metadata under the key `vit_spine`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from vit_spine import options
from vit_spine.labels import read_bounding_boxes, read_test_table, read_train_labels, read_vertebrae_table
from vit_spine.options import aliases, parse_config
from vit_spine.schema import FRACTURE_TARGETS, STUDY_LABEL_COLUMNS, STUDY_TARGETS, VERTEBRAE, VISIBLE_TARGETS

IMAGE_SETS = ("train", "test")
HEADER_COLUMNS = (
    "z",
    "transfer_syntax",
    "rows",
    "columns",
    "pixel_spacing",
    "pixel_spacing_column",
    "slice_thickness",
    "rescale_slope",
    "rescale_intercept",
    "bits_stored",
    "pixel_representation",
)
COLUMNS = (
    "StudyInstanceUID",
    "slice_number",
    "path",
    "frame",
    "image_set",
    "series_uid",
    "slice_index",
    "position",
    *HEADER_COLUMNS,
    "left_out",
    "problem",
    *VISIBLE_TARGETS,
    *FRACTURE_TARGETS,
    "visibility_source",
    "fracture_source",
    *STUDY_LABEL_COLUMNS,
    "fold",
)
METADATA_KEY = b"vit_spine"
# slice_number of a slice with neither a `<int>.dcm` file name nor an InstanceNumber.
NO_SLICE_NUMBER = -1
NOT_IN_VOLUME = -1  # slice_index of a row that is not part of its study's volume
# Slices of a segmentation read at once: bounds memory to about 512 x 512 x 32 voxels.
SEGMENTATION_SLAB = 32
ISSUES_PRINTED = 30


@dataclass
class ScanConfig:
    data_dir: str = field(
        metadata={"help": "dataset root in the RSNA 2022 layout: train_images/, test_images/, train.csv, "
                  "train_bounding_boxes.csv, segmentations/, test.csv (any of them may be missing)"}
    )
    output_file: str | None = field(
        default=None,
        metadata={"help": "Parquet file to write the slice table to (required on the command line)", "aliases": aliases("out")},
    )
    workers: int = field(
        default_factory=lambda: os.cpu_count() or 1,
        metadata={"help": "processes that read DICOM headers in parallel; defaults to the number of CPU cores "
                  "(1 = read in this process)"},
    )
    vertebrae_table: str | None = field(
        default=None,
        metadata={"help": "per-slice vertebra table (Kaggle meta format StudyInstanceUID,Slice,C1..C7) giving "
                  "visibility for studies without a segmentation"},
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        self.workers = options.capped_workers(self.workers)
        options.folder_path(self.data_dir, "DATA_DIR")
        options.file_path(self.output_file, "--output_file")
        options.file_path(self.vertebrae_table, "--vertebrae_table")


def main(argv: Sequence[str] | None = None) -> int:
    (config,) = parse_scan_config(argv)
    if not config.output_file:  # optional for the library (scan() without writing), required on the command line
        raise ValueError("--output_file FILE.parquet is required")
    scan(config.data_dir, config)
    return 0


def parse_scan_config(argv: Sequence[str] | None) -> tuple[ScanConfig]:
    return parse_config(
        ScanConfig,
        argv,
        prog="vit-spine scan",
        description="Read every DICOM header of a dataset into the slice table (Parquet), with visibility "
        "and fracture targets per slice and a report of everything that does not fit.",
        positionals=("data_dir",),
    )


def scan(data_dir: str | Path, config: ScanConfig | None = None) -> pd.DataFrame:
    """Build the slice table of `data_dir` (columns `COLUMNS`), print its report, write `config.output_file` if set.

    The report (dict) is also in `df.attrs["vit_spine"]` as {"data_dir", "report"}, the same JSON that
    goes into the Parquet metadata. `config.data_dir` is ignored here (the argument wins).
    """
    data_dir = Path(data_dir).resolve()
    config = config or ScanConfig(data_dir=str(data_dir))
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such directory")
    issues = Issues()
    inputs = read_inputs(data_dir, config, issues)
    folders = find_study_folders(data_dir, issues)
    if not folders:
        raise ValueError(f"{data_dir}: no study folder under train_images/ or test_images/")
    scanned = scan_studies(folders, config.workers, config.progress)
    if not any(len(s.rows) for s in scanned):
        raise ValueError(f"{data_dir}: no DICOM file in the study folders under train_images/ or test_images/")
    check_study_lists(data_dir, scanned, inputs, issues)

    studies = []
    for study in tqdm(scanned, desc="labels", unit="study", disable=not config.progress):
        report_volume(study, issues)
        if len(study.rows):
            studies.append(label_study(data_dir, study, inputs, issues))
    df = pd.concat([s.rows for s in studies], ignore_index=True)[list(COLUMNS)]
    report = build_report(df, studies, issues)
    df.attrs["vit_spine"] = {"data_dir": str(data_dir), "report": report}
    print(format_report(report, data_dir))
    if config.output_file:
        write_scan(df, config.output_file)
        print(f"wrote {len(df)} slices to {config.output_file}")
    return df


# ---------------------------------------------------------------- inputs


@dataclass
class Issues:
    """Everything about the dataset that does not fit, as (study uid or "", kind, detail)."""

    items: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, study: str, kind: str, detail: str) -> None:
        self.items.append((study, kind, detail))

    def of_study(self, study: str) -> list[str]:
        return [f"{kind}: {detail}" for uid, kind, detail in self.items if uid == study]


@dataclass
class Inputs:
    labels: pd.DataFrame | None
    boxes: pd.DataFrame
    test_table: pd.DataFrame | None
    vertebrae: dict[str, pd.DataFrame]

    def __post_init__(self) -> None:
        self.boxes_by_study = {uid: g for uid, g in self.boxes.groupby("StudyInstanceUID")}
        self.labels_by_study: dict[str, tuple[np.ndarray, float]] = {}
        if self.labels is not None:
            values = self.labels[list(STUDY_TARGETS)].to_numpy(dtype=float)
            folds = self.labels["fold"].to_numpy(dtype=float) if "fold" in self.labels else np.full(len(values), np.nan)
            self.labels_by_study = dict(zip(self.labels["StudyInstanceUID"], zip(values, folds)))


def read_inputs(data_dir: Path, config: ScanConfig, issues: Issues) -> Inputs:
    labels = boxes = test_table = None
    if (data_dir / "train.csv").is_file():
        labels = read_train_labels(data_dir / "train.csv")
    elif (data_dir / "train_images").is_dir():
        issues.add("", "no_train_csv", f"{data_dir / 'train.csv'} is missing: train studies are unlabeled")
    if (data_dir / "train_bounding_boxes.csv").is_file():
        boxes = read_bounding_boxes(data_dir / "train_bounding_boxes.csv")
    elif labels is not None:
        issues.add("", "no_boxes_csv", "train_bounding_boxes.csv is missing: positive studies use label x visibility")
    if (data_dir / "test.csv").is_file():
        test_table = read_test_table(data_dir / "test.csv")
    vertebrae: dict[str, pd.DataFrame] = {}
    if config.vertebrae_table:
        table = read_vertebrae_table(config.vertebrae_table)
        vertebrae = {uid: g.set_index("slice_number")[list(VERTEBRAE)] for uid, g in table.groupby("StudyInstanceUID")}
    if boxes is None:
        boxes = pd.DataFrame({"StudyInstanceUID": pd.Series(dtype=str), "slice_number": pd.Series(dtype="int64")})
    return Inputs(labels=labels, boxes=boxes, test_table=test_table, vertebrae=vertebrae)


@dataclass
class StudyFolder:
    image_set: str
    uid: str  # the folder's name (the RSNA convention)
    path: str


def find_study_folders(data_dir: Path, issues: Issues) -> list[StudyFolder]:
    """Each folder directly under `<set>_images/` is one study (named by the folder), whatever lies inside it.
    A file directly under `<set>_images/` belongs to no study: reported, not read."""
    folders = []
    for image_set in IMAGE_SETS:
        root = data_dir / f"{image_set}_images"
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if entry.is_dir():
                folders.append(StudyFolder(image_set, entry.name, str(entry.resolve())))
            else:
                issues.add("", "outside_study_folder", f"{entry} is not inside a study folder: not read")
    return folders


@dataclass
class ScannedStudy:
    """One study folder read and assembled: its rows (one per DICOM image frame) and what assembly said."""

    folder: StudyFolder
    rows: pd.DataFrame
    volume: dict[str, Any]  # chosen / other series, notes, left-out counts, error (for the report)
    not_dicom: list[str]  # files that are not DICOM


def scan_studies(folders: list[StudyFolder], workers: int, progress: bool = True) -> list[ScannedStudy]:
    """`scan_study_folder` of every folder, in `workers` processes (one study per task), in order."""
    bar = {"total": len(folders), "desc": "studies", "unit": "study", "disable": not progress}
    if workers <= 1 or len(folders) < 2:
        return [scan_study_folder(f) for f in tqdm(folders, **bar)]
    with ProcessPoolExecutor(max_workers=min(workers, len(folders))) as pool:
        return list(tqdm(pool.map(scan_study_folder, folders), **bar))


def scan_study_folder(folder: StudyFolder) -> ScannedStudy:
    """Read every file's header below one study folder and assemble its volume (`vit_spine.study`)."""
    from vit_spine import study

    reads = [study.read_file(path) for path in study.find_files(folder.path)]
    assembly = study.assemble(reads)
    rows = study_rows(folder, reads, assembly)
    volume = {
        "slices": len(assembly.slices),
        "series": assembly.chosen.describe() if assembly.chosen else None,
        "other_series": [s.describe() for s in assembly.others],
        "notes": assembly.notes,
        "left_out": dict(Counter(item.kind for item in assembly.left_out if item.kind != "not_dicom")),
        "error": assembly.error,
    }
    not_dicom = [item.path for item in assembly.left_out if item.kind == "not_dicom"]
    return ScannedStudy(folder, rows, volume, not_dicom)


def study_rows(folder: StudyFolder, reads, assembly) -> pd.DataFrame:
    """One row per DICOM image frame of the study: header fields, slice_index in the volume (or -1), problem."""
    from vit_spine import study

    index = {(h.path, h.frame): (i, p) for i, (h, p) in enumerate(zip(assembly.slices, assembly.positions))}
    left_out = {(item.path, item.frame): item for item in assembly.left_out}
    rows = []
    for read in reads:
        if read.not_dicom:
            continue
        base = {"StudyInstanceUID": folder.uid, "image_set": folder.image_set, "path": read.path}
        if read.error:  # a DICOM file whose header cannot be read: one row, the reason as its problem
            rows.append({**base, **_empty_header(), "slice_number": _file_number(read.path), "frame": 0,
                         "left_out": "unreadable", "problem": read.error})
            continue
        for header in read.headers:
            row = {**base, **header_fields(header), "slice_number": study.slice_number(header), "frame": header.frame}
            key = (header.path, header.frame)
            if key in index:
                row["slice_index"], row["position"] = index[key][0], _number(index[key][1])
                row["left_out"], row["problem"] = "", header.pixel_problem
            else:
                item = left_out.get((header.path, header.frame if header.number_of_frames > 1 else None))
                row["left_out"] = item.kind if item else "unknown"
                row["problem"] = "; ".join(p for p in (item.reason if item else "left out", header.pixel_problem) if p)
            rows.append(row)
    frame = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    return frame.astype({"slice_number": "int64", "frame": "int64", "slice_index": "int64"})


# What `study_rows` gives: the header part of COLUMNS, plus the StudyInstanceUID the file itself carries.
ROW_COLUMNS = ("StudyInstanceUID", "slice_number", "path", "frame", "image_set", "series_uid", "slice_index", "position",
               *HEADER_COLUMNS, "left_out", "problem", "header_study_uid")


def header_fields(header) -> dict[str, Any]:
    row: dict[str, Any] = {column: _number(getattr(header, column)) for column in HEADER_COLUMNS if column != "transfer_syntax"}
    row["transfer_syntax"] = header.transfer_syntax or None
    row["series_uid"] = header.series_uid
    row["header_study_uid"] = header.study_uid
    row["slice_index"], row["position"] = NOT_IN_VOLUME, np.nan
    return row


def _empty_header() -> dict[str, Any]:
    row: dict[str, Any] = {column: np.nan for column in HEADER_COLUMNS}
    row.update(transfer_syntax=None, series_uid=None, header_study_uid=None, slice_index=NOT_IN_VOLUME, position=np.nan)
    return row


def _file_number(path: str) -> int:
    stem = Path(path).stem
    return int(stem) if stem.isdigit() else NO_SLICE_NUMBER


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def check_study_lists(data_dir: Path, studies: list[ScannedStudy], inputs: Inputs, issues: Issues) -> None:
    """Report labelled studies without images, image folders without labels, unused segmentations and
    box rows of studies that do not exist."""
    folders = {s: {x.folder.uid for x in studies if x.folder.image_set == s and x.volume["slices"]} for s in IMAGE_SETS}
    for path in sorted((data_dir / "segmentations").glob("*.nii*")):
        uid = path.name.removesuffix(".gz").removesuffix(".nii")
        if uid not in folders["train"] | folders["test"]:
            issues.add(uid, "segmentation_without_images", f"{path.name} matches no study folder with images: unused")
    if inputs.labels is not None:
        labeled = set(inputs.labels["StudyInstanceUID"])
        for uid in sorted(labeled - folders["train"]):
            issues.add(uid, "missing_images", "listed in train.csv but has no usable CT volume under train_images/")
        for uid in sorted(folders["train"] - labeled):
            issues.add(uid, "unlabeled_folder", "train_images/ folder has no row in train.csv")
    for uid in sorted(set(inputs.boxes_by_study) - folders["train"]):
        rows = len(inputs.boxes_by_study[uid])
        issues.add(uid, "boxes_without_images", f"{rows} row(s) of train_bounding_boxes.csv name a study with no images: unused")
    if inputs.test_table is not None:
        listed = set(inputs.test_table["StudyInstanceUID"])
        for uid in sorted(listed - folders["test"]):
            issues.add(uid, "missing_images", "listed in test.csv but has no usable CT volume under test_images/")
        for uid in sorted(folders["test"] - listed):
            issues.add(uid, "unlisted_test_folder", "test_images/ folder is not listed in test.csv")
    if inputs.vertebrae:
        unknown = set(inputs.vertebrae) - folders["train"] - folders["test"]
        if unknown:
            issues.add("", "table_studies_without_images", f"{len(unknown)} study(ies) of the vertebrae table have no images")


def report_volume(study: ScannedStudy, issues: Issues) -> None:
    """Issues for what the study assembly left out, noted or could not do."""
    uid, volume = study.folder.uid, study.volume
    if study.not_dicom:
        names = ", ".join(Path(p).name for p in study.not_dicom[:3])
        issues.add(uid, "not_dicom", f"{len(study.not_dicom)} file(s) are not DICOM and were not read (e.g. {names})")
    if volume["error"]:
        issues.add(uid, "no_volume", volume["error"])
        return
    for kind, count in volume["left_out"].items():
        first = study.rows.loc[study.rows["left_out"] == kind, "problem"]
        issues.add(uid, f"left_out_{kind}", f"{count} slice(s): {first.iloc[0] if len(first) else kind}")
    for note in volume["notes"]:
        issues.add(uid, "volume_note", note)


def mark_duplicate_slice_numbers(uid: str, rows: pd.DataFrame, issues: Issues) -> None:
    """Flag slices of one volume that share a slice number (boxes and segmentations address slices by it)."""
    numbered = (rows["slice_index"] != NOT_IN_VOLUME) & (rows["slice_number"] != NO_SLICE_NUMBER)
    duplicated = pd.Series(False, index=rows.index)
    duplicated[numbered] = rows.loc[numbered].duplicated("slice_number", keep=False)
    for number, group in rows[duplicated].groupby("slice_number"):
        issues.add(uid, "duplicate_slice_number", f"slice_number {number} is used by {len(group)} slices of the volume")
    rows.loc[duplicated, "problem"] = [
        _join(p, f"duplicate slice_number {n} in its study") for p, n in zip(rows.loc[duplicated, "problem"], rows.loc[duplicated, "slice_number"])
    ]


def _join(first: str, second: str) -> str:
    return f"{first}; {second}" if first else second


# ---------------------------------------------------------------- visibility and targets


@dataclass
class StudyResult:
    rows: pd.DataFrame
    summary: dict[str, Any]


def label_study(data_dir: Path, study: ScannedStudy, inputs: Inputs, issues: Issues) -> StudyResult:
    """Visibility, fracture targets and study labels for the rows of one study.

    Only the slices of the volume (`slice_index` >= 0) get visibility and fracture targets; the rows
    left out keep NaN and "unknown", and the study's labels.
    """
    image_set, uid = study.folder.image_set, study.folder.uid
    rows = study.rows.sort_values(["slice_number", "path", "frame"], kind="stable", ignore_index=True)
    mark_duplicate_slice_numbers(uid, rows, issues)
    check_study_headers(uid, rows, issues)
    in_volume = (rows["slice_index"] != NOT_IN_VOLUME).to_numpy()
    volume = rows[in_volume].reset_index(drop=True)
    visible, sources = study_visibility(data_dir, uid, volume, inputs, issues)
    study_labels, fold = inputs.labels_by_study.get(uid, (None, np.nan)) if image_set == "train" else (None, np.nan)
    boxes = inputs.boxes_by_study.get(uid, inputs.boxes.iloc[:0]) if image_set == "train" else inputs.boxes.iloc[:0]
    box_slices = None
    if len(boxes):
        box_slices = volume["slice_number"].isin(boxes["slice_number"]).to_numpy()
        check_boxes(uid, volume, boxes, visible, box_slices, study_labels, issues)
    fracture, fracture_source = fracture_targets(visible, study_labels, box_slices)

    all_visible = np.full((len(rows), len(VERTEBRAE)), np.nan)
    all_fracture = np.full((len(rows), len(VERTEBRAE)), np.nan)
    all_visible[in_volume], all_fracture[in_volume] = visible, fracture
    rows[list(VISIBLE_TARGETS)] = all_visible
    rows[list(FRACTURE_TARGETS)] = all_fracture
    rows["visibility_source"] = "unknown"
    rows.loc[in_volume, "visibility_source"] = sources
    rows["fracture_source"] = np.where(in_volume, fracture_source, "unknown")
    rows[list(STUDY_LABEL_COLUMNS)] = np.tile(np.full(len(STUDY_LABEL_COLUMNS), np.nan) if study_labels is None else study_labels, (len(rows), 1))
    rows["fold"] = fold
    summary = {
        "StudyInstanceUID": uid,
        "image_set": image_set,
        "slices": int(in_volume.sum()),
        "left_out": int((~in_volume).sum()),
        "problems": int(((rows["problem"] != "") & in_volume).sum()),
        "labeled": study_labels is not None,
        "box_slices": int(box_slices.sum()) if box_slices is not None else 0,
        "visibility_source": dict(Counter(sources)),
        "fracture_source": fracture_source,
        "volume": study.volume,
        "issues": issues.of_study(uid) if uid else [],
    }
    return StudyResult(rows=rows, summary=summary)


def fracture_targets(
    visible: np.ndarray, study_labels: np.ndarray | None, box_slices: np.ndarray | None
) -> tuple[np.ndarray, str]:
    """Per-slice fracture targets (n, 7) of one study and the rule that made them.

    `visible` (n, 7): 1/0/NaN per slice and vertebra; `study_labels`: [patient_overall, C1..C7] from
    train.csv, None for an unlabeled study; `box_slices` (n,) bool: which slices carry a bounding box,
    None when the study has no boxes.

    - unlabeled study (test images, or no row in train.csv): all NaN, "unknown";
    - negative study (patient_overall 0): all 0, "negative" (even if it has boxes, which is reported);
    - study with boxes, "boxes": on a box slice, fracture_Cv = 1 for every fractured vertebra of the
      study (label Cv = 1) that is visible on that slice, and for every fractured vertebra when that
      slice's visibility is unknown; 0 for the other vertebrae. A slice without a box is 0 for every
      vertebra (the boxes mark every fractured slice);
    - other positive study, "label_x_visibility": fracture_Cv = label Cv x visible_Cv, i.e. 0 where the
      vertebra is not fractured, and NaN where it is fractured but its visibility is unknown.
    """
    n = len(visible)
    if study_labels is None:
        return np.full((n, len(VERTEBRAE)), np.nan), "unknown"
    if study_labels[0] == 0:
        return np.zeros((n, len(VERTEBRAE))), "negative"
    fractured = np.asarray(study_labels[1:], dtype=float) == 1
    if box_slices is not None:
        on_box = np.where(np.isnan(visible), 1.0, visible) * fractured
        return np.where(np.asarray(box_slices, dtype=bool)[:, None], on_box, 0.0), "boxes"
    return np.where(fractured, visible, 0.0), "label_x_visibility"


def study_visibility(
    data_dir: Path, uid: str, rows: pd.DataFrame, inputs: Inputs, issues: Issues
) -> tuple[np.ndarray, list[str]]:
    """(n, 7) visibility and a per-row source: the segmentation if usable, else the table, else unknown.

    An unusable segmentation (wrong slice count, unknown z direction, unreadable) is reported and
    then counts as absent, so the external table still applies when it covers the study.
    """
    n = len(rows)
    segmentation = _segmentation_path(data_dir, uid)
    if segmentation is not None:
        try:
            return segmentation_visibility(segmentation, rows), ["segmentation"] * n
        except SegmentationMismatch as error:
            issues.add(uid, error.kind, str(error))
        except Exception as error:  # noqa: BLE001 - a broken .nii is one study's problem, not the scan's
            issues.add(uid, "segmentation_unreadable", f"{segmentation}: {type(error).__name__}: {error}")
    table = inputs.vertebrae.get(uid)
    if table is not None:
        visible = table.reindex(rows["slice_number"].to_numpy()).to_numpy(dtype=float)
        known = ~np.isnan(visible).any(axis=1)
        if not known.all():
            issues.add(uid, "partial_table", f"the vertebrae table covers {int(known.sum())} of {n} slices")
        return visible, ["table" if k else "unknown" for k in known]
    return np.full((n, len(VERTEBRAE)), np.nan), ["unknown"] * n


class SegmentationMismatch(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _segmentation_path(data_dir: Path, uid: str) -> Path | None:
    for name in (f"{uid}.nii", f"{uid}.nii.gz"):
        path = data_dir / "segmentations" / name
        if uid and path.is_file():
            return path
    return None


def segmentation_visibility(path: Path, rows: pd.DataFrame) -> np.ndarray:
    """Visibility (n, 7) of the study's rows (sorted by slice_number) from its segmentation.

    The segmentation's third axis runs along the slices sorted by slice_number, reversed when z
    decreases with slice_number (the rule public RSNA 2022 solutions used on the real data: the mask is
    seg[:, ::-1, ::-1].transpose(2, 1, 0) then, else seg[:, ::-1].transpose(2, 1, 0); the in-plane flips
    do not change which labels a slice holds).
    Rows without a usable slice number stay NaN. Raises SegmentationMismatch when the slice counts
    differ or the z direction cannot be told.
    """
    numbers = rows["slice_number"].to_numpy()
    distinct = np.unique(numbers[numbers != NO_SLICE_NUMBER])
    presence = segmentation_presence(path)
    if len(presence) != len(distinct):
        raise SegmentationMismatch(
            "segmentation_mismatch",
            f"{path.name} has {len(presence)} slices but the study's volume has {len(distinct)} numbered slices: "
            "visibility left unknown",
        )
    if len(distinct) > 1:
        if z_decreases_with_slice_number(rows):
            presence = presence[::-1]
    visible = np.full((len(rows), len(VERTEBRAE)), np.nan)
    valid = numbers != NO_SLICE_NUMBER
    visible[valid] = presence[np.searchsorted(distinct, numbers[valid])]
    return visible


def z_decreases_with_slice_number(rows: pd.DataFrame) -> bool:
    """Whether the position along the slice normal (z for an axial stack) falls from the lowest to the
    highest slice number (rows with a position only)."""
    known = rows[np.isfinite(rows["position"].to_numpy(dtype=float)) & (rows["slice_number"] != NO_SLICE_NUMBER)]
    known = known.sort_values("slice_number")
    if len(known) < 2 or known["position"].iloc[0] == known["position"].iloc[-1]:
        raise SegmentationMismatch("z_direction_unknown", "cannot tell whether z rises or falls with slice_number")
    return bool(known["position"].iloc[-1] < known["position"].iloc[0])


def segmentation_presence(path: Path) -> np.ndarray:
    """(slices, 7) bool: whether label v (1..7 = C1..C7) occurs on each slice (third axis) of a NIfTI label map.

    Reads the volume a slab at a time through nibabel's array proxy, so memory stays at one slab.
    """
    import nibabel

    image = nibabel.load(path)
    if len(image.shape) != 3:
        raise SegmentationMismatch("segmentation_mismatch", f"{path.name} has shape {image.shape}, expected 3-D")
    depth = image.shape[2]
    presence = np.zeros((depth, len(VERTEBRAE)), dtype=bool)
    for start in range(0, depth, SEGMENTATION_SLAB):
        slab = np.asarray(image.dataobj[:, :, start : start + SEGMENTATION_SLAB])
        if slab.dtype.kind == "f":
            slab = np.rint(slab)
        for index in range(len(VERTEBRAE)):
            presence[start : start + slab.shape[2], index] = (slab == index + 1).any(axis=(0, 1))
    return presence


def check_study_headers(uid: str, rows: pd.DataFrame, issues: Issues) -> None:
    """Report files whose StudyInstanceUID is not their folder's, and volumes whose position along the
    normal is not monotonic in slice_number (rows sorted by slice_number)."""
    header_uids = rows["header_study_uid"].dropna()
    header_uids = header_uids[header_uids != ""]
    others = sorted(set(header_uids) - {uid})
    if uid and others:
        issues.add(uid, "uid_mismatch", f"{int((header_uids != uid).sum())} file(s) carry StudyInstanceUID {others[0]}")
    numbered = (rows["slice_number"] != NO_SLICE_NUMBER) & (rows["slice_index"] != NOT_IN_VOLUME)
    position = rows.loc[numbered, "position"].dropna().to_numpy()
    steps = np.diff(position)
    if len(steps) and not ((steps > 0).all() or (steps < 0).all()):
        issues.add(uid, "z_not_monotonic", "the slice position does not rise or fall steadily with slice_number (repeated or shuffled)")


def check_boxes(
    uid: str,
    rows: pd.DataFrame,
    boxes: pd.DataFrame,
    visible: np.ndarray,
    box_slices: np.ndarray,
    study_labels: np.ndarray | None,
    issues: Issues,
) -> None:
    if study_labels is None:
        issues.add(uid, "boxes_on_unlabeled_study", f"{len(boxes)} box(es) but no row in train.csv: ignored")
        return
    if study_labels[0] == 0:
        issues.add(uid, "boxes_on_negative_study", f"{len(boxes)} box(es) but patient_overall is 0: targets are 0")
        return
    missing = sorted(set(boxes["slice_number"]) - set(rows["slice_number"]))
    if missing:
        issues.add(uid, "box_slices_missing", f"{len(missing)} boxed slice number(s) have no file, e.g. {missing[:5]}")
    fractured = np.asarray(study_labels[1:]) == 1
    shown = visible[box_slices][:, fractured]
    empty = (~np.isnan(shown).any(axis=1)) & (np.nan_to_num(shown).sum(axis=1) == 0)
    if empty.any():
        issues.add(uid, "box_without_fractured_vertebra", f"{int(empty.sum())} box slice(s) show none of the fractured vertebrae")


# ---------------------------------------------------------------- report and output


def build_report(df: pd.DataFrame, studies: list[StudyResult], issues: Issues) -> dict[str, Any]:
    in_volume = df["slice_index"] != NOT_IN_VOLUME
    problems = df[in_volume & (df["problem"] != "")]
    left_out = df[~in_volume]
    return {
        "studies": {s: int(df.loc[df["image_set"] == s, "StudyInstanceUID"].nunique()) for s in IMAGE_SETS},
        "slices": {s: int(((df["image_set"] == s) & in_volume).sum()) for s in IMAGE_SETS},
        "problem_slices": len(problems),
        "left_out_slices": len(left_out),
        "left_out_reasons": {k: int(v) for k, v in left_out["left_out"].value_counts().items()},
        "visibility_source": {k: int(v) for k, v in df.loc[in_volume, "visibility_source"].value_counts().items()},
        "fracture_source": {k: int(v) for k, v in df.loc[in_volume, "fracture_source"].value_counts().items()},
        "problems": [{"path": p, "frame": int(f), "reason": r} for p, f, r in zip(problems["path"], problems["frame"], problems["problem"])],
        "left_out": [{"path": p, "frame": int(f), "reason": r} for p, f, r in zip(left_out["path"], left_out["frame"], left_out["problem"])],
        "issues": [{"study": uid, "kind": kind, "detail": detail} for uid, kind, detail in issues.items],
        "issue_counts": dict(Counter(kind for _, kind, _ in issues.items)),
        "per_study": [s.summary for s in studies],
    }


def format_report(report: dict[str, Any], data_dir: Path) -> str:
    """A compact table per image set, then the problems and issues (the first few of each)."""
    per_study = pd.DataFrame(report["per_study"])
    lines = [f"vit-spine scan {data_dir}"]
    table = []
    for image_set in IMAGE_SETS:
        studies = per_study[per_study["image_set"] == image_set] if len(per_study) else per_study
        if studies.empty:
            continue
        row: dict[str, Any] = {
            "set": image_set,
            "studies": len(studies),
            "slices": int(studies["slices"].sum()),
            "left_out": int(studies["left_out"].sum()),
            "problems": int(studies["problems"].sum()),
            "labeled": int(studies["labeled"].sum()),
        }
        visibility = Counter()
        for counts in studies["visibility_source"]:
            visibility.update(counts)
        for source in ("segmentation", "table", "unknown"):
            row[f"vis:{source}"] = visibility.get(source, 0)
        fracture = studies["fracture_source"].value_counts()
        for source in ("negative", "boxes", "label_x_visibility", "unknown"):
            row[f"studies:{source}"] = int(fracture.get(source, 0))
        table.append(row)
    lines.append(pd.DataFrame(table).to_string(index=False))
    lines.append("(slices: in the studies' volumes; left_out: other frames found, each with its reason; "
                 "vis:* count slices; studies:* count studies by fracture-target rule)")
    reasons = ", ".join(f"{kind} {count}" for kind, count in report["left_out_reasons"].items())
    lines.append(f"left out: {report['left_out_slices']} slice(s)" + (f" ({reasons})" if reasons else ""))
    for title, items in (
        ("problem slices", [f"{p['path']}: {p['reason']}" for p in report["problems"]]),
        ("issues", [f"{i['kind']:<30} {i['study'] or '-'}: {i['detail']}" for i in report["issues"]]),
    ):
        lines.append(f"{title}: {len(items)}")
        lines += [f"  {item}" for item in items[:ISSUES_PRINTED]]
        if len(items) > ISSUES_PRINTED:
            lines.append(f"  ... and {len(items) - ISSUES_PRINTED} more (all in the Parquet metadata key 'vit_spine')")
    return "\n".join(lines)


def write_scan(df: pd.DataFrame, out: str | Path) -> None:
    """Write the table to Parquet atomically, with `df.attrs["vit_spine"]` as JSON under metadata key `vit_spine`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df[list(COLUMNS)], preserve_index=False)
    metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    metadata[METADATA_KEY] = json.dumps(df.attrs.get("vit_spine", {})).encode()
    partial = out.with_name(out.name + ".partial")
    try:
        pq.write_table(table.replace_schema_metadata(metadata), partial)
        partial.replace(out)
    except BaseException as error:
        partial.unlink(missing_ok=True)  # a failed or interrupted write leaves nothing behind
        if isinstance(error, OSError) and not error.filename:
            error.filename = str(out)  # pyarrow's errors do not say which file (a full disk must name it)
        raise


def read_scan_metadata(path: str | Path) -> dict[str, Any]:
    """The {"data_dir", "report"} JSON that `vit-spine scan` stored in a slice table."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path}: no '{METADATA_KEY.decode()}' metadata; was it written by vit-spine scan?")
    return json.loads(metadata[METADATA_KEY])
