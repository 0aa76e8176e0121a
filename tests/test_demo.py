"""The demo chains every subcommand as a user types them: a shrunken run must produce every artefact."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from vit_spine import demo
from vit_spine.evaluation import mean_vertebra_auc


@pytest.mark.slow
def test_demo_runs_every_stage_end_to_end(tmp_path, capsys):
    config = demo.DemoConfig(
        workdir=str(tmp_path / "demo"), chunks=str(tmp_path / "chunks"), output_dir=str(tmp_path / "run"),
        num_studies=14, num_test_studies=2, num_slices=24, size=64, image_size=32, shard_size=120, epochs_per_shard=1,
    )
    demo.run_demo(config)
    out = capsys.readouterr().out
    for command in ("vit-spine synth", "vit-spine scan", "vit-spine chunk", "vit-spine train", "vit-spine evaluate",
                    "vit-spine predict", "vit-spine report"):
        assert f"$ {command} " in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and all("baseline_weighted_log_loss" in r for r in rows)
    submission = pd.read_csv(tmp_path / "demo" / "submission.csv")
    test_rows = pd.read_csv(tmp_path / "demo" / "data" / "test.csv")
    assert submission["row_id"].tolist() == test_rows["row_id"].tolist()
    assert submission["fractured"].between(0, 1, inclusive="neither").all()
    assert (tmp_path / "run" / "report" / "index.html").is_file()
    assert (tmp_path / "demo" / "vertebrae.csv").is_file()


@pytest.mark.quality
def test_demo_defaults_beat_the_constant_prevalence_baseline_clearly(tmp_path, capsys):
    """The default demo (seed 0): the best shard, judged by the default `sequence` aggregator, is at most 0.85x
    the prevalence baseline, and the head ranks the vertebrae better than max-pooling of the same checkpoint.

    Measured: best shard 3 at 0.3996 against a baseline of 0.5766 on the same 59 validation studies (0.69x;
    max-pooling's best 0.5328), mean AUC C1-C7 0.864 against max-pooling's 0.828 on that checkpoint. The
    assertions leave room for another CPU's float rounding.
    """
    config = demo.DemoConfig(workdir=str(tmp_path / "demo"), chunks=str(tmp_path / "chunks"), output_dir=str(tmp_path / "run"))
    demo.run_demo(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = min(rows, key=lambda row: row["weighted_log_loss"])
    assert best["aggregator"] == "sequence"
    assert best["weighted_log_loss"] <= 0.85 * best["baseline_weighted_log_loss"], rows
    assert best["weighted_log_loss"] < min(row["aggregators"]["max"]["weighted_log_loss"] for row in rows) - 0.05
    mean_auc = {name: mean_vertebra_auc(best["aggregators"][name]["auc"]) for name in ("max", "sequence")}
    assert mean_auc["sequence"] >= mean_auc["max"] + 0.02, mean_auc
    out = capsys.readouterr().out
    assert "per shard: validation weighted log loss" in out and "every aggregator side by side" in out
