"""The benchmarks run end to end through `vit-spine bench NAME` on tiny inputs and print their ratios.

Speed itself is never asserted (shared machines are noisy); what is checked is that each benchmark
runs, times every way it promises, and prints the goal lines a reader looks for.
"""

from __future__ import annotations

import re

import pytest
import torch

from vit_spine import cli
from vit_spine.chunk import ChunkConfig, chunk
from vit_spine.data import ShardDataset
from vit_spine.preprocess import PreprocessConfig

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


NUMBER = r"(\d+(?:\.\d+)?)"


def search(pattern: str, text: str) -> tuple[str, ...]:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{pattern!r} not in output:\n{text}"
    return match.groups()


def half_unit(printed: str) -> float:
    """Half a unit of the last printed digit: how far rounding for print moved the number."""
    return 0.5 * 10 ** -len(printed.partition(".")[2])


def quotient_range(numerator: str | int, denominator: str) -> tuple[float, float]:
    """The values numerator / denominator can have given the printed numbers (an int numerator is a count: exact)."""
    spread = 0.0 if isinstance(numerator, int) else half_unit(numerator)
    return ((float(numerator) - spread) / (float(denominator) + half_unit(denominator)),
            (float(numerator) + spread) / (float(denominator) - half_unit(denominator)))


def assert_printed_quotient(quotient: str, numerator: str | int, denominator: str) -> None:
    """`quotient` is numerator / denominator, up to the rounding of the three printed numbers."""
    low, high = quotient_range(numerator, denominator)
    assert low - half_unit(quotient) <= float(quotient) <= high + half_unit(quotient), (quotient, numerator, denominator)


