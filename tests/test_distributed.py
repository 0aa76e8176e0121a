"""Two CPU processes under `accelerate launch` (gloo): world size 2, only rank 0 writes, same metric as 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_spine.evaluation import EvaluateConfig, evaluate_checkpoint


@pytest.mark.slow
def test_accelerate_two_cpu_processes(toy_chunks, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        "-m", "vit_spine", "train", "--chunks", str(toy_chunks), "--output", str(out), "--model-config", "tiny",
        "--max_shards", "2", "--augment", "False", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
        "--disable_tqdm", "True", "--seed", "0",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["shard"] for r in rows] == [0, 1]  # written once (by rank 0), not once per process
    assert all(r["world_size"] == 2 for r in rows)
    # 36 slices per shard, 4 per process per step, 2 processes: ceil(36 / 8) = 5 steps per shard
    assert [r["shard_steps"] for r in rows] == [5, 5]
    assert all(r["num_val_slices"] == 60 for r in rows)  # gathered predictions, padding removed

    # the metric logged under DDP (each process predicting its share of the batches) equals a single-process
    # evaluation of the saved weights exactly, at the processes' one thread (more threads round differently)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row in rows:
            single = evaluate_checkpoint(
                EvaluateConfig(checkpoint=str(out / f"shard_{row['shard']:05d}"), chunks=str(toy_chunks), seed=0)
            )
            assert single["weighted_log_loss"] == row["weighted_log_loss"]
            assert single["weighted_log_loss_uncalibrated"] == row["weighted_log_loss_uncalibrated"]
            assert single["auc"] == row["auc"]
    finally:
        torch.set_num_threads(threads)
