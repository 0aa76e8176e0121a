"""The shard file format, read and written with pyarrow alone.

A shard folder is what `datasets.Dataset.save_to_disk` makes of one Arrow file (so `datasets.load_from_disk`
opens it), plus our `vit_spine_shard.json`:
- `data-00000-of-00001.arrow`: an Arrow IPC stream, one record batch per study, with the columns of
  `shard_schema`. `pixel_values` carries the Array3D extension type of `datasets` (its name and its JSON
  `[shape, dtype]` metadata), and the schema carries the `datasets` features as JSON under the key
  `huggingface`, exactly as `datasets.Features.arrow_schema` does.
- `dataset_info.json` and `state.json`: the two files `load_from_disk` reads next to it.

Nothing here imports `datasets`: the GPU machines this project meets first have torch, transformers and
pyarrow but not `datasets`, and the training path (and `vit-spine bench gpu`) must run there. Files
written here are byte-compatible with what `datasets` writes and reads (tests/test_shards.py), and
shards written by `datasets` itself (`save_to_disk`, several Arrow files included) read here too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vit_spine.artifacts import read_shard_meta
from vit_spine.fs import DamagedFile, check_files
from vit_spine.schema import NUM_SLICE_TARGETS, NUM_STUDY_TARGETS, SHARD_META_FILE

ARROW_FILE = "data-00000-of-00001.arrow"  # the name `save_to_disk` gives a one-file dataset
STATE_FILE = "state.json"
INFO_FILE = "dataset_info.json"
# The name `datasets` registers its Array3D type under (its module and class name): `load_from_disk`
# turns a column with this name back into an Array3D feature.
ARRAY3D_EXTENSION = "datasets.features.features.Array3DExtensionType"


class Array3DType(pa.ExtensionType):
    """The `datasets` Array3D extension type, without `datasets`: same name, same storage, same metadata.

    Never registered with pyarrow (`datasets` registers its own class under the same name when it is
    imported, and a second registration would fail); writing needs no registration, and the reader
    finds the shape in the schema's `huggingface` metadata whichever class pyarrow hands back.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: str = "uint8"):
        self.shape = tuple(int(v) for v in shape)
        self.value_type = dtype
        # nested variable-size lists, as `datasets` stores ArrayND (it avoids fixed-size lists)
        storage = pa.list_(pa.list_(pa.list_(pa.from_numpy_dtype(np.dtype(dtype)))))
        super().__init__(storage, ARRAY3D_EXTENSION)

    def __arrow_ext_serialize__(self) -> bytes:
        return json.dumps((self.shape, self.value_type)).encode()

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type: pa.DataType, serialized: bytes) -> "Array3DType":
        shape, dtype = json.loads(serialized)
        return cls(tuple(shape), dtype)


def features_dict(image_size: int, channels: int) -> dict[str, Any]:
    """The shard's columns as `datasets.Features.to_dict()` writes them (key order included)."""

    def value(dtype: str) -> dict[str, str]:
        return {"dtype": dtype, "_type": "Value"}

    return {
        "pixel_values": {"shape": [channels, image_size, image_size], "dtype": "uint8", "_type": "Array3D"},
        "labels": {"feature": value("float32"), "length": NUM_SLICE_TARGETS, "_type": "List"},
        "study_labels": {"feature": value("float32"), "length": NUM_STUDY_TARGETS, "_type": "List"},
        "StudyInstanceUID": value("string"),
        "slice_number": value("int32"),
        "z": value("float32"),
    }


def shard_schema(image_size: int, channels: int = 3) -> pa.Schema:
    """The Arrow schema of a shard; `channels` stored per slice (1 for 'bone25d', 3 for 'windows')."""
    fields = [
        pa.field("pixel_values", Array3DType((channels, image_size, image_size))),
        pa.field("labels", pa.list_(pa.float32(), NUM_SLICE_TARGETS)),
        pa.field("study_labels", pa.list_(pa.float32(), NUM_STUDY_TARGETS)),
        pa.field("StudyInstanceUID", pa.string()),
        pa.field("slice_number", pa.int32()),
        pa.field("z", pa.float32()),
    ]
    metadata = {"info": {"features": features_dict(image_size, channels)}}
    return pa.schema(fields, metadata={"huggingface": json.dumps(metadata)})


