"""Resume anywhere: a run stopped by SIGTERM mid-shard or between shards ends exactly like an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import TrainerCallback

from toy_run import run

ARGS = {"learning_rate": 1e-3, "num_train_epochs": 2, "save_strategy": "steps", "save_steps": 4}


class SignalAt(TrainerCallback):
    """Sends this process SIGTERM at a given global step (mid-shard) or when the shard's training ends."""

    def __init__(self, step: int | None = None, at_train_end: bool = False):
        self.step, self.at_train_end, self.fired = step, at_train_end, False

    def _fire(self):
        if not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_step_end(self, args, state, control, **kwargs):
        if self.step is not None and state.global_step == self.step:
            self._fire()

    def on_train_end(self, args, state, control, **kwargs):
        if self.at_train_end:
            self._fire()


def final_weights(out: Path, shard: int) -> dict:
    return load_file(str(out / f"shard_{shard:05d}" / "model.safetensors"))


def assert_same_run(a: Path, b: Path, shards: int) -> None:
    for k in range(shards):
        wa, wb = final_weights(a, k), final_weights(b, k)
        assert wa.keys() == wb.keys()
        for name in wa:
            assert (wa[name] == wb[name]).all(), f"shard {k}: {name} differs after resume"
    rows_a = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed_s", "seconds", "train_loss")} for r in rows]
    assert strip(rows_a) == strip(rows_b)
    # the training loss of the whole shard, also when it was resumed (a stop adds a log at its checkpoint,
    # so the same per-step losses are summed in another grouping: equal up to float rounding)
    for ra, rb in zip(rows_a, rows_b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-12, abs=0) and ra["train_loss"] > 0


@pytest.fixture(scope="module")
def uninterrupted(toy_chunks, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(toy_chunks, out, max_shards=2, patience=5, args=ARGS)
    return out


def test_killed_mid_shard_resumes_to_identical_weights(toy_chunks, uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    rows = run(toy_chunks, out, callbacks=[SignalAt(step=6)], max_shards=2, patience=5, args=ARGS)
    assert rows == []  # stopped inside shard 0 (10 steps), nothing finished
    checkpoints = sorted((out / "shard_00000" / "trainer").glob("checkpoint-*"))
    # the signal arrives after step 6's stop check (our callback runs first), so step 7 saves and stops
    assert [c.name for c in checkpoints][-1] == "checkpoint-7"
    assert "SIGTERM received" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # our handler is removed again

    rows = run(toy_chunks, out, max_shards=2, patience=5, args=ARGS)
    assert [r["shard"] for r in rows] == [0, 1]
    assert "resuming from" in capsys.readouterr().out
    assert_same_run(uninterrupted, out, shards=2)


def test_killed_between_shards_resumes_with_the_next_shard(toy_chunks, uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    rows = run(toy_chunks, out, callbacks=[SignalAt(at_train_end=True)], max_shards=2, patience=5, args=ARGS)
    assert [r["shard"] for r in rows] == [0]  # shard 0 finished and was saved, shard 1 not started
    assert not (out / "shard_00001").exists()
    mtime = (out / "shard_00000" / "model.safetensors").stat().st_mtime_ns

    rows = run(toy_chunks, out, max_shards=2, patience=5, args=ARGS)
    assert [r["shard"] for r in rows] == [0, 1]
    assert (out / "shard_00000" / "model.safetensors").stat().st_mtime_ns == mtime  # finished shard not redone
    assert_same_run(uninterrupted, out, shards=2)


def test_finished_run_is_not_retrained(toy_chunks, uninterrupted, tmp_path):
    import shutil

    out = Path(shutil.copytree(uninterrupted, tmp_path / "run", symlinks=True))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    rows = run(toy_chunks, out, max_shards=2, patience=5, args=ARGS)
    assert [r["shard"] for r in rows] == [0, 1]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before
