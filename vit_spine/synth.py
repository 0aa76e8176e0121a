"""`vit-spine synth`: a synthetic CT dataset in the RSNA 2022 layout, with known ground truth.

Every study is a phantom neck: air, fat, soft tissue, trachea, skull base and mandible at the top,
then C1..C7 and a few thoracic vertebrae stacked along z. Each vertebra is a vertebral body (cortical
ring around cancellous bone) plus a posterior arch around the spinal canal; the arch sits a little
lower than the body, so boundary slices show two vertebrae, like the real spine. Fractures are
dark gaps cut through the cortex on a run of slices. Because we plant every pixel we know, per
slice, which vertebrae are visible and which are fractured (`ground_truth.csv`), so later stages
can be tested against the truth instead of against themselves.

The files vary the way real RSNA data does: JPEG Lossless SV1 (most studies), RLE, JPEG 2000
lossless and uncompressed; 12-bit unsigned (intercept -1024) and 16-bit signed/unsigned pixels;
slice numbers running with or against z. Output is a pure function of the options (same bytes for
the same arguments, whatever `--workers`).
"""

from __future__ import annotations

import math
import multiprocessing
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from vit_spine import options
from vit_spine.options import aliases, parse_config
from vit_spine.schema import STUDY_TARGETS, VERTEBRAE

UID_ROOT = "1.2.826.0.1.3680043"  # the root the RSNA 2022 StudyInstanceUIDs use

# Fracture patterns (C1..C7 as a bit string) and how many of the 2,019 real RSNA 2022 training
# studies have each one. Drawing whole patterns keeps both the per-vertebra prevalence and the
# co-occurrence (adjacent vertebrae break together) of the real data. Counted from the competition's
# train.csv; kept as constants because users do not have that file.
REAL_FRACTURE_PATTERNS: dict[str, int] = {
    "0000000": 1058, "0000001": 223, "0100000": 180, "0000010": 82, "0000011": 77, "1000000": 64,
    "1100000": 42, "0000110": 36, "0000100": 28, "0001000": 28, "0000111": 21, "0001100": 20,
    "0010000": 18, "0011000": 13, "0100001": 9, "0100011": 9, "0110000": 7, "1000001": 7,
    "0001111": 6, "0001110": 6, "0001001": 5, "0000101": 5, "1100001": 4, "1000100": 4,
    "0111110": 3, "0011111": 3, "0100010": 3, "1000011": 3, "0010100": 3, "0011110": 2,
    "1000111": 2, "0110010": 2, "1110001": 2, "1000110": 2, "0001011": 2, "1001110": 2,
    "0100100": 2, "0110001": 2, "1100010": 2, "0111111": 2, "0111000": 1, "0011100": 1,
    "1110000": 1, "0010111": 1, "1110100": 1, "1101000": 1, "0100111": 1, "0011010": 1,
    "0101000": 1, "1100100": 1, "1001000": 1, "1010110": 1, "0111001": 1, "1010100": 1,
    "0111100": 1, "0001101": 1, "0101110": 1, "0010011": 1, "1000010": 1, "1010101": 1,
    "0110100": 1, "0101100": 1, "1101001": 1, "0101101": 1, "0001010": 1, "0010010": 1,
    "1011110": 1, "0010001": 1, "0101011": 1, "1100011": 1,
}

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Studies take these in turn (rotated by the seed): mostly JPEG Lossless, as in the real data.
SYNTAX_CYCLE = (JPEG_LOSSLESS, JPEG_LOSSLESS, RLE_LOSSLESS, JPEG_LOSSLESS, EXPLICIT_LE,
                JPEG_LOSSLESS, JPEG2000_LOSSLESS, JPEG_LOSSLESS)
SYNTAX_NAMES = {JPEG_LOSSLESS: "JPEG Lossless SV1", RLE_LOSSLESS: "RLE Lossless",
                JPEG2000_LOSSLESS: "JPEG 2000 Lossless", EXPLICIT_LE: "Explicit VR Little Endian"}


@dataclass(frozen=True)
class PixelFormat:
    bits_stored: int
    signed: bool
    intercept: float

    @property
    def name(self) -> str:
        return f"{self.bits_stored}-bit {'signed' if self.signed else 'unsigned'}"

    @property
    def hu_range(self) -> tuple[int, int]:
        lo = -(1 << (self.bits_stored - 1)) if self.signed else 0
        hi = (1 << (self.bits_stored - 1)) - 1 if self.signed else (1 << self.bits_stored) - 1
        return int(lo + self.intercept), int(hi + self.intercept)


PIXEL_CYCLE = (PixelFormat(12, False, -1024.0), PixelFormat(16, True, 0.0), PixelFormat(16, False, -1024.0))
# True: slice 1 is the top of the neck and z decreases with the slice number (the common RSNA case).
Z_DECREASING_CYCLE = (True, False, True, True, False)


