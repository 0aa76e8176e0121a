"""Promises that hold under faults: a kill at any instant resumes identically, a full disk loses nothing,
two processes never share an output folder, a table or run from elsewhere is refused, damage is found."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow
import pytest
import torch
from safetensors.torch import load_file

from kill_run import CONFIG, POINTS
from toy_run import run
from vit_spine import cli, fs, train
from vit_spine.artifacts import RunDir, load_manifest
from vit_spine.chunk import ChunkConfig, chunk
from vit_spine.data import ShardDataset
from vit_spine.preprocess import PreprocessConfig
from vit_spine.scan import ScanConfig, scan, write_scan
from vit_spine.schema import TRAINER_CHECKPOINT_COMPLETE_FILE

TESTS = Path(__file__).parent


def final_weights(out: Path, shard: int) -> dict:
    return load_file(str(out / f"shard_{shard:05d}" / "model.safetensors"))


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(reference: Path, resumed: Path, shards: int = 2) -> None:
    """Tensor-equal weights of every shard and equal metrics rows (timings aside)."""
    for k in range(shards):
        a, b = final_weights(reference, k), final_weights(resumed, k)
        assert a.keys() == b.keys()
        for name in a:
            assert (a[name] == b[name]).all(), f"shard {k}: {name} differs after the resume"
    rows_a, rows_b = metrics_rows(reference), metrics_rows(resumed)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed_s", "seconds", "train_loss")} for r in rows]
    assert strip(rows_a) == strip(rows_b)
    for ra, rb in zip(rows_a, rows_b):  # the same per-step losses, perhaps summed in another grouping
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-12) and ra["train_loss"] > 0
    assert os.readlink(reference / "best") == os.readlink(resumed / "best")
    assert json.loads((reference / "all_results.json").read_text()) == json.loads((resumed / "all_results.json").read_text())


@pytest.fixture(scope="module")
def reference_run(toy_chunks, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(toy_chunks, out, **CONFIG)
    return out


def killed_run(point: str, chunks: Path, out: Path) -> None:
    # the same torch thread count as this process's reference and resumed runs: float sums depend on it
    environment = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run([sys.executable, str(TESTS / "kill_run.py"), point, str(chunks), str(out)],
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, f"{point}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def trainer_checkpoints(out: Path, shard: int = 0) -> dict[str, bool]:
    """checkpoint-N -> marked complete, for one shard's Trainer folder."""
    folder = out / f"shard_{shard:05d}" / "trainer"
    return {p.name: (p / TRAINER_CHECKPOINT_COMPLETE_FILE).is_file() for p in sorted(folder.glob("checkpoint-*"))}


# What each kill leaves on disk, checked before the resume (so each test proves it hit its moment).
LEFT_BEHIND = {
    "mid_step": lambda out: trainer_checkpoints(out) == {"checkpoint-4": True} and not (out / "metrics.jsonl").exists(),
    "torn_checkpoint": lambda out: trainer_checkpoints(out) == {"checkpoint-4": True, "checkpoint-8": False}
    and not (out / "shard_00000" / "trainer" / "checkpoint-8" / "trainer_state.json").exists(),
    "first_checkpoint": lambda out: trainer_checkpoints(out) == {"checkpoint-4": True},
    "between_shards": lambda out: len(metrics_rows(out)) == 1 and not (out / "shard_00001").exists(),
    "shard_save": lambda out: (out / "shard_00000" / "model.safetensors").is_file()
    and not (out / "shard_00000" / "vit_spine.json").exists(),
    "before_run_files": lambda out: (out / "shard_00000" / "vit_spine.json").is_file()
    and not (out / "metrics.jsonl").exists() and not (out / "best").exists(),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_a_kill_at_any_moment_resumes_to_the_uninterrupted_run(point, toy_chunks, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    killed_run(point, toy_chunks, out)
    assert LEFT_BEHIND[point](out), f"{point}: the kill did not leave what it should"
    rows = run(toy_chunks, out, **CONFIG)
    assert [r["shard"] for r in rows] == [0, 1]
    printed = capsys.readouterr().out
    if point == "torn_checkpoint":
        assert "removing the torn Trainer checkpoint" in printed and "checkpoint-8" in printed
        assert "resuming from" in printed and "checkpoint-4" in printed
    assert_same_run(reference_run, out)


def test_every_kill_point_is_covered():
    assert set(POINTS) == set(LEFT_BEHIND) and len(POINTS) == 6


def test_a_torn_checkpoint_with_no_complete_one_restarts_the_shard(toy_chunks, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out, symlinks=True)
    for name in ("metrics.jsonl", "all_results.json", "best"):
        (out / name).unlink()
    shutil.rmtree(out / "shard_00001")
    # shard 1 was killed while writing its only checkpoint: a folder the Trainer would have trusted
    torn = out / "shard_00001" / "trainer" / "checkpoint-4"
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"\0" * 100)
    rows = run(toy_chunks, out, **CONFIG)
    assert [r["shard"] for r in rows] == [0, 1]
    assert "removing the torn Trainer checkpoint" in capsys.readouterr().out
    assert_same_run(reference_run, out)


# ---------------------------------------------------------------- a full disk


class DiskFull:
    """Make the k-th call of a writing function raise ENOSPC, as a full disk does."""

    def __init__(self, monkeypatch, owner, name: str, at: int) -> None:
        original, self.calls = getattr(owner, name), 0

        def write(*args, **kwargs):
            self.calls += 1
            if self.calls == at:
                raise OSError(errno.ENOSPC, "No space left on device", str(args[1] if len(args) > 1 else args[0]))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, write)


