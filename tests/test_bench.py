"""The benchmarks run end to end through `vit-spine bench NAME` on tiny inputs and print their ratios.

Speed itself is never asserted (shared machines are noisy); what is checked is that each benchmark
runs, times every way it promises, and prints the goal lines a reader looks for.
"""

from __future__ import annotations

import re

import pytest

from vit_spine import cli
from vit_spine.chunk import ChunkConfig, chunk
from vit_spine.preprocess import PreprocessConfig

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


def ratio(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def small_chunks(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "chunks"
    chunk(ChunkConfig(data_dir=str(synth_data), out=str(out), shard_size=200, val_fraction=0.2, workers=0,
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
    assert cli.main(["bench", "loader", str(small_chunks / "shard_00000"), "--batch_size", "16", "--batches", "2",
                     "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert ratio(r"ours / memmap ([\d.]+) \(goal >= 0.5\)", out) > 0
    assert ratio(r"ours / datasets ([\d.]+) \(goal >= 5\)", out) > 0
    for way in ("ours", "memmap", "datasets", "model_input", "model_input augment"):
        assert re.search(rf"^  {re.escape(way)} +\d+ img/s", out, re.MULTILINE), way


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
    assert ratio(r"trainer / plain loop img/s: ([\d.]+)", out) > 0
    assert "goal <= 10 %" in out


@pytest.mark.slow
def test_bench_predict_times_a_random_checkpoint_on_test_studies(synth_data, tmp_path, capsys):
    assert cli.main(["bench", "predict", str(tmp_path / "checkpoint"), str(synth_data / "test_images"),
                     "--model_config", "tiny", "--image_size", "32", "--repeats", "1", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "slices/s" in out and "decod" in out
