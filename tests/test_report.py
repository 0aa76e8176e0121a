"""`vit-spine report`: every figure a PNG of its stated size, index.html linking all, curves on global steps."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib.collections
import matplotlib.patches
import numpy as np
import pytest
from PIL import Image

from vit_spine import cli
from vit_spine import report as report_module
from vit_spine.artifacts import RunDir
from vit_spine.schema import STUDY_TARGETS
from vit_spine.report import SIZES, ReportConfig, build_report, choose_profile_studies, reliability, training_loss_curves, write_index


@dataclass
class Drawn:
    """What one axes of a saved figure holds, with data: the artists a reader sees."""

    line_points: list[int]  # finite points of each line, in drawing order
    bar_height: float  # summed height of the bars (histograms)
    scatter_points: list[int]  # points of each scatter
    images: list[tuple[int, ...]]  # shapes of the images that are not one flat colour
    texts: list[str]  # text placed in the axes (notes such as "only one class")
    legend: list[str]  # the legend's entries


def drawn(ax) -> Drawn:
    lines = [int(np.isfinite(np.asarray(line.get_ydata(), float)).sum()) for line in ax.get_lines()]
    heights = [p.get_height() for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle)]
    bars = sum(h for h in heights if np.isfinite(h))  # an undefined AUC is a NaN bar: nothing drawn
    scatters = [len(c.get_offsets()) for c in ax.collections if isinstance(c, matplotlib.collections.PathCollection)]
    images = [im.get_array().shape for im in ax.get_images() if np.ptp(np.asarray(im.get_array(), float)) > 0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
    return Drawn(lines, float(bars), scatters, images, [t.get_text() for t in ax.texts], legend)


@pytest.fixture(scope="module")
def built(trained_run: Path):
    """build_report, recording what each figure holds when it is saved (a PNG alone could be empty axes)."""
    drawings: dict[str, list[Drawn]] = {}
    save = report_module.save

    def recording_save(fig, path: Path) -> Path:
        drawings[path.name] = [drawn(ax) for ax in fig.axes]
        return save(fig, path)

    config = ReportConfig(run_dir=str(trained_run), num_studies=2, num_saliency_slices=2, num_smoothgrad_samples=2, batch_size=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_module, "save", recording_save)
        index, figures = build_report(config)
    return index, figures, drawings


@pytest.fixture(scope="module")
def report(built):
    return built[:2]


def figure_kind(path: Path) -> str:
    return re.sub(r"_\d+$", "", path.stem)


def test_every_figure_is_a_png_of_its_stated_size(report, trained_run):
    index, figures = report
    assert index == trained_run / "report" / "index.html"
    kinds = [figure_kind(f.path) for f in figures]
    assert kinds[:5] == ["shard_scores", "training_loss", "roc_curves", "calibration", "aggregators"]
    assert kinds.count("profile") == 2 and kinds.count("saliency") == 2
    for figure in figures:
        with Image.open(figure.path) as image:
            assert image.format == "PNG"
            assert image.size == SIZES[figure_kind(figure.path)], figure.path.name


def test_every_figure_draws_its_data(built, trained_run):
    _, figures, drawings = built
    assert sorted(drawings) == sorted(f.path.name for f in figures)
    rows = RunDir(trained_run).read_rows()
    shards = len(rows)

    loss, auc = drawings["shard_scores.png"]
    assert loss.line_points == [shards, shards, shards, 1]  # calibrated, raw, baseline, the best shard's star
    scored = [sum(row["auc"].get(target) is not None for row in rows) for target in STUDY_TARGETS]
    assert auc.line_points == [*scored, 2]  # each target's AUC where it is defined, then the chance line
    assert max(scored) == shards

    (curves,) = drawings["training_loss.png"]
    logged, _ = training_loss_curves(trained_run, rows)
    assert curves.line_points == [n for c in logged for n in (len(c.losses), 2)]  # each curve, then its start line

    roc = drawings["roc_curves.png"]
    assert len(roc) == 8
    for target in roc:  # the diagonal, then the curve or a note saying why there is none
        assert target.line_points[0] == 2
        assert (len(target.line_points) == 2 and target.line_points[1] >= 3) or any(t.startswith("only one class") for t in target.texts)
    assert any(len(target.line_points) == 2 for target in roc)

    reliability_axes, histogram = drawings["calibration.png"]
    assert len(reliability_axes.line_points) == 3 and min(reliability_axes.line_points) >= 2
    assert len(reliability_axes.scatter_points) == 2 and min(reliability_axes.scatter_points) >= 1
    studies = round(histogram.bar_height / 2 / 8)  # raw and calibrated, 8 targets per study
    assert studies > 0 and histogram.bar_height == 2 * 8 * studies

    # every aggregator's AUC per target (the re-scored best checkpoint), and its loss on every shard it was scored on
    auc_bars, losses = drawings["aggregators.png"]
    best = json.loads((trained_run / "best" / "vit_spine.json").read_text())["metrics"]
    assert list(best["aggregators"]) == ["max", "topk", "sequence"]
    defined = [v for scores in best["aggregators"].values() for v in scores["auc"].values() if v is not None]
    assert auc_bars.bar_height == pytest.approx(sum(defined), rel=1e-3)
    assert auc_bars.line_points == [2]  # the chance line
    assert losses.line_points == [shards, shards, shards, shards]  # max, topk, sequence (fitted from shard 0 on), baseline

    for k in range(2):
        fractures, visibility = drawings[f"profile_{k:02d}.png"]
        # each vertebra's study probability from every aggregator
        assert len(fractures.legend) == 7 and all(re.search(r"max \d\.\d\d, topk \d\.\d\d, sequence \d\.\d\d$", e) for e in fractures.legend)
        assert len(fractures.line_points) == 7 and len(set(fractures.line_points)) == 1 and fractures.line_points[0] > 1
        assert visibility.line_points == fractures.line_points  # one visibility line per vertebra, same slices

        ct, saliency, _colorbar = drawings[f"saliency_{k:02d}.png"]
        assert ct.images == [(32, 32)] and saliency.images == [(32, 32), (32, 32, 4)]


def test_index_html_links_every_figure(report):
    index, figures = report
    page = index.read_text()
    pngs = sorted(p.name for p in index.parent.glob("*.png"))
    assert pngs == sorted(f.path.name for f in figures)
    assert sorted(set(re.findall(r'href="([^"]+\.png)"', page))) == pngs
    assert sorted(set(re.findall(r'src="([^"]+\.png)"', page))) == pngs
    assert "baseline" in page and "<table>" in page


def test_training_loss_runs_on_global_steps_across_shards(trained_run):
    rows = RunDir(trained_run).read_rows()
    curves, notes = training_loss_curves(trained_run, rows)
    assert notes == [] and [c.shard for c in curves] == [0, 1]
    assert curves[0].steps[-1] <= rows[0]["global_step"] < curves[1].steps[0] <= curves[1].steps[-1] <= rows[1]["global_step"]
    steps = np.concatenate([c.steps for c in curves])
    assert (np.diff(steps) > 0).all()
    state = json.loads((trained_run / "shard_00001" / "trainer_state.json").read_text())
    assert len(curves[1].losses) == sum("loss" in entry for entry in state["log_history"])


def test_the_index_names_the_best_shard_by_the_runs_own_rule(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_run_config({"min_delta": 0.06})  # shard 1 (0.55) beats shard 0 (0.60) by less than that
    rows = [{"shard": k, "weighted_log_loss": wll, "weighted_log_loss_uncalibrated": wll, "baseline_weighted_log_loss": 0.56}
            for k, wll in enumerate([0.60, 0.55])]
    scores = {"num_val_studies": 3, "num_val_slices": 9, "weighted_log_loss": 0.6, "weighted_log_loss_uncalibrated": 0.6}
    page = write_index(tmp_path, run.path, run.shard(0), rows, scores, []).read_text()
    assert f"<code>{run.shard(0)}</code> (shard 0): validation weighted log loss 0.6000 vs" in page


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
