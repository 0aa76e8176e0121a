"""`vit-spine report RUN_DIR`: PNG figures of a training run and an index.html that shows them all.

Figures (pixel sizes are fixed; matplotlib Agg, 100 dpi):
- shard_scores.png (1200x500): validation weighted log loss per shard (calibrated, raw) against the
  constant-prevalence baseline, and validation AUC per target against chance (0.5).
- training_loss.png (1200x500): training loss from every shard's trainer_state.json, x = global step
  across shards, shard boundaries marked.
- roc_curves.png (1600x800): per-target ROC curves (patient_overall, C1..C7) of the best checkpoint
  on the validation studies.
- calibration.png (1200x500): reliability of the best checkpoint's study probabilities, raw and after
  cross-fitted calibration, and their distribution.
- profile_NN.png (1200x600 each): for a few validation studies, the fracture probability of every
  slice along z per vertebra, the true fractured vertebrae drawn thick and named in the title, the
  slices labelled fractured shaded; below, the predicted visibility of each vertebra along z.
- saliency_NN.png (1200x520 each): the top-scoring validation slices, the CT slice next to a
  SmoothGrad input-gradient map of the predicted vertebra's logit (SDPA attention gives no attention
  weights to roll out; gradients need none).

The validation predictions come from running the run's best checkpoint over the validation shard(s)
of the chunks it was trained on, through `vit_spine.evaluation.score_checkpoint`, as `evaluate` scores them
(the same inference path, pooling, baseline and calibration-fold seed as training).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from vit_spine import options  # noqa: E402
from vit_spine.artifacts import RunDir, best_row, default_chunks, read_checkpoint_meta, resolve_checkpoint  # noqa: E402
from vit_spine.fs import FolderLock  # noqa: E402
from vit_spine.schema import FRACTURES, STUDY_TARGETS, TRAINER_STATE_FILE, VERTEBRAE, VISIBLE  # noqa: E402
from vit_spine.options import aliases, parse_config  # noqa: E402

DPI = 100
SIZES = {  # (width, height) in pixels
    "shard_scores": (1200, 500),
    "training_loss": (1200, 500),
    "roc_curves": (1600, 800),
    "calibration": (1200, 500),
    "profile": (1200, 600),
    "saliency": (1200, 520),
    "aggregators": (1400, 500),
}
VERTEBRA_COLORS = dict(zip(VERTEBRAE, plt.get_cmap("tab10").colors))
TARGET_COLORS = {"patient_overall": "black", **VERTEBRA_COLORS}


@dataclass
class ReportConfig:
    run_dir: str = field(metadata={"help": "a training run folder (metrics.jsonl, shard_XXXXX/, best)."})
    chunks: str | None = field(
        default=None,
        metadata={"help": "chunks folder whose validation shard(s) to predict (default: the run's, from run_config.json)."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "folder for the figures and index.html (default RUN_DIR/report).", "aliases": aliases("out")},
    )
    num_studies: int = field(
        default=4, metadata={"help": "validation studies to draw slice-score profiles for.", "aliases": aliases("studies")}
    )
    num_saliency_slices: int = field(
        default=4,
        metadata={"help": "top-scoring validation slices to draw gradient maps for.", "aliases": aliases("saliency_slices")},
    )
    num_smoothgrad_samples: int = field(
        default=8,
        metadata={"help": "noisy copies averaged per gradient map (SmoothGrad).", "aliases": aliases("smoothgrad_samples")},
    )
    batch_size: int = field(default=64, metadata={"help": "slices per forward pass when predicting the validation shard(s)."})
    seed: int | None = field(
        default=None,
        metadata={"help": "seed of the cross-fitted calibration folds and of SmoothGrad noise (default: the training "
                  "run's --seed, so the re-score draws the run's own folds)."},
    )
    device: str = field(default="auto", metadata={"help": "torch device: auto (cuda when available), cpu, cuda ..."})

    def __post_init__(self) -> None:
        if self.num_studies < 0 or self.num_saliency_slices < 0:
            raise ValueError("--num_studies and --num_saliency_slices must be >= 0")
        if self.num_smoothgrad_samples < 1 or self.batch_size < 1:
            raise ValueError("--num_smoothgrad_samples and --batch_size must be >= 1")

        options.device(self.device)
        options.folder_path(self.run_dir, "RUN_DIR")
        options.folder_path(self.chunks, "--chunks")
        options.folder_path(self.output_dir, "--output_dir")


# ---------------------------------------------------------------- run files


def read_run_metrics(run_dir: Path) -> list[dict]:
    run = RunDir(run_dir)
    rows = run.read_rows()
    if not rows:
        raise FileNotFoundError(f"{run.metrics_path}: missing or empty; is {run_dir} a `vit-spine train` run folder?")
    return sorted(rows, key=lambda row: row["shard"])


@dataclass
class LossCurve:
    shard: int
    steps: np.ndarray  # global steps across shards
    losses: np.ndarray


def training_loss_curves(run_dir: Path, rows: list[dict]) -> tuple[list[LossCurve], list[str]]:
    """Per shard: logged training losses at global steps (the shard's start + its own step). Also notes on
    shards whose trainer_state.json is missing or holds no loss."""
    curves, notes = [], []
    for row in rows:
        path = RunDir(run_dir).shard(row["shard"]) / TRAINER_STATE_FILE
        if not path.is_file():
            notes.append(f"shard {row['shard']}: no {path.name}")
            continue
        history = json.loads(path.read_text()).get("log_history", [])
        logged = [entry for entry in history if "loss" in entry and "step" in entry]
        if not logged:
            notes.append(f"shard {row['shard']}: {path.name} logged no training loss")
            continue
        start = row["global_step"] - row.get("shard_steps", max(entry["step"] for entry in logged))
        steps = np.array([start + entry["step"] for entry in logged], dtype=float)
        curves.append(LossCurve(row["shard"], steps, np.array([entry["loss"] for entry in logged], dtype=float)))
    return curves, notes


# ---------------------------------------------------------------- validation predictions


@dataclass
class ValidationPredictions:
    slice_probs: np.ndarray  # (n, 14) per validation slice
    study_ids: np.ndarray  # (n,)
    zs: np.ndarray  # (n,)
    slice_numbers: np.ndarray  # (n,)
    slice_labels: np.ndarray  # (n, 14), NaN unknown
    shards: list  # ShardDataset per validation shard, in order
    scores: dict  # evaluation's metrics row for the best checkpoint
    studies: dict  # {uids, raw, calibrated, labels, NAME: raw of each aggregator}: pooled study arrays (labelled studies)

    def read_uint8(self, index: int) -> np.ndarray:
        """The stored uint8 (3, S, S) pixels of validation slice `index`."""
        for shard in self.shards:
            if index < len(shard):
                return shard.read_uint8([index])[0]
            index -= len(shard)
        raise IndexError(index)


def predict_validation(predictor, chunks: Path, batch_size: int, seed: int) -> ValidationPredictions:
    """Predict the validation shard(s) of `chunks` with a loaded checkpoint and score them as evaluate does
    (`evaluation.score_checkpoint`: the one inference path, the checkpoint's pooling and baseline), with
    `seed` for the calibration folds."""
    from vit_spine.evaluation import matching_manifest, score_checkpoint

    meta = read_checkpoint_meta(predictor.checkpoint)
    manifest = matching_manifest(chunks, predictor.checkpoint, meta)
    scored = score_checkpoint(predictor.model, predictor.checkpoint, meta, chunks, manifest, batch_size, seed)
    validation = scored.validation
    return ValidationPredictions(
        slice_probs=scored.slice_probs,
        study_ids=validation.study_ids,
        zs=validation.column("zs").astype(float),
        slice_numbers=validation.column("slice_numbers"),
        slice_labels=validation.column("labels"),
        shards=validation.shards,
        scores=scored.row,
        studies=scored.studies,
    )


# ---------------------------------------------------------------- figures


def new_figure(kind: str, **subplots):
    width, height = SIZES[kind]
    return plt.subplots(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained", **subplots)


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the stated pixel size is kept
    plt.close(fig)
    return path


def plot_shard_scores(rows: list[dict], best: dict, path: Path) -> Path:
    fig, (ax_loss, ax_auc) = new_figure("shard_scores", ncols=2)
    shards = [row["shard"] for row in rows]
    ax_loss.plot(shards, [r["weighted_log_loss"] for r in rows], "o-", color="tab:blue", label="model, calibrated (cross-fitted)")
    ax_loss.plot(shards, [r["weighted_log_loss_uncalibrated"] for r in rows], "s--", color="tab:cyan", label="model, raw")
    ax_loss.plot(shards, [r["baseline_weighted_log_loss"] for r in rows], "k:", lw=2, label="constant prevalence baseline")
    ax_loss.plot([best["shard"]], [best["weighted_log_loss"]], "*", color="tab:red", ms=16, label=f"best (shard {best['shard']})")
    ax_loss.set(title="Validation weighted log loss (lower is better)", xlabel="shard", ylabel="weighted log loss")
    ax_loss.legend(fontsize=9)

    for target in STUDY_TARGETS:
        values = [np.nan if r.get("auc", {}).get(target) is None else r["auc"][target] for r in rows]
        style = dict(lw=2.5, marker="o") if target == "patient_overall" else dict(lw=1.2, marker=".", alpha=0.85)
        label = target if not np.isnan(values).all() else f"{target} (n/a: one class in validation)"
        ax_auc.plot(shards, values, color=TARGET_COLORS[target], label=label, **style)
    ax_auc.axhline(0.5, color="gray", ls=":", lw=2, label="chance / constant baseline")
    ax_auc.set(title="Validation AUC per target (higher is better)", xlabel="shard", ylabel="AUC", ylim=(-0.02, 1.02))
    ax_auc.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for ax in (ax_loss, ax_auc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return save(fig, path)


def plot_training_loss(curves: list[LossCurve], notes: list[str], path: Path) -> Path:
    fig, ax = new_figure("training_loss")
    colors = plt.get_cmap("tab10").colors
    for i, curve in enumerate(curves):
        color = colors[i % len(colors)]
        ax.plot(curve.steps, curve.losses, ".-", color=color, lw=1, label=f"shard {curve.shard}")
        ax.axvline(curve.steps[0], color=color, ls=":", lw=1)
    ax.set(title="Training loss (masked BCE) per logging step, shard after shard", xlabel="global step (across shards)", ylabel="loss")
    if curves:
        ax.legend(fontsize=9, ncol=min(len(curves), 6))
    if notes or not curves:
        ax.text(0.01, 0.02, "\n".join(notes) or "no training loss logged", transform=ax.transAxes, fontsize=9, color="tab:red")
    ax.grid(alpha=0.3)
    return save(fig, path)


def plot_roc_curves(labels: np.ndarray, probs: np.ndarray, path: Path) -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, axes = new_figure("roc_curves", nrows=2, ncols=4)
    for j, (target, ax) in enumerate(zip(STUDY_TARGETS, axes.flat)):
        y, p = labels[:, j], probs[:, j]
        positives = int(y.sum())
        ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
        if 0 < positives < len(y):
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, color=TARGET_COLORS[target], lw=2, label=f"AUC {roc_auc_score(y, p):.3f}")
            ax.legend(loc="lower right", fontsize=10)
        else:
            ax.text(
                0.5, 0.5, f"only one class\n({positives} of {len(y)} positive)", ha="center", va="center", fontsize=11,
                bbox=dict(facecolor="white", edgecolor="gray"),
            )
        ax.set(title=f"{target}  ({positives}+ / {len(y) - positives}-)", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        if j % 4 == 0:
            ax.set_ylabel("true positive rate")
        if j >= 4:
            ax.set_xlabel("false positive rate")
    fig.suptitle("ROC curves of the best checkpoint on the validation studies", fontsize=14)
    return save(fig, path)


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted, observed frequency, count) per non-empty equal-width probability bin."""
    which = np.clip((probs * bins).astype(int), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    filled = counts > 0
    mean_pred = np.bincount(which, probs, bins)[filled] / counts[filled]
    observed = np.bincount(which, labels, bins)[filled] / counts[filled]
    return mean_pred, observed, counts[filled]


def plot_calibration(labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, path: Path) -> Path:
    fig, (ax_rel, ax_hist) = new_figure("calibration", ncols=2)
    y = labels.reshape(-1)
    ax_rel.plot([0, 1], [0, 1], color="gray", ls=":", lw=1.5, label="perfect calibration")
    for name, probs, color in (("raw", raw, "tab:orange"), ("calibrated (cross-fitted)", calibrated, "tab:blue")):
        mean_pred, observed, counts = reliability(y, probs.reshape(-1))
        ax_rel.plot(mean_pred, observed, "-", color=color, lw=1.5)
        ax_rel.scatter(mean_pred, observed, s=20 + 200 * counts / counts.max(), color=color, alpha=0.8, label=name)
        ax_hist.hist(probs.reshape(-1), bins=20, range=(0, 1), color=color, alpha=0.55, label=name)
    ax_rel.set(
        title=f"Reliability, all 8 targets pooled ({len(labels)} studies)",
        xlabel="mean predicted probability (10 bins)",
        ylabel="observed fraction fractured",
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
    )
    ax_rel.legend(fontsize=9, loc="upper left", title="marker area ∝ (study, target) pairs in the bin", title_fontsize=8)
    ax_hist.set(title="Distribution of study-level probabilities", xlabel="predicted probability", ylabel="count (study x target)")
    ax_hist.legend(fontsize=9)
    for ax in (ax_rel, ax_hist):
        ax.grid(alpha=0.3)
    return save(fig, path)


def choose_profile_studies(studies: dict, count: int) -> list[int]:
    """Indices into the pooled study arrays: fractured studies first (most confident first), then negatives."""
    patient = studies["calibrated"][:, 0]
    positive = np.nonzero(studies["labels"][:, 0] == 1)[0]
    negative = np.nonzero(studies["labels"][:, 0] == 0)[0]
    positive = positive[np.argsort(-patient[positive], kind="stable")]
    negative = negative[np.argsort(patient[negative], kind="stable")]
    half = min(len(positive), (count + 1) // 2)
    chosen = [*positive[:half], *negative[: count - half]]
    if len(chosen) < count:  # too few negatives: fill with more positives
        chosen += list(positive[half : half + count - len(chosen)])
    return [int(i) for i in chosen]


def plot_profile(predictions: ValidationPredictions, study_index: int, path: Path) -> Path:
    studies = predictions.studies
    uid = studies["uids"][study_index]
    truth = studies["labels"][study_index]
    probs = studies["calibrated"][study_index]
    names = list(predictions.scores["aggregators"])  # every aggregator's study probability, uncalibrated

    def each(target: int) -> str:
        return ", ".join(f"{name} {studies[name][study_index][target]:.2f}" for name in names)

    rows = np.nonzero(predictions.study_ids == uid)[0]
    rows = rows[np.argsort(predictions.zs[rows], kind="stable")]
    z = predictions.zs[rows]
    fracture = predictions.slice_probs[rows, FRACTURES]
    visible = predictions.slice_probs[rows, VISIBLE]
    fig, (ax, ax_vis) = new_figure("profile", nrows=2, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    fractured = [v for j, v in enumerate(VERTEBRAE) if truth[j + 1] == 1]
    top = min(1.02, max(0.1, 1.1 * float(fracture.max())))  # zoom in on weak models, never hide 0
    for j, vertebra in enumerate(VERTEBRAE):
        color = VERTEBRA_COLORS[vertebra]
        is_fractured = vertebra in fractured
        ax.plot(
            z,
            fracture[:, j],
            color=color,
            lw=3.0 if is_fractured else 1.2,
            ls="-" if is_fractured else "--",
            label=f"{vertebra}{' (fractured)' if is_fractured else ''}  p={probs[j + 1]:.2f} calibrated; {each(j + 1)}",
        )
        labelled = predictions.slice_labels[rows, j] == 1
        if labelled.any():
            ax.fill_between(z, 0, top, where=labelled, color=color, alpha=0.15, step="mid", lw=0)
        ax_vis.plot(z, visible[:, j], color=color, lw=1.5)
    truth_text = ", ".join(fractured) if fractured else "none"
    ax.set(
        title=f"Study {uid}: true fractured vertebrae: {truth_text}; patient p={probs[0]:.2f} calibrated "
              f"({predictions.scores['aggregator']}; {each(0)}) (label {int(truth[0])})",
        ylabel="slice fracture probability",
        ylim=(0, top),
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="vertebra: study p of each aggregator  "
              "(shaded: slices labelled fractured)", title_fontsize=7)
    ax_vis.set(
        title="predicted visibility of each vertebra (same colours)", xlabel="z position (mm, ascending)",
        ylabel="p(visible)", ylim=(-0.02, 1.02),
    )
    for axis in (ax, ax_vis):
        axis.grid(alpha=0.3)
    return save(fig, path)


def plot_aggregators(rows: list[dict], scores: dict, path: Path) -> Path:
    """Left: each aggregator's AUC per target on the validation studies (the checkpoint's re-score). Right: each
    aggregator's validation weighted log loss per shard (from metrics.jsonl), with the baseline."""
    fig, (ax_auc, ax_loss) = new_figure("aggregators", ncols=2, gridspec_kw={"width_ratios": [1.6, 1]})
    names = list(scores["aggregators"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        auc = scores["aggregators"][name]["auc"]
        values = [np.nan if auc.get(t) is None else auc[t] for t in STUDY_TARGETS]
        chosen = " (chosen)" if name == scores["aggregator"] else ""
        ax_auc.bar(np.arange(len(STUDY_TARGETS)) + (i - (len(names) - 1) / 2) * width, values, width, label=f"{name}{chosen}")
    ax_auc.axhline(0.5, color="grey", ls=":", lw=1)
    ax_auc.set(xticks=range(len(STUDY_TARGETS)), xticklabels=STUDY_TARGETS, ylim=(0, 1.02), ylabel="AUC",
               title="AUC per target and aggregator, validation studies")
    ax_auc.legend(fontsize=8)
    for name in names:
        scored = [(r["shard"], r["aggregators"][name]["weighted_log_loss"]) for r in rows if name in r.get("aggregators", {})]
        if scored:
            ax_loss.plot(*zip(*scored), "o-", label=name)
    ax_loss.plot([r["shard"] for r in rows], [r["baseline_weighted_log_loss"] for r in rows], "k--", label="baseline")
    ax_loss.set(xlabel="shard", ylabel="weighted log loss (calibrated)", title="validation weighted log loss per shard")
    ax_loss.legend(fontsize=8)
    for axis in (ax_auc, ax_loss):
        axis.grid(alpha=0.3)
    return save(fig, path)


def smoothgrad(model, pixels: np.ndarray, output: int, samples: int, seed: int) -> np.ndarray:
    """Mean |d logit[output] / d input| over `samples` noisy copies, max over channels -> (S, S)."""
    import torch

    from vit_spine.data import normalize

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    image = normalize(torch.from_numpy(pixels)[None])
    noise = 0.1 * torch.randn((samples, *image.shape[1:]), generator=generator)  # 5 % of the [-1, 1] range
    batch = (image + noise).to(device).requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model(pixel_values=batch).logits[:, output].sum().backward()
    saliency = batch.grad.abs().mean(dim=0).amax(dim=0)
    return saliency.detach().float().cpu().numpy()


def top_slices(predictions: ValidationPredictions, count: int) -> list[tuple[int, int]]:
    """(slice index, vertebra index) of the `count` highest fracture probabilities, one slice per row."""
    fracture = predictions.slice_probs[:, FRACTURES]
    best_vertebra = fracture.argmax(axis=1)
    order = np.argsort(-fracture.max(axis=1), kind="stable")[:count]
    return [(int(i), int(best_vertebra[i])) for i in order]


def plot_saliency(predictions: ValidationPredictions, model, index: int, vertebra: int, path: Path, samples: int, seed: int) -> Path:
    from scipy.ndimage import gaussian_filter

    pixels = predictions.read_uint8(index)
    saliency = smoothgrad(model, pixels, vertebra, samples, seed)
    # a light blur (about half a 16 px patch at 224 px) turns pixel speckle into readable regions
    saliency = gaussian_filter(saliency, sigma=len(saliency) / 100)
    saliency = np.clip(saliency / (np.percentile(saliency, 99.5) + 1e-12), 0, 1)
    uid, number = predictions.study_ids[index], predictions.slice_numbers[index]
    prob = predictions.slice_probs[index, vertebra]
    label = predictions.slice_labels[index, vertebra]
    label_text = "unknown" if np.isnan(label) else ("fractured" if label == 1 else "not fractured")
    fig, (ax_ct, ax_map) = new_figure("saliency", ncols=2)
    ax_ct.imshow(pixels[1], cmap="gray", vmin=0, vmax=255)
    ax_ct.set_title("slice (centre channel, as the model sees it)", fontsize=11)
    ax_map.imshow(pixels[1], cmap="gray", vmin=0, vmax=255)
    colors = plt.get_cmap("inferno")(saliency)
    colors[..., 3] = 0.85 * saliency  # low saliency stays transparent, so the anatomy shows through
    ax_map.imshow(colors)
    overlay = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap="inferno")
    ax_map.set_title(f"SmoothGrad |gradient| of the {VERTEBRAE[vertebra]} fracture logit", fontsize=11)
    fig.colorbar(overlay, ax=ax_map, fraction=0.046, label="relative saliency")
    for ax in (ax_ct, ax_map):
        ax.set_axis_off()
    fig.suptitle(
        f"Study {uid}, slice {number}, z={predictions.zs[index]:.1f} mm: "
        f"p({VERTEBRAE[vertebra]} fractured)={prob:.2f}, slice label: {label_text}",
        fontsize=12,
    )
    return save(fig, path)


# ---------------------------------------------------------------- html


@dataclass
class Figure:
    path: Path
    caption: str


def write_index(out: Path, run_dir: Path, checkpoint: Path, rows: list[dict], scores: dict, figures: list[Figure]) -> Path:
    from vit_spine.evaluation import format_aggregator_table, format_table

    best = best_row(rows, RunDir(run_dir).min_delta())
    summary = (
        f"Run <code>{html.escape(str(run_dir))}</code>: {len(rows)} shard(s) trained; best checkpoint "
        f"<code>{html.escape(str(checkpoint))}</code> (shard {best['shard']}): validation weighted log loss "
        f"{best['weighted_log_loss']:.4f} vs constant-prevalence baseline {best['baseline_weighted_log_loss']:.4f}. "
        f"Re-scored here on {scores['num_val_studies']} validation studies ({scores['num_val_slices']} slices): "
        f"{scores['weighted_log_loss']:.4f} (raw {scores['weighted_log_loss_uncalibrated']:.4f})."
    )
    sections = [
        f'<figure><a href="{html.escape(f.path.name)}"><img src="{html.escape(f.path.name)}" alt="{html.escape(f.caption)}"></a>'
        f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        for f in figures
    ]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vit-spine report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1650px;margin:auto;padding:1em}} img{{max-width:100%;border:1px solid #ccc}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} figure{{margin:1.5em 0}}</style>
</head><body>
<h1>vit-spine report: {html.escape(run_dir.name)}</h1>
<p>{summary}</p>
<h2>Per shard</h2>
{format_table(rows, "html", best_shard=best["shard"])}
<h2>Aggregators per shard (validation weighted log loss, mean AUC C1-C7)</h2>
{format_aggregator_table(rows, "html")}
<h2>Figures</h2>
{chr(10).join(sections)}
</body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    return path


# ---------------------------------------------------------------- driver


def build_report(config: ReportConfig) -> tuple[Path, list[Figure]]:
    """Write every figure and index.html; returns (index.html, figures)."""
    run_dir = Path(config.run_dir)
    out = Path(config.output_dir) if config.output_dir else run_dir / "report"
    rows = read_run_metrics(run_dir)
    with FolderLock(out, "vit-spine report"):  # two reports into one folder would mix their figures
        return _build_report(config, run_dir, out, rows)


def _build_report(config: ReportConfig, run_dir: Path, out: Path, rows: list[dict]) -> tuple[Path, list[Figure]]:
    import torch

    from vit_spine.evaluation import checkpoint_seed
    from vit_spine.predict import load_predictor

    for old in [*out.glob("profile_*.png"), *out.glob("saliency_*.png")]:
        old.unlink()  # an earlier report may have drawn more of them; index.html must match the folder
    checkpoint = resolve_checkpoint(run_dir)
    chunks = Path(config.chunks) if config.chunks else default_chunks(checkpoint)

    best = best_row(rows, RunDir(run_dir).min_delta())  # the shard `best` points at
    figures = [Figure(plot_shard_scores(rows, best, out / "shard_scores.png"), "Validation weighted log loss and AUC per shard against the constant-prevalence baseline.")]
    curves, notes = training_loss_curves(run_dir, rows)
    figures.append(Figure(plot_training_loss(curves, notes, out / "training_loss.png"), "Training loss across shards (dotted lines: shard starts)."))

    predictor = load_predictor(checkpoint, config.device)
    model = predictor.model
    seed = checkpoint_seed(read_checkpoint_meta(predictor.checkpoint), config.seed)
    predictions = predict_validation(predictor, chunks, config.batch_size, seed)
    studies = predictions.studies
    figures.append(Figure(plot_roc_curves(studies["labels"], studies["raw"], out / "roc_curves.png"), "ROC curves per target, best checkpoint, validation studies."))
    figures.append(Figure(plot_calibration(studies["labels"], studies["raw"], studies["calibrated"], out / "calibration.png"), "Reliability of study probabilities before and after calibration."))
    figures.append(Figure(plot_aggregators(rows, predictions.scores, out / "aggregators.png"),
                          "Each aggregator side by side: AUC per vertebra (best checkpoint) and validation weighted log loss per shard."))
    for k, study_index in enumerate(choose_profile_studies(studies, config.num_studies)):
        figures.append(Figure(plot_profile(predictions, study_index, out / f"profile_{k:02d}.png"), f"Slice-score profile along z, study {studies['uids'][study_index]}."))
    torch.manual_seed(seed)
    for k, (index, vertebra) in enumerate(top_slices(predictions, config.num_saliency_slices)):
        path = out / f"saliency_{k:02d}.png"
        plot_saliency(predictions, model, index, vertebra, path, config.num_smoothgrad_samples, seed + k)
        figures.append(Figure(path, f"Gradient saliency, top-scoring slice {k + 1}: study {predictions.study_ids[index]}, slice {predictions.slice_numbers[index]}."))
    index = write_index(out, run_dir, checkpoint, rows, predictions.scores, figures)
    return index, figures


def main(argv: Sequence[str] | None = None) -> int:
    (config,) = parse_config(ReportConfig, argv, prog="vit-spine report", description=__doc__.split("\n")[0], positionals=("run_dir",))
    index, figures = build_report(config)
    print(f"{len(figures)} figures and {index}")
    return 0
