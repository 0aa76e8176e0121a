"""Channel schemes: what a slice stores in a shard, and how the model's 3 channels are made from it.

A scheme has two halves, used by every reader and writer:
- `render(image, options)` at chunk (and predict) time: one resized HU slice (S, S) -> the uint8 channels
  stored for it (k, S, S), e.g. one bone window, or three windows;
- `layout(options)` at read time: for each of the model's 3 channels, (slice offset, stored channel),
  the stored channel of the slice that many slices away in the same study (clamped to the study's
  first and last slice). `assemble` is the one function that carries a layout out: `ShardDataset`
  (many studies per shard, rows read from a memory map) and `preprocess.stack_channels` (one study in
  memory, what predict uses) both call it, so training and prediction see the same pixels.

The layout is declarative so that a shard can record it (`vit_spine_shard.json` `channel_layout`) and be
read without the scheme's code, e.g. in DataLoader worker processes. Schemes are registered by name
(`register_channel_scheme`); `PreprocessConfig.channels` names one, so the manifest and every checkpoint
say which scheme made their pixels, and an unknown name is refused with the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

MODEL_CHANNELS = 3  # always 3, so ImageNet-pretrained weights apply

Layout = tuple[tuple[int, int], ...]  # per model channel: (slice offset within the study, stored channel)


class ChannelOptions(Protocol):
    """The preprocessing options the built-in schemes read (`preprocess.PreprocessConfig` has them)."""

    bone_window: str
    windows: str
    neighbor_offset: int


@dataclass(frozen=True)
class ChannelScheme:
    name: str = field(metadata={"help": "the registry name, the value of --channels and of `preprocess.channels`."})
    description: str = field(metadata={"help": "one line for --help: what the model's three channels show."})
    render: Callable[[np.ndarray, ChannelOptions], np.ndarray] = field(
        metadata={"help": "(resized HU slice float32 (S, S), options) -> uint8 (k, S, S), the channels a shard stores."}
    )
    layout: Callable[[ChannelOptions], Layout] = field(
        metadata={"help": "options -> 3 pairs (slice offset within the study, stored channel), one per model channel."}
    )

    def stored_channels(self, options: ChannelOptions) -> int:
        """k, the channels `render` returns: every stored channel is used by the layout."""
        return 1 + max(stored for _, stored in self.layout(options))


_SCHEMES: dict[str, ChannelScheme] = {}


def register_channel_scheme(scheme: ChannelScheme) -> ChannelScheme:
    """Make `scheme` available under its name (to --channels, chunk, the shard reader and predict)."""
    if _SCHEMES.get(scheme.name, scheme) is not scheme:
        raise ValueError(f"channel scheme {scheme.name!r} is already registered")
    _SCHEMES[scheme.name] = scheme
    return scheme


def channel_scheme(name: str) -> ChannelScheme:
    """The registered scheme called `name`; ValueError listing the known ones."""
    try:
        return _SCHEMES[name]
    except KeyError:
        raise ValueError(f"--channels {name!r}: not a channel scheme; known: {', '.join(scheme_names())}") from None


def scheme_names() -> list[str]:
    return sorted(_SCHEMES)


def check_layout(layout: Sequence[Sequence[int]], where: str) -> Layout:
    """A layout as a tuple of int pairs, or ValueError naming `where` it came from."""
    try:
        pairs = tuple((offset, stored) for offset, stored in layout)
    except (TypeError, ValueError):  # not a sequence of pairs
        pairs = ()
    if (len(pairs) != MODEL_CHANNELS or not all(isinstance(v, int) for pair in pairs for v in pair)
            or min(stored for _, stored in pairs) < 0):
        raise ValueError(f"{where}: a channel layout is {MODEL_CHANNELS} pairs [slice offset, stored channel >= 0], "
                         f"got {layout!r}")
    return pairs


# ---------------------------------------------------------------- windows (HU -> uint8)


def parse_windows(spec: str, name: str) -> list[tuple[float, float]]:
    """'400:1800,40:400' -> [(400.0, 1800.0), (40.0, 400.0)]."""
    windows = []
    for part in spec.split(","):
        try:
            center, width = (float(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"{name}: {part!r} is not CENTER:WIDTH (numbers in HU)") from None
        if width <= 0:
            raise ValueError(f"{name}: window width must be positive, got {part!r}")
        windows.append((center, width))
    return windows


def apply_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """HU -> uint8: center - width/2 maps to 0, center + width/2 to 255, rounded half up, clipped."""
    scaled = (hu - (center - width / 2)) * (255.0 / width)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    scaled += 0.5
    return scaled.astype(np.uint8)


# ---------------------------------------------------------------- assembling the model's channels


@dataclass(frozen=True)
class CopyRun:
    """Model channels [channel, channel + count) are stored channels [stored, stored + count) of `rows`."""

    channel: int = field(metadata={"help": "first model channel filled."})
    stored: int = field(metadata={"help": "first stored channel read."})
    count: int = field(metadata={"help": "number of consecutive channels copied in one go."})
    rows: np.ndarray = field(metadata={"help": "int64 (n,): the source row of every row of the shard or study."})


def rows_within_study(study_ids: np.ndarray, offset: int) -> np.ndarray:
    """The row `offset` away from each row inside its own study (a study's rows are contiguous and in
    volume order), clamped to the study's first / last row."""
    n = len(study_ids)
    rows = np.arange(n)
    starts_here = np.ones(n, bool)
    starts_here[1:] = study_ids[1:] != study_ids[:-1]
    first = np.maximum.accumulate(np.where(starts_here, rows, 0))
    ends_here = np.ones(n, bool)
    ends_here[:-1] = starts_here[1:]
    last = np.minimum.accumulate(np.where(ends_here, rows, n - 1)[::-1])[::-1]
    return np.clip(rows + offset, first, last)