@dataclass
class SynthConfig:
    output_dir: str = field(metadata={"help": "output folder for the dataset (RSNA 2022 layout)", "aliases": aliases("out")})
    num_studies: int = field(
        default=24, metadata={"help": "number of studies in all (train + test)", "aliases": aliases("studies")})
    num_test_studies: int = field(
        default=4, metadata={"help": "how many of the studies go to test_images/", "aliases": aliases("test_studies")})
    num_slices: int = field(
        default=96, metadata={"help": "axial slices per study (at least 24)", "aliases": aliases("slices")})
    size: int = field(default=256, metadata={"help": "rows and columns of every slice (at least 64)"})
    seed: int = field(default=0, metadata={"help": "random seed; the same arguments write the same bytes"})
    segmentation_fraction: float = field(
        default=0.5, metadata={"help": "fraction of train studies that get segmentations/<uid>.nii (at least one)"})
    box_fraction: float = field(
        default=0.5, metadata={"help": "fraction of fractured train studies that get bounding boxes (at least one)"})
    fracture_width: float = field(
        default=0.025,
        metadata={"help": "width of a planted cortical break as a fraction of the image side (wider = easier to learn)"})
    workers: int = field(default=1, metadata={"help": "processes writing studies in parallel"})
    overwrite: bool = field(default=False, metadata={"help": "replace the dataset files already in OUTPUT_DIR"})

    def __post_init__(self) -> None:
        if self.num_studies < 2:
            raise ValueError(f"--num_studies must be at least 2 (got {self.num_studies})")
        if not 0 <= self.num_test_studies < self.num_studies:
            raise ValueError(f"--num_test_studies must be in [0, --num_studies) (got {self.num_test_studies}, "
                             f"studies {self.num_studies})")
        if self.num_studies - self.num_test_studies < 2:
            raise ValueError("at least 2 train studies are needed (one positive, one negative): "
                             f"--num_studies {self.num_studies} --num_test_studies {self.num_test_studies}")
        if self.num_slices < 24:
            raise ValueError(f"--num_slices must be at least 24 to hold C1..C7 (got {self.num_slices})")
        if self.size < 64:
            raise ValueError(f"--size must be at least 64 (got {self.size})")
        for name in ("segmentation_fraction", "box_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1] (got {getattr(self, name)})")

        self.workers = options.capped_workers(self.workers)
        options.folder_path(self.output_dir, "OUTPUT_DIR")
        if not 0.0 < self.fracture_width <= 0.2:
            raise ValueError(f"--fracture_width must be in (0, 0.2] (got {self.fracture_width})")

    @property
    def train_studies(self) -> int:
        return self.num_studies - self.num_test_studies


@dataclass
class SynthSummary:
    out: str
    train_studies: int
    test_studies: int
    slices: int
    positive_train: int
    positive_test: int
    segmentations: int
    boxes: int
    transfer_syntaxes: dict[str, int]
    pixel_formats: dict[str, int]
    z_decreasing_studies: int
    elapsed_s: float

    def __str__(self) -> str:
        syntaxes = ", ".join(f"{SYNTAX_NAMES[k]} {v}" for k, v in self.transfer_syntaxes.items())
        formats = ", ".join(f"{k} {v}" for k, v in self.pixel_formats.items())
        studies = self.train_studies + self.test_studies
        return (
            f"wrote {studies} studies ({self.train_studies} train, {self.test_studies} test), "
            f"{self.slices} slices to {self.out} in {self.elapsed_s:.1f} s\n"
            f"  positive studies: {self.positive_train} train, {self.positive_test} test\n"
            f"  segmentations: {self.segmentations}, bounding boxes: {self.boxes}\n"
            f"  transfer syntaxes (studies): {syntaxes}\n"
            f"  pixel formats (studies): {formats}\n"
            f"  z decreasing with slice number: {self.z_decreasing_studies} of {studies} studies"
        )


# ----------------------------------------------------------------------------- labels

def _pattern_table() -> tuple[np.ndarray, np.ndarray]:
    patterns = np.array([[int(c) for c in key] for key in REAL_FRACTURE_PATTERNS], dtype=np.int8)
    counts = np.array(list(REAL_FRACTURE_PATTERNS.values()), dtype=np.float64)
    return patterns, counts / counts.sum()


