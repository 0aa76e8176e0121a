"""`vit-spine bench NAME ...`: benchmarks that print ours-vs-baseline ratios measured side by side.

Each benchmark lives in its own module here and exposes `main(argv) -> int`.
Machines here are shared and noisy: every benchmark times ours and the baseline in the same run,
interleaved, and reports the ratio first and absolute figures second.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

BENCHMARKS = {
    "decode": "DICOM decoding: read_hu vs pydicom+gdcm vs pydicom+pylibjpeg",
    "scan": "the scan's header pass (find, parse, check, assemble) slices/s vs a bare pydicom header parse",
    "loader": "ShardDataset random batches vs numpy memmap vs datasets with_format('torch')",
    "chunk": "end-to-end chunking slices/s vs bare decoding, and peak RSS",
    "train": "Trainer img/s vs a plain PyTorch loop on the same model and data",
    "predict": "studies/s and slices/s end to end, and the share of time spent decoding",
    "gpu": "ViT training img/s, MFU and data wait through the whole path vs the model alone; predict slices/s",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vit-spine bench NAME [options]   (vit-spine bench NAME --help)\n")
        for name, summary in BENCHMARKS.items():
            print(f"  {name:<8} {summary}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"vit_spine.benchmarks.{name}")
    return int(module.main(rest) or 0)
