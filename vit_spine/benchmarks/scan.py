"""`vit-spine bench scan DATA_DIR`: the scan's header pass, slices/s, against a bare pydicom header parse.

Ours is what `vit-spine scan` does per study folder before labelling: find every file by content, parse
each header once without its pixel data (`stop_before_pixels`), walk the Pixel Data element's framing
to catch truncated files, and assemble the study's volume (series, orientation, order). The baseline
is the floor of any header-only pass: `pydicom.dcmread(path, stop_before_pixels=True)` of the same
files, nothing else. Both run in this process, alternating, so load on a shared machine hits both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vit_spine.options import parse_config


@dataclass
class BenchScanConfig:
    data_dir: str = field(metadata={"help": "dataset root with train_images/ and/or test_images/ study folders."})
    repeats: int = field(default=3, metadata={"help": "timed passes of each way, alternating."})
    limit: int | None = field(default=None, metadata={"help": "time only the first N study folders."})

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


def bare_header_parse(paths: list[Path]) -> None:
    import pydicom

    for path in paths:
        pydicom.dcmread(path, stop_before_pixels=True)


def our_header_pass(folders) -> int:
    from vit_spine.scan import scan_study_folder

    return sum(len(scan_study_folder(folder).rows) for folder in folders)


def main(argv: Sequence[str] | None = None) -> int:
    (config,) = parse_config(BenchScanConfig, argv, prog="vit-spine bench scan", description=__doc__.splitlines()[0],
                             positionals=("data_dir",))
    from vit_spine.dicom import looks_like_dicom
    from vit_spine.scan import Issues, find_study_folders
    from vit_spine.study import find_files

    folders = find_study_folders(Path(config.data_dir).resolve(), Issues())[: config.limit]
    if not folders:
        raise ValueError(f"{config.data_dir}: no study folder under train_images/ or test_images/")
    paths = [p for folder in folders for p in find_files(folder.path) if looks_like_dicom(p)]
    ours_s, bare_s = [], []
    slices = our_header_pass(folders)  # warm the page cache and imports for both
    bare_header_parse(paths)
    for repeat in range(config.repeats):
        start = time.perf_counter()
        our_header_pass(folders)
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        bare_header_parse(paths)
        bare_s.append(time.perf_counter() - start)
        print(f"  repeat {repeat + 1}/{config.repeats}: ours {slices / ours_s[-1]:8.0f} slices/s, "
              f"bare pydicom header parse {len(paths) / bare_s[-1]:8.0f} files/s", flush=True)
    ours, bare = statistics.median(ours_s), statistics.median(bare_s)
    print(f"\nscan header pass / bare header parse time: {ours / bare:.2f}x  "
          f"({len(folders)} studies, {len(paths)} DICOM files, {slices} slices; median of {config.repeats})")
    print(f"ours {slices / ours:.0f} slices/s ({1e3 * ours / max(slices, 1):.3f} ms per slice), "
          f"bare pydicom {len(paths) / bare:.0f} files/s ({1e3 * bare / max(len(paths), 1):.3f} ms per file), one process")
    return 0
