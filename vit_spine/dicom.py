"""Read one DICOM file: its header (one `SliceHeader` per frame) and its pixels as Hounsfield units.

`read_hu` gives the same float32 values as pydicom 3's own decode followed by
`pydicom.pixels.apply_modality_lut`, for every transfer syntax pydicom's plugins (pylibjpeg,
gdcm, its own RLE and native readers) handle, with two additions a CT reader needs:
- multi-frame images (Enhanced CT/MR): every frame, each with the rescale of its functional groups
  (per-frame, else shared, else the top-level RescaleSlope/Intercept);
- Pixel Padding Value (and Pixel Padding Range Limit) becomes air, -1000 HU, whatever its VR says:
  scanners pad the area outside the reconstruction circle with e.g. -2000 (signed) or 63536
  (unsigned), which the modality LUT alone would turn into "bone" of +62,512 HU.

JPEG Lossless (Process 14 and its SV1 variant, the syntax of most RSNA 2022 slices) has a fast path:
libjpeg-turbo through `imagecodecs.jpeg8_decode`, about 2-3x faster than gdcm, followed by the same
bit handling pydicom applies. When imagecodecs is missing or fails on a frame, pydicom's decoders take
over. A JPEG Lossless frame without its end-of-image marker is an error: libjpeg-turbo and pylibjpeg
would fill the missing rows with gray without a word.

Files are recognised by content: the `DICM` marker after the 128-byte preamble, or (as some PACS
exports write them) a dataset that starts without a preamble. Everything that cannot be read raises
`DicomReadError`, whose message names the file and why; a file that is not DICOM at all raises its
subclass `NotDicomError`. Grouping files into series and studies is `vit_spine.study`'s job.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, iter_pixels, pixel_array

try:
    from imagecodecs import jpeg8_decode as _jpeg8_decode
except ImportError:  # the fast path is optional; pydicom's plugins decode everything it does
    _jpeg8_decode = None

logger = logging.getLogger(__name__)

JPEG_LOSSLESS_SYNTAXES = (uid.JPEGLossless, uid.JPEGLosslessSV1)
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
AIR_HU = -1000.0  # what padding outside the field of view becomes
_JPEG_EOI = b"\xff\xd9"
_EOI_SEARCH_BYTES = 16  # encoders pad the stream to an even length, a few use more than one byte
_warned_fallback = False
_scratch = threading.local()


class DicomReadError(Exception):
    """A DICOM file could not be read; `path` names the file and `reason` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        # Both go to Exception.args so the error pickles across worker processes.
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class NotDicomError(DicomReadError):
    """The file is not DICOM at all (no `DICM` marker and no dataset at its start): notes, thumbnails, junk."""


@dataclass
class SliceHeader:
    """One frame of a DICOM file as the study assembly needs it, read without the pixel data.

    A single-frame file has one header (`frame` 0); a multi-frame file one per frame, with the
    position, orientation, spacing and rescale of that frame's functional groups. Geometry is None
    when the file lacks it. Rescale slope/intercept are the values `read_hu` applies: 1.0 / 0.0
    unless the file has both (pydicom's rule). `pixel_problem` is "" when the file holds its whole
    Pixel Data element, else what is wrong with it (e.g. cut short by an interrupted copy).
    """

    path: str
    frame: int  # 0-based frame index within the file
    number_of_frames: int
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    image_type: tuple[str, ...]
    instance_number: int | None
    slice_number: int | None  # from the file name `<n>.dcm` (the Kaggle convention), None otherwise
    position: tuple[float, float, float] | None  # ImagePositionPatient, mm
    orientation: tuple[float, float, float, float, float, float] | None  # ImageOrientationPatient
    transfer_syntax: str
    rows: int
    columns: int
    pixel_spacing: float | None  # between rows (mm)
    pixel_spacing_column: float | None  # between columns (mm)
    slice_thickness: float | None
    rescale_slope: float
    rescale_intercept: float
    bits_stored: int
    pixel_representation: int
    photometric: str
    samples_per_pixel: int
    convolution_kernel: str
    series_description: str
    has_pixel_data: bool
    pixel_problem: str

    @property
    def z(self) -> float | None:
        return None if self.position is None else self.position[2]


