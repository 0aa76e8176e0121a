"""`vit-spine scan`: the target rules on hand-made arrays, then end to end on the synthetic dataset."""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest

from vit_spine import VERTEBRAE, cli
from vit_spine.scan import (
    COLUMNS,
    ScanConfig,
    SegmentationMismatch,
    fracture_targets,
    main,
    read_scan_metadata,
    scan,
    segmentation_presence,
    segmentation_visibility,
)
from vit_spine.schema import FRACTURE_TARGETS, VISIBLE_TARGETS

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
    """The public RSNA 2022 rule, written out literally: (slice, row, col) mask with slices sorted by slice_number."""
    mask = seg[:, ::-1, ::-1].transpose(2, 1, 0) if z_decreases else seg[:, ::-1].transpose(2, 1, 0)
    return np.array([[float((m == v).any()) for v in range(1, 8)] for m in mask])


def study_rows(slice_numbers: list[int], z: list[float]) -> pd.DataFrame:
    """Rows of a volume as segmentation matching sees them (position along the normal = z for axial slices)."""
    return pd.DataFrame({"slice_number": slice_numbers, "position": z})


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
    with pytest.raises(SegmentationMismatch, match="has 3 slices but the study's volume has 4 numbered slices") as info:
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


# ---------------------------------------------------------------- end to end on the synthetic dataset

MISSING_UID = "1.2.826.0.1.3680043.999001"  # in train.csv, no images
UNLABELED_UID = "1.2.826.0.1.3680043.999002"  # images, no row in train.csv
VISIBLE_GT = [f"{c}_gt" for c in VISIBLE_TARGETS]
FRACTURE_GT = [f"{c}_gt" for c in FRACTURE_TARGETS]


@dataclass
class Damaged:
    """A copy of the synthetic dataset with known defects planted in it."""

    root: Path
    truth: pd.DataFrame  # ground_truth.csv, plus column z_decreasing
    labels: pd.DataFrame  # train.csv as the generator wrote it
    boxed: set[str]
    segmented: set[str]  # studies whose segmentation is intact
    wrong_segmentation: str  # study whose segmentation lost a slice
    extra_files_study: str  # study (no segmentation) that got a corrupt and a truncated file
    corrupt: Path
    truncated: Path
    duplicate_study: str
    duplicates: tuple[Path, Path]
    stray_study: str  # a segmented study that also holds a notes.txt and a junk 9999.dcm
    vertebrae_table: Path


