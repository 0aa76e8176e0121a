"""Fixtures shared by the stage tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from vit_spine.phantom import (
    CORONAL,
    SeriesSpec,
    WrittenSeries,
    reformat,
    write_dose_screen,
    write_localizer,
    write_series,
    write_structured_report,
)
from vit_spine.synth import SynthConfig, synthesize

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_config(tmp_path_factory: pytest.TempPathFactory) -> SynthConfig:
    """The options `synth_data` was written with (10 studies, 3 of them test, 40 slices of 128 px)."""
    out = tmp_path_factory.mktemp("synth") / "data"
    return SynthConfig(output_dir=str(out), num_studies=10, num_test_studies=3, num_slices=40, size=128, seed=0)


@pytest.fixture(scope="session")
def synth_data(synth_config: SynthConfig) -> Path:
    """A small synthetic dataset in the RSNA 2022 layout, written once per test session.

    Holds every transfer syntax and pixel format synth writes, both slice orders, segmentations,
    boxes and `ground_truth.csv`. Treat it as read-only: other tests share it.
    """
    out = Path(synth_config.output_dir)
    synthesize(out, synth_config)
    return out


@pytest.fixture(scope="session")
def trained_run(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny shards trained on `synth_data` (scan -> chunk -> train, as a user would), --seed 0, 2 calibration
    folds; the chunks are `trained_run.parent / "chunks"`. Treat it as read-only: other tests share it."""
    from transformers import TrainingArguments

    from vit_spine import train
    from vit_spine.chunk import ChunkConfig, chunk
    from vit_spine.evaluation import PoolingConfig
    from vit_spine.preprocess import PreprocessConfig
    from vit_spine.scan import ScanConfig, scan, write_scan

    root = tmp_path_factory.mktemp("trained")
    table = scan(synth_data, ScanConfig(data_dir=str(synth_data), workers=1, progress=False))
    write_scan(table, root / "slices.parquet")
    chunks = root / "chunks"
    chunk(
        ChunkConfig(
            data_dir=str(synth_data), output_dir=str(chunks), slice_table=str(root / "slices.parquet"), shard_size=100,
            val_fraction=0.3, ignore_folds=True, workers=0, progress=False, rank=0, world_size=1,
        ),
        PreprocessConfig(image_size=32),
    )
    args = TrainingArguments(
        **{
            **train.training_defaults(),
            "per_device_train_batch_size": 16, "logging_steps": 2, "save_strategy": "no", "use_cpu": True,
            "disable_tqdm": True, "seed": 0, "learning_rate": 1e-3, "output_dir": str(root / "run"),
        }
    )
    config = train.TrainConfig(chunks=str(chunks), model_config="tiny", augment=False, patience=5, max_shards=2)
    result = train.run_training(config, PoolingConfig(calibration_folds=2), args)
    assert len(result.rows) == 2
    return root / "run"


@pytest.fixture(scope="session")
def toy_chunks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four toy training shards and a validation shard (tests/toy_run.py), for the training tests."""
    from toy_run import write_toy_chunks

    return write_toy_chunks(tmp_path_factory.mktemp("chunks"))


@pytest.fixture(scope="session")
def shared_rsna() -> Path:
    """The real RSNA 2022 label files in ../shared/rsna2022 (dev workspace only)."""
    path = REPO_ROOT.parent / "shared" / "rsna2022"
    if not (path / "train.csv").is_file():
        pytest.skip("../shared/rsna2022 not present (only in the dev workspace)")
    return path


@pytest.fixture
def disk_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Records ("fsync", real path) and ("rename", real target path) for os.fsync/rename/replace, in order."""
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(source, target):
        real_rename(source, target)
        events.append(("rename", os.path.realpath(target)))

    def replace(source, target):
        real_replace(source, target)
        events.append(("rename", os.path.realpath(target)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return events


EXPORT_STUDY_UID = "1.2.826.0.1.3680043.10.{}"


@dataclass
class ExportStudy:
    """One study folder written the way a scanner or PACS exports it, with what assembly must make of it."""

    uid: str
    folder: Path
    volume: WrittenSeries | None  # the series the assembly must choose (None: no usable volume)
    left_out: dict[str, int]  # reason -> count of files/frames it must leave out


@pytest.fixture(scope="session")
def export_studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportStudy]:
    """A folder of study folders in the layouts real exports use (built with vit_spine.phantom):

    - nested: PATIENT/STUDY/SERIES/IM0001 files without extension, plus a coronal localizer, a dose
      screen, a dose SR and a notes.txt;
    - uid_named: SOP-UID file names, a 1 mm bone series, a 3 mm soft-kernel series and a coronal reformat;
    - enhanced: one Enhanced CT file, frames written head first (against the position order);
    - no_preamble: files without the 128-byte preamble, named by UID without extension, padding 63536;
    - no_positions: no ImagePositionPatient, InstanceNumber descending along the stack;
    - hopeless: only a localizer and a dose screen (no axial CT at all).
    Treat it as read-only: other tests share it.
    """
    root = tmp_path_factory.mktemp("exports") / "studies"
    studies: dict[str, ExportStudy] = {}

    def add(name: str, index: int) -> tuple[str, Path]:
        uid = EXPORT_STUDY_UID.format(index)
        return uid, root / uid

    uid, folder = add("nested", 1)
    series = folder / "PATIENT01" / "STUDY01"
    volume = write_series(series / "SERIES02", SeriesSpec(num_slices=12, naming="IM", series_number=2), uid)
    write_localizer(series, uid, name="SERIES01")
    write_dose_screen(series / "SERIES99", uid)
    write_structured_report(series / "SERIES98", uid)
    (folder / "notes.txt").write_text("exported by PACS\n")
    studies["nested"] = ExportStudy(uid, folder, volume, {"localizer": 1, "secondary_capture": 1, "non_image": 1, "not_dicom": 1})

    uid, folder = add("uid_named", 2)
    thin = write_series(folder, SeriesSpec(num_slices=24, spacing=1.0, naming="uid", series_number=3), uid)
    write_series(folder, SeriesSpec(num_slices=8, spacing=3.0, kernel="STANDARD", naming="uid", series_number=4), uid)
    write_series(folder, reformat(SeriesSpec(num_slices=10), CORONAL, 5, naming="uid"), uid)
    studies["uid_named"] = ExportStudy(uid, folder, thin, {"other_series": 8, "not_axial": 10})

    uid, folder = add("enhanced", 3)
    spec = SeriesSpec(num_slices=10, spacing=2.0, enhanced=True, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                      first_position=(-63.0, -63.0, 20.0), drift=(0.0, 0.0, -4.0))  # z falls by 2 mm a frame
    studies["enhanced"] = ExportStudy(uid, folder, write_series(folder / "EN", spec, uid), {})

    uid, folder = add("no_preamble", 4)
    spec = SeriesSpec(num_slices=10, preamble=False, naming="uid_noext", signed=False, intercept=-1024.0, padding=63536)
    studies["no_preamble"] = ExportStudy(uid, folder, write_series(folder, spec, uid), {})

    uid, folder = add("no_positions", 5)
    spec = SeriesSpec(num_slices=10, positions=False, instance_numbers="descending", naming="uid")
    studies["no_positions"] = ExportStudy(uid, folder, write_series(folder, spec, uid), {})

    uid, folder = add("hopeless", 6)
    write_localizer(folder, uid)
    write_dose_screen(folder / "DOSE", uid)
    studies["hopeless"] = ExportStudy(uid, folder, None, {"localizer": 1, "secondary_capture": 1})
    return studies
