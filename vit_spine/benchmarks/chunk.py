"""`vit-spine bench chunk DATA_DIR`: end-to-end chunking vs bare decoding of the same files.

The dataset is scanned once (timed apart). Then, in interleaved repetitions with the same number of
worker processes: (a) bare decoding -- `read_hu` of every slice that chunk would write, results thrown
away; (b) `vit-spine chunk` into a fresh folder. Everything after decoding (resize, windows, channel
stacking, moving pixels to the writer, Arrow writing) costs (b) / (a) - 1 of the decode time; goal
<= 25 %. It is reported in CPU time (this process and its workers), which other load on the machine
disturbs less, also as user time alone (the kernel's share is mostly taking the written shards into
the page cache, which costs 0.03-0.4 ms per 150 kB slice on our VM depending on the page cache's
state), and in wall time. Peak memory is sampled (RSS of the main process, and summed over it and its workers; the
shared-memory slots count in every process that touched them, so the sum overstates).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vit_spine import options
from vit_spine.options import parse_config

REAL_SLICES = 711_000  # slices in the RSNA 2022 training set


@dataclass
class ChunkBenchConfig:
    data_dir: str = field(metadata={"help": "dataset root in the RSNA 2022 layout (e.g. from `vit-spine synth`)."})
    workers: int = field(default_factory=lambda: os.cpu_count() or 1, metadata={"help": "worker processes for both ways."})
    image_size: int = field(default=224, metadata={"help": "stored image side (px)."})
    channels: str = field(default="bone25d", metadata={"help": "channel scheme: bone25d or windows."})
    shard_size: int = field(default=15000, metadata={"help": "--shard_size passed to chunk."})
    repeats: int = field(default=2, metadata={"help": "interleaved repetitions; the median is reported."})
    sample: int = field(default=200, metadata={"help": "slices timed one by one in this process for the cost breakdown."})
    tmp: str | None = field(default=None, metadata={"help": "folder for the temporary outputs (default: system temp)."})
    transfer_syntax: str | None = field(
        default=None,
        metadata={"help": "time only the slices stored in this transfer syntax UID, e.g. 1.2.840.10008.1.2.4.70 (JPEG "
                  "Lossless SV1, most RSNA slices); default: all. Multi-threaded decoders (JPEG 2000) otherwise "
                  "inflate the decode CPU time the overhead is measured against."},
    )

    def __post_init__(self) -> None:
        self.workers = options.capped_workers(self.workers, minimum=0)
        for name in ("image_size", "shard_size", "repeats"):
            options.at_least(getattr(self, name), 1, f"--{name}")
        options.at_least(self.sample, 0, "--sample")
        options.folder_path(self.data_dir, "DATA_DIR")
        options.folder_path(self.tmp, "--tmp")


def main(argv: Sequence[str] | None = None) -> int:
    (config,) = parse_config(
        ChunkBenchConfig,
        argv,
        prog="vit-spine bench chunk",
        description="End-to-end chunking slices/s vs bare decoding of the same files, and peak RSS.",
        positionals=("data_dir",),
    )
    run(config)
    return 0


def decode_study(paths: list[str]) -> int:
    from vit_spine.dicom import DicomReadError, read_hu

    done = 0
    for path in paths:
        try:
            read_hu(path)
            done += 1
        except DicomReadError:
            pass
    return done


def cpu_seconds() -> np.ndarray:
    """CPU time [user, system] of this process and of its finished, reaped children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return np.array([own.ru_utime + children.ru_utime, own.ru_stime + children.ru_stime])


def decode_all(studies: list[list[str]], workers: int) -> None:
    if workers == 0:
        for paths in studies:
            decode_study(paths)
        return
    with multiprocessing.Pool(workers) as pool:
        for _ in pool.imap_unordered(decode_study, studies):
            pass


