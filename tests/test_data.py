import json
import pickle

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import default_data_collator

from vit_spine.chunk import RenderedStudy, ShardPlan, shard_features, write_shard
from vit_spine.data import (
    AugmentConfig,
    ShardDataset,
    augment_batch,
    balanced_sampler,
    collate_batch,
    model_input,
    positive_slices,
)
from vit_spine.preprocess import PreprocessConfig, stack_channels
from vit_spine.schema import SLICE_TARGETS, STUDY_LABEL_COLUMNS

SIZE = 16


def fake_rows(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (n, 14)).astype(np.float32)
    labels[:, :7] = rng.random((n, 7)) < 0.04  # fractured slices are rare
    labels[rng.random((n, 14)) < 0.2] = np.nan
    return {
        "pixel_values": rng.integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8),
        "labels": labels,
        "study_labels": rng.integers(0, 2, (n, 8)).astype(np.float32),
        "StudyInstanceUID": [f"1.2.{i // 7}" for i in range(n)],
        "slice_number": np.arange(n, dtype=np.int32) + 1,
        "z": np.linspace(-50, 50, n, dtype=np.float32),
    }


@pytest.fixture(scope="module")
def hf_shard(tmp_path_factory) -> tuple[str, dict]:
    """A shard written by `datasets` itself, in 3 Arrow files (so several record batches)."""
    rows = fake_rows(40, seed=0)
    path = tmp_path_factory.mktemp("hf") / "shard_00000"
    dataset = datasets.Dataset.from_dict({k: list(v) for k, v in rows.items()}, features=shard_features(SIZE))
    dataset.save_to_disk(str(path), num_shards=3)
    return str(path), rows


def test_items_are_the_stored_pixels_and_model_input_normalises_them(hf_shard):
    path, rows = hf_shard
    dataset = ShardDataset(path)
    assert len(dataset) == 40 and len(dataset._pixel_chunks) >= 3
    indices = [39, 0, 13, 14, 27, 13, -1]
    items = dataset.__getitems__(indices)
    for index, item in zip(indices, items):
        assert item["pixel_values"].dtype == torch.uint8 and item["pixel_values"].shape == (3, SIZE, SIZE)
        np.testing.assert_array_equal(item["pixel_values"].numpy(), rows["pixel_values"][index])
        np.testing.assert_array_equal(item["labels"].numpy(), rows["labels"][index])  # NaN == NaN here
    assert torch.equal(dataset[13]["pixel_values"], items[2]["pixel_values"])
    batch = collate_batch(items)["pixel_values"]
    expected = (rows["pixel_values"][np.array(indices)] / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(model_input(batch).numpy(), expected, atol=1e-6)
    assert model_input(batch).dtype == torch.float32
    already = model_input(batch)
    assert model_input(already) is already  # float input is not normalised twice


def test_pixels_are_a_read_only_view_of_the_arrow_buffers(hf_shard):
    dataset = ShardDataset(hf_shard[0])
    for view in dataset._pixel_chunks:
        assert not view.flags.owndata and not view.flags.writeable
    stored = datasets.load_from_disk(hf_shard[0]).with_format("numpy")["pixel_values"]
    np.testing.assert_array_equal(dataset.read_uint8(np.arange(40)), stored)


def test_pickles_as_its_path_not_its_pixels(hf_shard):
    dataset = ShardDataset(hf_shard[0])
    blob = pickle.dumps(dataset)
    assert len(blob) < 2000
    copy = pickle.loads(blob)
    np.testing.assert_array_equal(copy.read_uint8([3, 30]), dataset.read_uint8([3, 30]))


def test_metadata_arrays(hf_shard):
    path, rows = hf_shard
    dataset = ShardDataset(path)
    np.testing.assert_array_equal(dataset.labels, rows["labels"])
    np.testing.assert_array_equal(dataset.study_labels, rows["study_labels"])
    assert dataset.study_ids.tolist() == rows["StudyInstanceUID"]
    np.testing.assert_array_equal(dataset.slice_numbers, rows["slice_number"])
    np.testing.assert_array_equal(dataset.zs, rows["z"])


def test_out_of_range_index_raises(hf_shard):
    dataset = ShardDataset(hf_shard[0])
    with pytest.raises(IndexError):
        dataset[40]
    with pytest.raises(IndexError):
        dataset.__getitems__([0, -41])


def test_not_a_shard_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such shard"):
        ShardDataset(tmp_path / "missing")
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="missing column"):
        ShardDataset(tmp_path / "other")