@pytest.fixture(scope="module")
def damaged(synth_data: Path, tmp_path_factory) -> Damaged:
    root = tmp_path_factory.mktemp("scan") / "data"
    shutil.copytree(synth_data, root)
    truth = pd.read_csv(root / "ground_truth.csv", dtype={"StudyInstanceUID": str})
    ends = truth.sort_values("slice_number").groupby("StudyInstanceUID")["z"].agg(["first", "last"])
    truth["z_decreasing"] = truth["StudyInstanceUID"].map(ends["last"] < ends["first"])
    labels = pd.read_csv(root / "train.csv", dtype={"StudyInstanceUID": str})
    boxed = set(pd.read_csv(root / "train_bounding_boxes.csv", dtype={"StudyInstanceUID": str})["StudyInstanceUID"])
    segmented = sorted(p.name.removesuffix(".nii") for p in (root / "segmentations").glob("*.nii"))
    plain = sorted(set(labels["StudyInstanceUID"]) - set(segmented))
    assert len(segmented) >= 3 and plain, "synth_data needs 3+ segmented and 1+ unsegmented train studies"

    # the segmentation of one study loses its last slice
    wrong = segmented[-1]
    image = nibabel.load(root / "segmentations" / f"{wrong}.nii", mmap=False)
    shorter = np.array(image.dataobj[:, :, :-1])
    nibabel.save(nibabel.Nifti1Image(shorter, image.affine), root / "segmentations" / f"{wrong}.nii")
    # a file of random bytes and a copy cut short inside its pixel data
    folder = root / "train_images" / plain[0]
    corrupt, truncated = folder / "9001.dcm", folder / "9002.dcm"
    corrupt.write_bytes(np.random.default_rng(0).bytes(3000))
    whole = (folder / "5.dcm").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    # the same slice number twice ("3" and "003") in a segmented study
    duplicate_study = segmented[0]
    original = root / "train_images" / duplicate_study / "3.dcm"
    duplicate = original.with_name("003.dcm")
    shutil.copy(original, duplicate)
    # files that are not DICOM in a segmented study: they must not cost it its segmentation
    stray_study = segmented[1]
    (root / "train_images" / stray_study / "notes.txt").write_text("exported with notes\n")
    (root / "train_images" / stray_study / "9999.dcm").write_bytes(np.random.default_rng(1).bytes(2000))
    # a labelled study without images, images without labels, a segmentation without images
    shutil.copy(root / "segmentations" / f"{segmented[0]}.nii", root / "segmentations" / f"{MISSING_UID}.nii")
    with open(root / "train.csv", "a") as f:
        f.write(f"{MISSING_UID},0,0,0,0,0,0,0,0,0\n")
    test_uid = truth.loc[truth["split"] == "test", "StudyInstanceUID"].iloc[0]
    shutil.copytree(root / "test_images" / test_uid, root / "train_images" / UNLABELED_UID)
    # the per-slice vertebra table (Kaggle format) of every study, from the generator's truth
    table = truth[["StudyInstanceUID", "slice_number", *VISIBLE_TARGETS]]
    table = table.rename(columns={"slice_number": "Slice", **{f"visible_{v}": v for v in VERTEBRAE}})
    table.to_csv(root / "vertebrae.csv", index=False)
    return Damaged(
        root=root, truth=truth, labels=labels, boxed=boxed, segmented=set(segmented) - {wrong},
        wrong_segmentation=wrong, extra_files_study=plain[0], corrupt=corrupt, truncated=truncated,
        duplicate_study=duplicate_study, duplicates=(original, duplicate), stray_study=stray_study,
        vertebrae_table=root / "vertebrae.csv",
    )


@dataclass
class Scanned:
    df: pd.DataFrame
    metadata: dict
    printed: str


