"""`vit-spine bench train`: training img/s of our Trainer path vs a plain PyTorch loop, same model and data.

Both read the same shard through the same `ShardDataset` + DataLoader settings, run the same number of
optimizer steps with AdamW and the same masked BCE loss, and alternate (Trainer, loop, Trainer, loop...)
so load on a shared machine hits both alike. Goal: Trainer overhead <= 10 %.
With no --shard, a shard of random pixels is written to a temporary folder first.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vit_spine import options
from vit_spine.options import parse_config


@dataclass
class BenchTrainConfig:
    shard: str | None = field(default=None, metadata={"help": "a shard folder from `vit-spine chunk` (default: random pixels)."})
    model_config: str = field(default="tiny", metadata={"help": "ViT size: tiny, small or base."})
    image_size: int = field(default=96, metadata={"help": "image side for the random shard (a given --shard sets its own)."})
    batch_size: int = field(default=32, metadata={"help": "per-step batch size."})
    steps: int = field(default=120, metadata={"help": "optimizer steps per timed run (the Trainer has a fixed start-up cost)."})
    repeats: int = field(default=3, metadata={"help": "timed runs of each path, alternating."})
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes for both paths."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast in both paths (GPU)."})

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "steps", "repeats"):
            options.at_least(getattr(self, name), 1, f"--{name}")
        self.workers = options.capped_workers(self.workers, minimum=0)
        options.folder_path(self.shard, "--shard")


def random_shard(folder: Path, size: int, count: int) -> Path:
    import datasets

    from vit_spine.chunk import shard_features

    rng = np.random.default_rng(0)
    labels = (rng.random((count, 14)) < 0.1).astype(np.float32)
    data = {
        "pixel_values": rng.integers(0, 255, (count, 3, size, size), dtype=np.uint8),
        "labels": labels,
        "study_labels": np.zeros((count, 8), np.float32),
        "StudyInstanceUID": [f"1.2.3.{i // 40}" for i in range(count)],
        "slice_number": np.arange(count, dtype=np.int32) % 40 + 1,
        "z": np.arange(count, dtype=np.float32),
    }
    datasets.Dataset.from_dict(data, features=shard_features(size)).save_to_disk(str(folder))
    return folder


def run_trainer(model, dataset, config: BenchTrainConfig, workdir: str) -> float:
    from transformers import TrainingArguments

    from vit_spine.data import AugmentConfig
    from vit_spine.models import MaskedBCELoss
    from vit_spine.train import ShardTrainer, collate

    args = TrainingArguments(
        output_dir=workdir, max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        save_strategy="no", logging_steps=10_000, report_to="none", disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=config.workers, bf16=config.bf16, lr_scheduler_type="cosine", learning_rate=1e-4,
    )
    trainer = ShardTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                           compute_loss_func=MaskedBCELoss(), schedule_total=config.steps, augment=AugmentConfig())
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def run_plain_loop(model, dataset, config: BenchTrainConfig) -> float:
    from torch.utils.data import DataLoader, RandomSampler

    from vit_spine.data import AugmentConfig, model_input
    from vit_spine.models import MaskedBCELoss
    from vit_spine.train import collate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    model.to(device).train()
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=RandomSampler(dataset),
                        collate_fn=collate, num_workers=config.workers, pin_memory=device == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    loss_fn, steps = MaskedBCELoss(), 0
    while steps < config.steps:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            pixels = model_input(batch["pixel_values"], AugmentConfig())
            with torch.autocast(device, dtype=torch.bfloat16, enabled=config.bf16):
                outputs = model(pixel_values=pixels)
            loss = loss_fn(outputs, batch["labels"], num_items_in_batch=(batch["labels"] != -100).sum())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer clips too
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            if steps == config.steps:
                break
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    (config,) = parse_config(BenchTrainConfig, argv, prog="vit-spine bench train", description=__doc__.split("\n")[0])
    from vit_spine.data import ShardDataset
    from vit_spine.models import create_model

    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(config.shard) if config.shard else random_shard(Path(tmp) / "shard", config.image_size,
                                                                     config.batch_size * config.steps)
        dataset = ShardDataset(shard)
        images = config.steps * config.batch_size
        trainer_s, loop_s = [], []
        for r in range(config.repeats):
            for name, times in (("trainer", trainer_s), ("loop", loop_s)):
                model = create_model(model_config=config.model_config, image_size=dataset.image_size, seed=r)
                seconds = (run_trainer(model, dataset, config, tmp) if name == "trainer"
                           else run_plain_loop(model, dataset, config))
                times.append(seconds)
                print(f"  repeat {r + 1}/{config.repeats} {name:<8} {images / seconds:8.1f} img/s", flush=True)
    trainer_rate = images / statistics.median(trainer_s)
    loop_rate = images / statistics.median(loop_s)
    print(f"\ntrainer / plain loop img/s: {trainer_rate / loop_rate:.3f}  (Trainer overhead "
          f"{100 * (loop_rate / trainer_rate - 1):+.1f} %; goal <= 10 %)")
    print(f"trainer {trainer_rate:.1f} img/s, plain loop {loop_rate:.1f} img/s "
          f"(median of {config.repeats}; ViT-{config.model_config}, {dataset.image_size} px, batch {config.batch_size}, "
          f"{config.steps} steps, device {'cuda' if torch.cuda.is_available() else 'cpu'})")
    return 0