WRITERS = {"weights": ("transformers.modeling_utils", "safe_save_file"), "optimizer": ("torch", "save")}


@pytest.mark.parametrize(("writer", "at"), [("weights", 1), ("optimizer", 2), ("weights", 3)],
                         ids=["first_checkpoint_weights", "first_checkpoint_optimizer", "final_shard_weights"])
def test_a_full_disk_during_training_loses_nothing_and_the_rerun_is_identical(writer, at, toy_chunks, reference_run,
                                                                              tmp_path, monkeypatch):
    import importlib

    out = tmp_path / "run"
    module, name = WRITERS[writer]
    full = DiskFull(monkeypatch, importlib.import_module(module), name, at)
    with pytest.raises(OSError, match="No space left on device"):
        run(toy_chunks, out, **CONFIG)
    assert full.calls == at
    # nothing looks finished that is not: every marked checkpoint is whole, no shard marked done
    for folder in out.glob("shard_*/trainer/checkpoint-*"):
        assert train.checkpoint_damage(folder) == [] or not (folder / TRAINER_CHECKPOINT_COMPLETE_FILE).exists()
    assert not list(out.glob("shard_*/vit_spine.json"))  # call 3 is shard 0's final weights: not marked done
    monkeypatch.undo()  # space was freed
    run(toy_chunks, out, **CONFIG)
    assert_same_run(reference_run, out)


