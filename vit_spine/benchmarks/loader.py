"""`vit-spine bench loader SHARD`: random training batches from a shard, three ways, side by side.

- ours: `ShardDataset.__getitems__` + `vit_spine.train.collate`, exactly what the Trainer's DataLoader
  runs: a uint8 (batch, 3, S, S) batch plus labels. Normalisation and augmentation happen later, on the
  device (`vit_spine.data.model_input`), for every way alike, so they are timed separately, for information.
- memmap: the same uint8 (batch, 3, S, S) pixels, neighbour channels included, in a plain .npy,
  `np.load(mmap_mode="r")[indices]`
- datasets: `Dataset.with_format("torch")[indices]["pixel_values"]` (for a one-channel 'bone25d' shard,
  also the neighbours' rows, concatenated into the same 3-channel batch)

The ways take turns (interleaved repetitions) so that machine noise hits all of them alike.
Goals: ours/memmap >= 0.5, ours/datasets >= 5.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vit_spine import options
from vit_spine.options import parse_config


@dataclass
class LoaderBenchConfig:
    shard: str = field(metadata={"help": "a shard folder written by `vit-spine chunk`."})
    batch_size: int = field(default=256, metadata={"help": "slices per random batch."})
    batches: int = field(default=10, metadata={"help": "batches timed per way and repetition."})
    repeats: int = field(default=3, metadata={"help": "interleaved repetitions; the median is reported."})
    seed: int = field(default=0, metadata={"help": "seed of the random indices."})
    threads: int = field(
        default=1, metadata={"help": "torch threads (DataLoader workers run with 1, the default here)."}
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "batches", "repeats", "threads"):
            options.at_least(getattr(self, name), 1, f"--{name}")
        options.folder_path(self.shard, "SHARD")


def main(argv: Sequence[str] | None = None) -> int:
    (config,) = parse_config(
        LoaderBenchConfig,
        argv,
        prog="vit-spine bench loader",
        description="img/s of ShardDataset random batches vs a numpy memmap and datasets with_format('torch').",
        positionals=("shard",),
    )
    run(config)
    return 0


def run(config: LoaderBenchConfig) -> dict[str, float]:
    """Times the ways at `config.threads` torch threads; the caller's thread count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return measure(config)
    finally:
        torch.set_num_threads(previous)


def measure(config: LoaderBenchConfig) -> dict[str, float]:
    import datasets

    from vit_spine.data import AugmentConfig, ShardDataset, model_input
    from vit_spine.train import collate

    ours = ShardDataset(config.shard)
    n = len(ours)
    if n == 0:
        raise ValueError(f"{config.shard}: empty shard")
    batch = min(config.batch_size, n)
    hf = datasets.load_from_disk(config.shard).with_format("torch", columns=["pixel_values", "labels"])
    rng = np.random.default_rng(config.seed)

    with tempfile.TemporaryDirectory(dir=Path(config.shard).parent) as tmp:
        npy = Path(tmp) / "pixels.npy"
        write_npy(ours, npy)
        memmap = np.load(npy, mmap_mode="r")
        def batch_datasets(indices: np.ndarray) -> torch.Tensor:
            # the same 3-channel batch, every row the channel layout reads (neighbours too) through datasets
            parts = [hf[run.rows[indices].tolist()]["pixel_values"][:, run.stored : run.stored + run.count]
                     for run in ours.plan]
            return torch.cat(parts, dim=1)

        ways: dict[str, Callable[[np.ndarray], torch.Tensor]] = {
            "ours": lambda indices: collate(ours.__getitems__(indices.tolist()))["pixel_values"],
            "memmap": lambda indices: torch.from_numpy(memmap[indices]),
            "datasets": batch_datasets,
        }
        check = rng.choice(n, batch, replace=False)
        reference = ways["memmap"](check)
        for name in ("ours", "datasets"):
            if not torch.equal(ways[name](check), reference):
                raise RuntimeError(f"{name} read other pixels than the memmap: benchmark invalid")
        # what every way's batch goes through on the device; timed here on this machine's CPU
        ways["model_input"] = lambda indices: model_input(reference)
        ways["model_input augment"] = lambda indices: model_input(reference, AugmentConfig())
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(config.repeats):
            for name, read in ways.items():
                batches = [rng.choice(n, batch, replace=False) for _ in range(config.batches)]
                read(batches[0])  # warm the page cache for this way
                start = time.perf_counter()
                for indices in batches:
                    read(indices)
                rates[name].append(config.batches * batch / (time.perf_counter() - start))
        del memmap

    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"shard {config.shard}: {n} slices of {tuple(ours.read_uint8([0]).shape[1:])} uint8, "
          f"batch {batch}, {config.batches} batches x {config.repeats} interleaved repetitions, "
          f"{config.threads} torch thread(s)")
    print(f"uint8 batches as the DataLoader yields them: ours / memmap {median['ours'] / median['memmap']:.2f} "
          f"(goal >= 0.5), ours / datasets {median['ours'] / median['datasets']:.1f} (goal >= 5)")
    for name in ways:
        spread = ", ".join(f"{v:.0f}" for v in rates[name])
        print(f"  {name:<20} {median[name]:9.0f} img/s   (repetitions: {spread})")
    print("model_input (normalise, and augment while training) runs on the training device; the figures above "
          "are this CPU's, for information.")
    return median


def write_npy(dataset, path: Path, block: int = 1024) -> None:
    """The shard's pixels as a plain .npy file, written block by block."""
    n = len(dataset)
    shape = (n, *dataset.read_uint8([0]).shape[1:])
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    for start in range(0, n, block):
        out[start : start + block] = dataset.read_uint8(np.arange(start, min(start + block, n)))
    out.flush()
    del out
