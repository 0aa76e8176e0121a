"""`vit-spine demo`: the whole pipeline on synthetic data, a few minutes on 2 CPU cores.

synth -> scan -> chunk -> train (tiny ViT, shard after shard) -> evaluate -> predict -> report.
Every step runs the same entry point a user would type, with the arguments printed first.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vit_spine import cli, options
from vit_spine.artifacts import RunDir
from vit_spine.options import aliases, parse_config
from vit_spine.schema import VERTEBRAE


@dataclass
class DemoConfig:
    workdir: str = field(default="demo", metadata={"help": "folder for the synthetic dataset and the slice table."})
    chunks: str = field(default="chunks/demo", metadata={"help": "folder for the demo's shards."})
    output_dir: str = field(
        default="checkpoints/demo", metadata={"help": "folder for the demo's training run.", "aliases": aliases("output")}
    )
    num_studies: int = field(default=300, metadata={"help": "synthetic studies (train + test).", "aliases": aliases("studies")})
    num_test_studies: int = field(
        default=6, metadata={"help": "of which in test_images/ (predicted at the end).", "aliases": aliases("test_studies")}
    )
    num_slices: int = field(default=40, metadata={"help": "slices per study.", "aliases": aliases("slices")})
    size: int = field(default=96, metadata={"help": "rows/columns of the synthetic DICOM slices."})
    fracture_width: float = field(
        default=0.06,
        metadata={"help": "width of the planted breaks (fraction of the image side); wider than the generator's "
                  "default so a tiny ViT learns them in minutes on a CPU."},
    )
    image_size: int = field(default=64, metadata={"help": "side of the preprocessed images the tiny ViT sees."})
    crop: float = field(
        default=0.65,
        metadata={"help": "centred part of each slice kept before resizing (chunk --crop): the spine gets more pixels."},
    )
    pixel_spacing: float | None = field(
        default=None,
        metadata={"help": "resample every slice to this many mm per pixel (chunk --pixel_spacing) instead of the crop; "
                  "the synthetic studies' fields of view vary from 140 to 200 mm."},
    )
    val_fraction: float = field(default=0.2, metadata={"help": "share of the training studies held out for validation."})
    shard_size: int = field(default=2000, metadata={"help": "slices per training shard."})
    patch_size: int = field(
        default=8,
        metadata={"help": "ViT patch size: 8 px patches see the breaks; 16 px ones, about 3x cheaper, learn visibility but not fractures."},
    )
    epochs_per_shard: float = field(default=6.0, metadata={"help": "passes over each shard."})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak learning rate of the tiny ViT."})
    positive_fraction: float = field(default=0.3, metadata={"help": "share of fracture-positive slices drawn per batch."})
    seed: int = field(default=0, metadata={"help": "seed of the data and of training."})

    def __post_init__(self) -> None:
        """Check every value before the demo removes its folders: the stages' own configs check theirs."""
        from vit_spine.chunk import ChunkConfig
        from vit_spine.preprocess import PreprocessConfig
        from vit_spine.synth import SynthConfig

        for option in ("workdir", "chunks", "output_dir"):
            options.folder_path(getattr(self, option), f"--{option}")
        SynthConfig(output_dir=str(Path(self.workdir) / "data"), num_studies=self.num_studies,
                    num_test_studies=self.num_test_studies, num_slices=self.num_slices, size=self.size,
                    fracture_width=self.fracture_width)
        PreprocessConfig(image_size=self.image_size, crop=1.0 if self.pixel_spacing is not None else self.crop,
                         pixel_spacing=self.pixel_spacing)
        ChunkConfig(output_dir=self.chunks, shard_size=self.shard_size, val_fraction=self.val_fraction, workers=0)
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"--patch_size {self.patch_size} does not divide --image_size {self.image_size}")
        options.positive(self.epochs_per_shard, "--epochs_per_shard")
        options.positive(self.learning_rate, "--learning_rate")
        if not 0 < self.positive_fraction < 1:
            raise ValueError(f"--positive_fraction must be in (0, 1), got {self.positive_fraction}")


def run_step(title: str, name: str, command: list[str]) -> None:
    """Run subcommand `name` in this process, printed as the command a user would type."""
    shown = f"vit-spine {name} {' '.join(command)}"
    print(f"\n=== {title}\n$ {shown}", flush=True)
    code = cli.main([name, *command])
    if code:  # the step has printed its one line; the demo ends with the step's exit code
        raise SystemExit(code)


