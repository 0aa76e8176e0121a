"""Reading shards written by `vit-spine chunk` as a torch Dataset, fast.

`datasets` decodes an Array3D row by row into Python/numpy objects (about 4k img/s on 2 CPU cores,
against over 100k img/s for a zero-copy view). The shard's Arrow file is memory-mapped, and the uint8 pixels of each record batch are one
contiguous buffer, so `ShardDataset` views them as numpy arrays (n, k, S, S) without a copy and a batch
is copied straight out of the memory map: memmap speed. The model's 3 channels are assembled from the
stored ones by the shard's channel layout (`vit_spine.channels.assemble`, the code `preprocess.stack_channels`
runs for predict): 'bone25d' shards store each slice once (k = 1) and the reader puts the slices below and
above it (same study, `neighbor_offset` away, the end slice repeated at the ends) into channels 0 and 2.

Batches stay uint8 all the way to the device (a quarter of the bytes of float32 through pinned memory
and PCIe); `model_input` turns them into the model's float input there, and applies the random
augmentation to whole batches while training (the Trainer subclass in `train` calls it). The CPU that
feeds a GPU then only copies bytes. `collate_batch` hands the batch on without stacking it again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from vit_spine.artifacts import val_shards
from vit_spine.channels import MODEL_CHANNELS, CopyRun, Layout, assemble, check_layout, copy_plan
from vit_spine.preprocess import PreprocessConfig
from vit_spine.schema import FRACTURES, MANIFEST_FILE, NUM_SLICE_TARGETS, NUM_STUDY_TARGETS, SHARD_META_FILE
from vit_spine.shards import check_whole, pixel_shape, read_table


@dataclass
class AugmentConfig:
    """Light, label-preserving augmentation of axial slices.

    A left/right mirror keeps every target (vertebra and fracture labels do not depend on the side);
    an up/down mirror would swap front and back of the neck, which no scan shows, so there is none.
    """

    max_rotation: float = field(default=10.0, metadata={"help": "largest rotation, degrees (uniform +-)."})
    max_shift: float = field(default=0.06, metadata={"help": "largest shift as a fraction of the image side."})
    max_zoom: float = field(default=0.1, metadata={"help": "scale drawn uniformly from 1 +- this."})
    flip_probability: float = field(default=0.5, metadata={"help": "probability of a left/right mirror."})
    max_brightness: float = field(default=0.05, metadata={"help": "intensity offset (image range 0..1), +-."})
    max_contrast: float = field(default=0.1, metadata={"help": "intensity gain drawn from 1 +- this."})


class ShardDataset(torch.utils.data.Dataset):
    """One shard (a `datasets` folder written by `vit-spine chunk`, read with pyarrow alone) as a torch Dataset.

    Items: {"pixel_values": uint8 (3, S, S) assembled from the stored channels by the shard's channel
    layout (the neighbour channels added for a one-channel 'bone25d' shard), "labels": float32 (14,) with
    NaN where a target is unknown}; `model_input` makes the model's input from a batch of them.
    `__getitems__` reads a whole batch at once (the DataLoader uses it). Per-slice metadata as numpy
    arrays: `labels` (n, 14), `study_labels` (n, 8), `study_ids`, `slice_numbers`, `zs`; `plan`: the
    copies (`channels.CopyRun`, source rows per model channel) that assemble a row.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such shard folder")
        check_whole(self.path)  # sizes against the record written with the shard: a cut file is named here
        # pyarrow alone (no `datasets`): the GPU machines may not have it
        table = read_table(self.path)
        missing = {"pixel_values", "labels", "study_labels", "StudyInstanceUID", "slice_number", "z"} - set(
            table.column_names
        )
        if missing:
            raise ValueError(f"{self.path}: not a vit-spine shard, missing column(s) {sorted(missing)}")
        shape = pixel_shape(table.schema, self.path)
        self.image_size = shape[-1]
        self._pixel_chunks = [pixel_view(chunk, self.path, shape) for chunk in table.column("pixel_values").chunks]
        self._chunk_starts = np.cumsum([0] + [len(c) for c in self._pixel_chunks])
        self.labels = fixed_list_to_numpy(table.column("labels"), NUM_SLICE_TARGETS)
        self.study_labels = fixed_list_to_numpy(table.column("study_labels"), NUM_STUDY_TARGETS)
        self.study_ids = np.asarray(table.column("StudyInstanceUID").to_pylist(), dtype=object)
        self.slice_numbers = table.column("slice_number").to_numpy()
        self.zs = table.column("z").to_numpy()
        layout = read_channel_layout(self.path, stored=shape[0])
        self.plan: list[CopyRun] = copy_plan(layout, self.study_ids)
        self._table = table  # keeps the memory map open for the views

    def __getstate__(self) -> dict:
        # DataLoader workers started with spawn get the path and reopen the memory map, instead of
        # a pickled copy of every pixel.
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __len__(self) -> int:
        return int(self._chunk_starts[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices) -> list[dict[str, torch.Tensor]]:
        pixels = torch.from_numpy(self.read_uint8(indices))
        labels = torch.from_numpy(self.labels[np.asarray(indices, dtype=np.int64)])
        return [{"pixel_values": v, "labels": y} for v, y in zip(pixels, labels)]

    def read_uint8(self, indices) -> np.ndarray:
        """The pixels of `indices` as one uint8 array (len(indices), 3, S, S)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"index out of range for a shard of {n} slices")
        indices = np.where(indices < 0, indices + n, indices)
        size = self.image_size
        out = np.empty((len(indices), MODEL_CHANNELS, size, size), np.uint8)
        return assemble(self.plan, indices, self._copy_rows, out)

    def _copy_rows(self, rows: np.ndarray, channels: slice, out: np.ndarray) -> None:
        """out[k] = stored `channels` of row rows[k]: one copy per slice, straight from the memory map."""
        chunk_of = np.searchsorted(self._chunk_starts, rows, side="right") - 1
        local = rows - self._chunk_starts[chunk_of]
        chunks = self._pixel_chunks
        for k, (c, i) in enumerate(zip(chunk_of.tolist(), local.tolist())):
            out[k] = chunks[c][i, channels]


def read_channel_layout(path: Path, stored: int) -> Layout:
    """How the model's channels are assembled from a shard's `stored` ones: its `vit_spine_shard.json`
    `channel_layout`. Shards written before it (no entry) are 'bone25d' with their `neighbor_offset`
    when they store one channel, and 'windows' when they store three (also a `datasets` folder without it)."""
    meta_path = path / SHARD_META_FILE
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    except (OSError, ValueError) as error:
        raise ValueError(f"{meta_path}: cannot read the shard's description ({error!r})") from error
    if "channel_layout" in meta:
        layout = check_layout(meta["channel_layout"], f"{meta_path} channel_layout")
    elif stored == 3:
        layout = PreprocessConfig(channels="windows").channel_layout()
    else:
        offset = meta.get("neighbor_offset")
        if not isinstance(offset, int) or offset < 1:
            raise ValueError(f"{meta_path}: a one-channel shard needs its channel_layout or a positive "
                             f"neighbor_offset here, got {offset!r}")
        layout = PreprocessConfig(neighbor_offset=offset).channel_layout()
    needs = 1 + max(channel for _, channel in layout)
    if needs != stored:
        raise ValueError(f"{path}: pixel_values has {stored} channel(s) but its channel layout {list(layout)} "
                         f"reads {needs}")
    return layout


def collate_batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`default_data_collator` for ShardDataset items, without its copy when they come from one `__getitems__`.

    `__getitems__` builds the whole batch as one tensor and hands out its rows; stacking them again
    costs a second copy of the batch. This returns that tensor instead, and falls back to `torch.stack`
    for items of any other origin.
    """
    return {key: stack_rows([item[key] for item in items]) for key in items[0]}


def stack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    first = tensors[0]
    storage, step = first.untyped_storage(), first.numel()
    consecutive = all(
        t.is_contiguous()
        and t.shape == first.shape
        and t.dtype == first.dtype
        and t.untyped_storage().data_ptr() == storage.data_ptr()
        and t.storage_offset() == first.storage_offset() + i * step
        for i, t in enumerate(tensors)
    )
    if not consecutive:
        return torch.stack(tensors)
    return first.new_empty(0).set_(storage, first.storage_offset(), (len(tensors), *first.shape))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 (x/255 - 0.5) / 0.5, on the tensor's device."""
    return pixels.float().mul_(2.0 / 255.0).sub_(1.0)


def model_input(pixels: torch.Tensor, augment: AugmentConfig | None = None) -> torch.Tensor:
    """A uint8 batch (b, 3, S, S) -> the model's float32 input in [-1, 1], on the batch's device.

    With `augment`, each image gets its own random affine, mirror and intensity jitter first (drawn from
    the global RNG of that device, which the Trainer seeds and checkpoints). Float input passes through
    unchanged, so callers that normalised already are not normalised twice. (The ViT casts its input
    to its own dtype, bf16 included.)
    """
    if pixels.dtype != torch.uint8:
        return pixels
    if augment is None:
        return normalize(pixels)
    images = augment_batch(pixels.float().div_(255.0), augment)
    return images.sub_(0.5).div_(0.5)


def pixel_view(chunk: pa.Array, path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Zero-copy uint8 (rows, *shape) view of one Arrow chunk of an Array3D column of that shape."""
    storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
    values = storage
    depth = 0
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(
        values.type
    ):
        if values.null_count:
            raise ValueError(f"{path}: pixel_values has missing rows")
        values = values.flatten()
        depth += 1
    if depth != 3 or values.type != pa.uint8():
        raise ValueError(f"{path}: pixel_values is not a 3-D uint8 array column ({chunk.type})")
    flat = values.to_numpy(zero_copy_only=True)
    rows = len(chunk)
    if flat.size != rows * math.prod(shape):
        raise ValueError(f"{path}: pixel_values holds {flat.size} bytes for {rows} rows of {shape}")
    return flat.reshape(rows, *shape)


def fixed_list_to_numpy(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A list<float32> column of fixed length `width` -> float32 (n, width)."""
    flat = np.concatenate([chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks] or [np.empty(0)])
    return flat.astype(np.float32, copy=False).reshape(-1, width)


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random affine (rotation, zoom, shift), left/right mirror and intensity jitter of float (b, 3, S, S) in [0, 1].

    Draws from the global RNG of the images' device unless `generator` is given (on that device).
    Areas moved into view are black (air).
    """
    b = images.shape[0]
    if b == 0:
        return images

    def uniform(scale: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator, device=images.device) * 2 - 1) * scale

    angle = uniform(math.radians(config.max_rotation))
    zoom = 1 + uniform(config.max_zoom)
    shift_x, shift_y = uniform(2 * config.max_shift), uniform(2 * config.max_shift)  # grid units span 2
    flip = torch.where(torch.rand(b, generator=generator, device=images.device) < config.flip_probability, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = (1 + uniform(config.max_contrast)).view(b, 1, 1, 1)
    offset = uniform(config.max_brightness).view(b, 1, 1, 1)
    return moved.sub_(0.5).mul_(gain).add_(0.5 + offset).clamp_(0.0, 1.0)


def positive_slices(labels: np.ndarray) -> np.ndarray:
    """Boolean (n,): a slice shows at least one fractured vertebra (unknown targets count as not)."""
    return np.nan_to_num(labels[:, FRACTURES], nan=0.0).max(axis=1) > 0.5


def balanced_sampler(
    dataset: ShardDataset,
    positive_fraction: float = 0.5,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.utils.data.WeightedRandomSampler:
    """A sampler that draws fracture-positive slices with probability `positive_fraction` (with replacement).

    Positive slices are rare (a few % of all slices); drawing them more often gives the model enough of
    them per shard. `num_samples` defaults to len(dataset). A shard without positives is sampled uniformly.
    """
    if not 0.0 < positive_fraction < 1.0:
        raise ValueError(f"positive_fraction must be in (0, 1), got {positive_fraction}")
    positive = positive_slices(dataset.labels)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        weights = np.ones(len(positive))
    else:
        weights = np.where(positive, positive_fraction / n_pos, (1 - positive_fraction) / n_neg)
    return torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double),
        num_samples=num_samples or len(positive),
        replacement=True,
        generator=generator,
    )


@dataclass
class ValidationSet:
    """The validation shards of a chunks folder (the one loader: `load_validation`), and per slice what
    scoring and the report need besides the model's outputs, in manifest order."""

    shards: list[ShardDataset]  # in manifest order
    study_ids: np.ndarray  # (n,) str
    study_labels: np.ndarray  # (n, 8) float, NaN if unlabeled

    @property
    def dataset(self) -> torch.utils.data.Dataset:
        """All validation slices as one Dataset (what `vit_spine.inference` reads)."""
        return self.shards[0] if len(self.shards) == 1 else torch.utils.data.ConcatDataset(self.shards)

    def column(self, name: str) -> np.ndarray:
        """A per-slice array of the shards (`labels`, `zs`, `slice_numbers`...), concatenated."""
        return np.concatenate([getattr(s, name) for s in self.shards])


def load_validation(chunks: Path, manifest: dict) -> ValidationSet:
    """The validation shards of a chunks folder (in manifest order) and their study labels."""
    shards = [ShardDataset(Path(chunks) / s["path"]) for s in val_shards(manifest)]
    if not shards:
        raise ValueError(f"{Path(chunks) / MANIFEST_FILE} lists no validation shard; re-chunk with --val_fraction > 0")
    return ValidationSet(
        shards=shards,
        study_ids=np.concatenate([s.study_ids for s in shards]),
        study_labels=np.concatenate([s.study_labels for s in shards]),
    )
