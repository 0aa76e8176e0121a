"""vit_spine.dicom against pydicom's own decoders on real DICOM (pydicom's test files and the
pydicom-data package) and on synthetic CT slices JPEG Lossless encoded with gdcm."""

from __future__ import annotations

import logging
import pickle
import shutil
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_modality_lut, pixel_array

from vit_spine import dicom
from vit_spine.benchmarks import decode as decode_bench
from vit_spine.benchmarks.decode import synthetic_ct_slice
from vit_spine.dicom import (
    DicomReadError,
    NotDicomError,
    encode_jpeg_lossless,
    iter_hu,
    read_header,
    read_headers,
    read_hu,
)

JPEG_LOSSLESS = (uid.JPEGLossless, uid.JPEGLosslessSV1)


def reference_hu(ds: pydicom.Dataset, plugin: str = "") -> np.ndarray:
    """pydicom's own decode (optionally with one plugin) + modality LUT, as float32, with the pixels
    holding the Pixel Padding Value (as the signed or unsigned pixels store it) set to air, -1000 HU."""
    stored = pixel_array(ds, decoding_plugin=plugin)
    hu = apply_modality_lut(stored, ds).astype(np.float32)
    if "PixelPaddingValue" in ds:
        hu[stored == np.array(ds.PixelPaddingValue).astype(stored.dtype)] = -1000.0
    return hu


def shipped_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not in pydicom's test data (pydicom-data installed?)"
    return Path(path)


def save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def testdata_datasets() -> list[tuple[Path, pydicom.Dataset | None]]:
    """Every file pydicom ships for testing, with its dataset (None when pydicom cannot read it)."""
    result = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(get_testdata_files()):
            path = Path(name)
            if not path.is_file():
                continue
            try:
                result.append((path, pydicom.dcmread(path)))
            except Exception:
                result.append((path, None))
    return result


def test_read_hu_equals_pydicom_on_every_test_file(testdata_datasets):
    checked: list[pydicom.Dataset] = []
    refused: dict[str, list[str]] = {}
    for path, ds in testdata_datasets:
        if ds is not None and "PerFrameFunctionalGroupsSequence" in ds:
            continue  # a rescale per frame, which pydicom's apply_modality_lut ignores: tested on its own below
        reason = _expected_refusal(ds)
        if reason is None:
            try:
                expected = reference_hu(ds)
            except Exception:
                reason = "pydicom cannot decode it"
        if reason is not None:
            with pytest.raises(DicomReadError) as raised, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_hu(path)
            assert str(path) in str(raised.value)
            refused.setdefault(reason, []).append(path.name)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hu = read_hu(path)
            out = np.full(expected.shape, np.nan, np.float32)
            into_out = read_hu(path, out=out)
        frames = int(ds.get("NumberOfFrames") or 1)
        shape = (ds.Rows, ds.Columns) if frames == 1 else (frames, ds.Rows, ds.Columns)
        assert hu.dtype == np.float32 and hu.shape == shape, path.name
        np.testing.assert_array_equal(hu, expected, err_msg=path.name)
        assert into_out is out, path.name
        np.testing.assert_array_equal(into_out, expected, err_msg=path.name)
        checked.append(ds)

    print(f"\nchecked {len(checked)} files; refused (DicomReadError): "
          + "; ".join(f"{reason}: {len(names)}" for reason, names in refused.items()))
    assert len(checked) >= 60
    syntaxes = Counter(ds.file_meta.TransferSyntaxUID for ds in checked)
    for syntax in (uid.JPEGLosslessSV1, uid.JPEG2000Lossless, uid.JPEG2000, uid.RLELossless, uid.JPEGLSLossless,
                   uid.ExplicitVRBigEndian, uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian):
        assert syntaxes[syntax] >= 1, f"no {syntax.name} file was checked"
    assert {ds.PixelRepresentation for ds in checked} == {0, 1}
    assert any(ds.BitsStored < ds.BitsAllocated and ds.PixelRepresentation == 1 for ds in checked)
    assert any(ds.BitsStored < ds.BitsAllocated and ds.PixelRepresentation == 0 for ds in checked)
    assert any("ModalityLUTSequence" in ds for ds in checked)
    assert sum(ds.get("Modality") == "CT" for ds in checked) >= 10
    assert sum(int(ds.get("NumberOfFrames") or 1) > 1 for ds in checked) >= 5  # emri_small in every encoding
    assert any("PixelPaddingValue" in ds for ds in checked)
    assert "not grayscale" in refused