def copy_plan(layout: Layout, study_ids: np.ndarray) -> list[CopyRun]:
    """The copies that carry out `layout` for rows of these studies. Model channels that read
    consecutive stored channels of the same slice are one copy (a 'windows' row is copied whole)."""
    runs: list[tuple[int, int, int, int]] = []  # (channel, offset, stored, count)
    for channel, (offset, stored) in enumerate(layout):
        if runs and runs[-1][1] == offset and runs[-1][2] + runs[-1][3] == stored:
            first, _, first_stored, count = runs[-1]
            runs[-1] = (first, offset, first_stored, count + 1)
        else:
            runs.append((channel, offset, stored, 1))
    rows = {offset: rows_within_study(study_ids, offset) for _, offset, _, _ in runs}
    return [CopyRun(channel, stored, count, rows[offset]) for channel, offset, stored, count in runs]


# read(rows, stored channels, out): out[k] = stored pixels of row rows[k], those channels
RowReader = Callable[[np.ndarray, slice, np.ndarray], None]


def assemble(plan: list[CopyRun], indices: np.ndarray, read: RowReader, out: np.ndarray) -> np.ndarray:
    """The model's uint8 (len(indices), 3, S, S) for rows `indices`, written into `out` and returned."""
    for run in plan:
        read(run.rows[indices], slice(run.stored, run.stored + run.count), out[:, run.channel : run.channel + run.count])
    return out


def array_reader(stored: np.ndarray) -> RowReader:
    """A RowReader over stored pixels held in one array (n, k, S, S)."""

    def read(rows: np.ndarray, channels: slice, out: np.ndarray) -> None:
        out[...] = stored[rows, channels]

    return read


# ---------------------------------------------------------------- the built-in schemes


def render_bone(image: np.ndarray, options: ChannelOptions) -> np.ndarray:
    return apply_window(image, *parse_windows(options.bone_window, "--bone_window")[0])[None]


def render_windows(image: np.ndarray, options: ChannelOptions) -> np.ndarray:
    return np.stack([apply_window(image, c, w) for c, w in parse_windows(options.windows, "--windows")])


BONE25D = register_channel_scheme(
    ChannelScheme(
        name="bone25d",
        # Fractures are thin cortical breaks seen only in a bone window, and a break continues from slice
        # to slice while noise does not: the neighbours give the model z-context for free. Each slice is
        # stored once (a third of the bytes); the neighbours are assembled when read.
        description="slices z-1, z, z+1 (--neighbor_offset apart) in the --bone_window",
        render=render_bone,
        layout=lambda options: ((-options.neighbor_offset, 0), (0, 0), (options.neighbor_offset, 0)),
    )
)

WINDOWS = register_channel_scheme(
    ChannelScheme(
        name="windows",
        description="one slice in the three --windows (bone, soft tissue, wide)",
        render=render_windows,
        layout=lambda options: ((0, 0), (0, 1), (0, 2)),
    )
)
