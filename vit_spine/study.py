"""From the files of one study folder to one axial CT volume: the rule every stage uses.

`scan`, `chunk` (through the slice table) and `predict` all call `assemble` on the headers of a
study's files, so a study becomes the same volume wherever it is read. The rule, in order:

1. Files are found by content at any depth below the study folder, whatever their names
   (`PATIENT/STUDY/SERIES/IM0001`, extension-less files, SOP-UID names, `<n>.dcm`): a file is DICOM
   when it has the `DICM` marker or starts like a dataset without the preamble (`vit_spine.dicom`).
2. Every frame is a candidate slice (an Enhanced CT file holds the whole stack). A slice is left out,
   with its reason, when it is: not DICOM, unreadable, not an image (no Pixel Data: dose or structured
   reports), a Secondary Capture or a dose screen, a localizer (ImageType LOCALIZER / SCOUT / TOPOGRAM /
   SURVIEW), not grayscale (colour), or not CT.
3. The rest is grouped into stacks: SeriesInstanceUID, then orientation, image size and pixel spacing
   inside a series. A stack whose slice normal (ImageOrientationPatient row x column) is more than
   `MAX_TILT_DEGREES` from the patient's head-foot axis is a reformat (coronal, sagittal) and left out.
4. Of the axial stacks one is chosen (`choose_stack`): among the stacks with at least half the slices
   of the largest, the thinnest slices (SliceThickness, else the measured spacing; to 0.1 mm), then the
   most slices, then a bone kernel, then the SeriesInstanceUID. The others are left out as
   `other_series`: two series are never mixed.
5. Slices are ordered by their position along the slice normal, pointed towards the head
   (normal . ImagePositionPatient, so an oblique stack with in-plane offsets keeps its order).
   When no slice has a position, InstanceNumber (then the frame, then the file name) orders them and a
   note says so; a slice without a position in a stack where others have one is left out. Two slices
   at the same position: a slice with whole pixel data before a truncated one, then the first by
   (InstanceNumber, file, frame) is kept; the other is left out naming it.

Nothing is dropped silently: every slice left out is in `Assembly.left_out` with its reason.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vit_spine.dicom import DicomReadError, NotDicomError, SliceHeader, iter_hu, read_headers, read_hu

MAX_TILT_DEGREES = 30.0  # CT gantries tilt at most about 30 degrees; beyond that a stack is a reformat
SAME_POSITION_MM = 0.01  # two slices closer than this along the normal are at the same position
PARTIAL_STACK = 0.5  # a stack with fewer than this share of the largest stack's slices is never chosen
LOCALIZER_TYPES = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW")
DOSE_TYPES = ("SCREEN SAVE", "DOSE", "DOSE_INFO", "SCREENSHOT")
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture and its multi-frame variants
# Kernel names that mean a sharp (bone) reconstruction: GE BONE/BONEPLUS, Philips/Canon "sharp"
# names, Siemens B/Br/Hr/Ur kernels of sharpness 60 and above (B60f, Br64, Hr68...).
BONE_KERNEL = re.compile(r"BONE|SHARP|^(B|BR|HR|UR|QR)[6-9]\d", re.IGNORECASE)

# What each leave-out reason means (README: "What counts as a study").
REASONS = {
    "not_dicom": "the file is not DICOM (no DICM marker and no dataset at its start)",
    "unreadable": "a DICOM file whose header cannot be parsed",
    "non_image": "a DICOM object without pixel data (dose report, structured report, presentation state)",
    "secondary_capture": "a Secondary Capture image (screenshots, dose screens, annotated key images)",
    "dose_report": "an image of a dose report or screen (ImageType SCREEN SAVE / DOSE)",
    "localizer": "a localizer / scout / topogram (ImageType LOCALIZER, SCOUT, TOPOGRAM or SURVIEW)",
    "colour": "not a grayscale image (RGB, palette colour, YBR)",
    "not_ct": "another modality than CT (MR, PT, SEG, ...)",
    "not_axial": f"the stack's slice normal is more than {MAX_TILT_DEGREES:g} degrees from the head-foot axis "
                 "(a coronal or sagittal reformat)",
    "no_position": "no ImagePositionPatient, in a stack whose other slices have one",
    "duplicate_position": "at the same position as another slice of the chosen stack, which was kept",
    "other_series": "an axial stack that was not chosen (another one is thinner, longer or a bone kernel)",
}


@dataclass
class FileRead:
    """What reading one file's header gave: its frames' headers, or why there are none."""

    path: str
    headers: list[SliceHeader] = field(default_factory=list)
    error: str = ""  # the reason the header could not be read ("" when it could)
    not_dicom: bool = False


@dataclass
class LeftOut:
    """One file or frame that is not part of the volume, and why (`kind` is a key of `REASONS`)."""

    path: str
    frame: int | None  # None: the whole file
    kind: str
    detail: str

    @property
    def reason(self) -> str:
        return f"left out ({self.kind}): {self.detail}"


@dataclass
class StackSummary:
    """One candidate stack, as reported."""

    series_uid: str
    description: str
    kernel: str
    num_slices: int
    thickness_mm: float | None
    plane: str  # axial | coronal | sagittal | oblique | unknown

    def describe(self) -> str:
        thickness = "?" if self.thickness_mm is None else f"{self.thickness_mm:g} mm"
        extra = ", ".join(p for p in (self.description, f"kernel {self.kernel}" if self.kernel else "") if p)
        return f"series {self.series_uid or '(no SeriesInstanceUID)'} ({self.num_slices} slices, {thickness}" + (
            f", {extra})" if extra else ")"
        )


@dataclass
class Assembly:
    """One study's volume: the chosen slices in order, and everything else with its reason."""

    slices: list[SliceHeader] = field(default_factory=list)  # ordered along the normal, towards the head
    positions: list[float | None] = field(default_factory=list)  # mm along the normal (None: no positions)
    left_out: list[LeftOut] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the volume was made, when it is worth saying
    chosen: StackSummary | None = None
    others: list[StackSummary] = field(default_factory=list)  # axial stacks not chosen
    error: str = ""  # why no volume could be assembled ("" when one was)

    @property
    def ok(self) -> bool:
        return not self.error