def framing(config: DemoConfig) -> list[str]:
    """chunk's options for what part of each slice the model sees: a physical pixel size, or the crop."""
    if config.pixel_spacing is not None:
        return ["--pixel_spacing", str(config.pixel_spacing)]
    return ["--crop", str(config.crop)]


def write_vertebrae_table(data: Path, out: Path) -> Path:
    """Per-slice vertebra visibility in the public Kaggle metadata format (StudyInstanceUID, Slice, C1..C7).

    Real RSNA users take such a table from the public per-slice metadata (a segmentation model's output)
    for the ~1,900 studies without a segmentation; here it is made from the generator's ground truth.
    """
    import pandas as pd

    truth = pd.read_csv(data / "ground_truth.csv")
    truth = truth[truth["split"] == "train"]
    names = {"slice_number": "Slice", **{f"visible_{v}": v for v in VERTEBRAE}}
    truth[["StudyInstanceUID", *names]].rename(columns=names).to_csv(out, index=False)
    return out


def run_demo(config: DemoConfig) -> None:
    from vit_spine import evaluation

    started = time.time()
    workdir, chunks, output = Path(config.workdir), Path(config.chunks), Path(config.output_dir)
    for folder in (workdir, chunks, output):  # the demo always starts from scratch, in its own folders only
        shutil.rmtree(folder, ignore_errors=True)
    data, table = workdir / "data", workdir / "slices.parquet"
    run_step("1. synthetic RSNA-layout dataset", "synth", [
        str(data), "--num_studies", str(config.num_studies), "--num_test_studies", str(config.num_test_studies),
        "--num_slices", str(config.num_slices), "--size", str(config.size), "--seed", str(config.seed), "--workers", "2",
        "--fracture_width", str(config.fracture_width),
    ])
    vertebrae = write_vertebrae_table(data, workdir / "vertebrae.csv")
    run_step("2. slice table", "scan", [str(data), "--output_file", str(table), "--vertebrae_table", str(vertebrae), "--no_progress"])
    run_step("3. shards", "chunk", [
        str(data), "--slice_table", str(table), "--output_dir", str(chunks), "--shard_size", str(config.shard_size),
        "--image_size", str(config.image_size), *framing(config), "--val_fraction", str(config.val_fraction),
        "--ignore_folds", "--seed", str(config.seed), "--no_progress",
    ])
    run_step("4. incremental training (tiny ViT)", "train", [
        "--chunks", str(chunks), "--output_dir", str(output), "--model_config", "tiny", "--patch_size", str(config.patch_size),
        "--num_train_epochs", str(config.epochs_per_shard), "--per_device_train_batch_size", "32",
        "--learning_rate", str(config.learning_rate), "--positive_fraction", str(config.positive_fraction),
        "--warmup_steps", "0.1", "--patience", "2", "--seed", str(config.seed),
        "--logging_steps", "20", "--disable_tqdm", "True", "--use_cpu", "True",
    ])
    run_step("5. evaluate the best checkpoint", "evaluate", [str(output), "--chunks", str(chunks)])
    submission = workdir / "submission.csv"
    run_step("6. predict the synthetic test studies", "predict", [
        str(output), str(data / "test_images"), "--studies_csv", str(data / "test.csv"), "--output_file", str(submission),
        "--slices_out", str(workdir / "slice_scores.parquet"), "--no_progress",
    ])
    run_step("7. report", "report", [str(output), "--chunks", str(chunks)])
    rows = RunDir(output).read_rows()
    print("\n=== per shard: validation weighted log loss (cross-fitted calibration), raw, the constant-prevalence "
          "baseline on the same studies, AUC")
    print(evaluation.format_table(rows))
    print("\n=== every aggregator side by side (validation weighted log loss, mean AUC C1-C7)")
    print(evaluation.format_aggregator_table(rows))
    print(f"\ndemo finished in {time.time() - started:.0f} s: data {data}, shards {chunks}, run {output}")
    print(f"submission: {submission}\nreport: {output / 'report' / 'index.html'}")


def main(argv: Sequence[str] | None = None) -> int:
    (config,) = parse_config(DemoConfig, argv, prog="vit-spine demo", description=__doc__.split("\n")[0])
    run_demo(config)
    return 0