def test_dataloader_with_the_trainer_collator_batches_through_getitems(hf_shard):
    dataset = ShardDataset(hf_shard[0])
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=default_data_collator)
    batches = list(loader)
    assert [b["pixel_values"].shape for b in batches] == [(8, 3, SIZE, SIZE)] * 5
    assert all(b["labels"].shape == (8, 14) for b in batches)


def test_collate_batch_equals_the_trainer_collator_without_copying(hf_shard):
    dataset = ShardDataset(hf_shard[0])
    items = dataset.__getitems__([5, 30, 2])
    ours, reference = collate_batch(items), default_data_collator(items)
    assert ours.keys() == reference.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], equal_nan=True, rtol=0, atol=0)
    assert ours["pixel_values"].data_ptr() == items[0]["pixel_values"].data_ptr()
    mixed = [dataset[1], dataset[0]]  # items of separate reads: stacked as usual
    torch.testing.assert_close(collate_batch(mixed)["pixel_values"], default_data_collator(mixed)["pixel_values"])
    assert collate_batch(mixed)["pixel_values"].data_ptr() != mixed[0]["pixel_values"].data_ptr()
    reversed_rows = items[::-1]
    torch.testing.assert_close(collate_batch(reversed_rows)["pixel_values"], torch.stack([i["pixel_values"] for i in reversed_rows]))


@pytest.mark.parametrize("channels", ["bone25d", "windows"])
def test_reads_a_shard_written_by_the_chunker_one_batch_per_study(channels, tmp_path):
    """write_shard streams each study as one record batch; the reader sees every study's rows in order.

    'bone25d' shards store one channel per slice and the reader adds the neighbours exactly as
    `stack_channels` (what predict uses) does; 'windows' shards store and read three channels.
    """
    config = PreprocessConfig(image_size=SIZE, channels=channels, neighbor_offset=2)
    stored = 1 if channels == "bone25d" else 3
    rng = np.random.default_rng(3)
    studies = {f"s{k}": rng.integers(0, 256, (n, stored, SIZE, SIZE), dtype=np.uint8) for k, n in enumerate((5, 1, 9))}
    slices = {}
    for uid, pixels in studies.items():
        n = len(pixels)
        slices[uid] = pd.DataFrame(
            {
                "StudyInstanceUID": uid,
                "slice_number": np.arange(n),
                "z": np.arange(n, dtype=float),
                "position": np.arange(n, dtype=float),
                "path": [f"/{uid}/{i}.dcm" for i in range(n)],
                **{c: rng.integers(0, 2, n).astype(float) for c in (*SLICE_TARGETS, *STUDY_LABEL_COLUMNS)},
            }
        )
    ok = {uid: np.ones(len(p), bool) for uid, p in studies.items()}
    ok["s2"][[0, 4]] = False  # two slices "failed to decode": the study yields 7 rows
    rendered = iter(RenderedStudy(uid, p[ok[uid]], ok[uid], []) for uid, p in studies.items())
    plan = ShardPlan("shard_00000", "train", list(studies), 15, 0, {})
    meta = write_shard(tmp_path, plan, rendered, slices, config)
    assert meta["num_slices"] == 13 and not (tmp_path / ".tmp-shard_00000").exists()
    assert datasets.load_from_disk(str(tmp_path / "shard_00000")).features["pixel_values"].shape == (stored, SIZE, SIZE)
    dataset = ShardDataset(tmp_path / "shard_00000")
    assert len(dataset._pixel_chunks) == 3
    expected = np.concatenate([stack_channels(list(p[ok[uid]]), config) for uid, p in studies.items()])
    np.testing.assert_array_equal(dataset.read_uint8(np.arange(13)), expected)
    assert dataset.slice_numbers[-7:].tolist() == [1, 2, 3, 5, 6, 7, 8]
    expected_labels = pd.concat([slices[uid][ok[uid]] for uid in studies])[list(SLICE_TARGETS)].to_numpy(np.float32)
    np.testing.assert_array_equal(dataset.labels, expected_labels)
    assert len(datasets.load_from_disk(str(tmp_path / "shard_00000"))) == 13