def read_hu(path: str | Path, out: np.ndarray | None = None, frame: int | None = None) -> np.ndarray:
    """Read a grayscale image as float32 Hounsfield units (modality LUT applied, padding as air).

    A single-frame file gives (rows, cols). A multi-frame file gives every frame, (frames, rows, cols),
    or only frame `frame` (0-based) as (rows, cols) when it is given. `out`: an array to write the
    result into when it is float32 of the result's shape (else a new one is made); a caller that
    consumes each slice at once (the chunker passes the previous slice's array) saves a fresh 1 MiB
    array, and its page faults, per slice.
    """
    ds = _read_dataset(path)
    frames = _number_of_frames(ds, path)
    _check_grayscale_image(ds, path)
    if frame is not None and not 0 <= frame < frames:
        raise DicomReadError(path, f"frame {frame} requested, the file has {frames} frame(s)")
    if frames == 1 or frame is not None:
        index = 0 if frame is None else frame
        return _frame_hu(ds, path, _stored_frame(ds, path, index, frames), index, out)
    shape = (frames, int(ds.Rows), int(ds.Columns))
    volume = out if _fits(out, shape) else np.empty(shape, np.float32)
    for index, stored in _iter_stored_frames(ds, path, frames):
        _frame_hu(ds, path, stored, index, volume[index])
    return volume


def iter_hu(path: str | Path) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, float32 HU (rows, cols)) for every frame of a file, decoded one frame at a time.

    Memory stays at one frame whatever the file holds (an Enhanced CT can carry 1,000 frames).
    The array is reused for the next frame: copy or consume it before advancing.
    """
    ds = _read_dataset(path)
    frames = _number_of_frames(ds, path)
    _check_grayscale_image(ds, path)
    hu = None
    for index, stored in _iter_stored_frames(ds, path, frames):
        hu = _frame_hu(ds, path, stored, index, hu)
        yield index, hu


def read_headers(path: str | Path) -> list[SliceHeader]:
    """One `SliceHeader` per frame of a file, parsed once and without decoding any pixel.

    Raises NotDicomError for a file that is not DICOM and DicomReadError for one that is but cannot
    be parsed. A file without Pixel Data (a dose report, a structured report) gives one header with
    `has_pixel_data` False, so the caller can say what it left out.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fp:
            ds = _parse(fp, path, stop_before_pixels=True)
            has_pixels, problem = _pixel_data_status(fp, ds, os.fstat(fp.fileno()).st_size)
    except OSError as error:
        raise DicomReadError(path, f"cannot open: {error.strerror or error}") from error
    if len(ds) == 0:
        raise DicomReadError(path, "the file holds no dataset after its header (cut short?)")
    if not has_pixels and "Image Storage" in _uid_name(str(ds.get("SOPClassUID", ""))):
        raise DicomReadError(path, f"file truncated: it ends before its Pixel Data ({_uid_name(str(ds.SOPClassUID))})")
    try:
        return _frame_headers(ds, path, has_pixels, problem)
    except (TypeError, ValueError, AttributeError, IndexError) as error:
        raise DicomReadError(path, f"invalid header value: {type(error).__name__}: {error}") from error


def looks_like_dicom(path: str | Path) -> bool:
    """A cheap content check (the first 132 bytes): the DICM marker, or a dataset starting without preamble."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or _starts_like_a_dataset(head[:8])


def read_header(path: str | Path) -> SliceHeader:
    """The header of a file's first frame (`read_headers(path)[0]`)."""
    return read_headers(path)[0]


