"""`vit-spine bench decode DIR`: slices/s of `read_hu` vs pydicom+gdcm vs pydicom+pylibjpeg.

All three produce the same thing (float32 HU: decode, then the modality LUT) from the same files,
timed in interleaved repetitions (block by block, the method order rotating) after one untimed
pass that also checks that `read_hu` equals pydicom+gdcm file by file. Rates use each file's
median time over the repetitions; a method that cannot decode a file (gdcm has no RLE) is left out of the comparisons
that involve it, and counted.

On JPEG Lossless files it also times libjpeg-turbo's decode alone (`imagecodecs.jpeg8_decode` on
frames read ahead: no file read, no parse, no modality LUT), interleaved with the others: the
ceiling any reader built on it could reach, printed as its own ratio to pydicom+gdcm.

`--make_sample N` first writes N synthetic 512x512 CT slices, JPEG Lossless SV1 encoded with
gdcm like most RSNA 2022 slices, into DIR/synthetic_ct/, so the benchmark runs anywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut, pixel_array
from tqdm import tqdm

from vit_spine.options import parse_config
from vit_spine.dicom import JPEG_LOSSLESS_SYNTAXES, encode_jpeg_lossless, read_hu

BASELINES = ("pydicom+gdcm", "pydicom+pylibjpeg")
METHODS = ("read_hu", *BASELINES)
FLOOR = "libjpeg-turbo alone"


@dataclass
class DecodeBenchConfig:
    dir: str = field(metadata={"help": "folder searched recursively for .dcm files"})
    limit: int = field(default=200, metadata={"help": "use at most this many files (sorted by path); 0 = all"})
    repeats: int = field(default=5, metadata={"help": "timed passes over the files per method, interleaved"})
    block: int = field(
        default=10, metadata={"help": "files each method decodes back to back before the next method's turn"}
    )
    make_sample: int = field(
        default=0,
        metadata={"help": "first write this many synthetic 512x512 JPEG Lossless CT slices into DIR/synthetic_ct/"},
    )

    def __post_init__(self) -> None:
        if self.limit < 0 or self.make_sample < 0 or self.repeats < 1 or self.block < 1:
            raise ValueError("--limit and --make_sample must be >= 0, --repeats and --block >= 1")


def synthetic_ct_slice(
    size: int = 512,
    z: float = 0.0,
    bits_stored: int = 12,
    signed: bool = False,
    seed: int = 0,
    study_uid: str | None = None,
    instance_number: int = 1,
) -> Dataset:
    """An uncompressed CT-like axial neck slice: air, fat, muscle, trachea, a vertebra, noise.

    HU span -1024 (air) to about 2000 (cortical bone); stored = HU - intercept with slope 1 and
    intercept -1024, as on most scanners. Signed slices mark the outside of the round field of
    view with the padding value -2000 (as Siemens/GE do), so negative stored values occur. A
    12-bit signed slice cannot hold HU + 1024 up to 3024, so it stores HU directly (intercept 0).
    """
    rng = np.random.default_rng([seed, instance_number])
    intercept = 0 if (signed and bits_stored <= 12) else -1024
    hu = _ct_phantom(size, z, rng)
    stored = np.rint(hu).astype(np.int32) - intercept
    if signed:
        radius = np.hypot(*np.meshgrid(np.arange(size) - size / 2 + 0.5, np.arange(size) - size / 2 + 0.5))
        stored[radius > 0.49 * size] = -2000
    low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    stored = np.clip(stored, low, high).astype(np.int16 if signed else np.uint16)

    study_uid = study_uid or uid.generate_uid(entropy_srcs=["vit-spine synthetic ct", str(seed)])
    spacing = 250.0 / size
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = uid.CTImageStorage
    ds.SOPInstanceUID = uid.generate_uid(entropy_srcs=[study_uid, str(instance_number), str(z)])
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = f"synthetic-{seed}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = uid.generate_uid(entropy_srcs=[study_uid, "series"])
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [-125.0, -125.0, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = 1.0
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.set_pixel_data(stored, "MONOCHROME2", bits_stored, generate_instance_uid=False)
    if signed:
        ds.PixelPaddingValue = -2000
    return ds


def _ct_phantom(size: int, z: float, rng: np.random.Generator) -> np.ndarray:
    """HU image of a neck cross-section whose vertebra drifts and changes size along z."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size * 2 - 1  # [-1, 1], y grows posterior

    def inside(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1

    phase = np.sin(z / 9.0)
    hu = np.full((size, size), -1000.0)
    hu[inside(0, 0.05, 0.72, 0.6)] = -100  # subcutaneous fat
    hu[inside(0, 0.05, 0.66, 0.54)] = 45  # muscle and soft tissue
    hu[inside(0, -0.3, 0.09, 0.08)] = -1000  # trachea
    body_x, body_y, body_r = 0.02 * phase, 0.12, 0.17 + 0.02 * phase
    hu[inside(body_x, body_y, body_r, body_r * 0.85)] = 1950  # cortical shell
    hu[inside(body_x, body_y, body_r - 0.025, body_r * 0.85 - 0.025)] = 280  # cancellous bone
    hu[inside(body_x, 0.45, 0.05, 0.16)] = 1100  # posterior elements
    hu[inside(body_x, 0.33, 0.08, 0.07)] = 15  # spinal canal
    hu += rng.normal(0.0, 12.0, hu.shape)  # quantum noise, about what a neck CT shows
    return np.clip(hu, -1024, 2000)  # scanners clip air at -1024


def write_sample_study(folder: Path, count: int, size: int = 512, seed: int = 0) -> list[Path]:
    """Write `count` synthetic JPEG Lossless SV1 CT slices as folder/1.dcm ... (z 2.5 mm apart)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in tqdm(range(1, count + 1), desc="writing synthetic slices", unit="slice"):
        ds = synthetic_ct_slice(size, z=-2.5 * number, seed=seed, instance_number=number)
        encode_jpeg_lossless(ds)
        path = folder / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _read_hu(path: Path) -> np.ndarray:
    return read_hu(path)


def _pydicom_decoder(plugin: str) -> Callable[[Path], np.ndarray]:
    def decode(path: Path) -> np.ndarray:
        ds = pydicom.dcmread(path)
        return apply_modality_lut(pixel_array(ds, decoding_plugin=plugin), ds).astype(np.float32)

    return decode


DECODERS: dict[str, Callable[[Path], np.ndarray]] = {
    "read_hu": _read_hu,
    "pydicom+gdcm": _pydicom_decoder("gdcm"),
    "pydicom+pylibjpeg": _pydicom_decoder("pylibjpeg"),
}


def main(argv: Sequence[str] | None = None) -> int:
    (config,) = parse_config(
        DecodeBenchConfig,
        argv,
        prog="vit-spine bench decode",
        description=__doc__.splitlines()[0],
        positionals=("dir",),
    )
    root = Path(config.dir)
    if config.make_sample:
        write_sample_study(root / "synthetic_ct", config.make_sample)
    paths = sorted(root.rglob("*.dcm")) if root.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"no .dcm files under {root} (nothing to time; --make_sample N writes some)")
    found = len(paths)
    if config.limit:
        paths = paths[: config.limit]
    syntaxes = [_transfer_syntax_name(path) for path in paths]

    outputs_equal, failures = _check_pass(paths)
    decoders = dict(DECODERS)
    frames = _jpeg_lossless_frames(paths)
    if frames:
        decoders[FLOOR] = _decode_frame_alone(frames)
        failures[FLOOR] = {i: "not JPEG Lossless" for i, path in enumerate(paths) if path not in frames}
    times = _time_interleaved(paths, failures, config.repeats, config.block, decoders)

    print(f"\ndecode: {len(paths)} of {found} .dcm files under {root}, {config.repeats} interleaved repeats, per-file medians")
    everything = np.ones(len(paths), dtype=bool)
    for baseline in BASELINES:
        ratio, count = _ratio(times["read_hu"], times[baseline], everything)
        print(f"read_hu / {baseline:<18} {_fmt_ratio(ratio)}  ({count} files)")

    groups = sorted(set(syntaxes))
    print(f"\n{'transfer syntax':<56} {'files':>5} {'vs gdcm':>8} {'vs pylibjpeg':>12}   slices/s: read_hu, gdcm, pylibjpeg")
    for group in [*groups, "all"]:
        mask = everything if group == "all" else np.array([s == group for s in syntaxes])
        vs_gdcm, _ = _ratio(times["read_hu"], times["pydicom+gdcm"], mask)
        vs_libjpeg, _ = _ratio(times["read_hu"], times["pydicom+pylibjpeg"], mask)
        rates = ", ".join(_fmt_rate(_rate(times[name], mask)) for name in METHODS)
        print(f"{group[:56]:<56} {int(mask.sum()):>5} {_fmt_ratio(vs_gdcm):>8} {_fmt_ratio(vs_libjpeg):>12}   {rates}")

    if FLOOR in times:
        ceiling, count = _ratio(times[FLOOR], times["pydicom+gdcm"], everything)
        rate = _fmt_rate(_rate(times[FLOOR], np.isfinite(times[FLOOR][0])))
        print(
            f"{FLOOR} / pydicom+gdcm {_fmt_ratio(ceiling)}  ({count} JPEG Lossless files, {rate} slices/s; "
            "frames read ahead, no parse, no LUT: the ceiling for any reader built on it)"
        )

    checked = len(paths) - len(failures["read_hu"] | failures["pydicom+gdcm"])
    print(f"\nread_hu output identical to pydicom+gdcm on {outputs_equal}/{checked} files both decode")
    for name in METHODS:
        if failures[name]:
            reasons = sorted({reason for reason in failures[name].values()})
            print(f"{name} failed on {len(failures[name])} files: {'; '.join(reasons)[:300]}")
    return 0


def _jpeg_lossless_frames(paths: list[Path]) -> dict[Path, tuple[bytes, np.ndarray]]:
    """Each single-frame JPEG Lossless file's JPEG stream and an output buffer to decode it into
    (one per shape and dtype, reused as read_hu reuses its own), for the files libjpeg-turbo decodes
    (read_hu falls back to pydicom's decoders on the others); empty without imagecodecs."""
    try:
        from imagecodecs import jpeg8_decode
    except ImportError:
        return {}
    buffers: dict[tuple[int, int, str], np.ndarray] = {}
    frames = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
            if ds.file_meta.TransferSyntaxUID not in JPEG_LOSSLESS_SYNTAXES or int(ds.get("NumberOfFrames") or 1) != 1:
                continue
            key = (int(ds.Rows), int(ds.Columns), f"{'i' if ds.PixelRepresentation else 'u'}{ds.BitsAllocated // 8}")
            buffer = buffers.setdefault(key, np.empty(key[:2], key[2]))
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            jpeg8_decode(frame, out=buffer)
            frames[path] = (frame, buffer)
        except Exception:  # unreadable (the check pass reports it) or not for libjpeg-turbo: not timed
            continue
    return frames


def _decode_frame_alone(frames: dict[Path, tuple[bytes, np.ndarray]]) -> Callable[[Path], np.ndarray]:
    from imagecodecs import jpeg8_decode

    def decode(path: Path) -> np.ndarray:
        frame, buffer = frames[path]
        return jpeg8_decode(frame, out=buffer)

    return decode


def _time_interleaved(
    paths: list[Path],
    failures: dict[str, dict[int, str]],
    repeats: int,
    block: int,
    decoders: dict[str, Callable[[Path], np.ndarray]],
) -> dict[str, np.ndarray]:
    """Seconds per (repeat, file) for each method; NaN where the method failed in the check pass.

    Each method decodes a block of files back to back, as it would in a pipeline (allocator and
    caches in their steady state); the methods take turns block by block, in rotating order, so
    that load from other processes on a shared machine falls on all of them alike.
    """
    names = tuple(decoders)
    times = {name: np.full((repeats, len(paths)), np.nan) for name in names}
    blocks = [range(start, min(start + block, len(paths))) for start in range(0, len(paths), block)]
    for repeat in tqdm(range(repeats), desc="timing", unit="pass"):
        for number, indices in enumerate(blocks):
            turn = (repeat + number) % len(names)
            for name in names[turn:] + names[:turn]:
                for i in indices:
                    if i in failures[name]:
                        continue
                    start = time.perf_counter()
                    decoders[name](paths[i])
                    times[name][repeat, i] = time.perf_counter() - start
    return times


def _check_pass(paths: list[Path]) -> tuple[int, dict[str, dict[int, str]]]:
    """Untimed warm-up: decode every file with every method; compare read_hu with gdcm."""
    failures: dict[str, dict[int, str]] = {name: {} for name in METHODS}
    equal = 0
    for i, path in enumerate(tqdm(paths, desc="checking", unit="file")):
        results = {}
        for name in METHODS:
            try:
                results[name] = DECODERS[name](path)
            except Exception as error:
                failures[name][i] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        if "read_hu" in results and "pydicom+gdcm" in results:
            equal += bool(np.array_equal(results["read_hu"], results["pydicom+gdcm"], equal_nan=True))
    return equal, failures


def _transfer_syntax_name(path: Path) -> str:
    try:
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        return f"{syntax} {syntax.name}"
    except Exception as error:
        return f"unreadable ({type(error).__name__})"


def _rate(seconds: np.ndarray, mask: np.ndarray) -> float:
    """Slices per second over the files in `mask` that the method decoded (per-file medians)."""
    usable = mask & np.isfinite(seconds[0])
    if not usable.any():
        return float("nan")
    return usable.sum() / np.median(seconds[:, usable], axis=0).sum()


def _ratio(ours: np.ndarray, baseline: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Speed-up of ours over baseline on the files in `mask` that both decoded."""
    both = mask & np.isfinite(ours[0]) & np.isfinite(baseline[0])
    if not both.any():
        return float("nan"), 0
    return _rate(ours, both) / _rate(baseline, both), int(both.sum())


def _fmt_ratio(ratio: float) -> str:
    return "n/a" if np.isnan(ratio) else f"{ratio:.2f}x"


def _fmt_rate(rate: float) -> str:
    return "n/a" if np.isnan(rate) else f"{rate:.0f}"