def test_a_shard_from_before_channel_layout_reads_by_its_neighbor_offset_and_a_wrong_layout_is_named(tmp_path):
    rows = fake_rows(21, seed=4)  # three studies of 7 slices
    rows["pixel_values"] = np.ascontiguousarray(rows["pixel_values"][:, :1])
    path = tmp_path / "shard_00000"
    datasets.Dataset.from_dict({k: list(v) for k, v in rows.items()}, features=shard_features(SIZE, 1)).save_to_disk(str(path))
    (path / "vit_spine_shard.json").write_text(json.dumps({"neighbor_offset": 2}))
    config = PreprocessConfig(image_size=SIZE, neighbor_offset=2)
    expected = np.concatenate([stack_channels(list(rows["pixel_values"][k : k + 7]), config) for k in (0, 7, 14)])
    np.testing.assert_array_equal(ShardDataset(path).read_uint8(np.arange(21)), expected)
    (path / "vit_spine_shard.json").write_text(json.dumps({"channel_layout": [[0, 0], [0, 1], [0, 2]]}))
    with pytest.raises(ValueError, match=r"pixel_values has 1 channel\(s\) but its channel layout .* reads 3$"):
        ShardDataset(path)


def test_augmented_model_input_keeps_shape_and_range_and_varies(hf_shard):
    pixels = collate_batch(ShardDataset(hf_shard[0]).__getitems__(list(range(8))))["pixel_values"]
    torch.manual_seed(0)
    first, second = model_input(pixels, AugmentConfig()), model_input(pixels, AugmentConfig())
    plain = model_input(pixels)
    assert first.shape == plain.shape == (8, 3, SIZE, SIZE) and first.dtype == torch.float32
    assert first.min() >= -1 and first.max() <= 1
    for a, b, r in zip(first, second, plain):
        assert not torch.equal(a, b) and not torch.equal(a, r)
    torch.manual_seed(0)
    assert torch.equal(model_input(pixels, AugmentConfig()), first)  # drawn from the (checkpointed) global RNG


def test_augmentation_without_any_change_is_the_identity_and_flip_mirrors():
    images = torch.rand(4, 3, SIZE, SIZE)
    none = AugmentConfig(0, 0, 0, 0, 0, 0)
    torch.testing.assert_close(augment_batch(images.clone(), none), images, atol=1e-5, rtol=0)
    flip = AugmentConfig(0, 0, 0, 1.0, 0, 0)
    torch.testing.assert_close(augment_batch(images.clone(), flip), images.flip(-1), atol=1e-5, rtol=0)


def test_balanced_sampler_draws_the_requested_share_of_positive_slices(hf_shard):
    dataset = ShardDataset(hf_shard[0])
    positive = positive_slices(dataset.labels)
    assert 0 < positive.sum() < len(positive)
    sampler = balanced_sampler(dataset, positive_fraction=0.3, num_samples=4000, generator=torch.Generator().manual_seed(0))
    drawn = np.fromiter(sampler, dtype=np.int64)
    assert len(drawn) == 4000
    assert abs(positive[drawn].mean() - 0.3) < 0.03
    with pytest.raises(ValueError, match="positive_fraction"):
        balanced_sampler(dataset, positive_fraction=1.0)
