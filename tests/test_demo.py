"""The demo chains every subcommand as a user types them: a shrunken run must produce every artefact."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from vit_spine import demo


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
    """The default demo (seed 0): the tiny ViT's best shard beats predicting the training prevalence.

    Measured: best 0.5328 (the last of 5 shards) against a baseline of 0.5766 on the same 59 validation
    studies, a margin of 0.044; the assertion asks for 0.02, room for another CPU's float rounding.
    """
    config = demo.DemoConfig(workdir=str(tmp_path / "demo"), chunks=str(tmp_path / "chunks"), output_dir=str(tmp_path / "run"))
    demo.run_demo(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = min(rows, key=lambda row: row["weighted_log_loss"])
    assert best["weighted_log_loss"] <= best["baseline_weighted_log_loss"] - 0.02, rows
    assert "per shard: validation weighted log loss" in capsys.readouterr().out
