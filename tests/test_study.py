"""The study assembly: any CT export in, one correct volume per study out (vit_spine.study).

Every case is written with vit_spine.phantom, whose slices carry their own height (the inside of the
vertebral ring holds 200 + z HU), so a test can check the order of the volume from its pixels too.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from vit_spine.dicom import read_hu
from vit_spine.phantom import (
    AXIAL,
    CORONAL,
    SAGITTAL,
    SeriesSpec,
    reformat,
    write_dose_screen,
    write_localizer,
    write_series,
    write_structured_report,
)
from vit_spine.study import (
    MAX_TILT_DEGREES,
    REASONS,
    SliceRef,
    assemble_folder,
    iter_volume_hu,
    slice_normal,
    tilt_degrees,
)

UID = "1.2.826.0.1.3680043.10.77"


def left_out_kinds(assembly) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in assembly.left_out:
        counts[item.kind] = counts.get(item.kind, 0) + 1
    return counts


def chosen_paths(assembly) -> list[tuple[str, int]]:
    return [(h.path, h.frame) for h in assembly.slices]


def ring_inside_hu(hu: np.ndarray, spec: SeriesSpec) -> float:
    """HU at the phantom's (0, 10) mm, which is 200 + z there."""
    position = spec.slice_positions()[0]
    col_mm = spec.column_spacing or spec.pixel_spacing
    column = round((0.0 - position[0]) / col_mm)
    row = round((10.0 - position[1]) / spec.pixel_spacing)
    return float(hu[row, column])


def test_every_export_layout_becomes_its_volume(export_studies):
    for name, study in export_studies.items():
        assembly = assemble_folder(study.folder)
        assert left_out_kinds(assembly) == study.left_out, name
        if study.volume is None:
            assert not assembly.ok and "no usable axial CT slice" in assembly.error, name
            continue
        assert assembly.ok, (name, assembly.error)
        written = study.volume
        order = np.argsort(written.positions[:, 2])  # the volume runs towards the head
        expected = [(str(written.paths[0]), int(i)) for i in order] if written.spec.enhanced else \
            [(str(written.paths[i]), 0) for i in order]
        if name == "no_positions":  # no positions: InstanceNumber order, which runs against the stack here
            expected = [(str(p), 0) for p in reversed(written.paths)]
            assert assembly.notes == ["no slice has ImagePositionPatient: ordered by InstanceNumber"]
            assert assembly.positions == [None] * len(written.paths)
        else:
            np.testing.assert_allclose(assembly.positions, np.sort(written.positions[:, 2]))
        assert chosen_paths(assembly) == expected, name


def test_the_volume_pixels_come_out_in_order_from_single_and_multi_frame_files(export_studies):
    for name in ("nested", "enhanced", "no_preamble"):
        study = export_studies[name]
        assembly = assemble_folder(study.folder)
        volume = [None] * len(assembly.slices)
        for index, hu in iter_volume_hu([SliceRef.of(h) for h in assembly.slices]):
            volume[index] = hu.copy()
        heights = [ring_inside_hu(hu, study.volume.spec) - 200 for hu in volume]
        np.testing.assert_allclose(heights, np.round(assembly.positions), atol=0.5, err_msg=name)
    # the Enhanced file's frames were written head first: the volume reverses them
    enhanced = assemble_folder(export_studies["enhanced"].folder)
    assert [h.frame for h in enhanced.slices] == list(range(9, -1, -1))
    # and padding (63536, unsigned) reads as air
    no_preamble = assemble_folder(export_studies["no_preamble"].folder)
    hu = read_hu(no_preamble.slices[0].path)
    assert hu[0, 0] == -1000.0


def test_an_oblique_stack_is_ordered_along_its_normal_not_by_z(tmp_path):
    """Tilted 25 degrees, with an in-plane shift per slice larger than the z step: z alone runs backwards."""
    tilt = math.radians(25)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), -math.sin(tilt))
    column = np.array(orientation[3:])
    spec = SeriesSpec(num_slices=8, spacing=1.0, orientation=orientation, drift=tuple(3.0 * column),
                      first_position=(-63.0, -63.0, 0.0))
    written = write_series(tmp_path, spec, UID)
    z = written.positions[:, 2]
    assert (np.diff(z) < 0).all()  # sorted by z, the stack would come out reversed
    assembly = assemble_folder(tmp_path)
    assert chosen_paths(assembly) == [(str(p), 0) for p in written.paths]
    normal = slice_normal(orientation)
    assert tilt_degrees(normal) == pytest.approx(25.0)
    np.testing.assert_allclose(assembly.positions, written.positions @ normal, atol=1e-3)  # as written: 4 decimals


@pytest.mark.parametrize(("orientation", "plane"), [(CORONAL, "coronal"), (SAGITTAL, "sagittal")])
def test_reformats_are_left_out_and_never_pass_as_axial(orientation, plane, tmp_path):
    write_series(tmp_path / "REF", reformat(SeriesSpec(num_slices=6), orientation, 7), UID)
    assembly = assemble_folder(tmp_path)
    assert not assembly.ok
    assert left_out_kinds(assembly) == {"not_axial": 6}
    assert f"{plane}, slice normal 90 degrees from the head-foot axis" in assembly.left_out[0].detail
    # a gantry tilt within the limit is still axial; just beyond it is not
    for degrees, ok in ((MAX_TILT_DEGREES - 1, True), (MAX_TILT_DEGREES + 1, False)):
        angle = math.radians(degrees)
        tilted = (1.0, 0.0, 0.0, 0.0, math.cos(angle), -math.sin(angle))
        folder = tmp_path / f"tilt{degrees}"
        write_series(folder, SeriesSpec(num_slices=4, orientation=tilted, series_number=8), UID)
        assert assemble_folder(folder).ok is ok, degrees