def draw_study_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 7) int8 fracture labels C1..C7, whole patterns drawn with their real RSNA frequencies."""
    patterns, probs = _pattern_table()
    return patterns[rng.choice(len(patterns), size=n, p=probs)]


def draw_split_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """Like `draw_study_labels`, but a split of 2 or more studies always holds both classes,
    so that tiny datasets can still be trained and scored."""
    labels = draw_study_labels(n, rng)
    if n < 2:
        return labels
    positive = labels.any(axis=1)
    if not positive.any():
        patterns, probs = _pattern_table()
        keep = patterns.any(axis=1)
        labels[0] = patterns[keep][rng.choice(int(keep.sum()), p=probs[keep] / probs[keep].sum())]
    elif positive.all():
        labels[-1] = 0
    return labels


# ----------------------------------------------------------------------------- study plans

@dataclass(frozen=True)
class StudyPlan:
    """Everything that decides one study's files; `render_study(plan)` is a pure function of it."""

    uid: str
    split: str  # "train" | "test"
    labels: tuple[int, ...]  # C1..C7 fracture labels
    fold: int | None
    num_slices: int
    size: int
    transfer_syntax: str
    pixel_format: PixelFormat
    z_decreasing: bool
    with_segmentation: bool
    with_boxes: bool
    seed: tuple[int, int]  # seeds the anatomy, fractures and noise
    fracture_width: float = 0.025  # gap width / image side

    @property
    def study_number(self) -> str:
        return self.uid.rsplit(".", 1)[1]


def plan_studies(config: SynthConfig) -> list[StudyPlan]:
    """The studies `synthesize(out, config)` writes, train studies first."""
    rng = np.random.default_rng([config.seed, 7919])
    numbers = rng.choice(np.arange(1000, 33000), size=config.num_studies, replace=False)
    uids = [f"{UID_ROOT}.{n}" for n in numbers]
    n_train = config.train_studies
    train_labels = draw_split_labels(n_train, rng)
    test_labels = draw_split_labels(config.num_test_studies, rng)
    labels = np.concatenate([train_labels, test_labels]) if config.num_test_studies else train_labels

    folds = _stratified_folds(train_labels.any(axis=1), rng)
    n_seg = max(1, round(config.segmentation_fraction * n_train))
    with_seg = set(rng.permutation(n_train)[:n_seg].tolist())
    positives = np.flatnonzero(train_labels.any(axis=1))
    n_box = max(1, round(config.box_fraction * len(positives))) if len(positives) else 0
    with_boxes = set(rng.permutation(positives)[:n_box].tolist())

    plans = []
    for i in range(config.num_studies):
        is_train = i < n_train
        plans.append(StudyPlan(
            uid=uids[i],
            split="train" if is_train else "test",
            labels=tuple(int(v) for v in labels[i]),
            fold=int(folds[i]) if is_train else None,
            num_slices=config.num_slices,
            size=config.size,
            transfer_syntax=SYNTAX_CYCLE[(i + config.seed) % len(SYNTAX_CYCLE)],
            pixel_format=PIXEL_CYCLE[(i + config.seed) % len(PIXEL_CYCLE)],
            z_decreasing=Z_DECREASING_CYCLE[(i + config.seed) % len(Z_DECREASING_CYCLE)],
            with_segmentation=is_train and i in with_seg,
            with_boxes=is_train and i in with_boxes,
            seed=(config.seed, i),
            fracture_width=config.fracture_width,
        ))
    return plans


def _stratified_folds(positive: np.ndarray, rng: np.random.Generator, n_folds: int = 5) -> np.ndarray:
    """Folds 0..4 dealt round-robin over positives, then negatives, each in random order."""
    folds = np.zeros(len(positive), dtype=np.int64)
    order = np.concatenate([rng.permutation(np.flatnonzero(positive)), rng.permutation(np.flatnonzero(~positive))])
    folds[order] = np.arange(len(order)) % n_folds
    return folds


# ----------------------------------------------------------------------------- phantom anatomy

# Craniocaudal height of each vertebra in units of a typical cervical vertebra.
HEIGHTS = {"C1": 0.8, "C2": 1.5, "C3": 1.0, "C4": 1.0, "C5": 1.0, "C6": 1.0, "C7": 1.0}
THORACIC_HEIGHT = 1.15
# Body width relative to C5, growing down the neck.
BODY_SCALE = {"C2": 0.85, "C3": 0.88, "C4": 0.93, "C5": 1.0, "C6": 1.05, "C7": 1.1}