@pytest.fixture(scope="module")
def small_chunks(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "chunks"
    chunk(ChunkConfig(data_dir=str(synth_data), output_dir=str(out), shard_size=200, val_fraction=0.2, workers=0,
                      progress=False, ignore_folds=True), PreprocessConfig(image_size=32))
    return out


def test_bench_lists_the_benchmarks_and_refuses_an_unknown_one(capsys):
    assert cli.main(["bench"]) == 0
    listing = capsys.readouterr().out
    for name in ("decode", "scan", "loader", "chunk", "train", "predict"):
        assert f"  {name} " in listing
    assert cli.main(["bench", "nonsense"]) == 2
    assert "unknown benchmark 'nonsense'" in capsys.readouterr().err


def test_bench_loader_compares_uint8_batches_with_memmap_and_datasets(small_chunks, capsys):
    shard = small_chunks / "shard_00000"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the bench times at --threads 1; the process's own setting must come back
    try:
        assert cli.main(["bench", "loader", str(shard), "--batch_size", "16", "--batches", "2", "--repeats", "3"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    slices = len(ShardDataset(shard))
    assert out.startswith(f"shard {shard}: {slices} slices of (3, 32, 32) uint8, batch 16, 2 batches x 3 interleaved "
                          "repetitions, 1 torch thread(s)\n")
    rows = re.findall(r"^  (\S+(?: augment)?) +(\d+) img/s   \(repetitions: (\d+), (\d+), (\d+)\)$", out, re.MULTILINE)
    assert [row[0] for row in rows] == ["ours", "memmap", "datasets", "model_input", "model_input augment"]
    for way, median, *repetitions in rows:
        assert int(median) == sorted(map(int, repetitions))[1], way  # the median of the three, as printed
    rate = {way: median for way, median, *_ in rows}
    memmap, datasets = search(rf"^uint8 batches as the DataLoader yields them: ours / memmap {NUMBER} \(goal >= 0.5\), "
                              rf"ours / datasets {NUMBER} \(goal >= 5\)$", out)
    assert len(memmap.partition(".")[2]) == 2 and len(datasets.partition(".")[2]) == 1
    assert_printed_quotient(memmap, rate["ours"], rate["memmap"])
    assert_printed_quotient(datasets, rate["ours"], rate["datasets"])


def test_bench_chunk_reports_overhead_over_decoding_and_filters_by_transfer_syntax(synth_data, tmp_path, capsys):
    assert cli.main(["bench", "chunk", str(synth_data), "--workers", "1", "--image_size", "16", "--repeats", "1",
                     "--sample", "5", "--tmp", str(tmp_path), "--transfer_syntax", JPEG_LOSSLESS_SV1]) == 0
    out = capsys.readouterr().out
    assert f"training slices in {JPEG_LOSSLESS_SV1}" in out
    assert re.search(r"after-decoding overhead, CPU time: [+-]\d+% of decode \(goal <= \+25%; user time alone [+-]\d+%", out)
    assert "peak RSS" in out and "GB per 15k-slice shard" in out
    assert cli.main(["bench", "chunk", str(synth_data), "--transfer_syntax", "1.2.3", "--tmp", str(tmp_path)]) == 2
    assert "no slice in transfer syntax 1.2.3" in capsys.readouterr().err


def test_bench_scan_times_the_header_pass_against_a_bare_header_parse(synth_data, capsys):
    assert cli.main(["bench", "scan", str(synth_data), "--repeats", "2", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"scan header pass / bare header parse time: [\d.]+x  \(3 studies, 120 DICOM files, 120 slices", out)
    assert len(re.findall(r"^  repeat \d/2: ours +\d+ slices/s, bare pydicom header parse +\d+ files/s$", out, re.M)) == 2
    assert cli.main(["bench", "scan", str(synth_data / "segmentations")]) == 2
    assert "no study folder" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_train_compares_the_trainer_with_a_plain_loop(small_chunks, capsys):
    assert cli.main(["bench", "train", "--shard", str(small_chunks / "shard_00000"), "--steps", "3", "--batch_size", "4",
                     "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    repeats = re.findall(r"^  repeat 1/1 (trainer|loop) +(\d+\.\d) img/s$", out, re.MULTILINE)
    assert [way for way, _ in repeats] == ["trainer", "loop"]
    quotient, overhead = search(rf"^trainer / plain loop img/s: {NUMBER}  \(Trainer overhead ([+-]\d+\.\d) %; goal <= 10 %\)$", out)
    trainer, loop = search(rf"^trainer {NUMBER} img/s, plain loop {NUMBER} img/s \(median of 1; ViT-tiny, 32 px, batch 4, "
                           r"3 steps, device (?:cpu|cuda)\)$", out)
    assert [trainer, loop] == [rate for _, rate in repeats]  # the median of one repetition is that repetition
    assert_printed_quotient(quotient, trainer, loop)
    low, high = quotient_range(loop, trainer)  # overhead = loop / trainer - 1, in percent
    assert 100 * (low - 1) - half_unit(overhead) <= float(overhead) <= 100 * (high - 1) + half_unit(overhead)


@pytest.mark.slow
def test_bench_predict_times_a_random_checkpoint_on_test_studies(synth_data, tmp_path, capsys):
    assert cli.main(["bench", "predict", str(tmp_path / "checkpoint"), str(synth_data / "test_images"),
                     "--model_config", "tiny", "--image_size", "32", "--repeats", "1", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    (slices,) = search(r"^predict: 2 studies, (\d+) slices from .*; 1 interleaved repeats, medians$", out)
    (quotient,) = search(rf"^end to end / model only \(slices/s\): {NUMBER}x$", out)
    search(r"^decoding \(study assembly \+ preprocess\) is \d+% of end-to-end time$", out)
    rows = re.findall(r"^(end to end|decode only|model only) +(\d+\.\d\d) +(\d+\.\d) +(\d+\.\d\d)$", out, re.MULTILINE)
    assert [row[0] for row in rows] == ["end to end", "decode only", "model only"]
    for _, studies_per_s, slices_per_s, seconds in rows:
        assert_printed_quotient(studies_per_s, 2, seconds)
        assert_printed_quotient(slices_per_s, int(slices), seconds)
    rate = {name: slices_per_s for name, _, slices_per_s, _ in rows}
    assert_printed_quotient(quotient, rate["end to end"], rate["model only"])
