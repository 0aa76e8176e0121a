"""The shard format written and read with pyarrow alone is the one `datasets` writes and reads."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest

from vit_spine import shards
from vit_spine.data import ShardDataset
from vit_spine.schema import SHARD_META_FILE


def reference_features(size: int, channels: int) -> datasets.Features:
    """The features `vit-spine chunk` declared through `datasets` before vit_spine.shards existed."""
    return datasets.Features(
        {
            "pixel_values": datasets.Array3D((channels, size, size), "uint8"),
            "labels": datasets.List(datasets.Value("float32"), length=14),
            "study_labels": datasets.List(datasets.Value("float32"), length=8),
            "StudyInstanceUID": datasets.Value("string"),
            "slice_number": datasets.Value("int32"),
            "z": datasets.Value("float32"),
        }
    )


def random_rows(n: int, size: int, channels: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 14)) < 0.3).astype(np.float32)
    labels[::3, 7:] = np.nan  # unknown visibility travels as NaN
    return {
        "pixel_values": rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8),
        "labels": labels,
        "study_labels": (rng.random((n, 8)) < 0.5).astype(np.float32),
        "StudyInstanceUID": np.array([f"1.2.3.{i // 4}" for i in range(n)]),
        "slice_number": np.arange(n, dtype=np.int32) % 4 + 1,
        "z": np.arange(n, dtype=np.float32) * 2.5,
    }


def write_with_pyarrow(folder: Path, rows: dict[str, np.ndarray], split: str = "train") -> None:
    """A shard the way `vit-spine chunk` writes one: a record batch per study, then the JSON files."""
    folder.mkdir()
    size, channels = rows["pixel_values"].shape[-1], rows["pixel_values"].shape[1]
    schema = shards.shard_schema(size, channels)
    uids = rows["StudyInstanceUID"]
    with pa.OSFile(str(folder / shards.ARROW_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for uid in dict.fromkeys(uids.tolist()):
            at = uids == uid
            writer.write_batch(
                shards.record_batch(
                    np.ascontiguousarray(rows["pixel_values"][at]), rows["labels"][at], rows["study_labels"][at],
                    uids[at].tolist(), rows["slice_number"][at], rows["z"][at], schema,
                )
            )
    shards.write_dataset_files(folder, schema, split, "0123456789abcdef")
    (folder / SHARD_META_FILE).write_text(json.dumps({"neighbor_offset": 1}))


def write_with_datasets(folder: Path, rows: dict[str, np.ndarray], num_shards: int = 1) -> None:
    features = reference_features(rows["pixel_values"].shape[-1], rows["pixel_values"].shape[1])
    data = {k: list(v) if k == "pixel_values" else v.tolist() for k, v in rows.items()}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(folder), num_shards=num_shards)
    (folder / SHARD_META_FILE).write_text(json.dumps({"neighbor_offset": 1}))


def arrow_table(folder: Path) -> pa.Table:
    names = [f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
    return pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(folder / n))).read_all() for n in names])


def column_bytes(table: pa.Table, name: str) -> bytes:
    """The values of a (nested) list column, flattened to their bytes."""
    column = table.column(name).combine_chunks()
    values = column.storage if isinstance(column, pa.ExtensionArray) else column
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).tobytes()


@pytest.mark.parametrize("size, channels", [(8, 1), (16, 3)])
def test_the_schema_is_the_datasets_schema_byte_for_byte(size, channels):
    ours = shards.shard_schema(size, channels)
    theirs = reference_features(size, channels).arrow_schema
    assert ours.serialize().to_pybytes() == theirs.serialize().to_pybytes()
    assert ours.metadata == theirs.metadata
    assert ours.field("pixel_values").type.extension_name == theirs.field("pixel_values").type.extension_name


def test_the_json_files_are_the_ones_datasets_writes(tmp_path):
    schema = shards.shard_schema(8, 1)
    shards.write_dataset_files(tmp_path, schema, "val", "0123456789abcdef")
    reference = tmp_path / "reference"
    reference.mkdir()
    datasets.DatasetInfo(features=reference_features(8, 1)).write_to_directory(str(reference), pretty_print=True)
    assert (tmp_path / "dataset_info.json").read_text() == (reference / "dataset_info.json").read_text()
    assert json.loads((tmp_path / "state.json").read_text()) == {
        "_data_files": [{"filename": "data-00000-of-00001.arrow"}],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": "val",
    }


@pytest.mark.parametrize("channels", [1, 3])
def test_a_shard_written_with_pyarrow_equals_one_written_through_datasets(tmp_path, channels):
    rows = random_rows(10, 8, channels)
    write_with_pyarrow(tmp_path / "ours", rows)
    write_with_datasets(tmp_path / "theirs", rows)
    ours, theirs = arrow_table(tmp_path / "ours"), arrow_table(tmp_path / "theirs")
    assert ours.schema.serialize().to_pybytes() == theirs.schema.serialize().to_pybytes()
    assert ours.num_rows == theirs.num_rows == 10
    for name in ("pixel_values", "labels", "study_labels"):
        assert column_bytes(ours, name) == column_bytes(theirs, name), name
    assert column_bytes(ours, "pixel_values") == rows["pixel_values"].tobytes()
    for name in ("StudyInstanceUID", "slice_number", "z"):
        assert ours.column(name).combine_chunks().equals(theirs.column(name).combine_chunks()), name

    # `datasets` opens our shard and sees what it wrote itself
    loaded = datasets.load_from_disk(str(tmp_path / "ours"))
    assert loaded.features == reference_features(8, channels)
    assert loaded.split == "train"
    ours_np, theirs_np = loaded.with_format("numpy")[:], datasets.load_from_disk(str(tmp_path / "theirs")).with_format("numpy")[:]
    np.testing.assert_array_equal(ours_np["pixel_values"], rows["pixel_values"])
    np.testing.assert_array_equal(ours_np["labels"], theirs_np["labels"])  # NaN where NaN
    assert ours_np["StudyInstanceUID"].tolist() == rows["StudyInstanceUID"].tolist()

    # and ShardDataset reads both alike
    a, b = ShardDataset(tmp_path / "ours"), ShardDataset(tmp_path / "theirs")
    everything = np.arange(10)
    np.testing.assert_array_equal(a.read_uint8(everything), b.read_uint8(everything))
    np.testing.assert_array_equal(a.labels, rows["labels"])
    assert a.study_ids.tolist() == b.study_ids.tolist() and a.zs.tolist() == b.zs.tolist()


def test_a_shard_saved_by_datasets_in_several_files_reads_whole(tmp_path):
    rows = random_rows(12, 8, 3, seed=1)
    write_with_datasets(tmp_path / "split", rows, num_shards=3)
    assert len(json.loads((tmp_path / "split" / "state.json").read_text())["_data_files"]) == 3
    dataset = ShardDataset(tmp_path / "split")
    assert len(dataset) == 12
    np.testing.assert_array_equal(dataset.read_uint8(np.arange(12)), rows["pixel_values"])


def test_a_folder_without_state_json_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="not a shard folder"):
        shards.read_table(tmp_path / "x")