class PeakMemory:
    """Samples RSS of this process and of it plus its children every 200 ms (psutil)."""

    def __init__(self):
        import psutil

        self._process = psutil.Process()
        self.main = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            main = self._process.memory_info().rss
            total = main
            for child in self._process.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.main, self.total = max(self.main, main), max(self.total, total)
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(config: ChunkBenchConfig) -> dict[str, float]:
    from vit_spine.chunk import ChunkConfig, chunk, select_training_slices
    from vit_spine.dicom import read_hu
    from vit_spine.preprocess import PreprocessConfig, render_slice
    from vit_spine.scan import ScanConfig, scan, write_scan

    preprocess = PreprocessConfig(image_size=config.image_size, channels=config.channels)
    with tempfile.TemporaryDirectory(dir=config.tmp) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        table = scan(config.data_dir, ScanConfig(data_dir=config.data_dir, workers=max(config.workers, 1), progress=False))
        scan_s = time.perf_counter() - start
        if config.transfer_syntax:
            table = table[table["transfer_syntax"] == config.transfer_syntax]
            if table.empty:
                raise ValueError(f"{config.data_dir}: no slice in transfer syntax {config.transfer_syntax}")
        write_scan(table, tmp / "slices.parquet")
        slices = select_training_slices(table).slices
        studies = [list(g["path"]) for _, g in slices.groupby("StudyInstanceUID", sort=True)]
        n = len(slices)
        if n == 0:
            raise ValueError(f"{config.data_dir}: no labelled training slice to chunk")
        rows, cols = int(slices["rows"].iloc[0]), int(slices["columns"].iloc[0])

        # one-process cost breakdown per slice
        sample = slices["path"].sample(min(config.sample, n), random_state=0).tolist()
        decode_ms, render_ms = [], []
        for path in sample:
            t0 = time.perf_counter()
            hu = read_hu(path)
            t1 = time.perf_counter()
            render_slice(hu, preprocess)
            decode_ms.append((t1 - t0) * 1e3)
            render_ms.append((time.perf_counter() - t1) * 1e3)

        decode_s, chunk_s, decode_cpu, chunk_cpu, peaks = [], [], [], [], []
        arrow_bytes = 0
        for rep in range(config.repeats):
            wall, cpu = time.perf_counter(), cpu_seconds()
            decode_all(studies, config.workers)
            decode_s.append(time.perf_counter() - wall)
            decode_cpu.append(cpu_seconds() - cpu)
            out = tmp / f"chunks_{rep}"
            options = ChunkConfig(
                output_dir=str(out), slice_table=str(tmp / "slices.parquet"), shard_size=config.shard_size,
                workers=config.workers, progress=False, rank=0, world_size=1,
            )
            with PeakMemory() as peak:
                wall, cpu = time.perf_counter(), cpu_seconds()
                manifest = chunk(options, preprocess)
                chunk_s.append(time.perf_counter() - wall)
                chunk_cpu.append(cpu_seconds() - cpu)
            peaks.append((peak.main, peak.total))
            written = sum(s["num_slices"] for s in manifest["shards"])
            arrow_bytes = sum((out / s["path"] / "data-00000-of-00001.arrow").stat().st_size for s in manifest["shards"])
            shutil.rmtree(out)

    decode_med, chunk_med = statistics.median(decode_s), statistics.median(chunk_s)
    # medians of user + system, and of user alone (the kernel's share is mostly writing the shards)
    decode_cpu_med, chunk_cpu_med = (statistics.median(float(t.sum()) for t in times) for times in (decode_cpu, chunk_cpu))
    decode_user_med, chunk_user_med = (statistics.median(float(t[0]) for t in times) for times in (decode_cpu, chunk_cpu))
    per_slice = arrow_bytes / written
    core_s_per_slice = chunk_cpu_med / n
    syntax = f" in {config.transfer_syntax}" if config.transfer_syntax else ""
    print(f"dataset {config.data_dir}: {n} training slices{syntax} of {rows}x{cols} in {len(studies)} studies; "
          f"workers {config.workers}; {config.image_size} px {config.channels}; {config.repeats} interleaved repetitions")
    print(f"after-decoding overhead, CPU time: {chunk_cpu_med / decode_cpu_med - 1:+.0%} of decode (goal <= +25%; "
          f"user time alone {chunk_user_med / decode_user_med - 1:+.0%}, the rest is the kernel writing the shards); "
          f"wall time: {chunk_med / decode_med - 1:+.0%}")
    print(f"  chunk end to end  {n / chunk_med:8.0f} slices/s  {chunk_cpu_med / n * 1e3:6.2f} CPU-ms/slice   "
          f"(repetitions, wall s: {', '.join(f'{t:.2f}' for t in chunk_s)})")
    print(f"  decode only       {n / decode_med:8.0f} slices/s  {decode_cpu_med / n * 1e3:6.2f} CPU-ms/slice   "
          f"(repetitions, wall s: {', '.join(f'{t:.2f}' for t in decode_s)})")
    print(f"  scan (headers, once) {scan_s:.2f} s = {n / scan_s if scan_s else 0:.0f} slices/s (all files, train and test)")
    print(f"  one process, per slice: read_hu {np.median(decode_ms):.2f} ms, preprocess {np.median(render_ms):.2f} ms (medians of {len(sample)})")
    main_peak, total_peak = max(p[0] for p in peaks), max(p[1] for p in peaks)
    print(f"  peak RSS: main process {main_peak / 2**20:.0f} MiB; main + workers {total_peak / 2**20:.0f} MiB")
    print(f"  disk: {per_slice / 1e3:.1f} kB per slice -> {per_slice * 15000 / 1e9:.2f} GB per 15k-slice shard "
          f"at {config.image_size} px; {per_slice * REAL_SLICES / 1e9:.0f} GB for {REAL_SLICES} slices")
    print(f"  time for {REAL_SLICES} slices of {rows}x{cols}: {core_s_per_slice * REAL_SLICES / 3600:.2f} core-hours "
          f"({core_s_per_slice * 1e3:.2f} core-ms per slice)")
    return {
        "cpu_overhead": chunk_cpu_med / decode_cpu_med - 1,
        "user_cpu_overhead": chunk_user_med / decode_user_med - 1,
        "wall_overhead": chunk_med / decode_med - 1,
        "chunk_slices_per_s": n / chunk_med,
        "decode_slices_per_s": n / decode_med,
    }
