"""Synthetic CT series written the way scanners and PACS exports write them.

`vit-spine synth` writes the Kaggle layout; real exports hold more: localizers, dose screens, several
series (kernels, thicknesses, reformats) in one folder, nested PATIENT/STUDY/SERIES trees, files
without `.dcm` or named by their SOP Instance UID, Enhanced (multi-frame) CT, files without the
128-byte preamble, Pixel Padding Value outside the field of view, non-square slices and pixel spacings
from 0.2 to 1.2 mm. `write_series` writes any of these from a `SeriesSpec`, so the study assembly can be
tested on each case with known answers.

The phantom is defined in millimetres of patient space (`phantom_hu`), so two series of the same
study with different pixel spacings, sizes or orientations show the same anatomy at the same place:
a neck (fat, soft tissue) around a vertebral ring of cortical bone whose inside carries the slice's
position (200 + z HU), so a test can read back which slice came out where.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
NAMINGS = ("number", "uid", "IM", "uid_noext")


@dataclass(frozen=True)
class SeriesSpec:
    """One series to write. Positions: slice i sits at `first_position + i * spacing * normal + i * drift`,
    where normal = row x column of `orientation` (for AXIAL: +z)."""

    num_slices: int = 12
    rows: int = 64
    columns: int = 64
    pixel_spacing: float = 2.0  # mm, rows and columns alike unless column_spacing is given
    column_spacing: float | None = None
    spacing: float = 2.5  # mm between slice centres along the normal
    slice_thickness: float | None = None  # written as SliceThickness (default: `spacing`)
    orientation: tuple[float, ...] = AXIAL
    first_position: tuple[float, float, float] | None = None  # default: the slice centred on x = y = 0, z = -10
    drift: tuple[float, float, float] = (0.0, 0.0, 0.0)  # extra offset per slice (an oblique stack's in-plane shift)
    series_uid: str | None = None  # default: derived from the study UID and series_number
    series_number: int = 1
    description: str = "C-SPINE"
    kernel: str = "BONE"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    modality: str = "CT"
    transfer_syntax: str = EXPLICIT_LE
    signed: bool = True
    intercept: float = 0.0  # stored = HU - intercept
    padding: int | None = None  # PixelPaddingValue; written outside a circular field of view
    padding_vr: str | None = None  # "US" or "SS" (default: as PixelRepresentation says)
    positions: bool = True  # write ImagePositionPatient
    instance_numbers: str = "ascending"  # ascending | descending (along the stack) | none
    enhanced: bool = False  # one Enhanced CT file holding every slice as a frame
    preamble: bool = True
    naming: str = "number"  # number: <n>.dcm | uid: <SOPInstanceUID>.dcm | IM: IM0001 | uid_noext

    def __post_init__(self) -> None:
        if self.naming not in NAMINGS:
            raise ValueError(f"naming must be one of {NAMINGS}, got {self.naming!r}")
        if self.instance_numbers not in ("ascending", "descending", "none"):
            raise ValueError(f"instance_numbers must be ascending, descending or none, got {self.instance_numbers!r}")

    def normal(self) -> np.ndarray:
        row, column = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        return np.cross(row, column)

    def slice_positions(self) -> np.ndarray:
        """(n, 3) ImagePositionPatient of each slice, in stack order."""
        row, column = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        col_mm = self.column_spacing or self.pixel_spacing
        if self.first_position is None:  # centre the first slice on the z axis at z = -10
            centre = np.array([0.0, 0.0, -10.0])
            first = centre - row * col_mm * (self.columns - 1) / 2 - column * self.pixel_spacing * (self.rows - 1) / 2
        else:
            first = np.asarray(self.first_position, float)
        steps = np.arange(self.num_slices)[:, None]
        return first + steps * self.spacing * self.normal() + steps * np.asarray(self.drift, float)


def phantom_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """HU of the phantom at patient coordinates (mm): air, a neck of fat and soft tissue, a vertebral ring
    of cortical bone (1200 HU) around (0, 10) whose inside holds 200 + z HU (the slice's height)."""
    hu = np.full(np.broadcast(x, y, z).shape, -1000.0, np.float32)
    neck = (x / 60.0) ** 2 + (y / 50.0) ** 2
    hu[neck <= 1.0] = -100.0
    hu[neck <= 0.85] = 40.0
    ring = np.hypot(x, y - 10.0)
    hu[ring <= 12.0] = 1200.0
    inside = ring <= 9.0
    hu[inside] = (200.0 + np.broadcast_to(z, hu.shape))[inside]
    return hu


def slice_hu(spec: SeriesSpec, position: np.ndarray) -> np.ndarray:
    """(rows, columns) HU of the slice at `position` (ImagePositionPatient), sampled from the phantom."""
    row, column = np.asarray(spec.orientation[:3]), np.asarray(spec.orientation[3:])
    col_mm = spec.column_spacing or spec.pixel_spacing
    r = np.arange(spec.rows)[:, None, None] * spec.pixel_spacing * column
    c = np.arange(spec.columns)[None, :, None] * col_mm * row
    points = position + r + c
    return phantom_hu(points[..., 0], points[..., 1], points[..., 2])


def stored_values(spec: SeriesSpec, hu: np.ndarray) -> np.ndarray:
    """HU -> stored pixel values (int16 or uint16), padding outside the inscribed circle when set."""
    dtype = np.int16 if spec.signed else np.uint16
    info = np.iinfo(dtype)
    stored = np.clip(np.rint(hu - spec.intercept), info.min, info.max).astype(dtype)
    if spec.padding is not None:
        yy, xx = np.ogrid[: spec.rows, : spec.columns]
        radius = min(spec.rows, spec.columns) / 2
        outside = (yy - spec.rows / 2 + 0.5) ** 2 + (xx - spec.columns / 2 + 0.5) ** 2 > radius**2
        stored[outside] = np.array(spec.padding).astype(np.int64).astype(dtype)
    return stored


@dataclass
class WrittenSeries:
    spec: SeriesSpec
    series_uid: str
    paths: list[Path]  # in stack order (one path for an Enhanced file)
    positions: np.ndarray  # (n, 3) in stack order
    hu: np.ndarray  # (n, rows, cols) HU as written (before padding)
    sop_uids: list[str] = field(default_factory=list)


def write_series(folder: str | Path, spec: SeriesSpec, study_uid: str) -> WrittenSeries:
    """Write one series into `folder` (created), named and encoded as `spec` says."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = spec.series_uid or f"{study_uid}.{spec.series_number}"
    positions = spec.slice_positions()
    hu = np.stack([slice_hu(spec, p) for p in positions])
    numbers = _instance_numbers(spec)
    if spec.enhanced:
        sop_uid = f"{series_uid}.1"
        path = folder / _file_name(spec, 1, sop_uid)
        _save(enhanced_dataset(spec, study_uid, series_uid, sop_uid, positions, hu), path, spec)
        return WrittenSeries(spec, series_uid, [path], positions, hu, [sop_uid])
    paths, sop_uids = [], []
    for index, position in enumerate(positions):
        sop_uid = f"{series_uid}.{index + 1}"
        number = numbers[index]
        ds = slice_dataset(spec, study_uid, series_uid, sop_uid, position, hu[index], number)
        path = folder / _file_name(spec, number if number is not None else index + 1, sop_uid)
        _save(ds, path, spec)
        paths.append(path)
        sop_uids.append(sop_uid)
    return WrittenSeries(spec, series_uid, paths, positions, hu, sop_uids)


def _instance_numbers(spec: SeriesSpec) -> list[int | None]:
    if spec.instance_numbers == "none":
        return [None] * spec.num_slices
    numbers = list(range(1, spec.num_slices + 1))
    return numbers[::-1] if spec.instance_numbers == "descending" else numbers


def _file_name(spec: SeriesSpec, number: int, sop_uid: str) -> str:
    return {"number": f"{number}.dcm", "uid": f"{sop_uid}.dcm", "IM": f"IM{number:04d}", "uid_noext": sop_uid}[spec.naming]


def _base_dataset(spec: SeriesSpec, study_uid: str, series_uid: str, sop_uid: str, sop_class: str):
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(spec.image_type)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.ContentDate = "20261202"
    ds.Modality = spec.modality
    ds.Manufacturer = "vit-spine phantom"
    ds.PatientName = ds.PatientID = "PHANTOM"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = spec.series_number
    ds.SeriesDescription = spec.description
    ds.ConvolutionKernel = spec.kernel
    ds.FrameOfReferenceUID = f"{study_uid}.0"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = spec.rows, spec.columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(spec.signed)
    if spec.padding is not None:
        ds.PixelPaddingValue = spec.padding
        ds["PixelPaddingValue"].VR = spec.padding_vr or ("SS" if spec.signed else "US")
    return ds


def _spacing(spec: SeriesSpec) -> list[str]:
    return [f"{spec.pixel_spacing:g}", f"{spec.column_spacing or spec.pixel_spacing:g}"]


def slice_dataset(spec: SeriesSpec, study_uid: str, series_uid: str, sop_uid: str, position: np.ndarray,
                  hu: np.ndarray, instance_number: int | None):
    ds = _base_dataset(spec, study_uid, series_uid, sop_uid, CT_IMAGE_STORAGE)
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    if spec.positions:
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:g}" for v in spec.orientation]
    ds.PixelSpacing = _spacing(spec)
    ds.SliceThickness = f"{spec.slice_thickness or spec.spacing:g}"
    ds.RescaleIntercept, ds.RescaleSlope = f"{spec.intercept:g}", "1"
    stored = stored_values(spec, hu)
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW"
    _encode(ds, spec, stored)
    return ds


def enhanced_dataset(spec: SeriesSpec, study_uid: str, series_uid: str, sop_uid: str, positions: np.ndarray,
                     hu: np.ndarray):
    """An Enhanced CT file: one frame per slice, positions per frame, spacing/orientation/rescale shared."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    ds = _base_dataset(spec, study_uid, series_uid, sop_uid, ENHANCED_CT_IMAGE_STORAGE)
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(positions)
    measures, orientation, transform = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = _spacing(spec)
    measures.SliceThickness = f"{spec.slice_thickness or spec.spacing:g}"
    orientation.ImageOrientationPatient = [f"{v:g}" for v in spec.orientation]
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = f"{spec.intercept:g}", "1", "HU"
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for index, position in enumerate(positions):
        plane, content, frame = Dataset(), Dataset(), Dataset()
        if spec.positions:
            plane.ImagePositionPatient = [f"{v:.4f}" for v in position]
            frame.PlanePositionSequence = DicomSequence([plane])
        content.InStackPositionNumber = index + 1
        frame.FrameContentSequence = DicomSequence([content])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    stored = np.stack([stored_values(spec, h) for h in hu])
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW"
    _encode(ds, spec, stored)
    return ds


def _encode(ds, spec: SeriesSpec, stored: np.ndarray) -> None:
    from vit_spine.dicom import encode_jpeg_lossless

    if spec.transfer_syntax in (EXPLICIT_LE, IMPLICIT_LE):
        ds.file_meta.TransferSyntaxUID = spec.transfer_syntax
    elif spec.transfer_syntax == JPEG_LOSSLESS_SV1:
        if spec.enhanced:
            raise ValueError("an Enhanced file is written uncompressed or RLE here (gdcm encodes one frame)")
        encode_jpeg_lossless(ds)
    else:
        ds.compress(spec.transfer_syntax, stored, encoding_plugin="gdcm" if spec.transfer_syntax == RLE_LOSSLESS else "",
                    generate_instance_uid=False)


def _save(ds, path: Path, spec: SeriesSpec) -> None:
    if spec.preamble:
        ds.save_as(path, enforce_file_format=True)
        return
    # as some PACS exports write it: no 128-byte preamble and no "DICM" marker, the dataset from byte 0
    import pydicom

    implicit = spec.transfer_syntax == IMPLICIT_LE
    del ds.file_meta
    pydicom.dcmwrite(path, ds, implicit_vr=implicit, little_endian=True)


def write_localizer(folder: str | Path, study_uid: str, name: str = "LOCALIZER") -> Path:
    """A coronal scout, ImageType LOCALIZER, as scanners put into every export."""
    spec = SeriesSpec(num_slices=1, rows=48, columns=64, pixel_spacing=3.0, orientation=CORONAL, series_number=90,
                      image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), description="SCOUT", naming="IM",
                      first_position=(-96.0, 0.0, 40.0))
    return write_series(Path(folder) / name, spec, study_uid).paths[0]


def write_dose_screen(folder: str | Path, study_uid: str) -> Path:
    """A dose screen: a Secondary Capture RGB image, as CT consoles export the dose summary."""
    from pydicom.dataset import Dataset, FileMetaDataset

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sop_uid = f"{study_uid}.99.1"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE_STORAGE, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, f"{study_uid}.99"
    ds.Modality = "CT"
    ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = 16, 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((16, 16, 3), np.uint8).tobytes()
    path = folder / "DOSE0001"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_structured_report(folder: str | Path, study_uid: str) -> Path:
    """A radiation dose structured report: a DICOM object without pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sop_class, sop_uid = "1.2.840.10008.5.1.4.1.1.88.67", f"{study_uid}.98.1"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, f"{study_uid}.98", "SR"
    path = folder / "SR0001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def reformat(spec: SeriesSpec, orientation: Sequence[float], series_number: int, **changes) -> SeriesSpec:
    """The same study resliced in another plane (a coronal or sagittal reformat)."""
    return replace(spec, orientation=tuple(orientation), series_number=series_number,
                   image_type=("DERIVED", "SECONDARY", "REFORMATTED"), **changes)
