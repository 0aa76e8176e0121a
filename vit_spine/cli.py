"""The `vit-spine` command: one subcommand per pipeline stage.

Each stage module owns its options as a dataclass (parsed by `HfArgumentParser`, help text on every
field) and exposes `main(argv) -> int`. Modules are imported only when their subcommand runs, so
`vit-spine --help` and the light stages start without importing torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("vit_spine.synth", "write a synthetic dataset in the RSNA 2022 layout"),
    "scan": ("vit_spine.scan", "read every DICOM header of a dataset into the slice table (Parquet)"),
    "chunk": ("vit_spine.chunk", "preprocess slices into ~15k-slice training shards plus a validation shard"),
    "train": ("vit_spine.train", "fine-tune a ViT on one shard after another, with early stopping"),
    "evaluate": ("vit_spine.evaluation", "score a checkpoint on the validation shard"),
    "predict": ("vit_spine.predict", "predict new studies and write a Kaggle submission"),
    "push": ("vit_spine.hub", "push a checkpoint to the Hugging Face Hub"),
    "report": ("vit_spine.report", "plots and an index.html for a training run"),
    "bench": ("vit_spine.benchmarks", "benchmarks: decode, loader, chunk, train, predict, gpu"),
    "demo": ("vit_spine.demo", "the whole pipeline on synthetic data, in a few minutes on CPU"),
}

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
    option (`vit-spine scan DATA_DIR --out t.parquet`). The last one may be a list field, which takes
    every remaining leading token. They are rewritten to `--field value` so that the dataclass stays
    the single description of every option. `defaults` overrides field defaults (e.g. our choices for
    TrainingArguments) while still letting the user set them.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    usage_pos = " ".join(_metavar(fields[name]) for name in positionals)
    parser = HfArgumentParser(
        (config_cls, *extra_types),
        prog=prog,
        description=description,
        usage=f"{prog} {usage_pos} [options]".replace("  ", " "),
    )
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
    return parser.parse_args_into_dataclasses(rewritten + argv)


def _metavar(field: dataclasses.Field) -> str:
    name = field.name.upper()
    return f"{name} [{name} ...]" if _is_list_field(field) else name


def _is_list_field(field: dataclasses.Field) -> bool:
    return str(field.type).startswith(("list", "List", "typing.List"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vit-spine COMMAND [options]   (vit-spine COMMAND --help for its options)\n")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<9} {summary}")
        return 0
    if argv[0] in ("-V", "--version"):
        from vit_spine import __version__

        print(f"vit-spine {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vit-spine: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        # bad input (a missing folder, a wrong option value): one clear line, not a traceback
        if os.environ.get("VIT_SPINE_TRACEBACK"):
            raise
        print(f"vit-spine {name}: error: {err}\n(set VIT_SPINE_TRACEBACK=1 to see where)", file=sys.stderr)
        return 2