def _expected_refusal(ds: pydicom.Dataset | None) -> str | None:
    """Why read_hu must raise DicomReadError on this file, or None when it must decode it."""
    if ds is None:
        return "not readable as DICOM"
    if "PixelData" not in ds:
        return "no pixel data"
    try:
        int(ds.get("NumberOfFrames") or 1)
    except ValueError:
        return "invalid NumberOfFrames"
    if ds.get("SamplesPerPixel", 1) != 1 or ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        return "not grayscale"
    return None


TWINS = [
    ("693_J2KR.dcm", "693_UNCR.dcm"),
    ("693_J2KI.dcm", "693_UNCI.dcm"),  # lossy J2K vs its decompressed copy
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
    ("MR2_J2KI.dcm", "MR2_UNCI.dcm"),
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
    ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),
    ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),
    *[("MR_small.dcm", f"MR_small_{variant}.dcm")
      for variant in ("RLE", "bigendian", "expb", "implicit", "jp2klossless", "jpeg_ls_lossless", "padded")],
]


@pytest.mark.parametrize(("compressed", "uncompressed"), TWINS)
def test_compressed_and_uncompressed_twins_are_equal(compressed, uncompressed):
    a, b = read_hu(shipped_file(compressed)), read_hu(shipped_file(uncompressed))
    np.testing.assert_array_equal(a, b)
    assert np.ptp(a) > 0


def test_693_ct_twin_has_hounsfield_values_and_its_padding_is_air():
    hu = read_hu(shipped_file("693_J2KR.dcm"))
    ds = pydicom.dcmread(shipped_file("693_UNCR.dcm"))
    assert (ds.RescaleSlope, ds.RescaleIntercept, ds.PixelPaddingValue) == (1, -1024, -2000)
    padded = ds.pixel_array == -2000  # outside the reconstruction circle: -3024 HU through the LUT alone
    assert padded.sum() > 10_000
    np.testing.assert_array_equal(hu[padded], -1000.0)
    np.testing.assert_array_equal(hu[~padded], ds.pixel_array[~padded].astype(np.float32) - 1024)
    assert hu.min() == -1024 and hu.max() > 1000  # stored 0 inside the field of view: -1024 HU


REAL_JPEG_LOSSLESS = ["bad_sequence.dcm", "JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"]


@pytest.mark.parametrize("name", REAL_JPEG_LOSSLESS)
def test_fast_path_equals_gdcm_on_real_jpeg_lossless(name, monkeypatch):
    path = shipped_file(name)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID in JPEG_LOSSLESS
    calls = _count_fast_decodes(monkeypatch)
    hu = read_hu(path)
    assert calls["n"] == 1, "the imagecodecs fast path was not used"
    np.testing.assert_array_equal(hu, reference_hu(ds, "gdcm"))
    np.testing.assert_array_equal(hu, reference_hu(ds, "pylibjpeg"))


def test_bad_sequence_is_a_12_bit_ct_slice():
    hu = read_hu(shipped_file("bad_sequence.dcm"))
    assert hu.shape == (512, 512)
    assert -1024 <= hu.min() < -900 and hu.max() > 1000


# Grayscale single-frame test files of every bit depth and sign, re-encoded as JPEG Lossless by
# gdcm: 8/10/12/14/15/16 bits stored, signed and unsigned, CT, MR, CR, and a Modality LUT Sequence.
REENCODE_SOURCES = ["CT_small.dcm", "693_UNCR.dcm", "MR_small.dcm", "MR2_UNCR.dcm", "RG3_UNCR.dcm",
                    "mlut_18.dcm", "JPEG2000_UNC.dcm", "vlut_04.dcm", "6154", "MR-SIEMENS-DICOM-WithOverlays.dcm"]