def test_the_choice_among_axial_series(tmp_path):
    # thinnest wins over more slices of a thicker series
    thin = write_series(tmp_path / "a" / "THIN", SeriesSpec(num_slices=20, spacing=1.0, series_number=1, kernel="STANDARD"), UID)
    write_series(tmp_path / "a" / "THICK", SeriesSpec(num_slices=30, spacing=3.0, series_number=2), UID)
    assembly = assemble_folder(tmp_path / "a")
    assert chosen_paths(assembly) == [(str(p), 0) for p in thin.paths]
    assert left_out_kinds(assembly) == {"other_series": 30}
    assert "chose series" in assembly.left_out[0].detail and "(20 slices, 1 mm" in assembly.left_out[0].detail
    # same thickness and coverage: the bone kernel, never a mix of both at the same positions
    write_series(tmp_path / "b" / "SOFT", SeriesSpec(num_slices=10, series_number=1, kernel="STANDARD"), UID)
    bone = write_series(tmp_path / "b" / "BONE", SeriesSpec(num_slices=10, series_number=2, kernel="B70f"), UID)
    assembly = assemble_folder(tmp_path / "b")
    assert chosen_paths(assembly) == [(str(p), 0) for p in bone.paths]
    assert left_out_kinds(assembly) == {"other_series": 10}
    # a thin partial stack (under half the slices of the largest) never wins
    write_series(tmp_path / "c" / "PART", SeriesSpec(num_slices=4, spacing=0.5, series_number=1), UID)
    full = write_series(tmp_path / "c" / "FULL", SeriesSpec(num_slices=20, spacing=2.0, series_number=2), UID)
    assert chosen_paths(assemble_folder(tmp_path / "c")) == [(str(p), 0) for p in full.paths]


def test_every_leave_out_reason_is_named(tmp_path):
    folder = tmp_path / "study"
    volume = write_series(folder / "CT", SeriesSpec(num_slices=6, series_number=1), UID)
    write_localizer(folder, UID)
    write_dose_screen(folder / "DOSE", UID)
    write_structured_report(folder / "SR", UID)
    write_series(folder / "MR", SeriesSpec(num_slices=2, modality="MR", series_number=3), UID)
    write_series(folder / "DOSECT", SeriesSpec(num_slices=1, series_number=4, image_type=("DERIVED", "SECONDARY", "SCREEN SAVE")), UID)
    write_series(folder / "COR", reformat(SeriesSpec(num_slices=3), CORONAL, 5), UID)
    write_series(folder / "THICK", SeriesSpec(num_slices=4, spacing=5.0, series_number=6), UID)
    # a copy of a slice (same position), a slice without position, junk and an unreadable DICOM
    shutil.copy(volume.paths[2], folder / "CT" / "copy.dcm")
    import pydicom

    ds = pydicom.dcmread(volume.paths[0])
    del ds.ImagePositionPatient
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.save_as(folder / "CT" / "nopos.dcm", enforce_file_format=True)
    (folder / "notes.txt").write_text("not an image")
    raw = volume.paths[1].read_bytes()
    (folder / "cut.dcm").write_bytes(raw[:200])  # DICM marker, header cut short
    ds = pydicom.dcmread(volume.paths[0])
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "RGB", 3
    ds.save_as(folder / "rgb.dcm", enforce_file_format=True)

    assembly = assemble_folder(folder)
    assert assembly.ok
    assert chosen_paths(assembly) == [(str(p), 0) for p in volume.paths]
    kinds = left_out_kinds(assembly)
    assert kinds == {"localizer": 1, "secondary_capture": 1, "non_image": 1, "not_ct": 2, "dose_report": 1,
                     "not_axial": 3, "other_series": 4, "duplicate_position": 1, "no_position": 1, "not_dicom": 1,
                     "unreadable": 1, "colour": 1}
    assert set(kinds) == set(REASONS)  # every reason the README documents is exercised here
    duplicate = next(i for i in assembly.left_out if i.kind == "duplicate_position")
    kept = {duplicate.path, str(volume.paths[2])} - {duplicate.path}
    assert duplicate.detail.endswith("which was kept") and (not kept or kept.pop() in duplicate.detail)
    assert all(item.reason.startswith(f"left out ({item.kind}): ") for item in assembly.left_out)


def test_no_positions_and_no_instance_numbers_fall_back_to_file_names(tmp_path):
    spec = SeriesSpec(num_slices=5, positions=False, instance_numbers="none", naming="IM")
    written = write_series(tmp_path, spec, UID)
    assembly = assemble_folder(tmp_path)
    assert chosen_paths(assembly) == [(str(p), 0) for p in written.paths]
    assert assembly.notes == ["no slice has ImagePositionPatient: ordered by InstanceNumber, then frame and file name"]


def test_a_folder_without_files_or_without_a_volume_says_why(tmp_path):
    assert assemble_folder(tmp_path / "missing").error.endswith("not a folder")
    (tmp_path / "empty").mkdir()
    assert assemble_folder(tmp_path / "empty").error.endswith("the folder holds no file")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    assembly = assemble_folder(tmp_path / "junk")
    assert assembly.error == "no usable axial CT slice among 1 file(s): 1 not_dicom"


def test_axial_normal_points_to_the_head_whatever_the_row_direction():
    assert slice_normal(AXIAL).tolist() == [0.0, 0.0, 1.0]
    assert slice_normal((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)).tolist() == [0.0, 0.0, 1.0]  # feet-first rows
    assert slice_normal(None).tolist() == [0.0, 0.0, 1.0]
