"""The command line of every stage: `parse_config` (argv -> the stage's options dataclasses), and the
checks of option values, called from the dataclasses' `__post_init__` (where argv is parsed).

Each check raises ValueError naming the option in the spelling `--help` shows (`--patch_size`), so a bad
value ends in one line from `vit_spine.cli.main` before any work starts or any file is written.
Nothing here imports torch: the light subcommands parse their options without it. The stages import
this module; `vit_spine.cli` (which dispatches to the stages) imports none of them, so it stays the top.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

# what `torch.device` accepts among the devices this tool runs on, plus our "auto"
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def aliases(*old_names: str) -> list[str]:
    """The option strings under which an option's earlier names stay accepted, each in its underscore and
    its dash spelling, for a dataclass field's `metadata["aliases"]` (HfArgumentParser's own mechanism).

    The canonical name is the field's (Hugging Face style: `--output_dir`, `--num_studies`); HfArgumentParser
    adds its dash spelling itself. `parse_config` refuses an option given under two of its
    names with different values.
    """
    return list(dict.fromkeys(spelling for name in old_names for spelling in (f"--{name}", f"--{name.replace('_', '-')}")))


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
    positive(args.num_train_epochs, "--num_train_epochs")  # each shard's length; --max_steps caps the whole run
    args.dataloader_num_workers = capped_workers(args.dataloader_num_workers, "--dataloader_num_workers", minimum=0)


# --- parsing argv into the options dataclasses ------------------------------------------------

T = TypeVar("T")


def parse_config(
    config_cls: type[T],
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    positionals: Sequence[str] = (),
    extra_types: Sequence[type] = (),
    defaults: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    """Parse argv into `config_cls` (and `extra_types`, e.g. TrainingArguments) with HfArgumentParser.

    `positionals` names dataclass fields that the user gives positionally, in order, before any
    option (`vit-spine scan DATA_DIR --output_file t.parquet`). The last one may be a list field, which takes
    every remaining leading token. They are rewritten to `--field value` so that the dataclass stays
    the single description of every option. `defaults` overrides field defaults (e.g. our choices for
    TrainingArguments) while still letting the user set them.
    """
    from transformers import HfArgumentParser  # here, not at the top: the option checks above need no transformers

    argv = list(sys.argv[1:] if argv is None else argv)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    usage_pos = " ".join(_metavar(fields[name]) for name in positionals)
    parser = HfArgumentParser(
        (config_cls, *extra_types),
        prog=prog,
        description=description,
        usage=f"{prog} {usage_pos} [options]".replace("  ", " "),
    )
    parser.error = _one_line_error(prog, positionals)  # type: ignore[method-assign]
    if defaults:
        parser.set_defaults(**defaults)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        raise SystemExit(0)
    leading = []
    while argv and not argv[0].startswith("-"):
        leading.append(argv.pop(0))
    rewritten: list[str] = []
    for i, name in enumerate(positionals):
        is_last = i == len(positionals) - 1
        if not leading:
            break
        if is_last and _is_list_field(fields[name]):
            rewritten += [f"--{name}", *leading]
            leading = []
        else:
            rewritten += [f"--{name}", leading.pop(0)]
    if leading:
        parser.error(f"unexpected argument(s): {' '.join(leading)}")
    _refuse_one_option_twice(parser, rewritten + argv)
    *parsed, unknown = parser.parse_args_into_dataclasses(rewritten + argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized argument(s): {' '.join(unknown)}")
    return tuple(parsed)


def _refuse_one_option_twice(parser, argv: Sequence[str]) -> None:
    """An option given under two of its names (`--output x --output_dir y`) with different values is refused:
    argparse would silently keep the last one."""
    given: dict[str, list[tuple[str, str | None]]] = {}
    for i, token in enumerate(argv):
        name, has_value, value = token.partition("=")
        action = parser._option_string_actions.get(name) if name.startswith("--") else None
        if action is None:
            continue
        if not has_value:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        for earlier, earlier_value in given.setdefault(action.dest, []):
            if earlier != name and earlier_value != value:
                parser.error(f"{earlier} {earlier_value} and {name} {value} both set --{action.dest}: give it once")
        given[action.dest].append((name, value))


def _one_line_error(prog: str, positionals: Sequence[str]):
    """argparse's `error` as one line (no usage block), exit 2: the same shape as every other bad input."""

    def error(message: str) -> NoReturn:
        # argparse names an option by all its strings (`--output_dir/--output-dir/--out`): show the canonical one
        message = re.sub(r"(--[\w-]+)(?:/--[\w-]+)+", r"\1", message)
        if message.startswith("the following arguments are required"):
            for name in positionals:  # a positional is rewritten to --name internally; show it as the user types it
                message = re.sub(rf"--{name}(?![\w-])", name.upper(), message)
        print(f"{prog}: error: {message} (`{prog} --help` lists the options)", file=sys.stderr)
        raise SystemExit(2)

    return error


def _metavar(field: dataclasses.Field) -> str:
    name = field.name.upper()
    return f"{name} [{name} ...]" if _is_list_field(field) else name


def _is_list_field(field: dataclasses.Field) -> bool:
    return str(field.type).startswith(("list", "List", "typing.List"))