@dataclass(frozen=True)
class Shape:
    """An ellipse in pixel coordinates (x = column, y = row)."""

    cx: float
    cy: float
    rx: float
    ry: float

    def mask(self, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        yy, xx = grid
        return ((xx - self.cx) / self.rx) ** 2 + ((yy - self.cy) / self.ry) ** 2 <= 1.0

    def shrunk(self, by: float) -> Shape:
        return Shape(self.cx, self.cy, max(self.rx - by, 0.5), max(self.ry - by, 0.5))


@dataclass(frozen=True)
class Part:
    """A piece of bone drawn on the slices [top, bottom) (float slice indices, top of the neck = 0).

    `label` is the segmentation label (1-7 C1-C7, 8-19 T1-T12, 0 for unlabelled bone such as the
    skull). `cortex` and `interior` are the bone masks with their HU; `soft` (the canal) only sets HU.
    """

    name: str
    label: int
    top: float
    bottom: float
    cortex: np.ndarray
    cortex_hu: float
    interior: np.ndarray | None = None
    interior_hu: float = 0.0
    soft: np.ndarray | None = None
    soft_hu: float = 0.0
    ray_origin: tuple[float, float] | None = None  # where a fracture ray starts (x, y); None: never fractured
    ray_angles: tuple[float, float] = (0.0, 0.0)  # range of its direction (radians, y points down)

    def covers(self, j: int) -> bool:
        return self.top <= j < self.bottom

    @property
    def bone(self) -> np.ndarray:
        return self.cortex if self.interior is None else self.cortex | self.interior


@dataclass(frozen=True)
class Fracture:
    vertebra: int  # 1..7
    part: str
    slices: tuple[int, ...]  # top-to-bottom slice indices
    mask: np.ndarray  # (rows, cols) pixels of the gap (the same on every slice of the run)


@dataclass
class Anatomy:
    base_hu: np.ndarray  # air, fat, soft tissue, trachea (same on every slice)
    fov_mask: np.ndarray | None  # pixels inside the scanner's field of view, None when all are
    parts: list[Part]
    fractures: list[Fracture]
    gap_hu: float
    noise_hu: float
    pixel_spacing: float
    slice_thickness: float
    z_top: float


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.ogrid[0:size, 0:size]
    return yy.astype(np.float32), xx.astype(np.float32)


def build_anatomy(plan: StudyPlan) -> Anatomy:
    """Draw one study's phantom: shapes vary a little per study and per vertebra."""
    rng = np.random.default_rng(list(plan.seed))
    S, N = plan.size, plan.num_slices
    grid = _grid(S)
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731

    cx0, cy0 = S / 2 + u(-0.03, 0.03) * S, S / 2 + u(-0.02, 0.02) * S
    neck = Shape(cx0, cy0, u(0.34, 0.40) * S, u(0.30, 0.34) * S)
    soft_hu, fat_hu = u(35, 55), u(-110, -80)
    base = np.full((S, S), -1000.0, dtype=np.float32)
    base[neck.mask(grid)] = fat_hu
    base[neck.shrunk(u(0.02, 0.035) * S).mask(grid)] = soft_hu
    trachea = Shape(cx0 + u(-0.01, 0.01) * S, cy0 - u(0.17, 0.20) * S, u(0.035, 0.045) * S, u(0.03, 0.04) * S)
    base[trachea.mask(grid)] = -1000.0
    fov_mask = None
    if plan.pixel_format.signed:  # many scanners pad outside the reconstruction circle with -2000 HU
        yy, xx = grid
        fov_mask = (xx - S / 2 + 0.5) ** 2 + (yy - S / 2 + 0.5) ** 2 <= (S / 2) ** 2

    cortical_hu = u(900, 1400)
    cancellous_hu = u(250, 400)
    arch_hu = cortical_hu * u(0.75, 0.9)
    canal_hu = u(10, 30)
    cortex = max(1.5, 0.014 * S)
    body_scale = u(0.92, 1.08)
    lordosis = u(0.015, 0.035) * S
    drift = u(-0.03, 0.03) * S  # lateral drift over the stack: the spine is not left-right symmetric

    # Vertical layout, in slices from the top of the neck.
    unit = N * u(0.66, 0.72) / (sum(HEIGHTS.values()))
    margin = N * u(0.07, 0.11)
    shift = 0.28 * unit  # the arch sits this much lower than its body
    names, tops = [], []
    top = margin
    while top < N and len(names) < 19:
        name = VERTEBRAE[len(names)] if len(names) < 7 else f"T{len(names) - 6}"
        names.append(name)
        tops.append(top)
        top += HEIGHTS.get(name, THORACIC_HEIGHT) * unit * u(0.93, 1.07)
    tops.append(top)
    cervical_end = tops[7] if len(tops) > 7 else N

    parts: list[Part] = []
    # Skull base (occipital bone around the foramen magnum) and mandible: bright, unlabelled bone.
    c1_body_y = cy0 + 0.05 * S
    occ = Shape(cx0, c1_body_y + 0.12 * S, u(0.19, 0.22) * S, u(0.14, 0.16) * S)
    occ_ring = occ.mask(grid) & ~occ.shrunk(0.05 * S).mask(grid) & (grid[0] >= occ.cy - 0.04 * S)
    parts.append(Part("skull", 0, 0.0, margin + 0.15 * unit, occ_ring, cortical_hu))
    mand = Shape(cx0, cy0 + 0.02 * S, u(0.22, 0.25) * S, u(0.24, 0.27) * S)
    mand_ring = mand.mask(grid) & ~mand.shrunk(0.035 * S).mask(grid) & (grid[0] < cy0 - 0.06 * S)
    parts.append(Part("mandible", 0, margin + 0.3 * unit, margin + 3.0 * unit, mand_ring, cortical_hu))

    for k, name in enumerate(names):
        label = k + 1
        body_top, body_bottom = tops[k], tops[k + 1]
        mid = (body_top + body_bottom) / 2
        cx = cx0 + drift * (mid / N - 0.5) + u(-0.005, 0.005) * S
        cy = c1_body_y - lordosis * math.sin(math.pi * min(mid / cervical_end, 1.0))
        rx = 0.095 * S * BODY_SCALE.get(name, 1.15) * body_scale
        body = Shape(cx, cy, rx, 0.72 * rx)
        canal = Shape(cx, cy + body.ry + 0.045 * S, 0.055 * S, 0.04 * S)
        canal_mask = canal.mask(grid)
        outer = Shape(canal.cx, canal.cy, canal.rx + 0.025 * S, canal.ry + 0.025 * S)
        # clear of this body and of the slightly larger body below, which shares the boundary slices
        arch = outer.mask(grid) & ~canal_mask & ~Shape(cx, cy, 1.2 * body.rx, 1.2 * body.ry).mask(grid)
        spine_len = 0.02 * S if name == "C1" else 0.045 * S
        arch |= Shape(cx, outer.cy + outer.ry + spine_len * 0.7, 0.014 * S, spine_len).mask(grid)
        laminae = (0.15 * math.pi, 0.40 * math.pi)
        parts.append(Part(f"{name} arch", label, body_top + shift, body_bottom + shift, arch, arch_hu,
                          soft=canal_mask, soft_hu=canal_hu, ray_origin=(canal.cx, canal.cy),
                          ray_angles=laminae if rng.random() < 0.5 else (math.pi - laminae[1], math.pi - laminae[0])))
        if name == "C1":  # the atlas has no body: an anterior arch and two lateral masses
            ant = Shape(cx, cy - 0.06 * S, 0.05 * S, 0.02 * S)
            masses = [Shape(cx + side * 0.075 * S, cy + 0.03 * S, 0.035 * S, 0.035 * S) for side in (-1, 1)]
            outer_mask = ant.mask(grid) | masses[0].mask(grid) | masses[1].mask(grid)
            inner_mask = masses[0].shrunk(cortex).mask(grid) | masses[1].shrunk(cortex).mask(grid)
            parts.append(Part("C1 anterior arch", label, body_top, body_bottom, outer_mask & ~inner_mask,
                              cortical_hu, interior=inner_mask, interior_hu=cancellous_hu,
                              ray_origin=(canal.cx, canal.cy), ray_angles=(-0.5 * math.pi - 0.25, -0.5 * math.pi + 0.25)))
            continue
        body_mask, inner_mask = body.mask(grid), body.shrunk(cortex).mask(grid)
        parts.append(Part(f"{name} body", label, body_top, body_bottom, body_mask & ~inner_mask, cortical_hu,
                          interior=inner_mask, interior_hu=cancellous_hu, ray_origin=(cx, cy),
                          ray_angles=(-math.pi - 0.3, 0.3)))
        if name == "C2":  # the dens rises into the ring of C1
            dens = Shape(cx, c1_body_y + 0.012 * S, 0.03 * S, 0.03 * S)
            dens_mask, dens_inner = dens.mask(grid), dens.shrunk(cortex).mask(grid)
            parts.append(Part("C2 dens", label, body_top - 0.6 * unit, body_top, dens_mask & ~dens_inner, cortical_hu,
                              interior=dens_inner, interior_hu=cancellous_hu))

    fractures = _plant_fractures(plan, parts, grid, rng, gap_width=max(2.0, plan.fracture_width * S))
    thickness = round(u(150, 190) / N, 3)
    return Anatomy(
        base_hu=base, fov_mask=fov_mask, parts=parts, fractures=fractures, gap_hu=u(30, 80),
        noise_hu=u(10, 25), pixel_spacing=round(u(140, 200) / S, 4), slice_thickness=thickness,
        z_top=round(u(-60, 60), 1),
    )


def _plant_fractures(plan: StudyPlan, parts: list[Part], grid, rng: np.random.Generator,
                     gap_width: float) -> list[Fracture]:
    """One cortical break per fractured vertebra: a ray from inside the bone out through the cortex,
    on a run of the slices where that piece of bone is present."""
    fractures = []
    yy, xx = grid
    for label, fractured in enumerate(plan.labels, start=1):
        if not fractured:
            continue
        candidates = [p for p in parts if p.label == label and p.ray_origin is not None]
        part = candidates[int(rng.integers(len(candidates)))]
        present = [j for j in range(plan.num_slices) if part.covers(j)]
        if not present:
            raise RuntimeError(f"{part.name} of {plan.uid} covers no slice; too few slices for this layout")
        run = max(1, round(len(present) * rng.uniform(0.3, 0.7)))
        start = int(rng.integers(len(present) - run + 1))
        angle = rng.uniform(*part.ray_angles)
        dx, dy = math.cos(angle), math.sin(angle)
        ox, oy = part.ray_origin
        along = (xx - ox) * dx + (yy - oy) * dy
        across = np.abs((xx - ox) * dy - (yy - oy) * dx)
        gap = (across <= gap_width / 2) & (along >= 0) & part.bone
        if not gap.any():
            raise RuntimeError(f"fracture ray misses {part.name} of {plan.uid}")
        fractures.append(Fracture(label, part.name, tuple(present[start:start + run]), gap))
    return fractures


# ----------------------------------------------------------------------------- rendering

@dataclass
class RenderedStudy:
    """A study as planted, indexed by slice_number - 1 (not by z)."""

    hu: np.ndarray  # (n, rows, cols) int32 HU exactly as stored (after clipping to the pixel format)
    labels: np.ndarray  # (n, rows, cols) uint8 segmentation labels
    fracture_masks: list[dict[int, np.ndarray]]  # per slice: vertebra 1..7 -> gap pixels
    slice_numbers: np.ndarray  # 1..n
    z: np.ndarray  # ImagePositionPatient[2] per slice
    anatomy: Anatomy


def render_study(plan: StudyPlan) -> RenderedStudy:
    anatomy = build_anatomy(plan)
    N, S = plan.num_slices, plan.size
    noise_rng = np.random.default_rng([*plan.seed, 1])
    lo, hi = plan.pixel_format.hu_range
    hu = np.empty((N, S, S), dtype=np.int32)
    labels = np.zeros((N, S, S), dtype=np.uint8)
    fracture_masks: list[dict[int, np.ndarray]] = [{} for _ in range(N)]
    # Slice numbers: top-to-bottom index j -> file number.
    numbers = np.arange(1, N + 1) if plan.z_decreasing else np.arange(N, 0, -1)
    for j in range(N):
        index = numbers[j] - 1
        image = anatomy.base_hu.copy()
        for part in anatomy.parts:
            if not part.covers(j):
                continue
            if part.soft is not None:
                image[part.soft] = part.soft_hu
            image[part.cortex] = part.cortex_hu
            if part.interior is not None:
                image[part.interior] = part.interior_hu
            if part.label:
                labels[index][part.bone] = part.label
        for fracture in anatomy.fractures:
            if j in fracture.slices:
                image[fracture.mask] = anatomy.gap_hu
                fracture_masks[index][fracture.vertebra] = fracture.mask
        image += noise_rng.standard_normal((S, S), dtype=np.float32) * anatomy.noise_hu
        if anatomy.fov_mask is not None:
            image[~anatomy.fov_mask] = -2000.0
        hu[index] = np.clip(np.rint(image), lo, hi)
    z_by_index = np.empty(N)
    z_by_index[numbers - 1] = anatomy.z_top - np.arange(N) * anatomy.slice_thickness
    return RenderedStudy(hu, labels, fracture_masks, np.arange(1, N + 1), np.round(z_by_index, 3), anatomy)


# ----------------------------------------------------------------------------- writing

def slice_dataset(plan: StudyPlan, rendered: RenderedStudy, index: int):
    """The DICOM dataset of slice `index` (slice_number index + 1), encoded in the plan's syntax."""
    from pydicom.dataset import Dataset, FileMetaDataset

    from vit_spine.dicom import encode_jpeg_lossless

    a, fmt, n = rendered.anatomy, plan.pixel_format, index + 1
    S = plan.size
    sop_uid = f"{plan.uid}.1.{n}"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20220727"
    ds.ContentDate = "20220727"
    ds.StudyTime = "120000"
    ds.Modality = "CT"
    ds.Manufacturer = "vit-spine synth"
    ds.PatientName = plan.study_number
    ds.PatientID = plan.study_number
    ds.BodyPartExamined = "CSPINE"
    ds.SliceThickness = f"{a.slice_thickness:.3f}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = plan.uid
    ds.SeriesInstanceUID = f"{plan.uid}.1"
    ds.StudyID = plan.study_number
    ds.SeriesNumber = 1
    ds.InstanceNumber = n
    x0 = -a.pixel_spacing * S / 2
    ds.ImagePositionPatient = [f"{x0:.4f}", f"{x0:.4f}", f"{rendered.z[index]:.3f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = f"{plan.uid}.2"
    ds.SliceLocation = f"{rendered.z[index]:.3f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = S
    ds.Columns = S
    ds.PixelSpacing = [f"{a.pixel_spacing:.4f}", f"{a.pixel_spacing:.4f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = fmt.bits_stored
    ds.HighBit = fmt.bits_stored - 1
    ds.PixelRepresentation = int(fmt.signed)
    if plan.pixel_format == PIXEL_CYCLE[1]:  # several windows, as some scanners write (multi-valued DS)
        ds.WindowCenter, ds.WindowWidth = ["40", "500"], ["400", "2000"]
    else:
        ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept = f"{fmt.intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = (rendered.hu[index] - int(fmt.intercept)).astype(np.int16 if fmt.signed else np.uint16)
    if plan.transfer_syntax in (JPEG_LOSSLESS, EXPLICIT_LE):
        ds.PixelData = stored.astype("<i2" if fmt.signed else "<u2").tobytes()
        ds["PixelData"].VR = "OW"
        if plan.transfer_syntax == JPEG_LOSSLESS:
            encode_jpeg_lossless(ds)  # gdcm: pydicom cannot encode JPEG Lossless
    else:
        # generate_instance_uid=False: pydicom would otherwise replace our SOPInstanceUID with a random one
        # gdcm's RLE encoder is compiled; pydicom's own is pure Python (about 40 ms a slice)
        plugin = "pylibjpeg" if plan.transfer_syntax == JPEG2000_LOSSLESS else "gdcm"
        ds.compress(plan.transfer_syntax, stored, encoding_plugin=plugin, generate_instance_uid=False)
    return ds


def segmentation_volume(plan: StudyPlan, rendered: RenderedStudy) -> np.ndarray:
    """The NIfTI array, stored the RSNA way: the inverse of the rule public RSNA 2022 solutions use to
    turn it back into a (slice, row, col) mask in slice_number order."""
    mask = rendered.labels
    if plan.z_decreasing:  # rule: seg[:, ::-1, ::-1].transpose(2, 1, 0)
        return np.ascontiguousarray(mask[::-1, ::-1, :].transpose(2, 1, 0))
    return np.ascontiguousarray(mask[:, ::-1, :].transpose(2, 1, 0))  # rule: seg[:, ::-1].transpose(2, 1, 0)


def segmentation_affine(rendered: RenderedStudy, size: int) -> np.ndarray:
    """RAS affine of `segmentation_volume`: i = column (towards patient left), j = row counted from
    the posterior edge, k = slices with z ascending."""
    a = rendered.anatomy
    ps, x0 = a.pixel_spacing, -a.pixel_spacing * size / 2
    affine = np.diag([-ps, ps, a.slice_thickness, 1.0])
    affine[:3, 3] = [-x0, -(x0 + (size - 1) * ps), float(rendered.z.min())]
    return affine


def study_folder(out: Path, plan: StudyPlan) -> Path:
    return out / f"{plan.split}_images" / plan.uid


@dataclass
class StudyResult:
    ground_truth: pd.DataFrame
    boxes: pd.DataFrame


def write_study(plan: StudyPlan, out: Path) -> StudyResult:
    rendered = render_study(plan)
    folder = study_folder(out, plan)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(plan.num_slices):
        slice_dataset(plan, rendered, index).save_as(folder / f"{index + 1}.dcm", enforce_file_format=True)
    if plan.with_segmentation:
        import nibabel as nib

        image = nib.Nifti1Image(segmentation_volume(plan, rendered), segmentation_affine(rendered, plan.size))
        image.set_data_dtype(np.uint8)
        image.header.set_xyzt_units("mm")
        nib.save(image, out / "segmentations" / f"{plan.uid}.nii")
    return StudyResult(ground_truth_rows(plan, rendered), box_rows(plan, rendered) if plan.with_boxes else _empty_boxes())


def ground_truth_rows(plan: StudyPlan, rendered: RenderedStudy) -> pd.DataFrame:
    table = pd.DataFrame({
        "StudyInstanceUID": plan.uid,
        "slice_number": rendered.slice_numbers,
        "z": rendered.z,
        "split": plan.split,
    })
    for k, name in enumerate(VERTEBRAE, start=1):
        table[f"visible_{name}"] = (rendered.labels == k).any(axis=(1, 2)).astype(np.int64)
    for k, name in enumerate(VERTEBRAE, start=1):
        table[f"fracture_{name}"] = np.array([int(k in masks) for masks in rendered.fracture_masks])
    return table


BOX_COLUMNS = ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]


def _empty_boxes() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=str if c == "StudyInstanceUID" else np.int64) for c in BOX_COLUMNS})