@pytest.mark.parametrize("syntax", JPEG_LOSSLESS, ids=["process14", "sv1"])
@pytest.mark.parametrize("name", REENCODE_SOURCES)
def test_fast_path_equals_gdcm_on_reencoded_test_files(name, syntax, tmp_path, monkeypatch):
    source = pydicom.dcmread(shipped_file(name))
    original = reference_hu(source)
    encode_jpeg_lossless(source, syntax)
    path = save(source, tmp_path / "reencoded.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    calls = _count_fast_decodes(monkeypatch)
    hu = read_hu(path)
    assert calls["n"] == 1
    np.testing.assert_array_equal(hu, original)  # the encoder is lossless
    np.testing.assert_array_equal(hu, reference_hu(ds, "gdcm"))


SYNTHETIC_KINDS = [(12, False), (12, True), (16, True)]


@pytest.mark.parametrize(("bits_stored", "signed"), SYNTHETIC_KINDS, ids=["12bit-unsigned", "12bit-signed", "16bit-signed"])
def test_fast_path_on_synthetic_512_ct_slice(bits_stored, signed, tmp_path, monkeypatch):
    ds = synthetic_ct_slice(512, z=-40.0, bits_stored=bits_stored, signed=signed, seed=3)
    stored = ds.pixel_array.copy()
    expected = reference_hu(ds)
    encode_jpeg_lossless(ds)
    path = save(ds, tmp_path / "1.dcm")
    calls = _count_fast_decodes(monkeypatch)
    hu = read_hu(path)
    assert calls["n"] == 1
    np.testing.assert_array_equal(hu, expected)
    written = pydicom.dcmread(path)
    assert written.file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1
    np.testing.assert_array_equal(pixel_array(written, decoding_plugin="gdcm"), stored)
    np.testing.assert_array_equal(hu, reference_hu(written, "gdcm"))
    # CT-like: air at -1024, bone up to about 2000 HU; the padding outside the field of view (signed
    # images store -2000 there) reads as air
    padded = stored == -2000
    assert padded.any() == signed and (hu[padded] == -1000).all()
    inside = hu[~padded]
    assert inside.min() == -1024 and 1800 < inside.max() <= 2000
    assert np.median(inside) > -1000  # a body fills the field of view, not just air
    assert (stored < 0).any() == signed


@pytest.fixture
def jpeg_lossless_file(tmp_path) -> Path:
    ds = synthetic_ct_slice(128, z=5.0, bits_stored=16, signed=True, seed=1)
    encode_jpeg_lossless(ds)
    return save(ds, tmp_path / "7.dcm")


def test_fallback_when_imagecodecs_is_missing(jpeg_lossless_file, monkeypatch):
    expected = reference_hu(pydicom.dcmread(jpeg_lossless_file), "gdcm")
    monkeypatch.setattr(dicom, "_jpeg8_decode", None)
    np.testing.assert_array_equal(read_hu(jpeg_lossless_file), expected)
    np.testing.assert_array_equal(read_hu(shipped_file("bad_sequence.dcm")),
                                  reference_hu(pydicom.dcmread(shipped_file("bad_sequence.dcm")), "gdcm"))


@pytest.mark.parametrize("failure", ["raises", "wrong_shape", "wrong_dtype"])
def test_fallback_when_imagecodecs_fails(failure, jpeg_lossless_file, monkeypatch, caplog):
    expected = reference_hu(pydicom.dcmread(jpeg_lossless_file), "gdcm")

    def broken_decode(data: bytes, **kwargs) -> np.ndarray:
        if failure == "raises":
            raise RuntimeError("simulated libjpeg-turbo failure")
        return np.zeros((3, 3), np.uint16) if failure == "wrong_shape" else np.zeros((128, 128), np.uint8)

    monkeypatch.setattr(dicom, "_jpeg8_decode", broken_decode)
    monkeypatch.setattr(dicom, "_warned_fallback", False)
    with caplog.at_level(logging.DEBUG, logger="vit_spine.dicom"):
        hu = read_hu(jpeg_lossless_file)
    np.testing.assert_array_equal(hu, expected)
    assert "using pydicom's decoders" in caplog.text and str(jpeg_lossless_file) in caplog.text


def test_results_never_share_the_per_thread_decode_buffer(tmp_path):
    paths, expected = [], []
    for seed in (1, 2):
        ds = synthetic_ct_slice(64, z=float(seed), bits_stored=12, seed=seed)
        expected.append(apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
        encode_jpeg_lossless(ds)
        paths.append(save(ds, tmp_path / f"{seed}.dcm"))
    first, second = read_hu(paths[0]), read_hu(paths[1])
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, expected[0])  # not overwritten by the second decode
    np.testing.assert_array_equal(second, expected[1])
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(read_hu, paths * 20))
    for i, hu in enumerate(results):
        np.testing.assert_array_equal(hu, expected[i % 2])


