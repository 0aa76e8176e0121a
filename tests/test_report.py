"""`vit-spine report`: every figure a PNG of its stated size, index.html linking all, curves on global steps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import TrainingArguments

from vit_spine import cli, evaluation, train
from vit_spine.chunk import ChunkConfig, chunk
from vit_spine.evaluation import PoolingConfig
from vit_spine.preprocess import PreprocessConfig
from vit_spine.report import SIZES, ReportConfig, build_report, choose_profile_studies, reliability, training_loss_curves
from vit_spine.scan import ScanConfig, scan, write_scan


@pytest.fixture(scope="module")
def trained_run(synth_data: Path, tmp_path_factory) -> Path:
    """Two tiny shards trained on the synthetic data (scan -> chunk -> train, as a user would)."""
    root = tmp_path_factory.mktemp("report")
    table = scan(synth_data, ScanConfig(data_dir=str(synth_data), workers=1, progress=False))
    write_scan(table, root / "slices.parquet")
    chunks = root / "chunks"
    chunk(
        ChunkConfig(
            data_dir=str(synth_data), out=str(chunks), slice_table=str(root / "slices.parquet"), shard_size=100,
            val_fraction=0.3, ignore_folds=True, workers=0, progress=False, rank=0, world_size=1,
        ),
        PreprocessConfig(image_size=32),
    )
    args = TrainingArguments(
        **{
            **train.training_defaults(),
            "per_device_train_batch_size": 16, "logging_steps": 2, "save_strategy": "no", "use_cpu": True,
            "disable_tqdm": True, "seed": 0, "learning_rate": 1e-3,
        }
    )
    config = train.TrainConfig(chunks=str(chunks), output=str(root / "run"), model_config="tiny", augment=False, patience=5, max_shards=2)
    result = train.run_training(config, PoolingConfig(calibration_folds=2), args)
    assert len(result.rows) == 2
    return root / "run"


@pytest.fixture(scope="module")
def report(trained_run: Path):
    config = ReportConfig(run_dir=str(trained_run), studies=2, saliency_slices=2, smoothgrad_samples=2, batch_size=32)
    return build_report(config)


def figure_kind(path: Path) -> str:
    return re.sub(r"_\d+$", "", path.stem)


def test_every_figure_is_a_png_of_its_stated_size(report, trained_run):
    index, figures = report
    assert index == trained_run / "report" / "index.html"
    kinds = [figure_kind(f.path) for f in figures]
    assert kinds[:4] == ["shard_scores", "training_loss", "roc_curves", "calibration"]
    assert kinds.count("profile") == 2 and kinds.count("saliency") == 2
    for figure in figures:
        with Image.open(figure.path) as image:
            assert image.format == "PNG"
            assert image.size == SIZES[figure_kind(figure.path)], figure.path.name
            assert len(set(np.asarray(image.convert("L")).reshape(-1).tolist())) > 20  # something is drawn


def test_index_html_links_every_figure(report):
    index, figures = report
    page = index.read_text()
    pngs = sorted(p.name for p in index.parent.glob("*.png"))
    assert pngs == sorted(f.path.name for f in figures)
    assert sorted(set(re.findall(r'href="([^"]+\.png)"', page))) == pngs
    assert sorted(set(re.findall(r'src="([^"]+\.png)"', page))) == pngs
    assert "baseline" in page and "<table>" in page


def test_training_loss_runs_on_global_steps_across_shards(trained_run):
    rows = evaluation.read_metrics(trained_run)
    curves, notes = training_loss_curves(trained_run, rows)
    assert notes == [] and [c.shard for c in curves] == [0, 1]
    assert curves[0].steps[-1] <= rows[0]["global_step"] < curves[1].steps[0] <= curves[1].steps[-1] <= rows[1]["global_step"]
    steps = np.concatenate([c.steps for c in curves])
    assert (np.diff(steps) > 0).all()
    state = json.loads((trained_run / "shard_00001" / "trainer_state.json").read_text())
    assert len(curves[1].losses) == sum("loss" in entry for entry in state["log_history"])


def test_profile_studies_take_fractured_first_then_negatives():
    studies = {
        "labels": np.array([[0] + [0] * 7, [1] + [1] + [0] * 6, [0] + [0] * 7, [1] + [0] * 6 + [1]], dtype=float),
        "calibrated": np.array([[0.3] * 8, [0.6] * 8, [0.1] * 8, [0.9] * 8]),
    }
    assert choose_profile_studies(studies, 3) == [3, 1, 2]
    assert choose_profile_studies(studies, 4) == [3, 1, 2, 0]
    assert choose_profile_studies(studies, 1) == [3]


def test_reliability_bins():
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.array([0.05, 0.15, 0.12, 0.95, 0.91])
    mean_pred, observed, counts = reliability(labels, probs, bins=10)
    np.testing.assert_allclose(mean_pred, [0.05, 0.135, 0.93])
    np.testing.assert_allclose(observed, [0.0, 0.5, 1.0])
    assert counts.tolist() == [1, 2, 2]


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2  # an input error, as the README says
    assert capsys.readouterr().err.startswith(f"vit-spine report: error: {tmp_path / 'metrics.jsonl'}: missing or empty")
