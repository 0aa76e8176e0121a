"""Checks of option values, called from the options dataclasses' `__post_init__` (where argv is parsed).

Each raises ValueError naming the option in the spelling `--help` shows (`--patch_size`), so a bad
value ends in one line from `vit_spine.cli.main` before any work starts or any file is written.
Nothing here imports torch: the light subcommands parse their options without it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

# what `torch.device` accepts among the devices this tool runs on, plus our "auto"
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def at_least(value: float | None, minimum: float, option: str) -> None:
    """`option` must be >= `minimum` (None: not given, nothing to check)."""
    if value is not None and value < minimum:
        raise ValueError(f"{option} must be at least {minimum}, got {value}")


def positive(value: float | None, option: str) -> None:
    """`option` must be > 0 (None: not given)."""
    if value is not None and not value > 0:
        raise ValueError(f"{option} must be greater than 0, got {value}")


def cpus() -> int:
    return os.cpu_count() or 1


def capped_workers(workers: int, option: str = "--workers", minimum: int = 1) -> int:
    """`workers` checked against `minimum` and capped at the CPUs there are, with a note when capped:
    more processes than cores only add memory and switching, never speed."""
    at_least(workers, minimum, option)
    available = cpus()
    if workers > available:
        print(f"note: {option} {workers} capped at the {available} CPUs here", file=sys.stderr)
        return available
    return workers


def device(name: str, option: str = "--device") -> None:
    """auto, cpu, mps, cuda or cuda:N (checked by pattern: parsing must not import torch)."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"{option} {name!r}: choose auto, cpu, cuda, cuda:N or mps")


def file_path(path: str | None, option: str) -> None:
    """An option naming a file to read or write: not an existing folder, and no file where its folder goes."""
    if not path:
        return
    if Path(path).is_dir():
        raise ValueError(f"{option} {path}: a folder, not a file; give a file name")
    _parents_are_folders(Path(path), option)


def folder_path(path: str | None, option: str) -> None:
    """An option naming a folder to read or write: not an existing file, and no file where a parent goes."""
    if not path:
        return
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{option} {path}: a file, not a folder; give a folder")
    _parents_are_folders(Path(path), option)


def _parents_are_folders(target: Path, option: str) -> None:
    # the nearest existing parent decides: writing under a file fails later with a less clear error
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {target}: {parent} is a file, not a folder")
            return


def training_arguments(args) -> None:
    """The TrainingArguments values transformers accepts unchecked and then fails on mid-run (a batch size
    of 0 is a ZeroDivisionError in its step count); the worker count capped like every other."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        at_least(getattr(args, name), 1, f"--{name}")
    if args.max_steps <= 0:  # max_steps > 0 replaces the epochs
        positive(args.num_train_epochs, "--num_train_epochs")
    args.dataloader_num_workers = capped_workers(args.dataloader_num_workers, "--dataloader_num_workers", minimum=0)