def box_rows(plan: StudyPlan, rendered: RenderedStudy) -> pd.DataFrame:
    """One box per planted break per slice: the tight pixel bounds of the gap."""
    rows = []
    for index, masks in enumerate(rendered.fracture_masks):
        for vertebra in sorted(masks):
            r, c = np.nonzero(masks[vertebra])
            rows.append((plan.uid, int(c.min()), int(r.min()), int(c.max() - c.min() + 1),
                         int(r.max() - r.min() + 1), index + 1))
    return pd.DataFrame(rows, columns=BOX_COLUMNS) if rows else _empty_boxes()


OUTPUT_NAMES = ("train_images", "test_images", "segmentations", "train.csv", "train_bounding_boxes.csv",
                "test.csv", "sample_submission.csv", "ground_truth.csv", "test_labels.csv")


def _prepare_output(out: Path, overwrite: bool) -> None:
    existing = [out / name for name in OUTPUT_NAMES if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset ({existing[0].name}); pass --overwrite to replace it")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in ("train_images", "test_images", "segmentations"):
        (out / name).mkdir(parents=True, exist_ok=True)


def _label_table(plans: list[StudyPlan], with_fold: bool) -> pd.DataFrame:
    table = pd.DataFrame([[p.uid, int(any(p.labels)), *p.labels] for p in plans],
                         columns=["StudyInstanceUID", *STUDY_TARGETS])
    if with_fold:
        table["fold"] = [p.fold for p in plans]
    return table


def _write_tables(out: Path, plans: list[StudyPlan], results: list[StudyResult]) -> None:
    train = [p for p in plans if p.split == "train"]
    test = [p for p in plans if p.split == "test"]
    _label_table(train, with_fold=True).to_csv(out / "train.csv", index=False)
    _label_table(test, with_fold=False).to_csv(out / "test_labels.csv", index=False)
    pd.concat([r.boxes for r in results], ignore_index=True).to_csv(out / "train_bounding_boxes.csv", index=False)
    pd.concat([r.ground_truth for r in results], ignore_index=True).to_csv(out / "ground_truth.csv", index=False)
    test_rows = pd.DataFrame(
        [(f"{p.uid}_{target}", p.uid, target) for p in test for target in STUDY_TARGETS],
        columns=["row_id", "StudyInstanceUID", "prediction_type"],
    )
    test_rows.to_csv(out / "test.csv", index=False)
    pd.DataFrame({"row_id": test_rows["row_id"], "fractured": 0.5}).to_csv(out / "sample_submission.csv", index=False)


def _write_study_job(job: tuple[StudyPlan, str]) -> StudyResult:
    plan, out = job
    return write_study(plan, Path(out))


def synthesize(out: Path, config: SynthConfig) -> SynthSummary:
    """Write the dataset to `out` and return what was written."""
    start = time.perf_counter()
    out = Path(out)
    _prepare_output(out, config.overwrite)
    plans = plan_studies(config)
    jobs = [(plan, str(out)) for plan in plans]
    progress = dict(total=len(jobs), desc="synth studies", unit="study")
    if config.workers > 1:
        with multiprocessing.get_context("spawn").Pool(config.workers) as pool:
            results = list(tqdm(pool.imap(_write_study_job, jobs), **progress))
    else:
        results = [_write_study_job(job) for job in tqdm(jobs, **progress)]
    _write_tables(out, plans, results)
    train = [p for p in plans if p.split == "train"]
    test = [p for p in plans if p.split == "test"]
    return SynthSummary(
        out=str(out),
        train_studies=len(train),
        test_studies=len(test),
        slices=sum(p.num_slices for p in plans),
        positive_train=sum(any(p.labels) for p in train),
        positive_test=sum(any(p.labels) for p in test),
        segmentations=sum(p.with_segmentation for p in plans),
        boxes=sum(len(r.boxes) for r in results),
        transfer_syntaxes=dict(Counter(p.transfer_syntax for p in plans).most_common()),
        pixel_formats=dict(Counter(p.pixel_format.name for p in plans).most_common()),
        z_decreasing_studies=sum(p.z_decreasing for p in plans),
        elapsed_s=time.perf_counter() - start,
    )


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_config(
        SynthConfig, argv, prog="vit-spine synth",
        description="Write a synthetic CT dataset in the RSNA 2022 cervical spine layout, with per-slice ground truth.",
        positionals=("output_dir",),
    )
    print(synthesize(Path(config.output_dir), config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