def test_out_is_reused_only_when_it_fits(jpeg_lossless_file):
    expected = read_hu(jpeg_lossless_file)
    out = np.zeros_like(expected)
    assert read_hu(jpeg_lossless_file, out=out) is out
    read_only = np.zeros_like(expected)
    read_only.flags.writeable = False
    for misfit in (np.zeros((3, 3), np.float32), np.zeros(expected.shape, np.float64), read_only):
        hu = read_hu(jpeg_lossless_file, out=misfit)
        assert hu is not misfit
        np.testing.assert_array_equal(hu, expected)


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm",
                                  "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm"])
def test_multi_frame_gives_every_frame_as_pydicom_does(name):
    path = shipped_file(name)
    ds = pydicom.dcmread(path)
    expected = reference_hu(ds)
    assert expected.shape == (10, 64, 64)
    np.testing.assert_array_equal(read_hu(path), expected)
    for frame in (0, 3, 9):
        np.testing.assert_array_equal(read_hu(path, frame=frame), expected[frame])
    frames = [(index, hu.copy()) for index, hu in iter_hu(path)]
    assert [index for index, _ in frames] == list(range(10))
    np.testing.assert_array_equal(np.stack([hu for _, hu in frames]), expected)
    with pytest.raises(DicomReadError, match="frame 10 requested, the file has 10 frame"):
        read_hu(path, frame=10)
    headers = read_headers(path)
    assert [h.frame for h in headers] == list(range(10)) and {h.number_of_frames for h in headers} == {10}
    assert {h.position for h in headers} == {None}  # emri_small has no positions at all
    assert {h.modality for h in headers} == {"MR"}


def test_enhanced_ct_frames_take_position_and_rescale_from_the_functional_groups():
    path = shipped_file("eCT_Supplemental.dcm")  # a real Enhanced CT: 2 frames, 512 x 512
    ds = pydicom.dcmread(path)
    stored = pixel_array(ds)
    hu = read_hu(path)
    # the rescale lives in the shared functional group (intercept -1024), not at the top level
    assert "RescaleIntercept" not in ds
    np.testing.assert_array_equal(hu, stored.astype(np.float32) - 1024.0)
    headers = read_headers(path)
    assert [h.position for h in headers] == [(99.5, -301.5, -159.0), (99.5, -301.5, -149.0)]
    assert {h.orientation for h in headers} == {(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)}
    assert {(h.pixel_spacing, h.pixel_spacing_column, h.slice_thickness) for h in headers} == {(0.388672, 0.388672, 10.0)}
    assert {(h.rescale_slope, h.rescale_intercept) for h in headers} == {(1.0, -1024.0)}
    assert {h.sop_class_uid for h in headers} == {uid.EnhancedCTImageStorage}


@pytest.mark.parametrize(("signed", "padding", "vr"), [(True, -2000, "SS"), (False, 63536, "US"), (True, 63536, "US")])
def test_pixel_padding_value_becomes_air_signed_or_unsigned(signed, padding, vr, tmp_path):
    """63536 unsigned would otherwise read as +62,512 HU, bone-white outside the field of view; scanners
    that write -2000 as US 63536 in a signed image mean the same padding."""
    from vit_spine.phantom import SeriesSpec, write_series

    spec = SeriesSpec(num_slices=1, signed=signed, intercept=0.0 if signed else -1024.0, padding=padding, padding_vr=vr)
    written = write_series(tmp_path, spec, "1.2.3.4")
    hu = read_hu(written.paths[0])
    yy, xx = np.ogrid[:64, :64]
    outside = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 > 32**2
    assert outside.sum() > 100 and (hu[outside] == -1000.0).all()
    np.testing.assert_array_equal(hu[~outside], written.hu[0][~outside])
    raw = apply_modality_lut(pixel_array(pydicom.dcmread(written.paths[0])), pydicom.dcmread(written.paths[0]))
    assert raw[outside].max() > 60000 if not signed else raw[outside].min() <= -2000  # what padding was before