def encode_jpeg_lossless(ds: Dataset, transfer_syntax: str = uid.JPEGLosslessSV1) -> None:
    """Re-encode `ds`'s pixel data as JPEG Lossless with gdcm, in place and bit-exact.

    pydicom 3 cannot encode JPEG Lossless; gdcm's ImageChangeTransferSyntax does. Supports one
    frame, one sample per pixel, 8 or 16 bits allocated, signed or unsigned, any Bits Stored.
    `transfer_syntax` is JPEG Lossless SV1 (1.2.840.10008.1.2.4.70, the RSNA default) or
    Process 14 (.57). Sets TransferSyntaxUID; the SOP Instance UID is kept.
    """
    import gdcm

    gdcm_syntaxes = {
        uid.JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1,
        uid.JPEGLossless: gdcm.TransferSyntax.JPEGLosslessProcess14,
    }
    if transfer_syntax not in gdcm_syntaxes:
        raise ValueError(f"transfer_syntax must be one of {list(gdcm_syntaxes)}, got {transfer_syntax!r}")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1 or ds.SamplesPerPixel != 1 or ds.BitsAllocated not in (8, 16):
        # gdcm aborts the whole process (not an exception) on some of these, so check first.
        raise ValueError(
            "encode_jpeg_lossless needs one frame, one sample per pixel and 8 or 16 bits allocated; got "
            f"{frames} frames, {ds.SamplesPerPixel} samples, {ds.BitsAllocated} bits allocated"
        )
    stored = ds.pixel_array
    little_endian = stored.astype(stored.dtype.newbyteorder("<"), copy=False).tobytes()

    change = gdcm.ImageChangeTransferSyntax()
    image = gdcm.Image()
    # gdcm filters hold their input through a reference-counting SmartPointer that frees it;
    # if Python also owned it, it would be freed twice (segfault). Hand ownership to the filter.
    image.thisown = False
    change.SetInput(image)
    image.SetNumberOfDimensions(2)
    image.SetDimensions((int(ds.Columns), int(ds.Rows), 1))
    bits_stored = int(ds.BitsStored)
    image.SetPixelFormat(gdcm.PixelFormat(1, int(ds.BitsAllocated), bits_stored, bits_stored - 1, int(ds.PixelRepresentation)))
    pi_type = gdcm.PhotometricInterpretation.GetPIType(str(ds.PhotometricInterpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi_type))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ExplicitVRLittleEndian))
    pixel_data = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    pixel_data.SetByteStringValue(little_endian)
    image.SetDataElement(pixel_data)
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm_syntaxes[transfer_syntax]))
    if not change.Change():
        raise RuntimeError("gdcm could not encode the pixel data as JPEG Lossless")
    fragments = change.GetOutput().GetDataElement().GetSequenceOfFragments()
    # gdcm hands byte buffers to Python as str; surrogateescape gives back the exact bytes.
    frame = b"".join(
        fragments.GetFragment(i).GetByteValue().GetBuffer().encode("utf-8", "surrogateescape")
        for i in range(fragments.GetNumberOfFragments())
    )

    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.UID(transfer_syntax)


# ---------------------------------------------------------------- parsing


_PREAMBLE_GROUPS = (0x0002, 0x0008)  # a dataset written without preamble starts with its meta or group 8


def _read_dataset(path: str | Path, stop_before_pixels: bool = False) -> Dataset:
    try:
        with open(path, "rb") as fp:
            return _parse(fp, path, stop_before_pixels)
    except OSError as error:
        raise DicomReadError(path, f"cannot open: {error.strerror or error}") from error


def _parse(fp, path: str | Path, stop_before_pixels: bool) -> Dataset:
    """dcmread of an open file; files without the 128-byte preamble are accepted when they start
    like a dataset. Raises NotDicomError when the content is not DICOM."""
    try:
        return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as error:
        fp.seek(0)
        if not _starts_like_a_dataset(fp.read(8)):
            raise NotDicomError(path, f"not a DICOM file ({error})") from error
        fp.seek(0)
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=True)
        except Exception as forced_error:  # noqa: BLE001 - any failure here means "not DICOM"
            raise NotDicomError(path, f"not a DICOM file ({forced_error})") from forced_error
        if "SOPClassUID" not in ds and "Rows" not in ds:
            raise NotDicomError(path, "not a DICOM file (no preamble, and no SOP Class or image attributes)")
        _set_transfer_syntax(ds)
        return ds
    except Exception as error:  # pydicom raises many types on damaged files
        raise DicomReadError(path, f"cannot parse DICOM: {type(error).__name__}: {error}") from error


def _starts_like_a_dataset(head: bytes) -> bool:
    """The first element of a preamble-less file: group 0002 or 0008, little or big endian."""
    if len(head) < 8:
        return False
    return struct.unpack("<H", head[:2])[0] in _PREAMBLE_GROUPS or struct.unpack(">H", head[:2])[0] in _PREAMBLE_GROUPS


