"""The files stages hand to each other (vit_spine.artifacts): exact bytes, the one "best" rule, the run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vit_spine.artifacts import (
    RunDir,
    best_row,
    read_checkpoint_meta,
    read_shard_meta,
    verify_checkpoint,
    write_checkpoint_meta,
    write_shard_meta,
)
from vit_spine.fs import DamagedFile, file_record


def row(shard: int, wll: float) -> dict:
    return {"shard": shard, "global_step": 10 * (shard + 1), "weighted_log_loss": wll, "baseline_weighted_log_loss": 0.56}


@pytest.mark.parametrize(("min_delta", "best"), [(0.0, 2), (0.015, 1), (0.05, 0)])
def test_a_shard_is_the_new_best_only_by_more_than_min_delta(min_delta, best):
    rows = [row(2, 0.565), row(0, 0.60), row(1, 0.58)]  # shard order decides, not the order given
    assert best_row(rows, min_delta)["shard"] == best
    assert best_row([], min_delta) is None


def test_write_rows_derives_metrics_best_and_all_results_by_the_rule(tmp_path):
    run = RunDir(tmp_path)
    rows = [row(0, 0.60), row(1, 0.58), row(2, 0.565)]
    run.write_rows(rows, min_delta=0.015)
    assert run.metrics_path.read_text() == "".join(json.dumps(r) + "\n" for r in rows)
    assert os.readlink(run.best_link) == "shard_00001"
    assert json.loads((tmp_path / "all_results.json").read_text()) == {
        "best_shard": 1, "best_weighted_log_loss": 0.58, "baseline_weighted_log_loss": 0.56, "shards_trained": 3,
        "global_step": 30,
    }
    assert run.read_rows() == rows


def test_the_run_rule_uses_the_recorded_min_delta_and_zero_for_older_runs(tmp_path):
    run = RunDir(tmp_path)
    run.write_rows([row(0, 0.60), row(1, 0.58)], min_delta=0.0)
    assert run.min_delta() == 0.0 and run.best()["shard"] == 1  # no run_config.json
    run.write_run_config({"chunks": "c"})  # a run from before min_delta was recorded
    assert run.min_delta() == 0.0
    run.write_run_config({"chunks": "c", "min_delta": 0.05})
    assert run.min_delta() == 0.05 and run.best()["shard"] == 0


def test_the_checkpoint_meta_is_written_as_train_always_wrote_it(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "trainer_state.json").write_text("{}")  # not a weight file: not recorded
    meta = {"shard": 3, "metrics": {"shard": 3}, "preprocess": {"image_size": 32}}
    written = write_checkpoint_meta(tmp_path, meta)
    files = file_record(tmp_path, ["model.safetensors", "config.json"])
    expected = {"format": 1, **meta, "files": files}
    assert (tmp_path / "vit_spine.json").read_text() == json.dumps(expected, indent=2)
    assert written == expected == read_checkpoint_meta(tmp_path)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".tmp-*"))  # no temporary file left
    verify_checkpoint(tmp_path, written)
    (tmp_path / "model.safetensors").write_bytes(b"wEights")
    with pytest.raises(DamagedFile, match="model.safetensors has another checksum than was written"):
        verify_checkpoint(tmp_path, written)


def test_a_checkpoint_meta_without_shard_or_metrics_is_refused_with_the_fix(tmp_path):
    (tmp_path / "vit_spine.json").write_text(json.dumps({"format": 1, "shard": "0"}))
    with pytest.raises(ValueError, match="expected integer `shard` and a `metrics` object: use another shard's checkpoint"):
        read_checkpoint_meta(tmp_path)


def test_the_shard_meta_records_the_files_written_before_it(tmp_path: Path):
    (tmp_path / "data-00000-of-00001.arrow").write_bytes(b"rows")
    meta = write_shard_meta(tmp_path, {"num_slices": 4, "problems": []})
    assert meta == {"num_slices": 4, "problems": [], "files": file_record(tmp_path, ["data-00000-of-00001.arrow"])}
    assert (tmp_path / "vit_spine_shard.json").read_text() == json.dumps(meta, indent=1) + "\n"
    assert read_shard_meta(tmp_path) == meta
