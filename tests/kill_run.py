"""Runs the toy training of tests/test_reliability.py and SIGKILLs itself at one named moment.

    python tests/kill_run.py POINT CHUNKS OUTPUT

Each POINT patches one function the run goes through, so the kill lands exactly there (a real SIGKILL:
no handler, no cleanup, files left as they are on disk at that instant).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import transformers
from transformers.trainer_callback import TrainerState

from vit_spine import train
from toy_run import run

CONFIG = dict(max_shards=2, patience=5, args={"learning_rate": 1e-3, "num_train_epochs": 2, "save_steps": 4,
                                              "save_strategy": "steps"})


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def after_calls(owner, name: str, calls: int) -> None:
    """Let `owner.name` run `calls` times, then die right after the last one returns."""
    original, count = getattr(owner, name), {"n": 0}

    def patched(*args, **kwargs):
        result = original(*args, **kwargs)
        count["n"] += 1
        if count["n"] == calls:
            die()
        return result

    setattr(owner, name, patched)


def before_call(owner, name: str, when) -> None:
    """Die when `owner.name` is called with arguments for which `when(*args)` is true, before it runs."""
    original = getattr(owner, name)

    def patched(*args, **kwargs):
        if when(*args):
            die()
        return original(*args, **kwargs)

    setattr(owner, name, patched)


POINTS = {
    # inside optimizer step 6 of shard 0, after forward and backward, before the optimizer update
    "mid_step": lambda: after_calls(train.ShardTrainer, "training_step", 6),
    # while shard 0's checkpoint-8 is written: weights and optimizer there, RNG, trainer state and marker not
    "torn_checkpoint": lambda: before_call(transformers.Trainer, "_save_rng_state", lambda *a: "checkpoint-8" in str(a[1])),
    # right after shard 0's first Trainer checkpoint is complete
    "first_checkpoint": lambda: after_calls(train, "mark_checkpoint_complete", 1),
    # shard 0 finished and saved, shard 1 not started
    "between_shards": lambda: before_call(train, "train_shard", lambda run_, k, *a: k == 1),
    # while shard 0's final checkpoint is saved: its weights written, trainer_state.json and the marker not
    "shard_save": lambda: before_call(TrainerState, "save_to_json",
                                      lambda state, path: Path(path).parent.name.startswith("shard_")),
    # shard 0's checkpoint marked done, metrics.jsonl / best / all_results.json not yet written
    "before_run_files": lambda: before_call(train, "write_run_files", lambda run_, rows: len(rows) == 1),
}


if __name__ == "__main__":
    point, chunks, output = sys.argv[1:4]
    POINTS[point]()
    run(Path(chunks), Path(output), **CONFIG)
    sys.exit("the run was not killed at " + point)
