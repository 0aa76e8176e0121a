"""The `vit-spine` command: one subcommand per pipeline stage.

Each stage module owns its options as a dataclass (parsed by `HfArgumentParser`, help text on every
field) and exposes `main(argv) -> int`. Modules are imported only when their subcommand runs, so
`vit-spine --help` and the light stages start without importing torch.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from collections.abc import Sequence

from vit_spine import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("vit_spine.synth", "write a synthetic dataset in the RSNA 2022 layout"),
    "scan": ("vit_spine.scan", "read every DICOM header of a dataset into the slice table (Parquet)"),
    "chunk": ("vit_spine.chunk", "preprocess slices into ~15k-slice training shards plus a validation shard"),
    "train": ("vit_spine.train", "fine-tune a ViT on one shard after another, with early stopping"),
    "pretrain": ("vit_spine.pretrain", "self-supervised ViTMAE pretraining on the shards' pixels (labels unused)"),
    "evaluate": ("vit_spine.evaluation", "score a checkpoint on the validation shard"),
    "predict": ("vit_spine.predict", "predict new studies and write a Kaggle submission"),
    "push": ("vit_spine.hub", "push a checkpoint to the Hugging Face Hub"),
    "report": ("vit_spine.report", "plots and an index.html for a training run"),
    "bench": ("vit_spine.benchmarks", "benchmarks: decode, loader, chunk, train, predict, gpu"),
    "demo": ("vit_spine.demo", "the whole pipeline on synthetic data, in a few minutes on CPU"),
}

def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand and return its exit code; the one place where errors become exit codes.

    0 success; 2 usage and input errors (one line on stderr, no traceback); 1 a run that failed on its
    data (a subcommand's own outcome, e.g. failed pushes, `predict --strict`) or a full disk; 3 predict
    with fallbacks; 130 interrupted. VIT_SPINE_TRACEBACK=1 re-raises instead. Anything else is a bug
    and keeps its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vit-spine COMMAND [options]   (vit-spine COMMAND --help for its options)\n")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<9} {summary}")
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"vit-spine {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vit-spine: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command = name
    try:
        module = importlib.import_module(COMMANDS[name][0])
        if rest and rest[0] in getattr(module, "BENCHMARKS", ()):  # `bench NAME`: name both in the message
            command = f"{name} {rest[0]}"
        return int(module.main(rest) or 0)
    except SystemExit as done:  # argparse (--help 0, usage error 2, its line already printed), or a stage's code
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(f"vit-spine {command}: error: {done.code}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if os.environ.get("VIT_SPINE_TRACEBACK"):
            raise
        print(f"vit-spine {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        code = exit_code(err)
        if code is None or os.environ.get("VIT_SPINE_TRACEBACK"):
            raise
        print(f"vit-spine {command}: error: {error_line(err)} (set VIT_SPINE_TRACEBACK=1 to see where)", file=sys.stderr)
        return code


# The project's own input errors (vit_spine.dicom.DicomReadError, vit_spine.fs.FolderInUse), by class
# name: classifying an error must not import pydicom, nor fail where a module is absent.
INPUT_ERROR_NAMES = {"DicomReadError", "FolderInUse"}
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


def disk_full(err: BaseException) -> bool:
    """ENOSPC from Python, or pyarrow's message for it (pyarrow's OSErrors carry no errno)."""
    return isinstance(err, OSError) and (err.errno == errno.ENOSPC or "No space left on device" in _os_text(err))


def exit_code(err: BaseException) -> int | None:
    """The exit code of an error that is the input's or the machine's fault; None for a bug (traceback)."""
    if disk_full(err):
        return 1
    if isinstance(err, INPUT_ERRORS) or any(cls.__name__ in INPUT_ERROR_NAMES for cls in type(err).__mro__):
        return 2
    return None


def error_line(err: BaseException) -> str:
    """The error as one line: its message with newlines joined, a full disk with what to do."""
    if disk_full(err):
        where = f"writing {err.filename}" if getattr(err, "filename", None) else f"({_os_text(err)})"
        return f"No space left on device {where}: free space and run the same command again"
    if isinstance(err, OSError) and err.filename:  # "[Errno 21] Is a directory: 'x'" -> "x: is a directory"
        message = f"{err.filename}: {_os_text(err)[:1].lower()}{_os_text(err)[1:]}"
    else:
        message = str(err)
    return " ".join(message.split())


def _os_text(err: OSError) -> str:
    # the reason alone: strerror when the OSError has an errno, else its message (pyarrow sets none)
    return err.strerror or " ".join(str(arg) for arg in err.args)