def test_a_full_disk_is_one_line_naming_the_file_with_exit_1(toy_chunks, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils

    DiskFull(monkeypatch, transformers.modeling_utils, "safe_save_file", 1)
    code = cli.main(["train", "--chunks", str(toy_chunks), "--output", str(tmp_path / "run"), "--model_config", "tiny",
                     "--max_shards", "1", "--save_steps", "4", "--per_device_train_batch_size", "8", "--use_cpu", "True",
                     "--disable_tqdm", "True"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0] and "checkpoint-4" in err[0]


@pytest.fixture(scope="module")
def small_dataset(synth_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reliability")
    table = scan(synth_data, ScanConfig(data_dir=str(synth_data), workers=1, progress=False))
    write_scan(table, root / "slices.parquet")
    reference = root / "reference"
    chunk(chunk_config(synth_data, root / "slices.parquet", reference), PreprocessConfig(image_size=32))
    return {"data": synth_data, "table": root / "slices.parquet", "reference": reference, "root": root}


def chunk_config(data: Path, table: Path, out: Path, **overrides) -> ChunkConfig:
    options = dict(data_dir=str(data), slice_table=str(table), output_dir=str(out), shard_size=60, workers=0, progress=False,
                   rank=0, world_size=1)
    return ChunkConfig(**{**options, **overrides})


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*_0000*/*"))}


def test_a_full_disk_during_chunking_leaves_no_shard_that_looks_whole_and_the_rerun_is_identical(small_dataset, tmp_path,
                                                                                                   monkeypatch):
    out = tmp_path / "chunks"
    real_file = pyarrow.OSFile

    class FullAfter:  # the third shard's Arrow file fills the disk after 20 kB
        def __init__(self, path, mode="rb"):
            self.file, self.budget = real_file(path, mode), 20_000 if ".tmp-shard_00002" in str(path) else None

        def write(self, data):
            if self.budget is not None and len(data) > self.budget:
                raise OSError(errno.ENOSPC, "No space left on device")
            if self.budget is not None:
                self.budget -= len(data)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(pyarrow, "OSFile", FullAfter)
    config = chunk_config(small_dataset["data"], small_dataset["table"], out)
    with pytest.raises(OSError, match="No space left on device"):
        chunk(config, PreprocessConfig(image_size=32))
    finished = [p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")]
    assert sorted(finished) == ["shard_00000", "shard_00001"]  # the third is only a .tmp- folder
    monkeypatch.undo()
    chunk(config, PreprocessConfig(image_size=32))
    assert shard_bytes(out) == shard_bytes(small_dataset["reference"])
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------- one process per folder


def hold_lock(folder: Path, name: str = fs.LOCK_FILE) -> subprocess.Popen:
    code = ("import sys, time; from vit_spine.fs import FolderLock\n"
            f"with FolderLock({str(folder)!r}, 'vit-spine train', name={name!r}):\n"
            "    print('held', flush=True); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_process_on_the_same_output_is_refused_naming_the_pid(toy_chunks, tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        with pytest.raises(fs.FolderInUse, match=rf"{out} is in use by PID {holder.pid} \(vit-spine train"):
            run(toy_chunks, out, **CONFIG)
        assert [p.name for p in out.iterdir()] == [fs.LOCK_FILE]  # nothing was written
        code = cli.main(["train", "--chunks", str(toy_chunks), "--output", str(out), "--model_config", "tiny"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"PID {holder.pid}" in err[0]
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    holder = hold_lock(tmp_path / "out")
    holder.kill()
    holder.wait()
    with fs.FolderLock(tmp_path / "out", "test"):
        pass
    assert f"taking over the lock of PID {holder.pid}, which is no longer running" in capsys.readouterr().err


def test_two_chunks_of_one_rank_are_refused_and_other_ranks_share_the_folder(small_dataset, tmp_path):
    out = tmp_path / "chunks"
    holder = hold_lock(out, ".vit-spine-chunk-rank0.lock")
    try:
        with pytest.raises(fs.FolderInUse, match=f"PID {holder.pid}"):
            chunk(chunk_config(small_dataset["data"], small_dataset["table"], out), PreprocessConfig(image_size=32))
        # rank 1 of a two-process job writes its shards beside rank 0 meanwhile
        manifest = chunk(chunk_config(small_dataset["data"], small_dataset["table"], out, rank=1, world_size=2),
                         PreprocessConfig(image_size=32))
        assert [s["complete"] for s in manifest["shards"]] == [i % 2 == 1 for i in range(len(manifest["shards"]))]
    finally:
        holder.kill()
        holder.wait()


def test_a_refused_chunk_leaves_no_folder_behind(small_dataset, tmp_path):
    with pytest.raises(ValueError):
        chunk(chunk_config(small_dataset["data"], small_dataset["table"], tmp_path / "new", val_fold=7),
              PreprocessConfig(image_size=32))
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- provenance


def test_a_slice_table_of_another_dataset_is_refused(small_dataset, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(small_dataset["data"], other)
    with pytest.raises(ValueError, match=rf"slices.parquet was scanned from {small_dataset['data'].resolve()}, not from "
                                         rf"{other.resolve()}"):
        chunk(chunk_config(other, small_dataset["table"], tmp_path / "chunks"), PreprocessConfig(image_size=32))
    assert not (tmp_path / "chunks").exists()


def test_a_resume_checks_what_the_folder_and_the_run_were_built_from(small_dataset, toy_chunks, tmp_path):
    out = Path(shutil.copytree(small_dataset["reference"], tmp_path / "chunks"))
    manifest = load_manifest(out)
    assert manifest["source"]["data_dir"] == str(small_dataset["data"].resolve())
    assert manifest["source"]["slice_table"] == str(small_dataset["table"].resolve())
    table = scan(small_dataset["data"], ScanConfig(data_dir=str(small_dataset["data"]), workers=1, progress=False))
    write_scan(table[table["StudyInstanceUID"] != table["StudyInstanceUID"].iloc[0]], tmp_path / "fewer.parquet")
    with pytest.raises(ValueError, match="holds another one; use another --output_dir folder"):
        chunk(chunk_config(small_dataset["data"], tmp_path / "fewer.parquet", out), PreprocessConfig(image_size=32))
    # a run resumed over chunks that were planned again differently is refused
    run_dir = tmp_path / "run"
    run(toy_chunks, run_dir, max_shards=1, patience=5)
    changed = Path(shutil.copytree(toy_chunks, tmp_path / "rechunked"))
    moved = json.loads((changed / "manifest.json").read_text())
    moved["shards"][0]["studies"] = moved["shards"][0]["studies"][::-1]
    (changed / "manifest.json").write_text(json.dumps(moved))
    config = RunDir(run_dir).read_run_config("the run the test just wrote")
    config["chunks"] = str(changed.resolve())
    RunDir(run_dir).write_run_config(config)
    with pytest.raises(ValueError, match="another configuration \\(manifest: was"):
        run(changed, run_dir, max_shards=1, patience=5)


# ---------------------------------------------------------------- damage


def test_a_damaged_shard_is_found_named_and_rewritten(small_dataset, tmp_path, capsys):
    out = Path(shutil.copytree(small_dataset["reference"], tmp_path / "chunks"))
    arrow = out / "shard_00001" / "data-00000-of-00001.arrow"
    whole = arrow.read_bytes()
    arrow.write_bytes(whole[: len(whole) // 2])  # cut short after it was written
    with pytest.raises(fs.DamagedFile, match=r"shard .*shard_00001 is damaged \(data-00000-of-00001.arrow has \d+ bytes, "
                                             r"\d+ were written\): run the same `vit-spine chunk` command again"):
        ShardDataset(out / "shard_00001")
    config = chunk_config(small_dataset["data"], small_dataset["table"], out)
    chunk(config, PreprocessConfig(image_size=32))
    assert "shard_00001 is damaged" in capsys.readouterr().out
    assert shard_bytes(out) == shard_bytes(small_dataset["reference"])
    # a flipped byte keeps the size: found by the checksum, with --verify
    flipped = bytearray(whole)
    flipped[len(flipped) // 2] ^= 0xFF
    arrow.write_bytes(bytes(flipped))
    chunk(config, PreprocessConfig(image_size=32))
    assert arrow.read_bytes() == bytes(flipped)  # sizes alone cannot see it
    chunk(chunk_config(small_dataset["data"], small_dataset["table"], out, verify=True), PreprocessConfig(image_size=32))
    assert "another checksum" in capsys.readouterr().out and arrow.read_bytes() == whole


def test_a_damaged_checkpoint_is_named_by_predict_evaluate_and_train(toy_chunks, reference_run, tmp_path, synth_data):
    from vit_spine.evaluation import EvaluateConfig, evaluate_checkpoint
    from vit_spine.predict import load_predictor

    out = Path(shutil.copytree(reference_run, tmp_path / "run", symlinks=True))
    weights = out / "shard_00000" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # a bit flip in the weights, same size
    weights.write_bytes(bytes(data))
    expected = r"checkpoint .*shard_00000 is damaged \(model.safetensors has another checksum"
    with pytest.raises(fs.DamagedFile, match=expected):
        load_predictor(out / "shard_00000", "cpu")
    with pytest.raises(fs.DamagedFile, match=expected):
        evaluate_checkpoint(EvaluateConfig(checkpoint=str(out / "shard_00000"), chunks=str(toy_chunks)))
    (out / "shard_00001" / "vit_spine.json").unlink()  # shard 1 must be trained again from shard 0's weights
    with pytest.raises(fs.DamagedFile, match=expected):
        run(toy_chunks, out, **CONFIG)
    (out / "shard_00000" / "config.json").unlink()
    with pytest.raises(fs.DamagedFile, match="config.json is missing"):
        load_predictor(out / "shard_00000", "cpu")
