import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vit_spine import STUDY_TARGETS, VERTEBRAE
from vit_spine import chunk as chunking
from vit_spine.artifacts import load_manifest, read_shard_meta, train_shards, val_shards
from vit_spine.chunk import ChunkConfig, chunk, plan_shards, resolve_rank
from vit_spine.data import ShardDataset
from vit_spine.dicom import read_hu
from vit_spine.preprocess import PreprocessConfig
from vit_spine.scan import ScanConfig, scan, write_scan
from vit_spine.schema import MANIFEST_FILE, SLICE_TARGETS, STUDY_LABEL_COLUMNS

SIZE = 64
SHARD_SIZE = 60  # ~40-slice synthetic studies: several shards of 1-2 studies
PREPROCESS = PreprocessConfig(image_size=SIZE)
# RSNA 2022 prevalence of a fracture per vertebra (train.csv of the competition)
PREVALENCE = {"C1": 0.072, "C2": 0.141, "C3": 0.036, "C4": 0.054, "C5": 0.080, "C6": 0.137, "C7": 0.195}


# ---------------------------------------------------------------- planner (labels only, no images)


def fake_studies(n: int, seed: int, folds: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    studies = pd.DataFrame({"StudyInstanceUID": [f"1.2.3.{i}" for i in range(n)]})
    studies["num_slices"] = rng.integers(200, 800, n)
    for v, p in PREVALENCE.items():
        studies[v] = (rng.random(n) < p).astype(int)
    studies["patient_overall"] = studies[list(VERTEBRAE)].max(axis=1)
    if folds:
        studies["fold"] = rng.integers(0, 5, n)
    return studies


def target_counts(plans, split: str, studies: pd.DataFrame) -> np.ndarray:
    by_uid = studies.set_index("StudyInstanceUID")
    return np.array([by_uid.loc[p.studies, list(STUDY_TARGETS)].sum().to_numpy() for p in plans if p.split == split])


def check_plan_covers_studies(plans, studies: pd.DataFrame) -> None:
    planned = [uid for p in plans for uid in p.studies]
    assert sorted(planned) == sorted(studies["StudyInstanceUID"])  # each study in exactly one shard
    sizes = studies.set_index("StudyInstanceUID")["num_slices"]
    assert all(p.num_slices == sizes[p.studies].sum() for p in plans)


@pytest.mark.parametrize("seed", [0, 1])
def test_plan_is_stratified_within_two_studies_per_target(seed):
    """Stated tolerance: per target (patient_overall, C1..C7), shard counts differ by at most 2."""
    studies = fake_studies(600, seed)
    plans, validation = plan_shards(studies, shard_size=15000, val_fraction=0.1, val_fold=None, seed=seed)
    check_plan_covers_studies(plans, studies)
    assert validation == {"method": "fraction", "fraction": 0.1, "num_studies": 60}
    train = target_counts(plans, "train", studies)
    assert len(train) == round(studies["num_slices"].sum() * 0.9 / 15000)
    assert (train.max(axis=0) - train.min(axis=0)).max() <= 2
    slices = np.array([p.num_slices for p in plans if p.split == "train"])
    assert slices.max() / slices.min() < 1.1
    # validation: its share of every target within 1 study of 10 %
    val = target_counts(plans, "val", studies).sum(axis=0)
    expected = studies[list(STUDY_TARGETS)].sum().to_numpy() * 0.1
    assert np.abs(val - expected).max() <= 1.5


def test_plan_is_deterministic_and_seeded():
    studies = fake_studies(300, 0)
    first = plan_shards(studies, 15000, 0.1, None, seed=4)
    again = plan_shards(studies.sample(frac=1.0, random_state=1), 15000, 0.1, None, seed=4)
    other = plan_shards(studies, 15000, 0.1, None, seed=5)
    assert first == again  # row order of the input does not matter
    assert first[0] != other[0]


def test_plan_without_validation_and_with_tiny_data():
    studies = fake_studies(5, 3)
    plans, validation = plan_shards(studies, 15000, 0.0, None, seed=0)
    assert [p.path for p in plans] == ["shard_00000"] and validation["num_studies"] == 0
    check_plan_covers_studies(plans, studies)
    plans, _ = plan_shards(studies, 300, 0.0, None, seed=0)
    assert len(plans) == 5  # one study per shard at most: no empty shard
    assert all(len(p.studies) == 1 for p in plans)
    check_plan_covers_studies(plans, studies)


def test_plan_holds_out_a_fold_when_there_is_one():
    studies = fake_studies(300, 2, folds=True)
    plans, validation = plan_shards(studies, 15000, 0.1, None, seed=0)
    assert validation == {"method": "fold", "fold": 0, "num_studies": int((studies["fold"] == 0).sum())}
    val_uids = {uid for p in plans if p.split == "val" for uid in p.studies}
    assert val_uids == set(studies.loc[studies["fold"] == 0, "StudyInstanceUID"])
    plans3, _ = plan_shards(studies, 15000, 0.1, 3, seed=0)
    assert {uid for p in plans3 if p.split == "val" for uid in p.studies} == set(
        studies.loc[studies["fold"] == 3, "StudyInstanceUID"]
    )
    with pytest.raises(ValueError, match="train.csv has folds"):
        plan_shards(studies, 15000, 0.1, 7, seed=0)
    with pytest.raises(ValueError, match="needs a fold column"):
        plan_shards(studies.drop(columns="fold"), 15000, 0.1, 1, seed=0)


def test_plan_on_the_real_rsna_labels(shared_rsna):
    labels = pd.read_csv(shared_rsna / "train.csv")
    labels["num_slices"] = np.random.default_rng(0).integers(150, 800, len(labels))
    plans, validation = plan_shards(labels, 15000, 0.1, None, seed=0)
    check_plan_covers_studies(plans, labels)
    assert validation["method"] == "fold"
    for split in ("train", "val"):
        counts = target_counts(plans, split, labels)
        assert (counts.max(axis=0) - counts.min(axis=0)).max() <= 2


def test_rank_comes_from_options_or_the_launcher_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank(None, None) == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank(None, None) == (2, 3)
    assert resolve_rank(0, 2) == (0, 2)
    with pytest.raises(ValueError, match="rank"):
        resolve_rank(3, 3)


# ---------------------------------------------------------------- end to end on synthetic DICOM


@pytest.fixture(scope="module")
def dataset(synth_data: Path, tmp_path_factory) -> dict:
    """A copy of synth_data with: one study unlabelled, one file truncated before the scan (a scan
    problem), one file damaged after the scan (fails only when chunk decodes it)."""
    root = tmp_path_factory.mktemp("chunk")
    data = root / "data"
    shutil.copytree(synth_data, data)
    labels = pd.read_csv(data / "train.csv")
    studies = sorted(labels["StudyInstanceUID"])
    unlabelled, truncated_study, damaged_study = studies[0], studies[1], studies[2]
    labels[labels["StudyInstanceUID"] != unlabelled].to_csv(data / "train.csv", index=False)
    truncated = data / "train_images" / truncated_study / "7.dcm"
    truncated.write_bytes(truncated.read_bytes()[:300])
    table = scan(data, ScanConfig(data_dir=str(data), workers=1, progress=False))
    write_scan(table, root / "slices.parquet")
    damaged = data / "train_images" / damaged_study / "5.dcm"
    damaged.write_bytes(damaged.read_bytes()[:-4000])
    return {
        "root": root,
        "data": data,
        "table": table,
        "slice_table": str(root / "slices.parquet"),
        "unlabelled": unlabelled,
        "truncated": str(truncated),
        "damaged": str(damaged),
        "labels": labels,
    }


def config_for(dataset: dict, out: Path, **overrides) -> ChunkConfig:
    options = dict(
        data_dir=str(dataset["data"]),
        output_dir=str(out),
        slice_table=dataset["slice_table"],
        shard_size=SHARD_SIZE,
        workers=0,
        progress=False,
        rank=0,
        world_size=1,
    )
    return ChunkConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def reference(dataset) -> tuple[Path, dict]:
    """An uninterrupted run with 2 worker processes."""
    out = dataset["root"] / "reference"
    manifest = chunk(config_for(dataset, out, workers=2), PREPROCESS)
    return out, manifest


def shard_rows(out: Path, manifest: dict) -> pd.DataFrame:
    frames = []
    for entry in manifest["shards"]:
        shard = ShardDataset(out / entry["path"])
        frames.append(
            pd.DataFrame(
                {
                    "shard": entry["path"],
                    "split": entry["split"],
                    "StudyInstanceUID": shard.study_ids,
                    "slice_number": shard.slice_numbers,
                    "z": shard.zs,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_every_readable_slice_lands_in_exactly_one_shard(dataset, reference):
    out, manifest = reference
    assert manifest["complete"] and len(train_shards(manifest)) >= 3 and len(val_shards(manifest)) >= 1
    rows = shard_rows(out, manifest)
    table = dataset["table"]
    expected = table[
        (table["image_set"] == "train")
        & (table["problem"] == "")
        & table["label_overall"].notna()
        & (table["path"] != dataset["damaged"])
    ]
    got = sorted(zip(rows["StudyInstanceUID"], rows["slice_number"]))
    assert got == sorted(zip(expected["StudyInstanceUID"], expected["slice_number"]))
    assert sum(s["num_slices"] for s in manifest["shards"]) == len(rows)
    # studies are never split; validation studies are the fold-0 studies and disjoint from training
    assert (rows.groupby("StudyInstanceUID")["shard"].nunique() == 1).all()
    val_studies = set(rows.loc[rows["split"] == "val", "StudyInstanceUID"])
    train_studies = set(rows.loc[rows["split"] == "train", "StudyInstanceUID"])
    assert val_studies and not val_studies & train_studies
    labels = dataset["labels"]
    assert val_studies == set(labels.loc[labels["fold"] == 0, "StudyInstanceUID"])
    assert manifest["validation"]["method"] == "fold"


def test_rows_are_grouped_by_study_and_z_sorted_with_the_scan_labels(dataset, reference):
    out, manifest = reference
    table = dataset["table"].set_index(["StudyInstanceUID", "slice_number"])
    for entry in manifest["shards"]:
        shard = ShardDataset(out / entry["path"])
        uids = list(dict.fromkeys(shard.study_ids))
        assert uids == entry["studies"]  # contiguous blocks, in plan order
        for uid in uids:
            zs = shard.zs[shard.study_ids == uid]
            assert (np.diff(zs) > 0).all()
        keys = list(zip(shard.study_ids, shard.slice_numbers.astype(int)))
        expected = table.loc[keys]
        np.testing.assert_array_equal(shard.labels, expected[list(SLICE_TARGETS)].to_numpy(np.float32))
        np.testing.assert_array_equal(shard.study_labels, expected[list(STUDY_LABEL_COLUMNS)].to_numpy(np.float32))


def test_problems_and_skipped_studies_are_listed(dataset, reference):
    _, manifest = reference
    problems = {p["path"]: p["reason"] for p in manifest["problems"]}
    assert dataset["truncated"] in problems and dataset["damaged"] in problems
    assert all(reason for reason in problems.values())
    assert {"StudyInstanceUID": dataset["unlabelled"], "reason": "no labels in train.csv", "num_slices": 40} in manifest[
        "skipped_studies"
    ]
    damaged_shard = [s for s in manifest["shards"] if Path(dataset["damaged"]).parent.name in s["studies"]][0]
    meta = read_shard_meta(reference[0] / damaged_shard["path"])
    assert [p["path"] for p in meta["problems"]] == [dataset["damaged"]]
    assert meta["num_slices"] == meta["planned_slices"] - 1


def test_stored_pixels_equal_an_independent_window_and_resize_of_read_hu(dataset, reference):
    out, manifest = reference
    paths = dataset["table"].set_index(["StudyInstanceUID", "slice_number"])["path"]
    rng = np.random.default_rng(0)
    low, high = 400 - 1800 / 2, 400 + 1800 / 2
    for entry in manifest["shards"]:
        shard = ShardDataset(out / entry["path"])
        for index in rng.choice(len(shard), size=3, replace=False):
            hu = read_hu(paths[(shard.study_ids[index], int(shard.slice_numbers[index]))])
            resized = np.asarray(Image.fromarray(hu, "F").resize((SIZE, SIZE), Image.BILINEAR))
            expected = np.round(np.clip((resized - low) / (high - low), 0, 1) * 255)
            stored = shard.read_uint8([index])[0].astype(int)
            assert np.abs(stored[1] - expected).max() <= 1
            same_study = shard.study_ids == shard.study_ids[index]
            before = index - 1 if index > 0 and same_study[index - 1] else index
            after = index + 1 if index + 1 < len(shard) and same_study[index + 1] else index
            assert np.array_equal(stored[0], shard.read_uint8([before])[0, 1])
            assert np.array_equal(stored[2], shard.read_uint8([after])[0, 1])


def test_pixel_spacing_resamples_every_slice_and_is_stored_with_the_preprocessing(dataset, tmp_path):
    """--pixel_spacing P: each slice's centred image_size x P mm, whatever its own spacing (synth varies it per study)."""
    spacing = 2.5  # 160 mm: more than some studies' field of view (padded), less than others' (cropped)
    preprocess = PreprocessConfig(image_size=SIZE, pixel_spacing=spacing)
    manifest = chunk(config_for(dataset, tmp_path / "chunks"), preprocess)
    assert manifest["preprocess"]["pixel_spacing"] == spacing
    table = dataset["table"].set_index(["StudyInstanceUID", "slice_number"])
    low, high = 400 - 1800 / 2, 400 + 1800 / 2
    seen_spacings = set()
    shard = ShardDataset(tmp_path / "chunks" / train_shards(manifest)[0]["path"])
    for index in range(0, len(shard), 17):
        row = table.loc[(shard.study_ids[index], int(shard.slice_numbers[index]))]
        hu = read_hu(row["path"])
        side = round(SIZE * spacing / row["pixel_spacing"])  # the slice's pixels in SIZE * spacing mm
        if side <= len(hu):  # a centred part of the slice
            start = (len(hu) - side) // 2
            window = hu[start:start + side, start:start + side]
        else:  # the slice, padded with air around it
            window = np.full((side, side), -1000.0, np.float32)
            start = (side - len(hu)) // 2
            window[start:start + len(hu), start:start + len(hu)] = hu
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(window), "F").resize((SIZE, SIZE), Image.BILINEAR))
        expected = np.round(np.clip((resized - low) / (high - low), 0, 1) * 255)
        assert np.abs(shard.read_uint8([index])[0, 1].astype(int) - expected).max() <= 1
        seen_spacings.add(round(row["pixel_spacing"], 3))
    assert len(seen_spacings) > 1  # studies of different pixel spacings, all brought to 2 mm


def test_each_shard_opens_with_datasets_load_from_disk(reference):
    out, manifest = reference
    entry = manifest["shards"][0]
    loaded = datasets.load_from_disk(str(out / entry["path"]))
    assert len(loaded) == entry["num_slices"]
    # 'bone25d' stores each slice once; ShardDataset adds the neighbour channels when it reads
    assert loaded.features["pixel_values"].shape == (1, SIZE, SIZE)
    assert loaded.with_format("numpy")[0]["labels"].shape == (14,)
    meta = read_shard_meta(out / entry["path"])
    offset = PREPROCESS.neighbor_offset
    assert meta["channel_layout"] == [[-offset, 0], [0, 0], [offset, 0]]


def test_rerun_over_a_finished_output_rewrites_nothing(dataset, reference):
    out, manifest = reference

    def data_files() -> dict:  # the lock file records its last holder each time: bookkeeping, not data
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if not p.name.endswith(".lock")}

    before = data_files()
    again = chunk(config_for(dataset, out, slice_table=None, data_dir=None), PREPROCESS)
    assert data_files() == before
    assert again == manifest
    with pytest.raises(ValueError, match="planned with other options"):
        chunk(config_for(dataset, out, seed=1), PREPROCESS)


class Killed(Exception):
    pass


def test_killed_run_resumes_to_byte_identical_shards(dataset, reference, monkeypatch):
    ref_out, ref_manifest = reference
    out = dataset["root"] / "killed"

    def kill_after_first_shard(meta):
        raise Killed(meta["path"])

    with pytest.raises(Killed):
        chunk(config_for(dataset, out), PREPROCESS, on_shard_done=kill_after_first_shard)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["shard_00000"]
    assert not load_manifest(out)["complete"]

    # killed in the middle of the next shard (after its first study when it has two): its temporary
    # folder stays behind, never a final one
    kill_at = min(2, len(ref_manifest["shards"][1]["studies"]))
    calls = {"n": 0}
    real_render = chunking.render_study

    def render_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed("mid-shard")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(chunking, "render_study", render_then_die)
    with pytest.raises(Killed):
        chunk(config_for(dataset, out), PREPROCESS)
    monkeypatch.setattr(chunking, "render_study", real_render)
    assert (out / ".tmp-shard_00001").is_dir() and not (out / "shard_00001").exists()
    assert [s["complete"] for s in load_manifest(out)["shards"]][:2] == [True, False]

    first_mtime = (out / "shard_00000" / chunking.ARROW_FILE).stat().st_mtime_ns
    written = []
    manifest = chunk(config_for(dataset, out), PREPROCESS, on_shard_done=lambda meta: written.append(meta["path"]))
    assert written == [s["path"] for s in ref_manifest["shards"]][1:]
    assert (out / "shard_00000" / chunking.ARROW_FILE).stat().st_mtime_ns == first_mtime
    assert not list(out.glob(".tmp-*"))
    assert manifest == {**ref_manifest, "data_dir": manifest["data_dir"]}
    for entry in ref_manifest["shards"]:
        assert folder_bytes(out / entry["path"]) == folder_bytes(ref_out / entry["path"])


def test_a_shard_is_on_disk_before_the_rename_that_marks_it_done(dataset, disk_events):
    out = dataset["root"] / "durable"
    manifest = chunk(config_for(dataset, out), PREPROCESS)
    real_out = os.path.realpath(out)
    for entry in manifest["shards"]:
        renamed_at = disk_events.index(("rename", f"{real_out}/{entry['path']}"))
        flushed = {path for kind, path in disk_events[:renamed_at] if kind == "fsync"}
        tmp = f"{real_out}/{chunking.TMP_PREFIX}{entry['path']}"
        assert {f"{tmp}/{name}" for name in os.listdir(out / entry["path"])} | {tmp} <= flushed
        assert disk_events[renamed_at + 1] == ("fsync", real_out)  # the new folder entry itself
    manifest_at = max(i for i, event in enumerate(disk_events) if event == ("rename", f"{real_out}/manifest.json"))
    assert disk_events[manifest_at - 1][1].startswith(f"{real_out}/{chunking.TMP_PREFIX}manifest.json")


def test_ranks_divide_the_shards_exactly_once(dataset, reference):
    ref_out, ref_manifest = reference
    out = dataset["root"] / "ranks"
    written: dict[int, list[str]] = {}
    for rank in (1, 0):  # rank 1 first: it plans on its own, before rank 0 wrote the manifest
        written[rank] = []
        chunk(
            config_for(dataset, out, rank=rank, world_size=2),
            PREPROCESS,
            on_shard_done=lambda meta, r=rank: written[r].append(meta["path"]),
        )
    all_shards = [s["path"] for s in ref_manifest["shards"]]
    assert sorted(written[0] + written[1]) == sorted(all_shards)
    assert written[0] == all_shards[0::2] and written[1] == all_shards[1::2]
    manifest = load_manifest(out)
    assert manifest["complete"]
    for entry in ref_manifest["shards"]:
        assert folder_bytes(out / entry["path"]) == folder_bytes(ref_out / entry["path"])


def test_command_line_writes_the_windows_scheme(dataset, capsys):
    out = dataset["root"] / "cli"
    argv = [
        str(dataset["data"]), "--out", str(out), "--slice-table", dataset["slice_table"], "--shard-size", "1000",
        "--image-size", "32", "--channels", "windows", "--workers", "0", "--ignore-folds", "--val-fraction", "0.3",
        "--progress", "false",
    ]
    assert chunking.main(argv) == 0
    manifest = load_manifest(out)
    assert manifest["preprocess"]["channels"] == "windows" and manifest["preprocess"]["image_size"] == 32
    assert manifest["validation"] == {"method": "fraction", "fraction": 0.3, "num_studies": 2}
    assert [s["path"] for s in manifest["shards"]] == ["shard_00000", "val_00000"]
    pixels = ShardDataset(out / "shard_00000").read_uint8([0])[0]
    assert pixels.shape == (3, 32, 32) and not np.array_equal(pixels[0], pixels[1])
    assert datasets.load_from_disk(str(out / "shard_00000")).features["pixel_values"].shape == (3, 32, 32)
    assert read_shard_meta(out / "shard_00000")["channel_layout"] == [[0, 0], [0, 1], [0, 2]]
    assert "2/2 shards complete" in capsys.readouterr().out


def test_a_manifest_of_another_format_is_refused_with_the_fix(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": 1, "shards": []}))
    with pytest.raises(ValueError, match="manifest format 1, this vit-spine reads 2; chunk the data again"):
        load_manifest(tmp_path)