@pytest.fixture(scope="module")
def with_table(damaged: Damaged, tmp_path_factory) -> Scanned:
    """The command line, in process, with two worker processes and the vertebra table."""
    out = tmp_path_factory.mktemp("out") / "slices.parquet"
    argv = [str(damaged.root), "--out", str(out), "--workers", "2", "--vertebrae-table", str(damaged.vertebrae_table)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return Scanned(pd.read_parquet(out), read_scan_metadata(out), printed.getvalue())


@pytest.fixture(scope="module")
def without_table(damaged: Damaged) -> Scanned:
    df = scan(damaged.root, ScanConfig(data_dir=str(damaged.root), workers=1, progress=False))
    return Scanned(df, df.attrs["vit_spine"], "")


def with_truth(scanned: Scanned, damaged: Damaged) -> pd.DataFrame:
    """Scanned rows of the studies' volumes, with the generator's truth alongside (columns suffixed _gt)."""
    volume = scanned.df[scanned.df["slice_index"] >= 0]
    return volume.merge(damaged.truth, on=["StudyInstanceUID", "slice_number"], suffixes=("", "_gt"))


def issues_of(scanned: Scanned, kind: str) -> set[str]:
    return {i["study"] for i in scanned.metadata["report"]["issues"] if i["kind"] == kind}


def test_cli_writes_one_row_per_dicom_file_with_the_contract_columns(with_table, damaged):
    df = with_table.df
    assert list(df.columns) == list(COLUMNS)
    # every DICOM file has a row; files that are not DICOM (random bytes, notes) have none
    files = sorted(str(p.resolve()) for p in damaged.root.glob("*_images/*/*.dcm"))
    not_dicom = {str(damaged.corrupt.resolve()), str((damaged.root / "train_images" / damaged.stray_study / "9999.dcm").resolve())}
    assert sorted(df["path"]) == sorted(set(files) - not_dicom)
    assert df["slice_number"].dtype == "int64" and df["z"].dtype == "float64" and df["slice_index"].dtype == "int64"
    assert (df["frame"] == 0).all()  # the synthetic studies are single-frame
    assert all(df[c].dtype == "float64" for c in (*VISIBLE_TARGETS, *FRACTURE_TARGETS, "label_overall", "fold"))
    assert set(df["image_set"]) == {"train", "test"}
    assert with_table.metadata["data_dir"] == str(damaged.root.resolve())
    report = with_table.metadata["report"]
    assert sum(report["slices"].values()) + report["left_out_slices"] == len(df)
    assert report["studies"]["test"] == damaged.truth.query("split == 'test'")["StudyInstanceUID"].nunique()
    # the volume of each study is its slices in order along z, numbered 0..n-1
    for uid, study in df[df["slice_index"] >= 0].groupby("StudyInstanceUID"):
        ordered = study.sort_values("slice_index")
        assert ordered["slice_index"].tolist() == list(range(len(study))), uid
        assert (np.diff(ordered["position"]) > 0).all() and (ordered["position"] == ordered["z"]).all(), uid


def test_visibility_equals_ground_truth_from_segmentations_and_table(with_table, damaged):
    rows = with_truth(with_table, damaged)
    assert len(rows) == len(damaged.truth)  # every generated slice is in its study's volume, once
    assert damaged.stray_study in set(rows["StudyInstanceUID"]) and damaged.stray_study in damaged.segmented
    np.testing.assert_array_equal(rows[list(VISIBLE_TARGETS)].to_numpy(), rows[VISIBLE_GT].to_numpy())
    from_segmentation = rows["StudyInstanceUID"].isin(damaged.segmented)
    assert (rows.loc[from_segmentation, "visibility_source"] == "segmentation").all()
    assert (rows.loc[~from_segmentation, "visibility_source"] == "table").all()
    # both slice orders were checked against segmentations
    assert set(rows.loc[from_segmentation, "z_decreasing"]) == {True, False}


def test_fracture_targets_follow_the_rules_against_ground_truth(with_table, damaged):
    rows = with_truth(with_table, damaged)
    labels = damaged.labels.set_index("StudyInstanceUID")
    kinds = set()
    for uid, study in rows.groupby("StudyInstanceUID"):
        fracture = study[list(FRACTURE_TARGETS)].to_numpy()
        truth = study[FRACTURE_GT].to_numpy()
        visible = study[VISIBLE_GT].to_numpy()
        if study["split"].iloc[0] == "test":
            kinds.add("test")
            assert np.isnan(fracture).all() and (study["fracture_source"] == "unknown").all()
            assert study[["label_overall", "fold"]].isna().all().all()
            continue
        label = labels.loc[uid]
        fractured = label[list(VERTEBRAE)].to_numpy() == 1
        np.testing.assert_array_equal(study["label_overall"], label["patient_overall"])
        np.testing.assert_array_equal(study[[f"label_{v}" for v in VERTEBRAE]].iloc[0], label[list(VERTEBRAE)])
        assert (study["fold"] == label["fold"]).all()
        if label["patient_overall"] == 0:
            kinds.add("negative")
            assert (study["fracture_source"] == "negative").all() and (fracture == 0).all()
        elif uid in damaged.boxed:
            kinds.add("boxes")
            assert (study["fracture_source"] == "boxes").all()
            # every planted break is marked; nothing outside a fractured, visible vertebra is
            assert (fracture >= truth).all()
            assert (fracture <= visible * fractured).all()
            # exact wherever one fractured vertebra is in view (more in view: a box cannot say which)
            single = (visible * fractured).sum(axis=1) <= 1
            np.testing.assert_array_equal(fracture[single], truth[single])
        else:
            kinds.add("label_x_visibility")
            assert (study["fracture_source"] == "label_x_visibility").all()
            np.testing.assert_array_equal(fracture, visible * fractured)
            assert (fracture >= truth).all()
    assert kinds == {"test", "negative", "boxes", "label_x_visibility"}, f"synth_data lacks a kind of study: {kinds}"


def test_without_a_table_only_segmented_studies_have_visibility(without_table, damaged):
    rows = with_truth(without_table, damaged)
    segmented = rows["StudyInstanceUID"].isin(damaged.segmented)
    np.testing.assert_array_equal(rows.loc[segmented, list(VISIBLE_TARGETS)], rows.loc[segmented, VISIBLE_GT])
    assert rows.loc[~segmented, list(VISIBLE_TARGETS)].isna().all().all()
    assert (rows.loc[~segmented, "visibility_source"] == "unknown").all()
    labels = damaged.labels.set_index("StudyInstanceUID")
    for uid, study in rows[~segmented & (rows["split"] == "train")].groupby("StudyInstanceUID"):
        label = labels.loc[uid]
        fractured = label[list(VERTEBRAE)].to_numpy() == 1
        fracture = study[list(FRACTURE_TARGETS)].to_numpy()
        if label["patient_overall"] == 0:
            assert (fracture == 0).all()
        elif uid in damaged.boxed:  # box slices: every fractured vertebra; other slices 0
            boxed = (study[FRACTURE_GT].to_numpy() == 1).any(axis=1)
            np.testing.assert_array_equal(fracture[boxed], np.tile(fractured * 1.0, (boxed.sum(), 1)))
            assert (fracture[~boxed] == 0).all()
        else:  # fractured vertebrae unknown, the others 0
            assert np.isnan(fracture[:, fractured]).all() and (fracture[:, ~fractured] == 0).all()


def test_bad_files_are_reported_and_every_other_file_is_read(with_table, damaged):
    df = with_table.df.set_index("path")
    assert str(damaged.corrupt.resolve()) not in df.index  # random bytes: not DICOM, reported as an issue
    not_dicom = {i["study"]: i["detail"] for i in with_table.metadata["report"]["issues"] if i["kind"] == "not_dicom"}
    assert set(not_dicom) == {damaged.extra_files_study, damaged.stray_study}
    assert "9001.dcm" in not_dicom[damaged.extra_files_study] and "2 file(s)" in not_dicom[damaged.stray_study]
    truncated = df.loc[str(damaged.truncated.resolve())]
    # a cut copy of 5.dcm: same position as 5.dcm, which is whole and kept
    assert truncated["left_out"] == "duplicate_position" and truncated["slice_index"] == -1
    assert "5.dcm, which was kept" in truncated["problem"] and "file truncated" in truncated["problem"]
    assert truncated["StudyInstanceUID"] == damaged.extra_files_study and truncated["visibility_source"] == "unknown"
    original, copy = (str(p.resolve()) for p in damaged.duplicates)  # 3.dcm and its copy 003.dcm
    assert df.loc[copy, "problem"] == "" and df.loc[copy, "slice_index"] >= 0  # the first by file name is kept
    assert df.loc[original, "left_out"] == "duplicate_position" and "003.dcm, which was kept" in df.loc[original, "problem"]
    others = df.drop(index=[str(damaged.truncated.resolve()), original])
    assert (others["problem"] == "").all() and np.isfinite(others["z"]).all() and (others["rows"] > 0).all()
    report = with_table.metadata["report"]
    assert report["problems"] == [] and report["left_out_reasons"] == {"duplicate_position": 2}
    assert {p["path"] for p in report["left_out"]} == {str(damaged.truncated.resolve()), original}
    assert "problem slices: 0" in with_table.printed and "left out: 2 slice(s) (duplicate_position 2)" in with_table.printed


def test_dataset_inconsistencies_are_reported(with_table, without_table, damaged):
    assert issues_of(with_table, "missing_images") == {MISSING_UID}
    assert issues_of(with_table, "unlabeled_folder") == {UNLABELED_UID}
    assert issues_of(with_table, "segmentation_without_images") == {MISSING_UID}
    assert issues_of(with_table, "uid_mismatch") == {UNLABELED_UID}  # its files carry the test study's uid
    assert issues_of(with_table, "segmentation_mismatch") == {damaged.wrong_segmentation}
    assert issues_of(with_table, "left_out_duplicate_position") == {damaged.duplicate_study, damaged.extra_files_study}
    assert issues_of(with_table, "partial_table") == set()  # the table covers every slice of every volume
    for kind in ("missing_images", "unlabeled_folder", "segmentation_mismatch", "left_out_duplicate_position"):
        assert kind in with_table.printed
    assert MISSING_UID not in set(with_table.df["StudyInstanceUID"])
    unlabeled = with_table.df[with_table.df["StudyInstanceUID"] == UNLABELED_UID]
    assert len(unlabeled) > 0 and (unlabeled["fracture_source"] == "unknown").all()
    assert unlabeled[["label_overall", *FRACTURE_TARGETS]].isna().all().all()
    # an unusable segmentation counts as absent: the table fills in, and without it visibility is unknown
    wrong = with_table.df["StudyInstanceUID"] == damaged.wrong_segmentation
    assert (with_table.df.loc[wrong, "visibility_source"] == "table").all()
    wrong = without_table.df["StudyInstanceUID"] == damaged.wrong_segmentation
    assert without_table.df.loc[wrong, list(VISIBLE_TARGETS)].isna().all().all()
    assert issues_of(without_table, "segmentation_mismatch") == {damaged.wrong_segmentation}
    summary = {s["StudyInstanceUID"]: s for s in with_table.metadata["report"]["per_study"]}
    assert any("segmentation_mismatch" in issue for issue in summary[damaged.wrong_segmentation]["issues"])
    assert (summary[damaged.extra_files_study]["problems"], summary[damaged.extra_files_study]["left_out"]) == (0, 1)


def test_main_reports_bad_arguments(tmp_path, capsys):
    def error_of(*argv: str) -> str:
        assert cli.main(["scan", *argv]) == 2
        return capsys.readouterr().err

    assert "nowhere: no such directory" in error_of(str(tmp_path / "nowhere"), "--out", str(tmp_path / "t.parquet"))
    assert "vit-spine scan: error: --output_file FILE.parquet is required" in error_of(str(tmp_path))
    assert "no study folder under train_images/ or test_images/" in error_of(str(tmp_path), "--out", str(tmp_path / "t.parquet"))
    (tmp_path / "train_images" / "1.2.3").mkdir(parents=True)
    (tmp_path / "train_images" / "1.2.3" / "notes.txt").write_text("no images here")
    assert "no DICOM file in the study folders" in error_of(str(tmp_path), "--out", str(tmp_path / "t.parquet"))
    assert not (tmp_path / "t.parquet").exists()


# ---------------------------------------------------------------- real export layouts


@pytest.fixture(scope="module")
def exports_scanned(export_studies, tmp_path_factory) -> tuple[Scanned, dict]:
    """The export studies as an RSNA-layout dataset: labels for all, boxes for a study that does not
    exist, and a segmentation for the study whose folder holds three series."""
    root = tmp_path_factory.mktemp("exports_scan") / "data"
    for study in export_studies.values():
        shutil.copytree(study.folder, root / "train_images" / study.uid)
    uids = [s.uid for s in export_studies.values()]
    labels = pd.DataFrame({"StudyInstanceUID": uids, "patient_overall": 0, **{v: 0 for v in VERTEBRAE}})
    labels.to_csv(root / "train.csv", index=False)
    pd.DataFrame({"StudyInstanceUID": ["1.2.999.404"], "x": [1.0], "y": [1.0], "width": [4.0], "height": [4.0],
                  "slice_number": [3]}).to_csv(root / "train_bounding_boxes.csv", index=False)
    segmented = export_studies["uid_named"]
    (root / "segmentations").mkdir()
    per_slice = [[1 + k // 4] for k in range(segmented.volume.spec.num_slices)]  # C1..C6, 4 slices each
    write_segmentation(root / "segmentations" / f"{segmented.uid}.nii", per_slice)
    out = root / "slices.parquet"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([str(root), "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    return Scanned(pd.read_parquet(out), read_scan_metadata(out), printed.getvalue()), export_studies


def test_nested_extension_less_and_uid_named_layouts_scan_to_their_volumes(exports_scanned):
    scanned, studies = exports_scanned
    df = scanned.df
    for name, study in studies.items():
        rows = df[df["StudyInstanceUID"] == study.uid]
        volume = rows[rows["slice_index"] >= 0].sort_values("slice_index")
        if study.volume is None:
            assert volume.empty and (rows["problem"] != "").all(), name
            continue
        assert len(volume) == study.volume.spec.num_slices, name
        assert (volume["problem"] == "").all(), name  # UID names, IM0001 names, no preamble: none is a problem
        left = rows[rows["slice_index"] < 0]["left_out"].value_counts().to_dict()
        assert left == {k: v for k, v in study.left_out.items() if k != "not_dicom"}, name
    nested = df[df["StudyInstanceUID"] == studies["nested"].uid]
    assert nested["path"].str.contains("/PATIENT01/STUDY01/SERIES02/IM00").any()
    # slice numbers: the file's <n>.dcm, else InstanceNumber, else (multi-frame) the frame number
    uid_named = df[(df["StudyInstanceUID"] == studies["uid_named"].uid) & (df["slice_index"] >= 0)]
    assert sorted(uid_named["slice_number"]) == list(range(1, 25))
    enhanced = df[df["StudyInstanceUID"] == studies["enhanced"].uid].sort_values("slice_index")
    assert enhanced["frame"].tolist() == list(range(9, -1, -1)) and enhanced["slice_number"].tolist() == list(range(10, 0, -1))
    assert enhanced["path"].nunique() == 1 and (enhanced["position"].diff().dropna() > 0).all()


def test_a_segmentation_matches_the_chosen_series_and_stray_files_cost_nothing(exports_scanned):
    scanned, studies = exports_scanned
    study = studies["uid_named"]
    rows = scanned.df[(scanned.df["StudyInstanceUID"] == study.uid) & (scanned.df["slice_index"] >= 0)]
    assert (rows["visibility_source"] == "segmentation").all() and len(rows) == 24
    by_number = rows.set_index("slice_number").sort_index()
    expected = np.zeros((24, 7))
    for k in range(24):
        expected[k, k // 4] = 1
    np.testing.assert_array_equal(by_number[list(VISIBLE_TARGETS)].to_numpy(), expected)  # z rises with the number
    assert not issues_of(scanned, "segmentation_mismatch")


def test_the_report_names_every_leave_out_the_hopeless_study_and_unknown_box_rows(exports_scanned):
    scanned, studies = exports_scanned
    assert issues_of(scanned, "no_volume") == {studies["hopeless"].uid}
    assert issues_of(scanned, "boxes_without_images") == {"1.2.999.404"}
    assert issues_of(scanned, "missing_images") == {studies["hopeless"].uid}
    assert issues_of(scanned, "not_dicom") == {studies["nested"].uid}
    assert issues_of(scanned, "left_out_other_series") == {studies["uid_named"].uid}
    assert issues_of(scanned, "left_out_not_axial") == {studies["uid_named"].uid}
    assert issues_of(scanned, "left_out_localizer") == {studies["nested"].uid}
    assert issues_of(scanned, "volume_note") == {studies["no_positions"].uid}
    reasons = scanned.metadata["report"]["left_out_reasons"]
    assert reasons == {"other_series": 8, "not_axial": 10, "localizer": 2, "secondary_capture": 2, "non_image": 1}
    assert "boxes_without_images" in scanned.printed and "no_volume" in scanned.printed


def test_a_multi_frame_file_is_scanned_frame_by_frame_with_its_true_cause_when_left_out(tmp_path):
    """pydicom's real Enhanced MR: 10 frames, each a row; left out because it is MR, not for lacking a position."""
    from pydicom.data import get_testdata_file

    folder = tmp_path / "data" / "test_images" / "1.2.3.4"
    folder.mkdir(parents=True)
    shutil.copy(get_testdata_file("emri_small.dcm"), folder / "emri.dcm")
    df = scan(tmp_path / "data", ScanConfig(data_dir=str(tmp_path / "data"), workers=1, progress=False))
    assert df["frame"].tolist() == list(range(10)) and (df["left_out"] == "not_ct").all()
    assert (df["problem"] == "left out (not_ct): Modality MR").all()
    assert df.attrs["vit_spine"]["report"]["issues"][0]["kind"] == "no_volume"