def _set_transfer_syntax(ds: Dataset) -> None:
    """A file without File Meta has no TransferSyntaxUID; pydicom's decoders need one. Take it from
    the encoding the dataset was parsed with."""
    if getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None):
        return
    implicit, little = ds.original_encoding
    syntax = uid.ImplicitVRLittleEndian if implicit else (uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax


_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
_PIXEL_DATA = (0x7FE0, 0x0010)
_ITEM, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _pixel_data_status(fp, ds: Dataset, size: int) -> tuple[bool, str]:
    """(whether the file has Pixel Data, "" when it is all there else what is wrong), from element headers.

    A header-only read cannot see a file cut short inside its pixel data (an interrupted copy), and
    decoding every slice while scanning would cost a full read of the dataset. So this walks element
    and item headers only, from where pydicom left the file after a `stop_before_pixels` read (at the
    Pixel Data tag): a defined length must fit in the file; encapsulated fragments must fit and end
    with the sequence delimiter. A deflated dataset is not checked (its bytes are compressed).
    """
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if syntax == uid.DeflatedExplicitVRLittleEndian:
        return True, ""
    implicit, little = ds.original_encoding
    endian = "<" if little is not False else ">"
    start = fp.tell()
    head = fp.read(8)
    if len(head) < 8:
        return False, ""
    if struct.unpack(f"{endian}HH", head[:4]) != _PIXEL_DATA:
        return _PIXEL_DATA in ds, ""  # pydicom stopped elsewhere (e.g. float pixel data): nothing to check
    if implicit:
        (length,), value_start = struct.unpack(f"{endian}I", head[4:]), start + 8
    elif head[4:6] in _LONG_LENGTH_VRS:
        more = fp.read(4)
        if len(more) < 4:
            return True, "file truncated in the Pixel Data element header"
        (length,), value_start = struct.unpack(f"{endian}I", more), start + 12
    else:
        (length,), value_start = struct.unpack(f"{endian}H", head[6:]), start + 8
    if length != _UNDEFINED_LENGTH:
        present = size - value_start
        return True, "" if present >= length else f"file truncated: Pixel Data has {present} of its {length} bytes"
    fp.seek(value_start)
    while True:  # encapsulated (always little endian): items, then the sequence delimiter
        item = fp.read(8)
        if len(item) < 8:
            return True, "file truncated: encapsulated Pixel Data ends without its sequence delimiter"
        group, element, length = struct.unpack("<HHI", item)
        if (group, element) == _SEQUENCE_END:
            return True, ""
        if (group, element) != _ITEM:
            return True, f"corrupt encapsulated Pixel Data: tag ({group:04X},{element:04X}) where an item should be"
        if fp.tell() + length > size:
            return True, "file truncated inside an encapsulated Pixel Data fragment"
        fp.seek(length, os.SEEK_CUR)


def _frame_headers(ds: Dataset, path: Path, has_pixels: bool, pixel_problem: str) -> list[SliceHeader]:
    frames = _number_of_frames(ds, path) if has_pixels else 1
    shared = _first_item(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    common = dict(
        path=str(path),
        number_of_frames=frames,
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        modality=str(ds.get("Modality", "") or ""),
        image_type=tuple(str(v).upper() for v in _as_list(ds.get("ImageType"))),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        slice_number=int(path.stem) if path.stem.isdigit() else None,
        transfer_syntax=str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""),
        rows=int(ds.get("Rows") or 0),
        columns=int(ds.get("Columns") or 0),
        bits_stored=int(ds.get("BitsStored") or 0),
        pixel_representation=int(ds.get("PixelRepresentation") or 0),
        photometric=str(ds.get("PhotometricInterpretation", "") or ""),
        samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
        convolution_kernel="\\".join(str(v) for v in _as_list(ds.get("ConvolutionKernel"))),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        has_pixel_data=has_pixels,
        pixel_problem=pixel_problem,
    )
    headers = []
    for index in range(frames):
        groups = (per_frame[index] if index < len(per_frame) else None, shared)
        spacing = _functional(ds, groups, "PixelMeasuresSequence", "PixelSpacing")
        slope, intercept = _frame_rescale(ds, groups)
        headers.append(SliceHeader(
            frame=index,
            position=_floats(_functional(ds, groups, "PlanePositionSequence", "ImagePositionPatient"), 3),
            orientation=_floats(_functional(ds, groups, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            pixel_spacing=_float_at(spacing, 0),
            pixel_spacing_column=_float_at(spacing, 1),
            slice_thickness=_float_at(_functional(ds, groups, "PixelMeasuresSequence", "SliceThickness"), None),
            rescale_slope=slope,
            rescale_intercept=intercept,
            **common,
        ))
    return headers


def _uid_name(value: str) -> str:
    """The registered name of a UID (e.g. 'CT Image Storage'), the UID itself when it has none."""
    return uid.UID(value).name if value else ""


def _first_item(sequence) -> Dataset | None:
    return sequence[0] if sequence else None


def _functional(ds: Dataset, groups: tuple[Dataset | None, Dataset | None], sequence: str, keyword: str):
    """An attribute of one frame: from its per-frame functional group, else the shared one, else the top level."""
    for group in groups:
        item = _first_item(group.get(sequence)) if group is not None else None
        if item is not None and keyword in item:
            return item.get(keyword)
    return ds.get(keyword)


def _frame_rescale(ds: Dataset, groups: tuple[Dataset | None, Dataset | None]) -> tuple[float, float]:
    """Slope and intercept of one frame as pydicom's apply_modality_lut uses them: both present, or 1 and 0."""
    slope = _functional(ds, groups, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _functional(ds, groups, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None or intercept is None or slope == "" or intercept == "":
        return 1.0, 0.0
    return float(slope), float(intercept)


def _as_list(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _int_or_none(value) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _floats(value, count: int) -> tuple[float, ...] | None:
    """`count` finite floats from a multi-valued element, None when absent, short or not numeric."""
    values = _as_list(value)
    if len(values) < count:
        return None
    try:
        numbers = tuple(float(v) for v in values[:count])
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(v) for v in numbers) else None


def _float_at(value: object, index: int | None) -> float | None:
    """`value[index]` (or `value` itself) as float, None when absent, empty or not a number."""
    values = _as_list(value)
    if index is None:
        values = values[:1]
        index = 0
    if len(values) <= index:
        return None
    try:
        return float(values[index])
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- pixels


def _number_of_frames(ds: Dataset, path: str | Path) -> int:
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as error:
        raise DicomReadError(path, f"invalid NumberOfFrames: {error}") from error
    if frames < 1:
        raise DicomReadError(path, f"invalid NumberOfFrames {frames}")
    return frames


def _check_grayscale_image(ds: Dataset, path: str | Path) -> None:
    if "PixelData" not in ds:
        raise DicomReadError(path, _missing_pixel_data_reason(ds, path))
    try:
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError) as error:
        raise DicomReadError(path, f"invalid SamplesPerPixel: {error}") from error
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples != 1 or photometric not in GRAYSCALE:
        raise DicomReadError(
            path, f"not grayscale ({photometric or 'no photometric interpretation'}, {samples} samples per pixel)"
        )


def _missing_pixel_data_reason(ds: Dataset, path: str | Path) -> str:
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        return "float pixel data is not supported (no (7FE0,0010) Pixel Data)"
    # A truncated file loses its Pixel Data silently apart from a pydicom warning; re-read to name it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with open(path, "rb") as fp:
                _parse(fp, path, stop_before_pixels=False)
        except Exception as error:
            return f"no Pixel Data element ({type(error).__name__}: {error})"
    hints = "; ".join(str(w.message) for w in caught)
    return "no Pixel Data element" + (f" (file truncated? pydicom: {hints})" if hints else "")


def _fits(out: np.ndarray | None, shape: tuple[int, ...]) -> bool:
    return out is not None and out.shape == shape and out.dtype == np.float32 and out.flags.writeable


def _frame_hu(ds: Dataset, path: str | Path, stored: np.ndarray, frame: int, out: np.ndarray | None) -> np.ndarray:
    """Stored values of one frame -> float32 HU with that frame's rescale, padding as air."""
    if stored.shape != (int(ds.Rows), int(ds.Columns)):
        raise DicomReadError(path, f"decoded pixel data has shape {stored.shape}, expected (rows, columns)")
    if not _fits(out, stored.shape):
        out = None
    try:
        hu = _apply_modality_lut(stored, ds, out, _rescale_of_frame(ds, frame))
        padding = _padding_mask(stored, ds)
        if padding is not None:
            hu[padding] = AIR_HU
        return hu
    except Exception as error:
        raise DicomReadError(path, f"cannot apply the modality LUT: {type(error).__name__}: {error}") from error


def _rescale_of_frame(ds: Dataset, frame: int) -> tuple[float, float] | None:
    """Slope and intercept of a multi-frame file's frame from its functional groups; None for the
    top-level ones (single-frame files, or no functional groups)."""
    shared = _first_item(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if shared is None and not per_frame:
        return None
    return _frame_rescale(ds, (per_frame[frame] if frame < len(per_frame) else None, shared))


def _padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Pixels whose stored value is the Pixel Padding Value (or within [value, range limit]), None without one.

    The value is compared as the stored pixels hold it: Bits Stored wide, sign-extended for signed
    pixels. That makes 63536 (US) and -2000 (SS) the same padding in a signed 16-bit image, as
    scanners that write the VR inconsistently mean them.
    """
    value = _int_or_none(ds.get("PixelPaddingValue"))
    if value is None:
        return None
    limit = _int_or_none(ds.get("PixelPaddingRangeLimit"))
    bits = int(ds.get("BitsStored") or stored.dtype.itemsize * 8)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    low, high = sorted((_as_stored(value, bits, signed), _as_stored(value if limit is None else limit, bits, signed)))
    if low == high:
        return stored == low
    return (stored >= low) & (stored <= high)


def _as_stored(value: int, bits: int, signed: bool) -> int:
    value &= (1 << bits) - 1
    if signed and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


def _stored_frame(ds: Dataset, path: str | Path, index: int, frames: int) -> np.ndarray:
    """The stored values of frame `index` exactly as pydicom 3 decodes them (before the modality LUT).

    From the fast path this is a per-thread scratch buffer, overwritten by the thread's next call.
    """
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax in JPEG_LOSSLESS_SYNTAXES:
        for number, frame in _jpeg_frames(ds, path, frames):
            if number == index:
                return _decode_jpeg_frame(frame, ds, path, index, frames)
    return _pydicom_frame(ds, path, index, frames)


def _iter_stored_frames(ds: Dataset, path: str | Path, frames: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, stored values) of every frame in file order, one decode at a time."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax in JPEG_LOSSLESS_SYNTAXES:
        for index, frame in _jpeg_frames(ds, path, frames):
            yield index, _decode_jpeg_frame(frame, ds, path, index, frames)
        return
    if frames == 1:
        yield 0, _pydicom_frame(ds, path, 0, 1)
        return
    try:
        for index, stored in enumerate(iter_pixels(ds)):
            yield index, stored
    except DicomReadError:
        raise
    except Exception as error:
        raise _decode_error(ds, path, error) from error


def _pydicom_frame(ds: Dataset, path: str | Path, index: int, frames: int) -> np.ndarray:
    try:
        return pixel_array(ds, index=index if frames > 1 else None)
    except Exception as error:
        raise _decode_error(ds, path, error) from error


def _decode_jpeg_frame(frame: bytes, ds: Dataset, path: str | Path, index: int, frames: int) -> np.ndarray:
    """libjpeg-turbo when available and it succeeds, else pydicom's decoders."""
    if _jpeg8_decode is not None:
        try:
            return _decode_jpeg_lossless(frame, ds)
        except Exception as error:
            _log_fallback(path, error)
    return _pydicom_frame(ds, path, index, frames)


def _decode_error(ds: Dataset, path: str | Path, error: Exception) -> DicomReadError:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax_name = syntax.name if syntax else "unknown transfer syntax (no TransferSyntaxUID)"
    return DicomReadError(path, f"cannot decode {syntax_name} pixel data: {type(error).__name__}: {error}")


def _jpeg_frames(ds: Dataset, path: str | Path, frames: int) -> Iterator[tuple[int, bytes]]:
    """(index, JPEG stream) of every frame (all its fragments), each checked for truncation.

    pylibjpeg and libjpeg-turbo decode a JPEG stream cut short without an error (the missing rows
    come out gray), so a missing end-of-image marker is the only sign; we make it an error.
    """
    try:
        streams = generate_frames(ds.PixelData, number_of_frames=frames)
        for index in range(frames):
            frame = next(streams, None)
            if frame is None:
                raise ValueError(f"the pixel data holds {index} of its {frames} frames")
            if _JPEG_EOI not in frame[-_EOI_SEARCH_BYTES:]:
                raise DicomReadError(
                    path, "JPEG Lossless frame has no end-of-image marker: truncated or corrupt pixel data"
                )
            yield index, frame
    except DicomReadError:
        raise
    except Exception as error:
        raise DicomReadError(path, f"cannot split the encapsulated pixel data: {type(error).__name__}: {error}") from error


def _decode_jpeg_lossless(frame: bytes, ds: Dataset) -> np.ndarray:
    """libjpeg-turbo decode, then pydicom's handling of Bits Stored < Bits Allocated.

    Returns this thread's scratch buffer: valid until the thread's next call.
    """
    bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
    signed = int(ds.PixelRepresentation) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")
    shape = (int(ds.Rows), int(ds.Columns))
    # imagecodecs checks that the stream's size and precision fit `out` (ValueError otherwise).
    stored = _jpeg8_decode(frame, out=_scratch_buffer(shape, dtype))
    if stored.shape != shape or stored.dtype != dtype:
        raise ValueError(f"decoded {stored.dtype} {stored.shape}, expected {dtype} {shape}")
    # Same result as pydicom's unused-bits correction (shift left, then arithmetic shift right):
    # drop the bits above Bits Stored, sign-extending signed pixels.
    shift = bits_allocated - bits_stored
    if shift and signed:
        np.left_shift(stored, shift, out=stored)
        np.right_shift(stored, shift, out=stored)
    elif shift:
        np.bitwise_and(stored, (1 << bits_stored) - 1, out=stored)
    return stored


def _scratch_buffer(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """A per-thread decode buffer reused across slices. A fresh 512 KiB array per slice costs
    page faults that took a third of the decode time on the machines we measured."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
        buffer = _scratch.buffer = np.empty(shape, dtype)
    return buffer


def _log_fallback(path: str | Path, error: Exception) -> None:
    global _warned_fallback
    message = f"{path}: fast JPEG Lossless decode failed ({type(error).__name__}: {error}); using pydicom's decoders"
    if not _warned_fallback:
        logger.warning("%s (further fallbacks are logged at DEBUG)", message)
        _warned_fallback = True
    else:
        logger.debug(message)


def _rescale(ds: Dataset) -> tuple[float, float]:
    """Top-level slope and intercept as pydicom's apply_modality_lut uses them: both present, or 1 and 0."""
    return _frame_rescale(ds, (None, None))


def _apply_modality_lut(
    stored: np.ndarray, ds: Dataset, out: np.ndarray | None = None, rescale: tuple[float, float] | None = None
) -> np.ndarray:
    """float32 equal to pydicom's apply_modality_lut(stored, ds) (float64) cast to float32, in `out` when given.

    `rescale`: a frame's own (slope, intercept) from its functional groups, instead of the top level's.
    """
    if out is None:
        out = np.empty(stored.shape, np.float32)
    if rescale is None and ds.get("ModalityLUTSequence"):
        out[...] = apply_modality_lut(stored, ds)
        return out
    slope, intercept = rescale if rescale is not None else _rescale(ds)
    integral = slope.is_integer() and intercept.is_integer()
    # With 16-bit inputs and integral slope/intercept every intermediate is an integer below
    # 2**24, so float32 arithmetic is exact and equals pydicom's float64 result; it is also
    # about 5x faster. Anything else goes through float64 like pydicom.
    if stored.dtype.itemsize <= 2 and integral and 65536 * abs(slope) + abs(intercept) < 2**24:
        if slope == 1:  # one pass: convert and add together
            return np.add(stored, np.float32(intercept), out=out, dtype=np.float32)
        np.multiply(stored, np.float32(slope), out=out, dtype=np.float32)
        if intercept:
            out += np.float32(intercept)
        return out
    out[...] = stored.astype(np.float64) * slope + intercept
    return out
