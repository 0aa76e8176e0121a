"""Read DICOM slices as Hounsfield units, read headers for scanning, and read whole studies.

`read_hu` gives the same float32 values as pydicom 3's own decode followed by
`pydicom.pixels.apply_modality_lut`, for every transfer syntax pydicom's plugins (pylibjpeg,
gdcm, its own RLE and native readers) handle. JPEG Lossless (Process 14 and its SV1 variant,
the syntax of most RSNA 2022 slices) has a fast path: libjpeg-turbo through
`imagecodecs.jpeg8_decode`, about 2-3x faster than gdcm, followed by the same bit handling
pydicom applies. When imagecodecs is missing or fails on a frame, pydicom's decoders take over.
A JPEG Lossless frame without its end-of-image marker is an error: libjpeg-turbo and pylibjpeg
would fill the missing rows with gray without a word.

Scope: one 2-D grayscale image per file (MONOCHROME1/2, one sample per pixel). Multi-frame files
raise `DicomReadError` instead of returning one frame of a volume the caller did not ask for.
Everything that cannot be read raises `DicomReadError`, whose message names the file and why.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

try:
    from imagecodecs import jpeg8_decode as _jpeg8_decode
except ImportError:  # the fast path is optional; pydicom's plugins decode everything it does
    _jpeg8_decode = None

logger = logging.getLogger(__name__)

JPEG_LOSSLESS_SYNTAXES = (uid.JPEGLossless, uid.JPEGLosslessSV1)
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
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


@dataclass
class SliceHeader:
    """What the scanner needs from one slice, read without its pixel data.

    Optional geometry is None when the file lacks it. Rescale slope/intercept are the values
    `read_hu` applies: 1.0 / 0.0 unless the file has both (pydicom's rule).
    """

    path: str
    study_uid: str
    sop_uid: str
    slice_number: int | None
    z: float | None
    transfer_syntax: str
    rows: int
    columns: int
    pixel_spacing: float | None
    slice_thickness: float | None
    rescale_slope: float
    rescale_intercept: float
    bits_stored: int
    pixel_representation: int
    photometric: str
    modality: str


@dataclass
class Study:
    """The readable slices of one study folder, sorted by z ascending, and the ones that failed."""

    slices: list[tuple[SliceHeader, np.ndarray]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def read_hu(path: str | Path, out: np.ndarray | None = None) -> np.ndarray:
    """Read one grayscale slice as float32 Hounsfield units (modality LUT applied), rows x cols.

    `out`: an array to write the result into when it is float32 of the slice's shape (else a new one is
    made). A caller that consumes each slice at once (the chunker passes the previous slice's array)
    saves a fresh 1 MiB array, and its page faults, per slice.
    """
    ds = _read_dataset(path)
    return _hu_from_dataset(ds, path, out)


def read_header(path: str | Path) -> SliceHeader:
    """Read the header of one slice without touching its pixel data (for scanning many files)."""
    ds = _read_dataset(path, stop_before_pixels=True)
    return _header_from_dataset(ds, path)


def read_study(folder: str | Path) -> Study:
    """Read every `*.dcm` in `folder`, ordered by ImagePositionPatient z (never by file number).

    A slice that cannot be read, or has no z position, goes to `problems` with its reason; only a
    folder without any readable slice raises `DicomReadError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomReadError(folder, "not a directory")
    paths = sorted(folder.glob("*.dcm"))
    if not paths:
        raise DicomReadError(folder, "no .dcm files in the folder")
    study = Study()
    for path in paths:
        try:
            ds = _read_dataset(path)
            header = _header_from_dataset(ds, path)
            if header.z is None:
                raise DicomReadError(path, "no ImagePositionPatient, cannot place the slice along z")
            study.slices.append((header, _hu_from_dataset(ds, path)))
        except DicomReadError as error:
            study.problems.append((str(path), error.reason))
    if not study.slices:
        first_path, first_reason = study.problems[0]
        raise DicomReadError(
            folder,
            f"none of {len(paths)} .dcm files is readable (first: {Path(first_path).name}: {first_reason})",
        )
    study.slices.sort(key=lambda item: (item[0].z, _sortable_number(item[0].slice_number)))
    return study


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


def _read_dataset(path: str | Path, stop_before_pixels: bool = False) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as error:
        raise DicomReadError(path, f"not a DICOM file ({error})") from error
    except OSError as error:
        raise DicomReadError(path, f"cannot open: {error.strerror or error}") from error
    except Exception as error:  # pydicom raises many types on damaged files
        raise DicomReadError(path, f"cannot parse DICOM: {type(error).__name__}: {error}") from error


def _header_from_dataset(ds: Dataset, path: str | Path) -> SliceHeader:
    path = Path(path)
    if "Rows" not in ds or "Columns" not in ds:
        raise DicomReadError(path, "no Rows/Columns: not an image")
    slope, intercept = _rescale(ds)
    try:
        return SliceHeader(
            path=str(path),
            study_uid=str(ds.get("StudyInstanceUID", "")),
            sop_uid=str(ds.get("SOPInstanceUID", "")),
            slice_number=int(path.stem) if path.stem.isdigit() else None,
            z=_float_at(ds.get("ImagePositionPatient"), 2),
            transfer_syntax=str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""),
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            pixel_spacing=_float_at(ds.get("PixelSpacing"), 0),
            slice_thickness=_float_at(ds.get("SliceThickness"), None),
            rescale_slope=slope,
            rescale_intercept=intercept,
            bits_stored=int(ds.get("BitsStored") or 0),
            pixel_representation=int(ds.get("PixelRepresentation") or 0),
            photometric=str(ds.get("PhotometricInterpretation", "")),
            modality=str(ds.get("Modality", "")),
        )
    except (TypeError, ValueError) as error:
        raise DicomReadError(path, f"invalid header value: {error}") from error


def _float_at(value: object, index: int | None) -> float | None:
    """`value[index]` (or `value` itself) as float, None when absent or empty."""
    if value is None or value == "":
        return None
    if index is not None:
        if len(value) <= index:
            return None
        value = value[index]
    return float(value)


def _sortable_number(number: int | None) -> int:
    return -1 if number is None else number


def _rescale(ds: Dataset) -> tuple[float, float]:
    """Slope and intercept as pydicom's apply_modality_lut uses them: both present, or 1 and 0."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None or intercept is None or slope == "" or intercept == "":
        return 1.0, 0.0
    return float(slope), float(intercept)


def _hu_from_dataset(ds: Dataset, path: str | Path, out: np.ndarray | None = None) -> np.ndarray:
    _check_single_grayscale_frame(ds, path)
    stored = _stored_values(ds, path)
    if out is not None and (out.shape != stored.shape or out.dtype != np.float32 or not out.flags.writeable):
        out = None
    try:
        return _apply_modality_lut(stored, ds, out)
    except Exception as error:
        raise DicomReadError(path, f"cannot apply the modality LUT: {type(error).__name__}: {error}") from error


def _check_single_grayscale_frame(ds: Dataset, path: str | Path) -> None:
    if "PixelData" not in ds:
        raise DicomReadError(path, _missing_pixel_data_reason(ds, path))
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError) as error:
        raise DicomReadError(path, f"invalid NumberOfFrames/SamplesPerPixel: {error}") from error
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if frames != 1:
        raise DicomReadError(path, f"multi-frame image ({frames} frames); read_hu reads single-frame slices")
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
            pydicom.dcmread(path, stop_before_pixels=False)
        except Exception as error:
            return f"no Pixel Data element ({type(error).__name__}: {error})"
    hints = "; ".join(str(w.message) for w in caught)
    return "no Pixel Data element" + (f" (file truncated? pydicom: {hints})" if hints else "")


def _stored_values(ds: Dataset, path: str | Path) -> np.ndarray:
    """The stored pixel values exactly as pydicom 3 decodes them (before the modality LUT).

    From the fast path this is a per-thread scratch buffer, overwritten by the thread's next call.
    """
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax in JPEG_LOSSLESS_SYNTAXES:
        frame = _single_frame(ds, path)
        if _jpeg8_decode is not None:
            try:
                return _decode_jpeg_lossless(frame, ds)
            except Exception as error:
                _log_fallback(path, error)
    try:
        stored = ds.pixel_array
    except Exception as error:
        syntax_name = syntax.name if syntax else "unknown transfer syntax (no TransferSyntaxUID)"
        raise DicomReadError(path, f"cannot decode {syntax_name} pixel data: {type(error).__name__}: {error}") from error
    if stored.ndim != 2:
        raise DicomReadError(path, f"decoded pixel data has shape {stored.shape}, expected (rows, columns)")
    return stored


def _single_frame(ds: Dataset, path: str | Path) -> bytes:
    """The JPEG stream of a single-frame file (all its fragments), checked for truncation.

    pylibjpeg and libjpeg-turbo decode a JPEG stream cut short without an error (the missing rows
    come out gray), so a missing end-of-image marker is the only sign; we make it an error.
    """
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as error:
        raise DicomReadError(path, f"cannot split the encapsulated pixel data: {type(error).__name__}: {error}") from error
    if _JPEG_EOI not in frame[-_EOI_SEARCH_BYTES:]:
        raise DicomReadError(path, "JPEG Lossless frame has no end-of-image marker: truncated or corrupt pixel data")
    return frame


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


def _apply_modality_lut(stored: np.ndarray, ds: Dataset, out: np.ndarray | None = None) -> np.ndarray:
    """float32 equal to pydicom's apply_modality_lut(stored, ds) (float64) cast to float32, in `out` when given."""
    if out is None:
        out = np.empty(stored.shape, np.float32)
    if ds.get("ModalityLUTSequence"):
        out[...] = apply_modality_lut(stored, ds)
        return out
    slope, intercept = _rescale(ds)
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