# ---------------------------------------------------------------- reading a folder


def find_files(folder: str | Path) -> list[Path]:
    """Every regular file at any depth below `folder`, in a stable order (sorted by relative path)."""
    folder = Path(folder)
    return sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())


def read_file(path: str | Path) -> FileRead:
    """The headers of one file; never raises (a bad file is reported, not fatal). Picklable."""
    try:
        return FileRead(str(path), headers=read_headers(path))
    except NotDicomError as error:
        return FileRead(str(path), error=error.reason, not_dicom=True)
    except DicomReadError as error:
        return FileRead(str(path), error=error.reason)


def assemble_folder(folder: str | Path) -> Assembly:
    """`assemble` of every file below `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return Assembly(error=f"{folder}: not a folder")
    files = find_files(folder)
    if not files:
        return Assembly(error=f"{folder}: the folder holds no file")
    return assemble([read_file(path) for path in files])


# ---------------------------------------------------------------- the rule


def assemble(reads: Iterable[FileRead]) -> Assembly:
    """The volume of one study from its files' headers (see the module docstring for the rule)."""
    assembly = Assembly()
    candidates: list[SliceHeader] = []
    num_files = 0
    for read in reads:
        num_files += 1
        if read.not_dicom:
            assembly.left_out.append(LeftOut(read.path, None, "not_dicom", read.error))
        elif read.error:
            assembly.left_out.append(LeftOut(read.path, None, "unreadable", read.error))
        for header in read.headers:
            kind_detail = leave_out_reason(header)
            if kind_detail is None:
                candidates.append(header)
            else:
                assembly.left_out.append(LeftOut(header.path, _frame_of(header), *kind_detail))
    stacks = [s for s in group_stacks(candidates) if _axial_or_left_out(s, assembly)]
    if not stacks:
        assembly.error = _no_volume_reason(assembly, num_files)
        return assembly
    summaries = {id(stack): summarize(stack) for stack in stacks}
    chosen = choose_stack(stacks, summaries)
    assembly.chosen = summaries[id(chosen)]
    for stack in stacks:
        if stack is chosen:
            continue
        assembly.others.append(summaries[id(stack)])
        detail = f"{summaries[id(stack)].describe()}; chose {assembly.chosen.describe()}"
        assembly.left_out += [LeftOut(h.path, _frame_of(h), "other_series", detail) for h in stack]
    order_stack(chosen, assembly)
    return assembly


def leave_out_reason(header: SliceHeader) -> tuple[str, str] | None:
    """(kind, detail) when this frame cannot be a slice of a CT volume whatever the rest of the study holds."""
    if not header.has_pixel_data:
        return "non_image", f"no Pixel Data (SOP Class {_sop_class_name(header.sop_class_uid)})"
    if header.sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX):
        return "secondary_capture", f"SOP Class {_sop_class_name(header.sop_class_uid)}"
    localizer = [t for t in header.image_type if t in LOCALIZER_TYPES]
    if localizer:
        return "localizer", f"ImageType {'/'.join(header.image_type)}"
    if any(t in DOSE_TYPES for t in header.image_type):
        return "dose_report", f"ImageType {'/'.join(header.image_type)}"
    if header.samples_per_pixel != 1 or header.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return "colour", f"{header.photometric or 'no PhotometricInterpretation'}, {header.samples_per_pixel} sample(s) per pixel"
    if header.modality and header.modality != "CT":
        return "not_ct", f"Modality {header.modality}"
    if header.rows < 1 or header.columns < 1:
        return "non_image", "no Rows/Columns"
    return None


