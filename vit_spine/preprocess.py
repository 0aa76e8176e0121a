"""Slices in Hounsfield units -> the 3-channel uint8 images the model sees (shared by chunk and predict).

Per slice: take a centred square field of view, resize it (antialiased bilinear, as PIL's BILINEAR and
`torch.nn.functional.interpolate(antialias=True)`), then map HU through the display window(s) to uint8.
Resampling in HU and windowing afterwards is the radiology order (resample the volume, then display
it) and costs one resize per slice whatever the channel scheme.

The field of view is never stretched: a non-square slice (512 x 640) is padded with air to a square
first. By default it is the whole slice (`crop` 1) or its centred part (`crop` < 1), so the physical
scale follows each study's reconstruction (0.3 to 1 mm per pixel on real scanners). With
`pixel_spacing` every slice is resampled to that many mm per output pixel instead: the field of view
is `image_size x pixel_spacing` mm around the slice centre, the same anatomy at the same size in every
study.

What a resized slice becomes, and how the model's 3 channels are made from it, is the channel scheme
`channels` names (`vit_spine.channels`: "bone25d", the default, "windows", or any registered one).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np

from vit_spine.channels import (
    ChannelScheme,
    Layout,
    MODEL_CHANNELS,
    array_reader,
    assemble,
    channel_scheme,
    copy_plan,
    parse_windows,
    scheme_names,
)


@dataclass
class PreprocessConfig:
    image_size: int = field(default=224, metadata={"help": "side of the square images stored in the shards (px)."})
    channels: str = field(
        default="bone25d",
        metadata={
            "help": "channel scheme, a name in the vit_spine.channels registry; built in: "
            + "; ".join(f"'{name}' = {channel_scheme(name).description}" for name in scheme_names())
            + "."
        },
    )
    bone_window: str = field(
        default="400:1800", metadata={"help": "CENTER:WIDTH in HU of the window used by 'bone25d'."}
    )
    windows: str = field(
        default="400:1800,40:400,500:3000",
        metadata={"help": "three CENTER:WIDTH windows in HU used by 'windows' (bone, soft tissue, wide)."},
    )
    neighbor_offset: int = field(
        default=1, metadata={"help": "'bone25d': distance in slices of the neighbours (edges repeat the end slice)."}
    )
    crop: float = field(
        default=1.0,
        metadata={
            "help": "side of the centred square kept before resizing, as a fraction of the slice's longer side "
            "(1 = the whole slice, padded to a square with air when it is not square). Cervical spine CTs are "
            "reconstructed centred on the neck, so e.g. 0.6 drops air and shoulders and gives the vertebrae 1/0.6 "
            "times more pixels at the same --image_size. Not with --pixel_spacing."
        },
    )
    pixel_spacing: float | None = field(
        default=None,
        metadata={
            "help": "resample every slice to this physical pixel size (mm per output pixel; default: off). The kept "
            "square is then image_size x pixel_spacing millimetres around the slice centre (e.g. 224 x 0.5 = 112 mm), "
            "so a 0.3 mm and a 1.2 mm study show the neck at the same scale. Slices without PixelSpacing are skipped."
        },
    )

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"--image_size must be at least 8, got {self.image_size}")
        channel_scheme(self.channels)  # an unknown name: one line listing the known ones
        if not 0.0 < self.crop <= 1.0:
            raise ValueError(f"--crop must be in (0, 1], got {self.crop}")
        if self.pixel_spacing is not None:
            if not self.pixel_spacing > 0:
                raise ValueError(f"--pixel_spacing must be a positive number of mm, got {self.pixel_spacing}")
            if self.crop != 1.0:
                raise ValueError("give --crop or --pixel_spacing, not both: with --pixel_spacing the kept square is "
                                 "image_size x pixel_spacing mm")
        if self.neighbor_offset < 1:
            raise ValueError(f"--neighbor_offset must be at least 1, got {self.neighbor_offset}")
        if len(parse_windows(self.bone_window, "--bone_window")) != 1:
            raise ValueError(f"--bone_window takes one CENTER:WIDTH, got {self.bone_window!r}")
        if len(parse_windows(self.windows, "--windows")) != 3:
            raise ValueError(f"--windows takes three CENTER:WIDTH separated by commas, got {self.windows!r}")

    @property
    def scheme(self) -> ChannelScheme:
        return channel_scheme(self.channels)

    def stored_channels(self) -> int:
        """Channels a shard stores per slice: what `render_slice` returns (1 for 'bone25d', 3 for 'windows')."""
        return self.scheme.stored_channels(self)

    def channel_layout(self) -> Layout:
        """How the model's 3 channels are assembled from the stored ones (`vit_spine.channels`)."""
        return self.scheme.layout(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing option(s) {unknown}; written by a newer vit-spine?")
        return cls(**values)


def resize_hu(hu: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize of one float32 (rows, cols) image to (size, size).

    The same triangle filter as PIL's BILINEAR and torch's `interpolate(antialias=True)` (widened by the
    scale when shrinking, so every input pixel counts), applied as two sparse matrix products: about
    twice as fast as torch's kernel on one core, equal to it within float32 rounding (0.03 HU).
    """
    if hu.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {hu.shape}")
    if hu.shape == (size, size):
        return np.asarray(hu, dtype=np.float32)
    image = np.asarray(hu, dtype=np.float32)
    rows, cols = resampling_matrix(image.shape[0], size), resampling_matrix(image.shape[1], size)
    return np.ascontiguousarray((cols @ (rows @ image).T).T)


@functools.lru_cache(maxsize=32)
def resampling_matrix(n_in: int, n_out: int):
    """(n_out, n_in) float32 sparse weights of antialiased bilinear resampling along one axis.

    Output pixel i is centred at (i + 0.5) * scale in input coordinates (scale = n_in / n_out); input
    pixel j gets weight max(0, 1 - |j + 0.5 - centre| / max(scale, 1)), normalised to sum to 1 (PIL's
    ImagingResample, which torch's antialiased kernel follows).
    """
    import scipy.sparse

    scale = n_in / n_out
    support = max(scale, 1.0)
    indices, weights, starts = [], [], [0]
    for i in range(n_out):
        centre = (i + 0.5) * scale
        first, last = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        taps = np.arange(first, last)
        w = np.clip(1.0 - np.abs(taps + 0.5 - centre) / support, 0.0, None)
        indices.append(taps)
        weights.append(w / w.sum())
        starts.append(starts[-1] + len(taps))
    return scipy.sparse.csr_matrix(
        (np.concatenate(weights).astype(np.float32), np.concatenate(indices), np.array(starts)), shape=(n_out, n_in)
    )


AIR_HU = -1000.0  # what padding adds around a slice


def field_of_view(shape: tuple[int, int], config: PreprocessConfig, spacing: tuple[float, float] | None = None) -> tuple[int, int]:
    """(rows, cols) in input pixels of the centred window a slice is resized from.

    Without `config.pixel_spacing`: a square of side crop x the longer side (a non-square slice is padded,
    never stretched). With it: image_size x pixel_spacing mm on each axis, in pixels of that axis's
    `spacing` (row spacing, column spacing in mm); ValueError when the slice has no spacing.
    """
    if config.pixel_spacing is None:
        side = max(1, round(config.crop * max(shape)))
        return side, side
    if spacing is None or not all(s and s > 0 for s in spacing):
        raise ValueError(f"--pixel_spacing {config.pixel_spacing} needs the slice's PixelSpacing, and it has none")
    extent = config.image_size * config.pixel_spacing
    return max(1, round(extent / spacing[0])), max(1, round(extent / spacing[1]))


def centered(image: np.ndarray, rows: int, cols: int, fill: float = AIR_HU) -> np.ndarray:
    """The centred (rows, cols) window of a 2-D image: cropped where it is smaller (a view when it is
    only cropped), padded with `fill` where it is larger."""
    have_rows, have_cols = image.shape
    if rows <= have_rows and cols <= have_cols:
        top, left = (have_rows - rows) // 2, (have_cols - cols) // 2
        return image[top:top + rows, left:left + cols]
    out = np.full((rows, cols), fill, np.float32)
    source, target = [], []
    for have, want in ((have_rows, rows), (have_cols, cols)):
        if want <= have:
            start = (have - want) // 2
            source.append(slice(start, start + want))
            target.append(slice(0, want))
        else:
            start = (want - have) // 2
            source.append(slice(0, have))
            target.append(slice(start, start + have))
    out[tuple(target)] = image[tuple(source)]
    return out


def render_slice(hu: np.ndarray, config: PreprocessConfig, spacing: tuple[float, float] | None = None) -> np.ndarray:
    """One HU slice -> uint8 (k, S, S), what the channel scheme stores: k = 1 window for 'bone25d', 3 for 'windows'.

    `spacing`: the slice's (row, column) pixel spacing in mm, needed with `config.pixel_spacing`.
    """
    window = centered(hu, *field_of_view(hu.shape, config, spacing))
    small = resize_hu(window, config.image_size)
    rendered = config.scheme.render(small, config)
    want = (config.stored_channels(), config.image_size, config.image_size)
    if rendered.shape != want or rendered.dtype != np.uint8:  # a registered scheme's bug, named here
        raise TypeError(f"channel scheme {config.channels!r} rendered {rendered.dtype} {rendered.shape}; "
                        f"its layout needs uint8 {want}")
    return rendered


def render_volume(refs, config: PreprocessConfig) -> tuple[list[np.ndarray | None], list[tuple[str, int, str]]]:
    """Read and render the slices `refs` (`vit_spine.study.SliceRef`, in volume order) of one study.

    Returns each slice's `render_slice` result (None where it failed) and the failures as (path, frame,
    reason). Each file is read once (a multi-frame file in one pass), and each slice is rendered as
    soon as it is decoded, so memory holds one HU slice whatever the file.
    """
    from vit_spine.study import iter_volume_hu

    rendered: list[np.ndarray | None] = [None] * len(refs)
    problems = []
    for index, hu in iter_volume_hu(refs):
        ref = refs[index]
        if isinstance(hu, Exception):
            problems.append((str(ref.path), ref.frame, hu.reason))
            continue
        try:
            rendered[index] = render_slice(hu, config, ref.spacing)
        except ValueError as error:  # --pixel_spacing on a slice without PixelSpacing
            problems.append((str(ref.path), ref.frame, str(error)))
    return rendered, problems


def stack_channels(rendered: list[np.ndarray], config: PreprocessConfig, out: np.ndarray | None = None) -> np.ndarray:
    """Rendered slices of one study (volume order) -> the model's uint8 (n, 3, S, S), assembled by the channel
    scheme exactly as `data.ShardDataset` does from a shard; written into `out[:n]` when given."""
    n, size = len(rendered), config.image_size
    shape = (MODEL_CHANNELS, size, size)
    if out is None:
        out = np.empty((n, *shape), np.uint8)
    elif out.shape[0] < n or out.shape[1:] != shape or out.dtype != np.uint8:
        raise ValueError(f"out has shape {out.shape} {out.dtype}; need at least ({n}, 3, {size}, {size}) uint8")
    out = out[:n]
    if n == 0:
        return out
    plan = copy_plan(config.channel_layout(), np.zeros(n, np.int64))  # one study
    return assemble(plan, np.arange(n), array_reader(np.stack(rendered)), out)


def preprocess_study(
    hu_slices: list[np.ndarray], config: PreprocessConfig, spacings: list[tuple[float, float] | None] | None = None
) -> np.ndarray:
    """HU slices of one study, sorted along z ascending -> uint8 (n, 3, S, S); `spacings` per slice for
    `config.pixel_spacing`."""
    spacings = spacings or [None] * len(hu_slices)
    return stack_channels([render_slice(hu, config, s) for hu, s in zip(hu_slices, spacings)], config)