def test_pixel_padding_range_limit_pads_the_whole_range(tmp_path):
    from vit_spine.phantom import SeriesSpec, write_series

    written = write_series(tmp_path, SeriesSpec(num_slices=1), "1.2.3.4")
    ds = pydicom.dcmread(written.paths[0])
    ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = -1010, -990  # every stored value in [-1010, -990]
    ds["PixelPaddingValue"].VR = ds["PixelPaddingRangeLimit"].VR = "SS"
    path = save(ds, tmp_path / "range.dcm")
    stored = pixel_array(ds)
    hu = read_hu(path)
    in_range = (stored >= -1010) & (stored <= -990)
    assert in_range.any() and (hu[in_range] == -1000.0).all()
    np.testing.assert_array_equal(hu[~in_range], stored[~in_range].astype(np.float32))


def test_a_file_without_preamble_is_read_and_junk_is_not_dicom(tmp_path):
    from vit_spine.phantom import IMPLICIT_LE, SeriesSpec, write_series

    for syntax in (IMPLICIT_LE, "1.2.840.10008.1.2.1"):
        written = write_series(tmp_path / syntax, SeriesSpec(num_slices=1, preamble=False, transfer_syntax=syntax), "1.2.3.4")
        raw = written.paths[0].read_bytes()
        assert raw[128:132] != b"DICM" and raw[:2] == b"\x08\x00"  # starts with (0008,0005), no preamble
        np.testing.assert_array_equal(read_hu(written.paths[0]), written.hu[0])
        assert read_header(written.paths[0]).position == pytest.approx(tuple(written.positions[0]))
    (tmp_path / "notes.txt").write_text("patient notes, not an image")
    (tmp_path / "9999.dcm").write_bytes(np.random.default_rng(1).bytes(3000))
    for name in ("notes.txt", "9999.dcm"):
        with pytest.raises(NotDicomError, match="not a DICOM file"):
            read_headers(tmp_path / name)
        with pytest.raises(NotDicomError):
            read_hu(tmp_path / name)


def test_color_is_refused_clearly():
    with pytest.raises(DicomReadError, match="not grayscale \\(RGB"):
        read_hu(shipped_file("SC_rgb.dcm"))


def test_read_header_fields(tmp_path):
    ds = synthetic_ct_slice(64, z=-12.5, bits_stored=12, seed=2, instance_number=37)
    encode_jpeg_lossless(ds)
    path = save(ds, tmp_path / "37.dcm")
    header = read_header(path)
    assert header.path == str(path)
    assert header.study_uid == ds.StudyInstanceUID and header.sop_uid == ds.SOPInstanceUID
    assert header.slice_number == 37
    assert header.z == -12.5
    assert header.transfer_syntax == uid.JPEGLosslessSV1
    assert (header.rows, header.columns) == (64, 64)
    assert header.pixel_spacing == pytest.approx(250 / 64)
    assert header.slice_thickness == 1.0
    assert (header.rescale_slope, header.rescale_intercept) == (1.0, -1024.0)
    assert (header.bits_stored, header.pixel_representation) == (12, 0)
    assert (header.photometric, header.modality) == ("MONOCHROME2", "CT")


def test_read_header_on_real_ct_and_without_pixel_data(tmp_path):
    header = read_header(shipped_file("bad_sequence.dcm"))
    assert header.slice_number is None  # the file stem is not a number
    assert (header.modality, header.bits_stored, header.rescale_intercept) == ("CT", 12, -1024.0)
    assert header.transfer_syntax == uid.JPEGLosslessSV1 and header.rows == 512
    # The header read never touches the pixel data, so a file cut inside it still scans ...
    raw = shipped_file("CT_small.dcm").read_bytes()
    cut = tmp_path / "5.dcm"
    cut.write_bytes(raw[: len(raw) - 1000])
    assert read_header(cut).z == pytest.approx(float(pydicom.dcmread(shipped_file("CT_small.dcm")).ImagePositionPatient[2]))
    # ... while decoding it fails with the file's name.
    with pytest.raises(DicomReadError, match="5.dcm"):
        read_hu(cut)