def group_stacks(headers: Sequence[SliceHeader]) -> list[list[SliceHeader]]:
    """Slices grouped by series, then by orientation, image size and pixel spacing; in first-seen order."""
    groups: dict[tuple, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        orientation = None if header.orientation is None else tuple(round(v, 3) for v in header.orientation)
        spacing = tuple(None if s is None else round(s, 4) for s in (header.pixel_spacing, header.pixel_spacing_column))
        groups[(header.series_uid, orientation, header.rows, header.columns, spacing)].append(header)
    return list(groups.values())


def slice_normal(orientation: Sequence[float] | None) -> np.ndarray:
    """Unit normal of ImageOrientationPatient (row x column), pointed towards the head (+z);
    the axial normal (0, 0, 1) when the orientation is unknown."""
    if orientation is None:
        return np.array([0.0, 0.0, 1.0])
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    normal = np.cross(row, column)
    length = np.linalg.norm(normal)
    if length < 1e-6:
        return np.array([0.0, 0.0, 1.0])
    normal /= length
    return -normal if normal[2] < 0 else normal


def tilt_degrees(normal: np.ndarray) -> float:
    """Angle between the slice normal and the head-foot axis."""
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])))))


def plane_name(normal: np.ndarray) -> str:
    """axial within MAX_TILT_DEGREES of the head-foot axis; sagittal or coronal within that of the
    left-right or front-back axis; oblique otherwise."""
    if tilt_degrees(normal) <= MAX_TILT_DEGREES:
        return "axial"
    axis = int(np.argmax(np.abs(normal)))
    near_axis = abs(float(normal[axis])) >= math.cos(math.radians(MAX_TILT_DEGREES))
    return ("sagittal", "coronal", "axial")[axis] if near_axis else "oblique"


def _axial_or_left_out(stack: list[SliceHeader], assembly: Assembly) -> bool:
    if stack[0].orientation is None:
        return True  # no orientation: taken as axial (the position order still holds)
    normal = slice_normal(stack[0].orientation)
    tilt = tilt_degrees(normal)
    if tilt <= MAX_TILT_DEGREES:
        return True
    detail = f"{summarize(stack).describe()}: {plane_name(normal)}, slice normal {tilt:.0f} degrees from the head-foot axis"
    assembly.left_out += [LeftOut(h.path, _frame_of(h), "not_axial", detail) for h in stack]
    return False


def summarize(stack: list[SliceHeader]) -> StackSummary:
    first = stack[0]
    return StackSummary(
        series_uid=first.series_uid,
        description=first.series_description,
        kernel=first.convolution_kernel,
        num_slices=len(stack),
        thickness_mm=stack_thickness(stack),
        plane="unknown" if first.orientation is None else plane_name(slice_normal(first.orientation)),
    )


def stack_thickness(stack: list[SliceHeader]) -> float | None:
    """The stack's slice thickness (median SliceThickness, else the median spacing of its positions), to 0.1 mm."""
    thicknesses = [h.slice_thickness for h in stack if h.slice_thickness]
    if thicknesses:
        return round(float(np.median(thicknesses)), 1)
    positions = sorted({round(p, 3) for p in _positions(stack) if p is not None})
    if len(positions) > 1:
        return round(float(np.median(np.diff(positions))), 1)
    return None


def is_bone_kernel(kernel: str) -> bool:
    return any(BONE_KERNEL.search(part.strip()) for part in kernel.split("\\"))


def choose_stack(stacks: list[list[SliceHeader]], summaries: dict[int, StackSummary]) -> list[SliceHeader]:
    """The stack to use: not partial, thinnest, longest, bone kernel, then by SeriesInstanceUID (see module doc)."""
    largest = max(len(stack) for stack in stacks)
    whole = [stack for stack in stacks if len(stack) >= PARTIAL_STACK * largest]

    def preference(stack: list[SliceHeader]) -> tuple:
        summary = summaries[id(stack)]
        thickness = math.inf if summary.thickness_mm is None else summary.thickness_mm
        return (thickness, -len(stack), not is_bone_kernel(summary.kernel), summary.series_uid)

    return min(whole, key=preference)


