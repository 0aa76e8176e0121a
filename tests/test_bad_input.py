"""Bad input to any subcommand: exit 2 and ONE line `vit-spine CMD: error: ...` naming the option or file,
no traceback, and nothing that existed before changed (no partial file, no empty output folder left).

Also: a full disk is exit 1 with one line naming the file, Ctrl-C is 130, `--workers` is capped at the CPUs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from vit_spine import cli
from vit_spine.chunk import ChunkConfig, chunk
from vit_spine.artifacts import RunDir, write_checkpoint_meta
from vit_spine.evaluation import PoolingConfig
from vit_spine.schema import CHECKPOINT_META_FILE
from vit_spine.models import create_model
from vit_spine.predict import PredictConfig
from vit_spine.preprocess import PreprocessConfig
from vit_spine.scan import ScanConfig, scan, write_scan
from vit_spine.synth import SynthConfig

IMAGE_SIZE = 32


def write_checkpoint(folder: Path) -> Path:
    """A tiny random-init ViT saved the way train saves a shard (weights, config.json, vit_spine.json)."""
    create_model(model_config="tiny", image_size=IMAGE_SIZE).save_pretrained(folder)
    write_checkpoint_meta(folder, {"shard": 0, "preprocess": PreprocessConfig(image_size=IMAGE_SIZE).to_dict(),
                                   "pooling": asdict(PoolingConfig(aggregator="max")), "calibration": None, "metrics": {},
                                   "baseline_prevalence": [0.5] * 8})
    return folder


def damaged_copy(source: Path, target: Path, damage) -> Path:
    shutil.copytree(source, target, symlinks=True)
    damage(target)
    return target


def cut(path: Path, size: int) -> None:
    os.truncate(path, size)


@pytest.fixture(scope="module")
def workspace(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs written by the project's own writers, whole and damaged. Every case must leave them as they are."""
    root = tmp_path_factory.mktemp("bad_input")
    table = root / "slices.parquet"
    write_scan(scan(synth_data, ScanConfig(data_dir=str(synth_data), workers=1, progress=False)), table)
    chunks = root / "chunks"
    chunk(ChunkConfig(data_dir=str(synth_data), output_dir=str(chunks), slice_table=str(table), shard_size=200,
                      val_fraction=0.3, ignore_folds=True, workers=0, progress=False, rank=0, world_size=1),
          PreprocessConfig(image_size=IMAGE_SIZE))
    run = root / "run"
    checkpoint = write_checkpoint(run / "shard_00000")
    RunDir(run).write_run_config({"chunks": str(chunks)})
    row = {"shard": 0, "global_step": 1, "weighted_log_loss": 0.6, "weighted_log_loss_uncalibrated": 0.7,
           "baseline_weighted_log_loss": 0.65, "auc": {}}
    RunDir(run).write_rows([row], min_delta=0.0)  # metrics.jsonl, best -> shard_00000, all_results.json
    existing = root / "existing"  # what synth takes for a dataset already there
    existing.mkdir()
    (existing / "train.csv").write_text("StudyInstanceUID,patient_overall\n")
    (root / "notes.txt").write_text("a file where a folder or a table is expected\n")
    damaged = root / "damaged"
    damaged.mkdir()
    return {
        "data": synth_data, "table": table, "chunks": chunks, "run": run, "ck": checkpoint, "existing": existing,
        "file": root / "notes.txt", "root": root,
        "no_config": damaged_copy(checkpoint, damaged / "no_config", lambda p: (p / "config.json").unlink()),
        "no_weights": damaged_copy(checkpoint, damaged / "no_weights", lambda p: (p / "model.safetensors").unlink()),
        "cut_weights": damaged_copy(checkpoint, damaged / "cut_weights",
                                    lambda p: cut(p / "model.safetensors", (p / "model.safetensors").stat().st_size // 2)),
        "cut_config": damaged_copy(checkpoint, damaged / "cut_config", lambda p: cut(p / "config.json", 20)),
        "cut_meta": damaged_copy(checkpoint, damaged / "cut_meta", lambda p: cut(p / CHECKPOINT_META_FILE, 20)),
        "cut_manifest": damaged_copy(chunks, damaged / "cut_manifest", lambda p: cut(p / "manifest.json", 30)),
        "cut_metrics": damaged_copy(run, damaged / "cut_metrics", lambda p: cut(p / "metrics.jsonl", 10)),
        "cut_run_config": damaged_copy(run, damaged / "cut_run_config", lambda p: cut(p / "run_config.json", 5)),
    }


def snapshot(folder: Path, contents: bool = True) -> dict[str, object]:
    """Every path under `folder` with its bytes' hash (or size and mtime, for the large shared dataset).

    Lock files are left out: `vit_spine.fs.FolderLock` keeps its lock file in a folder it locked, by design.
    """
    state: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        if path.name.endswith(".lock"):
            continue
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = ("link", os.readlink(path))
        elif path.is_dir():
            state[key] = "dir"
        elif contents:
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            stat = path.stat()
            state[key] = (stat.st_size, stat.st_mtime_ns)
    return state


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# (argv with {placeholders}, texts the one error line must contain). Placeholders: the workspace's
# entries, plus {tmp} (the case's empty folder, also the working directory), {new} (a path under it that
# must not exist afterwards) and {nothing} (a path that does not exist).
CASES = [
    # synth
    pytest.param(["synth", "{existing}"], ["{existing} already holds a dataset", "--overwrite"], id="synth-existing-dataset"),
    pytest.param(["synth", "{file}"], ["OUTPUT_DIR {file}: a file, not a folder"], id="synth-out-is-a-file"),
    pytest.param(["synth"], ["required: OUTPUT_DIR"], id="synth-missing-out"),
    pytest.param(["synth", "{new}", "--studies", "x"], ["argument --num_studies: invalid int value"], id="synth-not-a-number"),
    pytest.param(["synth", "{new}", "--bogus", "1"], ["unrecognized argument(s): --bogus 1"], id="synth-unknown-option"),
    pytest.param(["synth", "{new}", "--studies", "1"], ["--num_studies must be at least 2"], id="synth-too-few-studies"),
    pytest.param(["synth", "{new}", "--num_studies", "1"], ["--num_studies must be at least 2"], id="synth-too-few-num-studies"),
    pytest.param(["synth", "{new}", "--out", "{tmp}/other"], ["--output_dir {new} and --out {tmp}/other both set --output_dir: give it once"],
                 id="synth-output-dir-twice"),
    pytest.param(["synth", "{new}", "--workers", "0"], ["--workers must be at least 1"], id="synth-zero-workers"),
    pytest.param(["synth", "{new}", "--size", "10"], ["--size must be at least 64"], id="synth-tiny-size"),
    # scan
    pytest.param(["scan", "{data}", "--out", "{tmp}"], ["--output_file {tmp}: a folder, not a file"], id="scan-out-is-a-folder"),
    pytest.param(["scan", "{data}", "--out", "{file}/t.parquet"], ["--output_file {file}/t.parquet", "is a file"], id="scan-out-under-a-file"),
    pytest.param(["scan", "{nothing}", "--out", "{new}.parquet"], ["{nothing}: no such directory"], id="scan-missing-data-dir"),
    pytest.param(["scan", "{file}", "--out", "{new}.parquet"], ["DATA_DIR {file}: a file, not a folder"], id="scan-data-dir-is-a-file"),
    pytest.param(["scan", "{data}"], ["--output_file FILE.parquet is required"], id="scan-without-out"),
    pytest.param(["scan", "{data}", "--out", "{new}.parquet", "--workers", "0"], ["--workers must be at least 1"], id="scan-zero-workers"),
    pytest.param(["scan", "{data}", "--out", "{new}.parquet", "--workers", "many"], ["--workers", "invalid int value"], id="scan-workers-not-a-number"),
    pytest.param(["scan", "{data}", "--out", "{new}.parquet", "--vertebrae_table", "{nothing}.csv"], ["{nothing}.csv: no such file"],
                 id="scan-missing-vertebrae-table"),
    pytest.param(["scan", "{data}", "--out", "{new}.parquet", "--vertebrae_table", "{tmp}"], ["--vertebrae_table {tmp}: a folder"],
                 id="scan-vertebrae-table-is-a-folder"),
    pytest.param(["scan", "{tmp}", "--out", "{new}.parquet"], ["no study folder under train_images/ or test_images/"], id="scan-no-studies"),
    # chunk
    pytest.param(["chunk", "{data}", "--slice_table", "{table}", "--out", "{file}"], ["--output_dir {file}: a file, not a folder"], id="chunk-out-is-a-file"),
    pytest.param(["chunk", "{data}", "--slice_table", "{nothing}", "--out", "{new}"], ["--slice_table {nothing}: no such file"],
                 id="chunk-missing-slice-table"),  # refused before --out is made
    pytest.param(["chunk", "{nothing}", "--out", "{new}"], ["DATA_DIR {nothing}: no such directory"], id="chunk-missing-data-dir"),
    pytest.param(["chunk", "{data}", "--slice_table", "{tmp}", "--out", "{new}"], ["--slice_table {tmp}: a folder"], id="chunk-slice-table-is-a-folder"),
    pytest.param(["chunk", "{data}", "--slice_table", "{file}", "--out", "{new}"], ["{file}", "Parquet"],
                 id="chunk-slice-table-not-parquet"),  # refused after --out is made: the folder it made is removed
    pytest.param(["chunk", "{data}", "--slice_table", "{table}", "--out", "{new}", "--image_size", "0"], ["--image_size must be at least 8"],
                 id="chunk-zero-image-size"),
    pytest.param(["chunk", "{data}", "--slice_table", "{table}", "--out", "{new}", "--shard_size", "0"], ["--shard_size must be >= 1"],
                 id="chunk-zero-shard-size"),
    pytest.param(["chunk", "{data}", "--slice_table", "{table}", "--out", "{new}", "--val_fraction", "1.5"], ["--val_fraction"],
                 id="chunk-val-fraction-above-1"),
    pytest.param(["chunk", "{data}", "--slice_table", "{table}", "--out", "{new}", "--channels", "rgb"],
                 ["--channels 'rgb': not a channel scheme; known: bone25d, windows"],
                 id="chunk-unknown-channels"),
    pytest.param(["chunk", "{data}", "--slice_table", "{table}", "--out", "{new}", "--workers", "-1"], ["--workers must be at least 0"],
                 id="chunk-negative-workers"),
    pytest.param(["chunk", "{data}", "--slice_table", "{table}", "--out", "{new}", "--rank", "3", "--world_size", "2"], ["--rank 3"],
                 id="chunk-rank-outside-world"),
    pytest.param(["chunk", "--out", "{new}"], ["give DATA_DIR or --slice_table"], id="chunk-without-input"),
    pytest.param(["chunk", "{data}", "--slice_table", "{table}", "--output_dir", "{file}"], ["--output_dir {file}: a file, not a folder"],
                 id="chunk-output-dir-is-a-file"),
    pytest.param(["chunk", "--out", "{cut_manifest}"], ["{cut_manifest}/manifest.json: not valid JSON", "vit-spine chunk"], id="chunk-cut-manifest"),
    # train
    pytest.param(["train", "--chunks", "{chunks}", "--output", "{file}", "--model_config", "tiny"], ["--output_dir {file}: a file"],
                 id="train-output-is-a-file"),
    pytest.param(["train", "--chunks", "{nothing}", "--output", "{new}", "--model_config", "tiny"], ["{nothing}"], id="train-missing-chunks"),
    pytest.param(["train", "--chunks", "{file}", "--output", "{new}", "--model_config", "tiny"], ["--chunks {file}: a file"], id="train-chunks-is-a-file"),
    pytest.param(["train", "--chunks", "{chunks}", "--output", "{new}", "--model_config", "tiny", "--patch_size", "0"],
                 ["--patch_size must be at least 1"], id="train-zero-patch-size"),
    pytest.param(["train", "--chunks", "{chunks}", "--output", "{new}", "--model_config", "tiny", "--patch_size", "7"],
                 ["--patch_size 7 does not divide the chunks' image size 32"], id="train-patch-size-not-a-divisor"),
    pytest.param(["train", "--chunks", "{chunks}", "--output", "{new}", "--model_config", "tiny", "--fracture_pos_weight_max", "-1"],
                 ["--fracture_pos_weight_max must be greater than 0"], id="train-negative-pos-weight"),
    pytest.param(["train", "--chunks", "{chunks}", "--output", "{new}", "--model_config", "huge"], ["--model_config 'huge'"],
                 id="train-unknown-model-config"),
    pytest.param(["train", "--chunks", "{chunks}", "--output", "{new}", "--model", "{ck}", "--model_config", "tiny"], ["--model_name_or_path or --model_config"],
                 id="train-model-and-model-config"),
    pytest.param(["train", "--chunks", "{chunks}", "--output", "{new}", "--model", "{tmp}"], ["--model_name_or_path {tmp}: no config.json"],
                 id="train-model-folder-without-config"),
    pytest.param(["train", "--chunks", "{chunks}", "--output", "{new}", "--model_config", "tiny", "--per_device_train_batch_size", "0"],
                 ["--per_device_train_batch_size must be at least 1"], id="train-zero-batch-size"),
    pytest.param(["train", "--chunks", "{chunks}", "--output", "{new}", "--model_config", "tiny", "--replay_fraction", "2"],
                 ["--replay_fraction must be in [0, 1]"], id="train-replay-fraction-above-1"),
    pytest.param(["train", "--chunks", "{chunks}", "--output", "{new}", "--model_config", "tiny", "--learning_rate", "fast"],
                 ["--learning_rate", "invalid float value"], id="train-learning-rate-not-a-number"),
    pytest.param(["train", "--chunks", "{cut_manifest}", "--output", "{new}", "--model_config", "tiny"],
                 ["{cut_manifest}/manifest.json: not valid JSON"], id="train-cut-manifest"),
    pytest.param(["train", "--output", "{new}", "--model_config", "tiny"], ["required", "--chunks"], id="train-missing-chunks-option"),
    pytest.param(["train", "--chunks", "{chunks}", "--model_config", "tiny"], ["required: --output_dir"], id="train-missing-output-dir"),
    pytest.param(["train", "--chunks", "{chunks}", "--output", "{new}", "--output_dir", "{tmp}/b", "--model_config", "tiny"],
                 ["--output {new} and --output_dir {tmp}/b both set --output_dir: give it once"], id="train-output-and-output-dir-differ"),
    pytest.param(["train", "--chunks", "{chunks}", "--output_dir", "{new}", "--model_config", "tiny", "--eval_strategy", "steps"],
                 ["--eval_strategy steps: not supported by `vit-spine train`"], id="train-eval-strategy-steps"),
    pytest.param(["train", "--chunks", "{chunks}", "--output_dir", "{new}", "--model_config", "tiny", "--resume_from_checkpoint", "{ck}"],
                 ["--resume_from_checkpoint {ck}: not supported by `vit-spine train`: a run resumes by itself"],
                 id="train-resume-from-checkpoint"),
    pytest.param(["train", "--chunks", "{chunks}", "--output", "{new}", "--frobnicate"], ["unrecognized argument(s): --frobnicate"],
                 id="train-unknown-option"),
    # evaluate
    pytest.param(["evaluate", "{run}", "--out", "{tmp}"], ["--output_file {tmp}: a folder, not a file"], id="evaluate-out-is-a-folder"),
    pytest.param(["evaluate", "{tmp}"], ["is neither a vit-spine checkpoint"], id="evaluate-not-a-checkpoint"),
    pytest.param(["evaluate", "{nothing}"], ["{nothing}"], id="evaluate-missing-checkpoint"),
    pytest.param(["evaluate", "{file}"], ["CHECKPOINT {file}: a file"], id="evaluate-checkpoint-is-a-file"),
    pytest.param(["evaluate"], ["required", "CHECKPOINT"], id="evaluate-missing-checkpoint-argument"),
    pytest.param(["evaluate", "{run}", "--batch_size", "0"], ["--batch_size must be at least 1"], id="evaluate-zero-batch-size"),
    pytest.param(["evaluate", "{no_config}", "--chunks", "{chunks}"], ["checkpoint {no_config} is damaged (config.json is missing)", "vit-spine train"],
                 id="evaluate-checkpoint-without-config"),
    pytest.param(["evaluate", "{no_weights}", "--chunks", "{chunks}"], ["checkpoint {no_weights} is damaged (model.safetensors is missing)"],
                 id="evaluate-checkpoint-without-weights"),
    pytest.param(["evaluate", "{cut_weights}", "--chunks", "{chunks}"], ["checkpoint {cut_weights}", "damaged", "vit-spine train"],
                 id="evaluate-cut-weights"),
    pytest.param(["evaluate", "{cut_config}", "--chunks", "{chunks}"], ["checkpoint {cut_config}", "config.json", "damaged"],
                 id="evaluate-cut-config"),
    pytest.param(["evaluate", "{cut_meta}", "--chunks", "{chunks}"], ["{cut_meta}/vit_spine.json: not valid JSON", "another shard's checkpoint"],
                 id="evaluate-cut-checkpoint-meta"),
    pytest.param(["evaluate", "{ck}", "--chunks", "{cut_manifest}"], ["{cut_manifest}/manifest.json: not valid JSON"], id="evaluate-cut-manifest"),
    pytest.param(["evaluate", "{cut_run_config}"], ["{cut_run_config}/run_config.json: not valid JSON", "--chunks"], id="evaluate-cut-run-config"),
    # predict
    pytest.param(["predict", "{run}", "{data}/test_images", "--out", "{tmp}"], ["--output_file {tmp}: a folder, not a file"], id="predict-out-is-a-folder"),
    pytest.param(["predict", "{run}", "{data}/test_images", "--out", "{new}.csv", "--device", "foo"], ["--device 'foo'"], id="predict-unknown-device"),
    pytest.param(["predict", "{run}", "{data}/test_images", "--out", "{new}.csv", "--device", "cuda"], ["--device cuda: CUDA is not available"],
                 id="predict-cuda-without-cuda", marks=pytest.mark.skipif("cuda_available()")),
    pytest.param(["predict", "{run}", "{nothing}", "--out", "{new}.csv"], ["{nothing}: no such folder"], id="predict-missing-path"),
    pytest.param(["predict", "{run}", "{file}", "--out", "{new}.csv"], ["PATH {file}: a file, not a folder"], id="predict-path-is-a-file"),
    pytest.param(["predict", "{run}"], ["required", "PATHS"], id="predict-missing-paths"),
    pytest.param(["predict", "{run}", "{data}/test_images", "--out", "{new}.csv", "--studies", "{nothing}.csv"], ["{nothing}.csv: no such file"],
                 id="predict-missing-studies"),
    pytest.param(["predict", "{run}", "{data}/test_images", "--out", "{new}.csv", "--studies", "{tmp}"], ["--studies_csv {tmp}: a folder"],
                 id="predict-studies-is-a-folder"),
    pytest.param(["predict", "{run}", "{data}/test_images", "--out", "{new}.csv", "--studies", "{file}"], ["{file}: missing column(s)"],
                 id="predict-studies-not-a-test-table"),
    pytest.param(["predict", "{run}", "{data}/test_images", "--out", "{new}.csv", "--slices_out", "{new}.txt"], ["--slices_out", ".csv or .parquet"],
                 id="predict-slices-out-suffix"),
    pytest.param(["predict", "{run}", "{data}/test_images", "--out", "{new}.csv", "--batch_size", "0"], ["--batch_size must be at least 1"],
                 id="predict-zero-batch-size"),
    pytest.param(["predict", "{run}", "{data}/test_images", "--out", "{new}.csv", "--workers", "-1"], ["--workers must be at least 0"],
                 id="predict-negative-workers"),
    pytest.param(["predict", "{no_config}", "{data}/test_images", "--out", "{new}.csv"], ["checkpoint {no_config} is damaged (config.json is missing)"],
                 id="predict-checkpoint-without-config"),
    pytest.param(["predict", "{cut_weights}", "{data}/test_images", "--out", "{new}.csv"], ["checkpoint {cut_weights}", "damaged"],
                 id="predict-cut-weights"),
    # push
    pytest.param(["push", "{run}"], ["required: --hub_model_id"], id="push-missing-repo-id"),
    pytest.param(["push", "{run}", "--repo_id", "nope"], ["--hub_model_id 'nope': expected `owner/name`"], id="push-bad-repo-id"),
    pytest.param(["push", "{nothing}", "--repo_id", "a/b"], ["{nothing} is neither a vit-spine checkpoint"], id="push-missing-checkpoint"),
    pytest.param(["push", "{file}", "--repo_id", "a/b"], ["CHECKPOINT {file}: a file"], id="push-checkpoint-is-a-file"),
    pytest.param(["push", "{run}", "--repo_id", "a/b", "--retries", "0"], ["--retries 0"], id="push-zero-retries"),
    pytest.param(["push", "{run}", "--repo_id", "a/b", "--backoff", "-1"], ["--backoff must be at least 0"], id="push-negative-backoff"),
    pytest.param(["push", "{run}", "--hub_model_id", "nope"], ["--hub_model_id 'nope': expected `owner/name`"], id="push-bad-hub-model-id"),
    # report
    pytest.param(["report", "{tmp}"], ["{tmp}/metrics.jsonl: missing or empty"], id="report-not-a-run"),
    pytest.param(["report", "{run}", "--out", "{file}"], ["--output_dir {file}: a file, not a folder"], id="report-out-is-a-file"),
    pytest.param(["report", "{run}", "--chunks", "{file}"], ["--chunks {file}: a file"], id="report-chunks-is-a-file"),
    pytest.param(["report", "{run}", "--device", "tpu"], ["--device 'tpu'"], id="report-unknown-device"),
    pytest.param(["report", "{run}", "--studies", "-1"], ["--num_studies and --num_saliency_slices must be >= 0"], id="report-negative-studies"),
    pytest.param(["report", "{cut_metrics}"], ["{cut_metrics}/metrics.jsonl: not valid JSON", "line 1"], id="report-cut-metrics"),
    # bench NAME
    pytest.param(["bench", "nonsense"], ["unknown benchmark 'nonsense'"], id="bench-unknown"),
    pytest.param(["bench", "loader", "{nothing}"], ["{nothing}: no such shard folder"], id="bench-loader-missing-shard"),
    pytest.param(["bench", "loader", "{file}"], ["SHARD {file}: a file"], id="bench-loader-shard-is-a-file"),
    pytest.param(["bench", "loader", "{chunks}/shard_00000", "--batch_size", "0"], ["--batch_size must be at least 1"], id="bench-loader-zero-batch"),
    pytest.param(["bench", "chunk", "{nothing}"], ["{nothing}: no such directory"], id="bench-chunk-missing-data"),
    pytest.param(["bench", "chunk", "{data}", "--workers", "-1"], ["--workers must be at least 0"], id="bench-chunk-negative-workers"),
    pytest.param(["bench", "decode", "{tmp}"], ["no .dcm files under {tmp}"], id="bench-decode-no-files"),
    pytest.param(["bench", "scan", "{tmp}"], ["no study folder"], id="bench-scan-no-studies"),
    pytest.param(["bench", "train", "--shard", "{nothing}"], ["{nothing}: no such shard folder"], id="bench-train-missing-shard"),
    pytest.param(["bench", "train", "--batch_size", "0"], ["--batch_size must be at least 1"], id="bench-train-zero-batch"),
    pytest.param(["bench", "predict", "{nothing}", "{data}/test_images"], ["{nothing} is neither a vit-spine checkpoint"],
                 id="bench-predict-missing-checkpoint"),
    pytest.param(["bench", "predict", "{run}", "{data}/test_images", "--device", "foo"], ["--device 'foo'"], id="bench-predict-unknown-device"),
    pytest.param(["bench", "gpu", "--batch_sizes", "0"], ["--batch_sizes '0': expected positive integers"], id="bench-gpu-zero-batch"),
    pytest.param(["bench", "gpu", "--variants", "fast"], ["--variants 'fast'"], id="bench-gpu-unknown-variant"),
    # demo: every value is checked before the demo removes its folders
    pytest.param(["demo", "--studies", "1"], ["--num_studies must be at least 2"], id="demo-too-few-studies"),
    pytest.param(["demo", "--patch_size", "7"], ["--patch_size 7 does not divide --image_size 64"], id="demo-patch-size"),
    pytest.param(["demo", "--crop", "2"], ["--crop must be in (0, 1]"], id="demo-crop-above-1"),
    pytest.param(["demo", "--workdir", "{file}"], ["--workdir {file}: a file"], id="demo-workdir-is-a-file"),
    pytest.param(["demo", "--bogus"], ["unrecognized argument(s): --bogus"], id="demo-unknown-option"),
]


def command_of(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] == "bench" and argv[1] != "nonsense" else argv[0]


@pytest.mark.parametrize("template, expected", CASES)
def test_bad_input_is_one_line_and_exit_2_and_changes_nothing(template, expected, workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo's default folders are relative: they must not be touched either
    monkeypatch.delenv("VIT_SPINE_TRACEBACK", raising=False)
    paths = {name: str(path) for name, path in workspace.items()}
    paths.update(tmp=str(tmp_path), new=str(tmp_path / "new"), nothing=str(tmp_path / "nothing"))
    argv = [part.format(**paths) for part in template]
    before = (snapshot(workspace["root"]), snapshot(workspace["data"], contents=False), snapshot(tmp_path))

    code = cli.main(argv)

    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vit-spine {command_of(argv)}: error: "), lines[0]
    for text in expected:
        assert text.format(**paths) in lines[0]
    assert "Traceback" not in out + err
    assert (snapshot(workspace["root"]), snapshot(workspace["data"], contents=False), snapshot(tmp_path)) == before


@pytest.mark.parametrize("argv, text", [
    (["scan", "{tmp}", "--out", "{tmp}/t.parquet"], "no study folder"),
    (["predict", "{run}", "{data}/test_images", "--out", "{tmp}"], "--output_file {tmp}: a folder"),
])
def test_the_console_script_prints_one_line_and_no_traceback(argv, text, workspace, tmp_path):
    paths = {"tmp": str(tmp_path), "run": str(workspace["run"]), "data": str(workspace["data"])}
    env = {k: v for k, v in os.environ.items() if k != "VIT_SPINE_TRACEBACK"}
    script = Path(sys.executable).with_name("vit-spine")
    proc = subprocess.run([str(script), *(a.format(**paths) for a in argv)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"vit-spine {argv[0]}: error: ") and text.format(**paths) in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError("IOError: Error writing bytes to file. Detail: [errno 28] No space left on device"),  # pyarrow: no errno
], ids=["errno", "pyarrow-message"])
def test_a_full_disk_is_exit_1_naming_the_file_and_leaves_no_partial_file(error, workspace, tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq

    def full_disk(table, where, *args, **kwargs):
        Path(where).write_bytes(b"PAR1 half")  # what a write cut short by a full disk leaves
        raise error

    monkeypatch.setattr(pq, "write_table", full_disk)
    out = tmp_path / "slices.parquet"
    assert cli.main(["scan", str(workspace["data"]), "--out", str(out), "--workers", "1", "--no-progress"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"vit-spine scan: error: No space left on device writing {out}: free space and run the same "
                     "command again (set VIT_SPINE_TRACEBACK=1 to see where)"]
    assert list(tmp_path.iterdir()) == []  # neither the table nor slices.parquet.partial


def test_ctrl_c_is_exit_130_with_one_line(workspace, tmp_path, monkeypatch, capsys):
    from vit_spine import scan as scan_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_module, "scan", interrupted)
    assert cli.main(["scan", str(workspace["data"]), "--out", str(tmp_path / "t.parquet")]) == 130
    assert capsys.readouterr().err == "vit-spine scan: interrupted\n"


def test_a_bug_keeps_its_traceback(workspace, tmp_path, monkeypatch):
    """Only input errors become one line: anything else is a bug, and must show where it is."""
    from vit_spine import scan as scan_module

    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(scan_module, "scan", bug)
    with pytest.raises(KeyError, match="oops"):
        cli.main(["scan", str(workspace["data"]), "--out", str(tmp_path / "t.parquet")])


WORKER_OPTIONS = {  # every options dataclass whose --workers starts processes
    "scan": lambda tmp, n: ScanConfig(data_dir=str(tmp), workers=n),
    "chunk": lambda tmp, n: ChunkConfig(output_dir=str(tmp / "chunks"), workers=n),
    "predict": lambda tmp, n: PredictConfig(checkpoint=str(tmp), paths=[str(tmp)], workers=n),
    "synth": lambda tmp, n: SynthConfig(output_dir=str(tmp / "data"), workers=n),
}


@pytest.mark.parametrize("make", WORKER_OPTIONS.values(), ids=WORKER_OPTIONS.keys())
def test_workers_are_capped_at_the_cpus_with_a_note(make, tmp_path, capsys):
    cpus = os.cpu_count() or 1
    assert make(tmp_path, cpus + 62).workers == cpus
    assert capsys.readouterr().err == f"note: --workers {cpus + 62} capped at the {cpus} CPUs here\n"
    assert make(tmp_path, cpus).workers == cpus
    assert capsys.readouterr().err == ""


def test_the_workers_cap_is_applied_on_the_command_line(workspace, tmp_path, capsys):
    cpus = os.cpu_count() or 1
    out = tmp_path / "t.parquet"
    assert cli.main(["scan", str(workspace["data"]), "--out", str(out), "--workers", str(cpus + 62), "--no-progress"]) == 0
    assert f"note: --workers {cpus + 62} capped at the {cpus} CPUs here" in capsys.readouterr().err
    assert out.is_file()


def folder_in_use() -> Exception:
    # vit_spine.fs.FolderInUse is recognised by its name: cli must not import fs to classify an error
    return type("FolderInUse", (RuntimeError,), {})("/data/run is in use by PID 42 (vit-spine train on host)")


def dicom_read_error() -> Exception:
    from vit_spine.dicom import DicomReadError

    return DicomReadError("/data/1.dcm", "not a DICOM file")


@pytest.mark.parametrize("make_error, text", [
    (folder_in_use, "/data/run is in use by PID 42"),
    (dicom_read_error, "/data/1.dcm"),
    (lambda: PermissionError(errno.EACCES, "Permission denied", "/data/t.parquet"), "/data/t.parquet: permission denied"),
], ids=["folder-in-use", "dicom-read-error", "permission"])
def test_the_projects_input_errors_are_one_line_and_exit_2(make_error, text, workspace, tmp_path, monkeypatch, capsys):
    from vit_spine import scan as scan_module

    def fails(*args, **kwargs):
        raise make_error()

    monkeypatch.setattr(scan_module, "scan", fails)
    assert cli.main(["scan", str(workspace["data"]), "--out", str(tmp_path / "t.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vit-spine scan: error: ") and text in err