def test_read_header_defaults_when_rescale_is_absent():
    header = read_header(shipped_file("MR_small.dcm"))
    assert (header.rescale_slope, header.rescale_intercept) == (1.0, 0.0)
    assert header.modality == "MR" and header.pixel_representation == 1


def _corrupt_files(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(7)
    files = {"random": rng.bytes(20000), "random_after_preamble": bytes(128) + b"DICM" + rng.bytes(5000), "empty": b""}
    jpeg = shipped_file("bad_sequence.dcm").read_bytes()
    native = shipped_file("CT_small.dcm").read_bytes()
    for fraction in (0.2, 0.5, 0.99):
        files[f"jpeg_cut_{fraction}"] = jpeg[: int(len(jpeg) * fraction)]
        files[f"native_cut_{fraction}"] = native[: int(len(native) * fraction)]
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.dcm"
        paths[name].write_bytes(data)
    return paths


def test_corrupt_and_truncated_files_raise_dicom_read_error_naming_the_file(tmp_path):
    for name, path in _corrupt_files(tmp_path).items():
        with pytest.raises(DicomReadError) as raised, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_hu(path)
        assert str(path) in str(raised.value), name
        assert raised.value.reason, name


def test_truncated_jpeg_frame_is_an_error_not_a_gray_image(tmp_path, monkeypatch):
    """pylibjpeg and libjpeg-turbo both return an image for a cut JPEG stream; read_hu must not."""
    ds = pydicom.dcmread(shipped_file("bad_sequence.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    assert pixel_array(ds, decoding_plugin="pylibjpeg").shape == (512, 512)  # no error
    assert dicom._jpeg8_decode(frame[: len(frame) // 2]).shape == (512, 512)  # no error either
    path = save(ds, tmp_path / "cut_frame.dcm")
    with pytest.raises(DicomReadError, match="no end-of-image marker"):
        read_hu(path)
    monkeypatch.setattr(dicom, "_jpeg8_decode", None)
    with pytest.raises(DicomReadError, match="no end-of-image marker"):
        read_hu(path)


def test_missing_file_directory_and_no_pixel_data(tmp_path):
    for path, reason in [(tmp_path / "absent.dcm", "cannot open"), (tmp_path, "cannot open"),
                         (shipped_file("rtplan.dcm"), "no Pixel Data")]:
        with pytest.raises(DicomReadError, match=reason) as raised:
            read_hu(path)
        assert str(path) in str(raised.value)


def test_truncated_native_file_names_the_truncation(tmp_path):
    raw = shipped_file("MR_small.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(raw[:-2000])  # inside the 8 KiB of pixel data
    with pytest.raises(DicomReadError, match="less than expected|truncated") as raised, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_hu(path)
    assert "cut.dcm" in str(raised.value)


def test_dicom_read_error_pickles_for_worker_processes():
    error = pickle.loads(pickle.dumps(DicomReadError("/data/1.dcm", "not a DICOM file")))
    assert (error.path, error.reason, str(error)) == ("/data/1.dcm", "not a DICOM file", "/data/1.dcm: not a DICOM file")


def test_encode_jpeg_lossless_refuses_what_gdcm_would_abort_on():
    ds = pydicom.dcmread(shipped_file("liver_1frame.dcm"))  # 1 bit allocated
    with pytest.raises(ValueError, match="8 or 16 bits allocated"):
        encode_jpeg_lossless(ds)
    with pytest.raises(ValueError, match="one frame"):
        encode_jpeg_lossless(pydicom.dcmread(shipped_file("emri_small.dcm")))


def test_decode_bench_runs_and_reports_ratios(tmp_path, capsys):
    assert decode_bench.main([str(tmp_path / "data"), "--make_sample", "3", "--repeats", "1"]) == 0
    shutil.copy(shipped_file("MR_small_RLE.dcm"), tmp_path / "data" / "rle.dcm")  # gdcm cannot decode RLE
    assert decode_bench.main([str(tmp_path / "data"), "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "read_hu / pydicom+gdcm" in out and "read_hu / pydicom+pylibjpeg" in out
    assert "JPEG Lossless" in out and "RLE Lossless" in out
    assert "read_hu output identical to pydicom+gdcm on 3/3 files" in out
    assert "pydicom+gdcm failed on 1 files" in out
    assert "libjpeg-turbo alone / pydicom+gdcm" in out and "(3 JPEG Lossless files" in out  # not the RLE one
    assert decode_bench.main([str(tmp_path / "data"), "--limit", "1", "--repeats", "1"]) == 0
    assert "1 of 4 .dcm files" in capsys.readouterr().out


def test_decode_bench_says_when_there_is_nothing_to_time(tmp_path, capsys):
    from vit_spine import cli

    assert cli.main(["bench", "decode", str(tmp_path)]) == 2  # nothing to time is an input error
    assert capsys.readouterr().err.startswith(f"vit-spine bench decode: error: no .dcm files under {tmp_path}")


def _count_fast_decodes(monkeypatch) -> dict[str, int]:
    calls = {"n": 0}
    real = dicom._jpeg8_decode
    assert real is not None, "imagecodecs is installed in the dev environment"

    def counting(data: bytes, **kwargs) -> np.ndarray:
        calls["n"] += 1
        return real(data, **kwargs)

    monkeypatch.setattr(dicom, "_jpeg8_decode", counting)
    return calls


def _jpeg_lossless_dataset(stream: bytes, signed: bool) -> pydicom.Dataset:
    ds = synthetic_ct_slice(64, bits_stored=12, signed=signed, seed=5)
    if "PixelPaddingValue" in ds:  # random test values may hit it; these tests are about the bits
        del ds.PixelPaddingValue
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid.JPEGLosslessSV1
    return ds


@pytest.mark.parametrize("case", ["signed_precision_12", "signed_precision_16_not_extended", "unsigned_garbage_high_bits"])
def test_fast_path_sign_extends_and_masks_like_gdcm(case, tmp_path, monkeypatch):
    """Bits Stored 12 in a 16-bit container, encoded the ways scanners do (libjpeg-turbo here):
    12-bit precision two's complement, or 16-bit with the upper 4 bits not matching the value."""
    import imagecodecs

    rng = np.random.default_rng(11)
    signed = case.startswith("signed")
    values = rng.integers(-2048 if signed else 0, 2048 if signed else 4096, (64, 64))
    bits = (values & 0xFFF).astype(np.uint16)
    if case == "unsigned_garbage_high_bits":
        bits |= (rng.integers(0, 16, bits.shape) << 12).astype(np.uint16)
    stream = imagecodecs.jpeg8_encode(bits, lossless=True, predictor=1, bitspersample=12 if case == "signed_precision_12" else 16)
    path = save(_jpeg_lossless_dataset(stream, signed), tmp_path / "1.dcm")
    ds = pydicom.dcmread(path)
    expected = apply_modality_lut(values, ds).astype(np.float32)
    np.testing.assert_array_equal(reference_hu(ds, "gdcm"), expected)
    calls = _count_fast_decodes(monkeypatch)
    np.testing.assert_array_equal(read_hu(path), expected)
    assert calls["n"] == 1


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.uint32, np.int32])
@pytest.mark.parametrize(("slope", "intercept"),
                         [(1, 0), (1, -1024), (2, -1024), (-1, 32768), (301, -8191), (1, -16777217), (0.5, -1024), (3.774114, 0.000061), (1, 0.5)])
def test_modality_lut_equals_pydicom_float64_result(dtype, slope, intercept):
    info = np.iinfo(dtype)
    stored = np.linspace(info.min, info.max, 4097).round().astype(dtype).reshape(1, -1)
    ds = pydicom.Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ours = dicom._apply_modality_lut(stored.copy(), ds)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, apply_modality_lut(stored, ds).astype(np.float32))


def test_modality_lut_needs_both_slope_and_intercept_like_pydicom():
    stored = np.arange(-5, 5, dtype=np.int16).reshape(2, 5)
    ds = pydicom.Dataset()
    ds.RescaleIntercept = -1024  # without a slope pydicom leaves the values alone
    np.testing.assert_array_equal(dicom._apply_modality_lut(stored, ds), stored.astype(np.float32))
