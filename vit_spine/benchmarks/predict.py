"""`vit-spine bench predict CHECKPOINT DIR`: studies/s and slices/s of prediction end to end, and the decode share.

Three ways through the same studies, timed in interleaved repetitions (the order rotates every
repetition), after one untimed warm-up pass that also caches the preprocessed pixels:
- end to end: what `vit-spine predict` does per study (study assembly -> preprocess_study -> model ->
  pooling and calibration), with `--workers` decoding processes;
- decode only: study assembly -> preprocess_study (the CPU side);
- model only: the forward passes on the cached pixels (the accelerator side).
The ratio printed first is end-to-end slices/s over model-only slices/s: how close the whole pipeline
comes to the model's own speed. Rates are medians over repetitions.

`--model_config tiny|small|base` first writes a random-init checkpoint of that size into CHECKPOINT
(with the default preprocessing at --image_size), so the benchmark runs where no trained run exists;
speed does not depend on the weights. DIR is a study folder or a folder of study folders
(e.g. `vit-spine synth DATA --size 512` then DATA/test_images).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from vit_spine import options
from vit_spine.options import parse_config

METHODS = ("end to end", "decode only", "model only")


@dataclass
class PredictBenchConfig:
    checkpoint: str = field(
        metadata={"help": "a run folder or a shard checkpoint (created with --model_config).",
                  "aliases": options.aliases("model_name_or_path")}
    )
    dir: str = field(metadata={"help": "a study folder or a folder of study folders (.dcm)."})
    limit: int = field(default=0, metadata={"help": "use at most this many studies (sorted by name); 0 = all."})
    repeats: int = field(default=3, metadata={"help": "timed passes per method, interleaved."})
    batch_size: int = field(default=64, metadata={"help": "slices per forward pass."})
    workers: int = field(default=0, metadata={"help": "decoding processes for the end-to-end pass (as predict --workers)."})
    device: str = field(default="auto", metadata={"help": "torch device: auto, cpu, cuda ..."})
    model_config: str | None = field(
        default=None, metadata={"help": "first write a random-init checkpoint of this size (tiny, small, base) into CHECKPOINT."}
    )
    image_size: int = field(default=224, metadata={"help": "image size of the checkpoint written by --model_config."})

    def __post_init__(self) -> None:
        if self.limit < 0 or self.repeats < 1 or self.batch_size < 1 or self.workers < 0:
            raise ValueError("--limit and --workers must be >= 0; --repeats and --batch_size >= 1")
        self.workers = options.capped_workers(self.workers, minimum=0)
        options.device(self.device)
        options.at_least(self.image_size, 8, "--image_size")


def write_random_checkpoint(folder: Path, model_config: str, image_size: int) -> None:
    from vit_spine.artifacts import write_checkpoint_meta
    from vit_spine.evaluation import PoolingConfig
    from vit_spine.models import create_model
    from vit_spine.preprocess import PreprocessConfig

    create_model(model_config=model_config, image_size=image_size).save_pretrained(folder)
    write_checkpoint_meta(folder, {
        "shard": 0,  # the checkpoint format's field is an integer; `note` says this one was never trained
        "note": "random-init checkpoint written by `vit-spine bench predict --model_config`; not trained",
        "preprocess": PreprocessConfig(image_size=image_size).to_dict(),
        "pooling": asdict(PoolingConfig(aggregator="max")),
        "calibration": None,
        "model_config": model_config,
        "metrics": {},
    })


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from vit_spine.predict import decode_study, decoded_studies, find_study_folders, load_predictor, predict_decoded

    (config,) = parse_config(
        PredictBenchConfig,
        argv,
        prog="vit-spine bench predict",
        description=__doc__.splitlines()[0],
        positionals=("checkpoint", "dir"),
    )
    if config.model_config:
        write_random_checkpoint(Path(config.checkpoint), config.model_config, config.image_size)
    predictor = load_predictor(config.checkpoint, config.device)
    folders = find_study_folders([config.dir])
    if config.limit:
        folders = folders[: config.limit]

    def sync() -> None:
        if predictor.device.type == "cuda":
            torch.cuda.synchronize(predictor.device)

    cached = [decode_study(folder, predictor.preprocess) for folder in tqdm(folders, desc="warm-up", unit="study")]
    for study in cached:
        predict_decoded(predictor, study, config.batch_size)
    num_slices = sum(len(study.pixels) for study in cached)

    def end_to_end() -> tuple[float, float]:
        decode = 0.0
        for study in decoded_studies(folders, predictor.preprocess, config.workers):
            decode += study.seconds
            predict_decoded(predictor, study, config.batch_size)
        return decode, 0.0

    def decode_only() -> tuple[float, float]:
        for folder in folders:
            decode_study(folder, predictor.preprocess)
        return 0.0, 0.0

    def model_only() -> tuple[float, float]:
        for study in cached:
            predictor.slice_probabilities(study.pixels, config.batch_size)
        return 0.0, 0.0

    runs = {"end to end": end_to_end, "decode only": decode_only, "model only": model_only}
    seconds: dict[str, list[float]] = {name: [] for name in METHODS}
    decode_in_end_to_end: list[float] = []
    for repeat in tqdm(range(config.repeats), desc="timing", unit="pass"):
        order = METHODS[repeat % len(METHODS) :] + METHODS[: repeat % len(METHODS)]
        for name in order:
            sync()
            start = time.perf_counter()
            decode, _ = runs[name]()
            sync()
            seconds[name].append(time.perf_counter() - start)
            if name == "end to end":
                decode_in_end_to_end.append(decode)

    median = {name: statistics.median(values) for name, values in seconds.items()}
    rate = {name: num_slices / median[name] for name in METHODS}
    model = predictor.model.config
    share = statistics.median(d / s for d, s in zip(decode_in_end_to_end, seconds["end to end"]))
    print(
        f"\npredict: {len(folders)} studies, {num_slices} slices from {config.dir}; device {predictor.device}; "
        f"ViT hidden {model.hidden_size} x {model.num_hidden_layers} layers at {model.image_size} px; "
        f"batch {config.batch_size}; workers {config.workers}; {config.repeats} interleaved repeats, medians"
    )
    print(f"end to end / model only (slices/s): {rate['end to end'] / rate['model only']:.2f}x")
    print(
        f"decoding (study assembly + preprocess) is {100 * share:.0f}% of end-to-end time"
        + (" (summed over the workers, so it can exceed 100%)" if config.workers else "")
    )
    print(f"\n{'':<14} {'studies/s':>10} {'slices/s':>10} {'seconds':>9}")
    for name in METHODS:
        print(f"{name:<14} {len(folders) / median[name]:>10.2f} {rate[name]:>10.1f} {median[name]:>9.2f}")
    return 0