def record_batch(
    pixels: np.ndarray,
    labels: np.ndarray,
    study_labels: np.ndarray,
    study_ids: Sequence[str],
    slice_numbers: np.ndarray,
    zs: np.ndarray,
    schema: pa.Schema,
) -> pa.RecordBatch:
    """Slices as one Arrow record batch of `schema`; the pixel column wraps `pixels` (uint8 (n, k, S, S),
    C-contiguous) without copying, so it must be written before the caller reuses that memory."""
    n, channels, height, width = pixels.shape
    if pixels.dtype != np.uint8 or not pixels.flags.c_contiguous:
        raise ValueError(f"pixels must be C-contiguous uint8, got {pixels.dtype}")

    def offsets(count: int, step: int) -> pa.Array:
        return pa.array(np.arange(0, count * step + 1, step, dtype=np.int32))

    flat = pa.Array.from_buffers(pa.uint8(), pixels.size, [None, pa.py_buffer(pixels)])
    rows_of_pixels = pa.ListArray.from_arrays(offsets(n * channels * height, width), flat)
    storage = pa.ListArray.from_arrays(
        offsets(n, channels), pa.ListArray.from_arrays(offsets(n * channels, height), rows_of_pixels)
    )

    def fixed(matrix: np.ndarray, width: int) -> pa.Array:
        values = np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1)
        if values.size != n * width:
            raise ValueError(f"expected {n} rows of {width} values, got {values.size} values")
        return pa.FixedSizeListArray.from_arrays(pa.array(values), width)

    return pa.record_batch(
        [
            pa.ExtensionArray.from_storage(schema.field("pixel_values").type, storage),
            fixed(labels, NUM_SLICE_TARGETS),
            fixed(study_labels, NUM_STUDY_TARGETS),
            pa.array([str(uid) for uid in study_ids], pa.string()),
            pa.array(np.asarray(slice_numbers, dtype=np.int32)),
            pa.array(np.asarray(zs, dtype=np.float32)),
        ],
        schema=schema,
    )


def write_dataset_files(folder: Path, schema: pa.Schema, split: str, fingerprint: str) -> None:
    """The two JSON files next to the Arrow file that make `datasets.load_from_disk` open the folder.

    `dataset_info.json` is the text `datasets.DatasetInfo(features=...).write_to_directory(pretty_print=True)`
    writes (an empty description, citation, homepage and license, then the features, indent 4).
    """
    info = {
        "description": "",
        "citation": "",
        "homepage": "",
        "license": "",
        "features": json.loads(schema.metadata[b"huggingface"])["info"]["features"],
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=4))
    state = {
        "_data_files": [{"filename": ARROW_FILE}],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": split,
    }
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))


REPAIR = "run the same `vit-spine chunk` command again to write it anew (add --verify to check every shard's checksum)"


def damage(folder: Path, checksums: bool = False) -> list[str]:
    """What is wrong with a finished shard's files compared with the sizes (and, when asked, checksums)
    recorded when it was written; [] when whole. A shard written before the record existed is not checked
    here (`read_table` still names it when its files cannot be read)."""
    record = read_shard_meta(folder).get("files")
    return check_files(Path(folder), record, checksums) if record else []


def check_whole(folder: Path) -> None:
    """DamagedFile naming the shard, what differs and how to repair it, unless its files have their recorded sizes."""
    problems = damage(folder) if (Path(folder) / SHARD_META_FILE).is_file() else []
    if problems:
        raise DamagedFile(f"shard {folder} is damaged ({'; '.join(problems)}): {REPAIR}")


def read_table(folder: Path) -> pa.Table:
    """A shard's rows as an Arrow table backed by the memory-mapped file(s) (`pixel_shape` reads its pixel shape).

    The Arrow files are the ones `state.json` lists, in order (`save_to_disk` may have written several).
    A file cut short or overwritten is reported naming the shard and the fix, not as a bare pyarrow error.
    """
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{folder}: not a shard folder, no readable {STATE_FILE} ({error!r})") from error
    try:
        tables = [pa.ipc.open_stream(pa.memory_map(str(folder / name))).read_all() for name in names]
    except (pa.ArrowInvalid, OSError) as error:
        raise DamagedFile(f"shard {folder} cannot be read ({error}): {REPAIR}") from error
    if not tables:
        raise ValueError(f"{folder}: {STATE_FILE} lists no data file")
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def pixel_shape(schema: pa.Schema, folder: Path) -> tuple[int, int, int]:
    """(k, S, S) of the `pixel_values` column, from the `datasets` features stored in the schema."""
    try:
        features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        shape = tuple(int(v) for v in features["pixel_values"]["shape"])
    except (TypeError, KeyError, ValueError) as error:
        raise ValueError(f"{folder}: the Arrow schema does not describe a pixel_values Array3D ({error!r})") from error
    if len(shape) != 3:
        raise ValueError(f"{folder}: pixel_values has shape {shape}; expected (channels, size, size)")
    return shape