def order_stack(stack: list[SliceHeader], assembly: Assembly) -> None:
    """Put the chosen stack's slices into `assembly` in order along the normal (see module doc, step 5)."""
    positions = _positions(stack)
    placed = [(p, h) for p, h in zip(positions, stack) if p is not None]
    if not placed:
        assembly.notes.append(
            "no slice has ImagePositionPatient: ordered by InstanceNumber"
            + ("" if all(h.instance_number is not None for h in stack) else ", then frame and file name")
        )
        assembly.slices = sorted(stack, key=_fallback_key)
        assembly.positions = [None] * len(stack)
        return
    for position, header in zip(positions, stack):
        if position is None:
            assembly.left_out.append(LeftOut(header.path, _frame_of(header), "no_position", "no ImagePositionPatient"))
    # at one position the first kept is a slice whose pixel data is whole (a truncated copy never wins)
    placed.sort(key=lambda item: (item[0], bool(item[1].pixel_problem), _fallback_key(item[1])))
    kept: list[tuple[float, SliceHeader]] = []
    for position, header in placed:
        if kept and position - kept[-1][0] < SAME_POSITION_MM:
            first = kept[-1][1]
            detail = f"same position ({position:.2f} mm) as {_name(first)}, which was kept"
            assembly.left_out.append(LeftOut(header.path, _frame_of(header), "duplicate_position", detail))
            continue
        kept.append((position, header))
    assembly.positions = [p for p, _ in kept]
    assembly.slices = [h for _, h in kept]
    steps = np.diff(assembly.positions)
    if len(steps) > 2 and steps.max() > 1.5 * np.median(steps):
        assembly.notes.append(
            f"uneven slice spacing: {steps.min():.2f} to {steps.max():.2f} mm (median {np.median(steps):.2f}): "
            "a gap in the stack?"
        )


def slice_number(header: SliceHeader, missing: int = -1) -> int:
    """The number boxes, segmentations and slice tables address a slice by: the file's `<n>.dcm` (the RSNA
    convention), else its InstanceNumber; a frame of a multi-frame file is its frame number (1-based)."""
    if header.number_of_frames > 1:
        return header.frame + 1
    for number in (header.slice_number, header.instance_number):
        if number is not None:
            return int(number)
    return missing


def _positions(stack: Sequence[SliceHeader]) -> list[float | None]:
    """Each slice's position along the stack's normal (mm, increasing towards the head), None without one."""
    normal = slice_normal(stack[0].orientation)
    return [None if h.position is None else float(np.dot(normal, h.position)) for h in stack]


def _fallback_key(header: SliceHeader) -> tuple:
    number = header.instance_number if header.instance_number is not None else math.inf
    return (number, header.path, header.frame)


def _frame_of(header: SliceHeader) -> int | None:
    return header.frame if header.number_of_frames > 1 else None


def _name(header: SliceHeader) -> str:
    return header.path + (f" frame {header.frame}" if header.number_of_frames > 1 else "")


def _sop_class_name(sop_class: str) -> str:
    from pydicom.uid import UID

    return UID(sop_class).name if sop_class else "unknown"


def _no_volume_reason(assembly: Assembly, num_files: int) -> str:
    if not num_files:
        return "no file"
    counts = Counter(item.kind for item in assembly.left_out)
    if not counts:
        return "no slice"
    listed = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    return f"no usable axial CT slice among {num_files} file(s): {listed}"


# ---------------------------------------------------------------- reading the volume's pixels


@dataclass(frozen=True)
class SliceRef:
    """Where one slice's pixels are, and what rendering needs of its header."""

    path: str
    frame: int  # 0-based frame index in the file
    spacing: tuple[float, float] | None = None  # (row, column) pixel spacing in mm

    @classmethod
    def of(cls, header: SliceHeader) -> SliceRef:
        spacing = (header.pixel_spacing, header.pixel_spacing_column)
        return cls(header.path, header.frame, spacing if None not in spacing else None)


def iter_volume_hu(refs: Sequence[SliceRef]) -> Iterator[tuple[int, np.ndarray | DicomReadError]]:
    """HU of each slice `refs[i]`, as (i, float32 (rows, cols)) or (i, the error).

    Each file is read once: single-frame files one by one, a multi-frame file one frame at a time in
    file order (memory stays at one frame). The array may be reused for the next slice: consume it
    before advancing. Order follows the files, not `refs`; `i` says where each slice belongs.
    """
    by_path: dict[str, dict[int, int]] = {}  # path -> {frame: index in refs}
    for index, ref in enumerate(refs):
        by_path.setdefault(str(ref.path), {})[int(ref.frame)] = index
    hu = None
    for path, remaining in by_path.items():
        error = None
        try:
            if len(remaining) == 1:
                frame, index = next(iter(remaining.items()))
                hu = read_hu(path, out=hu, frame=frame)
                del remaining[frame]
                yield index, hu
            else:
                for frame, frame_hu in iter_hu(path):
                    if frame in remaining:
                        yield remaining.pop(frame), frame_hu
        except DicomReadError as failure:
            error = failure
        except OSError as failure:  # e.g. the file vanished since the scan
            error = DicomReadError(path, f"cannot open: {failure.strerror or failure}")
        for frame, index in remaining.items():
            yield index, error or DicomReadError(path, f"frame {frame} is not in the file")
