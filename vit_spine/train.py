"""`vit-spine train`: fine-tune a ViT on one shard after another, judged after each shard.

Per shard: a fresh `Trainer` (resuming one onto a new shard restores its global_step, so it could train
zero steps) whose model is `from_pretrained(previous shard's checkpoint)` (the only load that renames
the ViT weights correctly); one learning-rate schedule spans the whole run (warm-up once, decay across
shards); after the shard the validation shard is predicted, pooled to vertebra and patient level,
calibrated (cross-fitted, so the reported score never sees its own labels) and scored with the
competition's weighted log loss. A row goes to OUTPUT_DIR/metrics.jsonl, the weights and their
preprocessing/calibration to OUTPUT_DIR/shard_XXXXX/, OUTPUT_DIR/best points at the best shard, and the run
stops after --patience shards without improvement (or after --max_steps optimizer steps in all).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import ConcatDataset, Dataset, Subset
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from vit_spine import options
from vit_spine.aggregate import Aggregator, aggregator_names, is_learned, make_aggregator
from vit_spine.artifacts import (
    RunDir,
    ShardSaved,
    best_row,
    load_manifest,
    plan_fingerprint,
    read_checkpoint_meta,
    train_shards,
    val_shards,
    verify_checkpoint,
    write_checkpoint_meta,
)
from vit_spine.data import AugmentConfig, ShardDataset, ValidationSet, balanced_sampler, collate_batch, load_validation, model_input
from vit_spine.evaluation import PoolingConfig, format_aggregator_table, format_table, score_predictions, train_prevalence
from vit_spine.fs import FolderLock, check_files, file_record, flush_folder_files, write_bytes_atomic, write_json_atomic
from vit_spine.inference import predict_logits, predict_probabilities, sigmoid
from vit_spine.models import IGNORE_INDEX, MaskedBCELoss, create_model, fracture_pos_weight, load_model
from vit_spine.options import aliases, parse_config
from vit_spine.schema import (
    FRACTURES,
    MANIFEST_FILE,
    OUT_OF_SAMPLE_FILE,
    TRAINER_CHECKPOINT_COMPLETE_FILE,
    TRAINER_DIR,
    TRAINER_STATE_FILE,
)


@dataclass
class TrainConfig:
    chunks: str = field(metadata={"help": "folder written by `vit-spine chunk` (holds manifest.json)."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "pretrained backbone, a Hub name in the local cache or a local folder "
            "(default google/vit-base-patch16-224-in21k when --model_config is not given).",
            "aliases": aliases("model"),
        },
    )
    model_config: str | None = field(
        default=None, metadata={"help": "random-init ViT size instead of pretrained weights: tiny, small or base."}
    )
    patch_size: int | None = field(
        default=None, metadata={"help": "with --model_config: ViT patch size (default 16); smaller sees finer detail, costs more."}
    )
    patience: int = field(default=2, metadata={"help": "stop after this many shards without a better validation score."})
    min_delta: float = field(default=0.0, metadata={"help": "an improvement smaller than this does not count."})
    replay_fraction: float = field(
        default=0.0,
        metadata={"help": "add this fraction (of the current shard's size) of slices drawn from earlier shards, against forgetting."},
    )
    max_shards: int | None = field(default=None, metadata={"help": "train on at most this many shards."})
    fracture_pos_weight_max: float = field(
        default=5.0,
        metadata={"help": "positive weight of the fracture targets = min(this, negatives/positives of the training slices)."},
    )
    augment: bool = field(
        default=True, metadata={"help": "random augmentation of training batches, on the device (see the --max_* options)."}
    )
    positive_fraction: float | None = field(
        default=None,
        metadata={
            "help": "draw fracture-positive slices with this probability (balanced sampling, with replacement); "
            "default: plain shuffling. Not combinable with --replay_fraction."
        },
    )
    oos_fraction: float | None = field(
        default=None,
        metadata={"help": "share of the next training shard's studies that each shard's model predicts (studies it never "
                  "trained on) for the learned aggregators to be fitted on; default min(1, 0.45 x --num_train_epochs): "
                  "a forward pass costs about a third of a training step, so about 15 %% of the shard's training time. "
                  "0: no learned aggregator."},
    )
    aggregator_history: int = field(
        default=0,
        metadata={"help": "fit the learned aggregators on the out-of-sample studies predicted by this many most recent "
                  "shards' models (0: all of them)."},
    )
    keep_trainer_checkpoints: bool = field(
        default=False,
        metadata={"help": "keep each finished shard's intermediate Trainer checkpoints (optimizer state; large)."},
    )

    def __post_init__(self):
        from vit_spine.models import backbone_of_preset, pretrained_backbone

        if self.model_name_or_path and self.model_config:
            raise ValueError("give either --model_name_or_path or --model_config, not both")
        if self.model_config is not None:
            backbone_of_preset(self.model_config)  # an unknown preset: one line listing the known ones
        if self.model_name_or_path:
            pretrained_backbone(self.model_name_or_path)  # a folder without config.json, of an unknown backbone
        if self.patch_size is not None and not self.model_config:
            raise ValueError("--patch_size applies to a random-init --model_config only")
        options.at_least(self.patch_size, 1, "--patch_size")
        if self.patch_size and (Path(self.chunks) / MANIFEST_FILE).is_file():
            # checked here, before the run folder is made; the image size is the chunks'
            image_size = load_manifest(self.chunks)["preprocess"]["image_size"]
            if image_size % self.patch_size:
                raise ValueError(f"--patch_size {self.patch_size} does not divide the chunks' image size {image_size}: "
                                 f"choose a divisor of {image_size}")
        if not 0 <= self.replay_fraction <= 1:
            raise ValueError(f"--replay_fraction must be in [0, 1], got {self.replay_fraction}")
        options.at_least(self.patience, 1, "--patience")
        options.at_least(self.min_delta, 0, "--min_delta")
        options.at_least(self.max_shards, 1, "--max_shards")
        options.positive(self.fracture_pos_weight_max, "--fracture_pos_weight_max")
        if self.oos_fraction is not None and not 0 <= self.oos_fraction <= 1:
            raise ValueError(f"--oos_fraction must be in [0, 1], got {self.oos_fraction}")
        options.at_least(self.aggregator_history, 0, "--aggregator_history")
        if self.positive_fraction is not None:
            if not 0 < self.positive_fraction < 1:
                raise ValueError(f"--positive_fraction must be in (0, 1), got {self.positive_fraction}")
            if self.replay_fraction > 0:
                raise ValueError("--positive_fraction and --replay_fraction cannot be combined")
        options.folder_path(self.chunks, "--chunks")


# TrainingArguments values the shard loop cannot honour: (the value that is accepted, why another is refused).
# Each is refused with one line before anything runs, rather than failing inside the Trainer or being ignored.
NOT_HONOURED: dict[str, tuple[object, str]] = {
    "resume_from_checkpoint": (None, "a run resumes by itself: run the same command again with the same --output_dir"),
    "eval_strategy": ("no", "the validation shard is scored after every shard (metrics.jsonl); leave it at no"),
    "eval_on_start": (False, "the validation shard is scored after every shard (metrics.jsonl)"),
    "load_best_model_at_end": (False, "OUTPUT_DIR/best points at the best shard (see --patience and --min_delta)"),
    "metric_for_best_model": (None, "the best shard is the one with the lowest validation weighted log loss"),
    "greater_is_better": (None, "the best shard is the one with the lowest validation weighted log loss"),
    "prediction_loss_only": (False, "each shard is scored on its validation predictions"),
    "label_smoothing_factor": (0.0, "the loss is vit-spine's masked BCE (see --fracture_pos_weight_max)"),
    "report_to": ("none", "each shard's Trainer counts its steps from 0, so the curves would overlap; "
                          "OUTPUT_DIR/metrics.jsonl and `vit-spine report` give the run's"),
    "hub_strategy": ("every_save", "--push_to_hub pushes every finished shard, the best to main"),
    "hub_revision": (None, "--push_to_hub commits the best shard to main and every shard to its shard-XXXXX branch"),
    "hub_always_push": (False, "--push_to_hub pushes every finished shard, one at a time"),
}


def refuse_not_honoured(args) -> None:
    """Refuse the TrainingArguments values in NOT_HONOURED, and --save_strategy best (it needs evaluation
    inside the Trainer); `args` raw from the command line or already a TrainingArguments."""
    for name, (accepted, why) in NOT_HONOURED.items():
        value = getattr(args, name)
        if name == "report_to" and value in ([], ["none"], None):  # TrainingArguments turns "none" into []
            continue
        if value != accepted:
            shown = " ".join(value) if isinstance(value, list) else getattr(value, "value", value)
            raise ValueError(f"--{name} {shown}: not supported by `vit-spine train`: {why}")
    if args.save_strategy == "best":
        raise ValueError("--save_strategy best: not supported by `vit-spine train`: OUTPUT_DIR/best points at the best "
                         "shard; choose steps, epoch or no")


@dataclass
class ShardTrainingArguments(TrainingArguments):
    """TrainingArguments as `vit-spine train` takes them: --output_dir is the run folder (required), and the
    values the shard loop cannot honour are refused before transformers checks (or ignores) them."""

    output_dir: str = field(
        metadata={"help": "run folder: shard_XXXXX/ checkpoints, metrics.jsonl, best -> shard; each shard's Trainer "
                  "writes under shard_XXXXX/trainer.", "aliases": aliases("output")}
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "passes over each shard."})
    max_steps: int = field(
        default=-1,
        metadata={"help": "optimizer steps of the whole run, across shards: shards train their --num_train_epochs in "
                  "turn until this many steps are taken, and the learning-rate schedule spans them (-1: no limit)."},
    )

    def __post_init__(self):
        refuse_not_honoured(self)
        super().__post_init__()


PREFETCH_BATCHES = 4  # batches each DataLoader worker keeps ready


# Our defaults for TrainingArguments (the user may override any of them on the command line).
def training_defaults() -> dict:
    on_gpu = torch.cuda.is_available()
    workers = min(8, (os.cpu_count() or 2) // 2) if on_gpu else 0
    return dict(
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=1e-4,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        num_train_epochs=1.0,
        logging_steps=10,
        save_strategy="steps",
        save_steps=200,
        save_total_limit=2,
        report_to="none",
        remove_unused_columns=False,
        bf16=bool(on_gpu and torch.cuda.is_bf16_supported()),
        dataloader_num_workers=workers,
        # On a GPU the step must never wait for the host: batches in pinned memory, copied to the device
        # without blocking (accelerate's loader does the copy), workers kept from one epoch to the next.
        dataloader_pin_memory=on_gpu,
        dataloader_persistent_workers=workers > 0,
        accelerator_config={"non_blocking": on_gpu},
        # The Trainer's NaN/inf filter turns each step's loss into a Python bool: a host sync per step on
        # a GPU. Without it a NaN loss shows as NaN in the logs instead of being skipped.
        logging_nan_inf_filter=not on_gpu,
    )


def fit_loader_options(args: TrainingArguments) -> TrainingArguments:
    """Worker options that depend on the worker count, which the command line may have changed.

    Persistent workers and a prefetch depth only exist with worker processes (TrainingArguments refuses a
    prefetch factor at 0 workers, the DataLoader refuses persistent workers), so they are set here, after
    parsing, rather than as defaults. A prefetch factor given on the command line is kept.
    """
    if args.dataloader_num_workers == 0:
        args.dataloader_persistent_workers = False
    elif args.dataloader_prefetch_factor is None:
        args.dataloader_prefetch_factor = PREFETCH_BATCHES
    return args


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a batch; unknown targets (NaN) become -100 so the Trainer's item count skips them."""
    stacked = collate_batch(batch)
    stacked["labels"] = torch.nan_to_num(stacked["labels"], nan=IGNORE_INDEX)
    return stacked


class EpochSeededSampler(torch.utils.data.Sampler):
    """Balanced sampling whose draws depend only on (seed, epoch), so a resumed shard skips to the same batches."""

    def __init__(self, dataset: ShardDataset, positive_fraction: float, seed: int):
        self.dataset, self.positive_fraction, self.seed, self.epoch = dataset, positive_fraction, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(balanced_sampler(self.dataset, self.positive_fraction, generator=generator))


class MarkedUint8Trainer(Trainer):
    """A Trainer for uint8 shard batches that marks each checkpoint complete: what train and pretrain share.

    Batches arrive as uint8 and become the model's input on the device (`model_input`): normalised, and
    augmented with `augment` (None: never) while the model is training.
    """

    augment: AugmentConfig | None = None

    def _prepare_input(self, data):
        # A batch in pinned memory can travel to the GPU while the host goes on queueing the step (the
        # Trainer's own copy blocks). Accelerate's loader has usually moved the batch already
        # (`non_blocking` in training_defaults); this covers batches it did not move.
        if isinstance(data, torch.Tensor) and not self.is_deepspeed_enabled:
            return data.to(self.args.device, non_blocking=True)
        return super()._prepare_input(data)

    def _prepare_inputs(self, inputs: dict) -> dict:
        inputs = super()._prepare_inputs(inputs)
        augment = self.augment if self.model.training else None
        inputs["pixel_values"] = model_input(inputs["pixel_values"], augment)
        return inputs

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer writes checkpoint-N file by file; a kill or a full disk in the middle leaves a folder
        that its resume would trust. The marker written last (after the files are on disk) says it is whole."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            mark_checkpoint_complete(Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")


class ShardTrainer(MarkedUint8Trainer):
    """A MarkedUint8Trainer whose LR schedule is one slice of a schedule spanning every shard of the run, with
    balanced sampling (`positive_fraction`) and augmentation (`augment`) while training."""

    def __init__(self, *args, schedule_offset: int = 0, schedule_total: int = 1, positive_fraction: float | None = None,
                 augment: AugmentConfig | None = None, **kwargs):
        self.schedule_offset = schedule_offset
        self.schedule_total = schedule_total
        self.positive_fraction = positive_fraction
        self.augment = augment
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.positive_fraction is None:
            return super()._get_train_sampler(train_dataset)
        return EpochSeededSampler(dataset, self.positive_fraction, self.args.seed)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = optimizer or self.optimizer
            whole_run = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=optimizer,
                num_warmup_steps=self.args.get_warmup_steps(self.schedule_total),
                num_training_steps=self.schedule_total,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
            if not isinstance(whole_run, LambdaLR):
                raise ValueError(f"--lr_scheduler_type {self.args.lr_scheduler_type} cannot span shards; use cosine, linear, constant...")
            factor, offset = whole_run.lr_lambdas[0], self.schedule_offset
            self.lr_scheduler = LambdaLR(optimizer, lambda step: factor(step + offset))
            self._created_lr_scheduler = True
        return self.lr_scheduler


def mark_checkpoint_complete(folder: Path) -> None:
    """Flush a finished Trainer checkpoint to disk, then record its files; the record is the "complete" mark."""
    flush_folder_files(folder)
    write_json_atomic(folder / TRAINER_CHECKPOINT_COMPLETE_FILE, file_record(folder))


def checkpoint_damage(folder: Path) -> list[str]:
    """Why a Trainer checkpoint cannot be resumed from ([] when it is whole: marked, and its files as recorded)."""
    marker = folder / TRAINER_CHECKPOINT_COMPLETE_FILE
    if not marker.is_file():
        return ["not marked complete: it was being written when the run stopped"]
    try:
        record = json.loads(marker.read_text())
    except ValueError:
        return [f"{TRAINER_CHECKPOINT_COMPLETE_FILE} is damaged"]
    record.pop(TRAINER_CHECKPOINT_COMPLETE_FILE, None)
    return check_files(folder, record, checksums=True)


def last_complete_checkpoint(trainer_dir: Path, remove_torn: bool) -> str | None:
    """The newest whole Trainer checkpoint under `trainer_dir`; newer torn ones are removed (by the main
    process, `remove_torn`) with a message, so the shard resumes from the one before, or from its start."""
    if not trainer_dir.is_dir():
        return None
    folders = [p for p in trainer_dir.iterdir() if p.is_dir() and p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")]
    for folder in sorted(folders, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True):
        damage = checkpoint_damage(folder)
        if not damage:
            return str(folder)
        if remove_torn:
            print(f"removing the torn Trainer checkpoint {folder} ({'; '.join(damage)})", flush=True)
            shutil.rmtree(folder)
    return None


class AlignLogs(TrainerCallback):
    """Log the loss at every checkpoint and at the shard's last step.

    A logged loss is the mean since the previous log, and a resumed Trainer starts counting at its
    checkpoint. With a log at every checkpoint the log history of a resumed shard is the one of an
    uninterrupted shard, and with a log at the last step it covers every step: `shard_train_loss`
    of it is then the same number whatever happened in between.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True


def shard_train_loss(log_history: list[dict]) -> float:
    """The mean training loss over the shard's steps, from its log history (each logged loss weighted by
    the steps it covers); NaN when nothing was logged."""
    logged = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    total, steps, previous = 0.0, 0, 0
    for step, loss in logged:
        total += loss * (step - previous)
        steps += step - previous
        previous = step
    return total / steps if steps else float("nan")


def update_steps(num_examples: int, args: TrainingArguments) -> int:
    """Optimizer steps the Trainer takes for one shard (same arithmetic as Trainer, --dataloader_drop_last included)."""
    per_batch = args.per_device_train_batch_size * args.world_size
    batches = num_examples // per_batch if args.dataloader_drop_last else math.ceil(num_examples / per_batch)
    per_epoch = max(1, math.ceil(batches / args.gradient_accumulation_steps))
    return math.ceil(per_epoch * args.num_train_epochs)


def with_replay(current: ShardDataset, earlier: list[ShardDataset], fraction: float, seed: int) -> Dataset:
    """The current shard plus `fraction * len(current)` slices drawn uniformly from earlier shards."""
    count = int(round(fraction * len(current)))
    if count == 0 or not earlier:
        return current
    pool = ConcatDataset(earlier)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return ConcatDataset([current, Subset(pool, np.sort(picked).tolist())])


def training_statistics(shards: list[ShardDataset]) -> tuple[np.ndarray, float]:
    """(prevalence of the 8 study targets over training studies, positive rate of fracture slice targets)."""
    prevalence = train_prevalence(
        np.concatenate([s.study_labels for s in shards]), np.concatenate([s.study_ids for s in shards])
    )
    fracture = np.concatenate([s.labels[:, FRACTURES] for s in shards])
    known = fracture[~np.isnan(fracture)]
    return prevalence, float(known.mean()) if known.size else 0.0


class StopRequest(TrainerCallback):
    """Turns SIGTERM / Ctrl-C into "save a checkpoint and stop" at the end of a step.

    One process reads its own flag at every step: no tensor, no device sync. Under DDP every process
    must stop at the same step, so the processes agree on the flag with an all-reduce, and reading its
    result waits for the GPU to finish the step. That is done only at the steps the Trainer logs (it
    waits for the GPU there anyway, to read the loss) and every `check_every` steps, so under DDP the
    stop comes up to `check_every` steps after the signal. A second Ctrl-C interrupts at once.
    """

    def __init__(self, check_every: int = 10):
        self.requested = False
        self.check_every = check_every
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint and stopping after this step", flush=True)

    def agreed(self, args, state, control) -> bool:
        """Whether every process has been asked to stop (see the class docstring for when they compare)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.requested
        # DefaultFlowCallback has already decided whether this step logs; every process decides alike
        if not (control.should_log or state.global_step % self.check_every == 0):
            return False
        flag = torch.tensor(int(self.requested), device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self.agreed(args, state, control):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True


@dataclass
class RunResult:
    rows: list[dict]  # one per finished shard, including shards finished by earlier invocations
    best_shard: int | None
    interrupted: bool  # stopped by a signal; run the same command again to continue


@dataclass
class Run:
    """What every shard of one run shares."""

    config: TrainConfig
    pooling: PoolingConfig
    args: TrainingArguments
    manifest: dict
    train_sets: list[ShardDataset]
    validation: ValidationSet
    prevalence: np.ndarray
    loss: MaskedBCELoss
    augment: AugmentConfig | None
    schedule_total: int
    state: PartialState
    output: Path  # the run folder, --output_dir (each shard's Trainer gets its own folder under it)
    max_steps: int | None  # --max_steps: optimizer steps of the whole run, None for no limit
    oos_fraction: float  # --oos_fraction, resolved


def prepare_run(config: TrainConfig, pooling: PoolingConfig, args: TrainingArguments, augment: AugmentConfig) -> Run:
    chunks, output = Path(config.chunks), Path(args.output_dir)
    if args.push_to_hub:  # the per-shard Trainer must not push on its own; a subscriber pushes each finished shard
        raise ValueError("--push_to_hub: run_training pushes nothing itself; subscribe a vit_spine.hub.ShardPusher "
                         "with on_shard_saved (as `vit-spine train --push_to_hub` does) and pass push_to_hub=False")
    manifest = load_manifest(chunks)
    image_size = int(manifest["preprocess"]["image_size"])
    entries = train_shards(manifest)[: config.max_shards]
    if not entries:
        raise ValueError(f"{chunks / MANIFEST_FILE} lists no training shard")
    missing = [e["path"] for e in [*entries, *val_shards(manifest)] if not e["complete"]]
    if missing:
        raise FileNotFoundError(
            f"shards listed in {chunks / MANIFEST_FILE} are not written yet: {', '.join(missing)}; finish `vit-spine chunk` first"
        )

    state = PartialState()
    identity = {
        "chunks": str(chunks.resolve()),
        "model": config.model_name_or_path,
        "model_config": config.model_config,
        "patch_size": config.patch_size,
        "image_size": image_size,
        "preprocess": manifest["preprocess"],
        "manifest": plan_fingerprint(manifest),  # the shards it was built from: a re-chunk is refused
        "min_delta": config.min_delta,  # part of the one "best" rule
        "aggregator": pooling.aggregator,  # so is the aggregator whose score it compares
        "oos_fraction": oos_fraction(config, args),  # what the learned aggregators are fitted on
        "aggregator_history": config.aggregator_history,
    }
    RunDir(output).check_run_config(identity)
    if state.is_main_process:
        RunDir(output).write_run_config(identity)
    state.wait_for_everyone()

    train_sets = [ShardDataset(chunks / e["path"]) for e in entries]
    validation = load_validation(chunks, manifest)
    prevalence, positive_rate = training_statistics(train_sets)
    sizes = [len(s) + int(round(config.replay_fraction * len(s))) * (k > 0) for k, s in enumerate(train_sets)]
    epoch_steps = sum(update_steps(n, args) for n in sizes)
    max_steps = args.max_steps if args.max_steps > 0 else None
    if max_steps is not None and max_steps > epoch_steps and state.is_main_process:
        print(f"note: --max_steps {max_steps} is more than the {epoch_steps} steps that --num_train_epochs "
              f"{args.num_train_epochs:g} gives over the shards; the run ends after {epoch_steps}", flush=True)
    return Run(
        config=config,
        pooling=pooling,
        args=args,
        manifest=manifest,
        train_sets=train_sets,
        validation=validation,
        prevalence=prevalence,
        loss=MaskedBCELoss(fracture_pos_weight(positive_rate, config.fracture_pos_weight_max)),
        augment=augment if config.augment else None,
        schedule_total=min(epoch_steps, max_steps or epoch_steps),  # one schedule over the steps the run takes
        state=state,
        output=output,
        max_steps=max_steps,
        oos_fraction=oos_fraction(config, args),
    )


def oos_fraction(config: TrainConfig, args: TrainingArguments) -> float:
    """--oos_fraction, or its default: about 15 % of a shard's training time (a forward pass is about a third of a step)."""
    return config.oos_fraction if config.oos_fraction is not None else min(1.0, 0.45 * args.num_train_epochs)


def starting_model(run: Run, k: int, resume_from: str | None):
    if resume_from is not None:
        # from_pretrained restores the renamed ViT weights (the Trainer's own strict=False load would
        # silently skip the encoder); the Trainer then restores optimizer, scheduler, RNG and data position.
        return load_model(resume_from)
    if k == 0:
        image_size = int(run.manifest["preprocess"]["image_size"])
        return create_model(run.config.model_name_or_path, run.config.model_config, image_size=image_size, seed=run.args.seed,
                            patch_size=run.config.patch_size)
    previous = RunDir(run.output).shard(k - 1)
    verify_checkpoint(previous, read_checkpoint_meta(previous))  # shard k starts from exactly these weights
    return load_model(previous)


def train_shard(run: Run, k: int, offset: int, stop: StopRequest, callbacks: Sequence[TrainerCallback]) -> dict | None:
    """Train, score and save shard k. Returns its metrics row, or None when stopped by a signal."""
    start = time.time()
    train_dataset = with_replay(run.train_sets[k], run.train_sets[:k], run.config.replay_fraction, seed=run.args.seed + k)
    args = copy.copy(run.args)  # this shard's: its own Trainer folder and, under --max_steps, what is left of them
    args.output_dir = str(RunDir(run.output).shard(k) / TRAINER_DIR)
    if run.max_steps is not None:
        args.max_steps = min(update_steps(len(train_dataset), args), run.max_steps - offset)
    if run.state.is_main_process:
        last_complete_checkpoint(Path(args.output_dir), remove_torn=True)
    run.state.wait_for_everyone()
    resume_from = last_complete_checkpoint(Path(args.output_dir), remove_torn=False)
    if resume_from is not None:
        print(f"shard {k}: resuming from {resume_from}", flush=True)
    trainer = ShardTrainer(
        model=starting_model(run, k, resume_from),
        args=args,
        train_dataset=train_dataset,
        data_collator=collate,
        compute_loss_func=run.loss,
        callbacks=[AlignLogs(), stop, *callbacks],
        schedule_offset=offset,
        schedule_total=run.schedule_total,
        positive_fraction=run.config.positive_fraction,
        augment=run.augment,
    )
    trainer.train(resume_from_checkpoint=resume_from)
    train_s = time.time() - start
    if stop.requested and trainer.state.global_step < trainer.state.max_steps:
        print(
            f"stopped in shard {k} at step {trainer.state.global_step}; checkpoint in {args.output_dir}. "
            "Run the same command again (or ./run.sh resume ...) to continue.",
            flush=True,
        )
        return None
    # the path evaluate, report and predict take: same batches, same precision, whatever this run's --bf16
    probs = predict_probabilities(trainer.model, run.validation.dataset, args.per_device_eval_batch_size, run.validation.study_ids)
    started = time.time()
    oos = predict_out_of_sample(run, k, trainer.model, args.per_device_eval_batch_size)
    oos_s = time.time() - started
    started = time.time()
    aggregators, fitted = fit_aggregators(run, k, oos)
    fit_s = round(time.time() - started, 2)
    scores, calibrator, _ = score_predictions(probs, run.validation, run.prevalence, run.pooling, seed=args.seed,
                                              aggregators=aggregators)
    steps = trainer.state.global_step
    row = {
        "shard": k,
        "shard_path": train_shards(run.manifest)[k]["path"],
        "global_step": offset + steps,
        "shard_steps": steps,
        "world_size": args.world_size,
        "train_loss": shard_train_loss(trainer.state.log_history),  # the whole shard's, across resumes
        "train_slices": len(train_dataset),
        **scores,
        "out_of_sample": {  # the next shard's studies this model predicted for the learned aggregators
            "shard": None if oos is None else k + 1,
            "studies": 0 if oos is None else len(np.unique(run.train_sets[k + 1].study_ids[oos.rows])),
            "slices": 0 if oos is None else len(oos.rows),
        },
        "aggregator_fit": fitted,
        # where the shard's time went: training (the Trainer), the out-of-sample pass, the learned aggregators' fit
        "seconds": {"training": round(train_s, 1), "out_of_sample_inference": round(oos_s, 2), "aggregator_fit": fit_s},
        "elapsed_s": round(time.time() - start, 1),
    }
    if run.state.is_main_process:
        save_shard(trainer, RunDir(run.output).shard(k), row, run, calibrator, oos, aggregators)
    # the next shard loads this one's weights on every process
    run.state.wait_for_everyone()
    return row


@dataclass
class OutOfSample:
    """Shard k's model's logits of some studies of training shard k+1: slices it never trained on."""

    rows: np.ndarray  # int64 row indices into training shard k+1, whole studies, in shard order
    logits: np.ndarray  # float32 (len(rows), 14)


def out_of_sample_rows(study_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The rows of a seeded draw of ceil(fraction x studies) whole studies of a shard, in shard order."""
    uids = np.unique(study_ids)
    count = math.ceil(fraction * len(uids))
    picked = np.random.default_rng(seed).choice(uids, size=count, replace=False) if count else uids[:0]
    return np.flatnonzero(np.isin(study_ids, picked)).astype(np.int64)


def predict_out_of_sample(run: Run, k: int, model, batch_size: int) -> OutOfSample | None:
    """Shard k's model predicts `--oos_fraction` of the studies of training shard k+1 (None: no next shard, or 0)."""
    if k + 1 >= len(run.train_sets) or run.oos_fraction == 0:
        return None
    shard = run.train_sets[k + 1]
    rows = out_of_sample_rows(shard.study_ids, run.oos_fraction, seed=run.args.seed + k + 1)
    logits = predict_logits(model, Subset(shard, rows.tolist()), batch_size, shard.study_ids[rows])
    return OutOfSample(rows, logits.astype(np.float32))


def write_out_of_sample(directory: Path, oos: OutOfSample) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, rows=oos.rows, logits=oos.logits)
    write_bytes_atomic(directory / OUT_OF_SAMPLE_FILE, buffer.getvalue())


def read_out_of_sample(checkpoint: Path) -> OutOfSample | None:
    """The out-of-sample logits a finished shard's checkpoint holds (None: it had no next shard), checked
    against the checkpoint's file record (that file only: every later shard reads it again, and the model's
    weights, hundreds of MB for ViT-B, are not needed here)."""
    path = checkpoint / OUT_OF_SAMPLE_FILE
    if not path.is_file():
        return None
    record = read_checkpoint_meta(checkpoint).get("files", {})
    verify_checkpoint(checkpoint, {"files": {name: record[name] for name in record if name == OUT_OF_SAMPLE_FILE}})
    with np.load(path) as stored:
        return OutOfSample(stored["rows"], stored["logits"])


def out_of_sample_studies(run: Run, k: int, current: OutOfSample | None) -> tuple[list[np.ndarray], np.ndarray, list[str], list[int]]:
    """(slice probabilities (n_i, 14) of each labelled out-of-sample study, their labels (m, 8), uids, the shards
    they come from) of the models of shards k - history + 1 .. k: what the learned aggregators are fitted on.
    Only training-shard studies, each predicted by a model that never trained on it."""
    first = 0 if run.config.aggregator_history == 0 else max(0, k - run.config.aggregator_history + 1)
    studies, labels, uids, shards = [], [], [], []
    for j in range(first, k + 1):
        oos = current if j == k else read_out_of_sample(RunDir(run.output).shard(j))
        if oos is None:
            continue
        shard = run.train_sets[j + 1]
        ids = shard.study_ids[oos.rows]
        starts = np.concatenate([[0], np.flatnonzero(ids[1:] != ids[:-1]) + 1, [len(ids)]])
        for a, b in zip(starts[:-1], starts[1:]):
            label = shard.study_labels[oos.rows[a]]
            if np.isnan(label).any():
                continue
            studies.append(sigmoid(oos.logits[a:b]))
            labels.append(label)
            uids.append(str(ids[a]))
        shards.append(j + 1)
    return studies, np.asarray(labels, dtype=np.float64).reshape(-1, 8), uids, shards


def fit_aggregators(run: Run, k: int, current: OutOfSample | None) -> tuple[dict[str, Aggregator], dict]:
    """Every registered aggregator ready to score shard k: the fixed ones as they are, the learned ones fitted on
    `out_of_sample_studies` (left out while there is none). Returns them and what the fits learned from."""
    studies, labels, uids, shards = out_of_sample_studies(run, k, current)
    aggregators = {}
    for name in aggregator_names():
        aggregator = make_aggregator(run.pooling, name)
        if is_learned(aggregator):
            if not studies:
                continue
            aggregator.fit(studies, labels, uids, seed=run.args.seed + k)
        aggregators[name] = aggregator
    return aggregators, {"studies": len(studies), "shards": shards}


# A subscriber to "shard saved": called on the main process after each shard is done (see run_training).
ShardListener = Callable[[ShardSaved], None]


def run_training(
    config: TrainConfig,
    pooling: PoolingConfig,
    args: TrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
    augment: AugmentConfig | None = None,
    on_shard_saved: Sequence[ShardListener] = (),
) -> RunResult:
    """Train shard after shard, continuing a run folder where an earlier invocation stopped.

    `augment` sets the augmentation used when `config.augment` is on (default: `AugmentConfig()`). The run
    folder is `args.output_dir`. Each of `on_shard_saved` is called (main process) with a `ShardSaved` once
    a shard's checkpoint is marked done and the run's files say so (`vit_spine.hub.ShardPusher` pushes it).
    """
    refuse_not_honoured(args)  # also for a plain TrainingArguments given from Python, before the folder is made
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"--output_dir {output}: a file, not a folder")
    lock = FolderLock(output, "vit-spine train") if PartialState().is_main_process else contextlib.nullcontext()
    with lock:
        return _run_training(config, pooling, args, callbacks, augment, on_shard_saved)


def write_run_files(run: Run, rows: list[dict]) -> None:
    """metrics.jsonl, `best` and all_results.json from the finished rows (main process; `RunDir.write_rows`)."""
    if run.state.is_main_process:
        RunDir(run.output).write_rows(rows, run.config.min_delta)


def _run_training(config, pooling, args, callbacks, augment, on_shard_saved: Sequence[ShardListener]) -> RunResult:
    run = prepare_run(config, pooling, args, augment or AugmentConfig())
    rows = RunDir(run.output).finished_rows()
    write_run_files(run, rows)  # repairs what a kill between a shard's checkpoint and these files left
    done = {row["shard"] for row in rows}
    stop = StopRequest()
    stop.install()
    interrupted = False
    try:
        for k in range(len(run.train_sets)):
            best = best_row(rows, config.min_delta)
            if best is not None and max(done, default=-1) - best["shard"] >= config.patience:
                break  # early-stopped (in this invocation or an earlier one)
            if k in done:
                continue
            if stop.requested:
                interrupted = True
                print("stopped between shards; run the same command again to continue.", flush=True)
                break
            offset = max((r["global_step"] for r in rows), default=0)
            if run.max_steps is not None and offset >= run.max_steps:
                print(f"--max_steps {run.max_steps} reached after shard {max(done)}", flush=True)
                break
            row = train_shard(run, k, offset, stop, callbacks)
            if row is None:
                interrupted = True
                break
            rows.append(row)
            done.add(k)
            write_run_files(run, rows)
            best = best_row(rows, config.min_delta)
            print(format_table([row]).splitlines()[-1], flush=True)
            if run.state.is_main_process:
                for listener in on_shard_saved:
                    listener(ShardSaved(RunDir(run.output), k, is_best=best["shard"] == k))
            if k - best["shard"] >= config.patience:
                print(f"early stopping: {config.patience} shard(s) without improvement since shard {best['shard']}")
    finally:
        stop.uninstall()
    best = best_row(rows, config.min_delta)
    return RunResult(rows=rows, best_shard=None if best is None else best["shard"], interrupted=interrupted)


def save_shard(trainer: Trainer, directory: Path, row: dict, run: Run, calibrator, oos: OutOfSample | None,
               aggregators: dict[str, Aggregator]) -> None:
    """Weights, trainer state, the out-of-sample logits, the learned aggregators and vit_spine.json; vit_spine.json
    is written last and marks the shard done."""
    trainer.save_model(str(directory))
    trainer.state.save_to_json(str(directory / TRAINER_STATE_FILE))
    if oos is not None:
        write_out_of_sample(directory, oos)
    for aggregator in aggregators.values():
        if is_learned(aggregator):
            aggregator.save(directory)
    write_checkpoint_meta(directory, {
        "shard": row["shard"],
        "metrics": row,
        "preprocess": run.manifest["preprocess"],
        # the aggregator the row was judged by (max while a learned one has nothing to be fitted on yet)
        "pooling": {**asdict(run.pooling), "aggregator": row["aggregator"]},
        "calibration": None if calibrator is None else calibrator.to_dict(),
        "model": run.config.model_name_or_path,
        "model_config": run.config.model_config,
        "seed": run.args.seed,  # seeds the cross-fitted calibration folds; evaluate reuses it
        "baseline_prevalence": run.prevalence.tolist(),  # of the training studies; evaluate's baseline
    })
    if not run.config.keep_trainer_checkpoints:
        shutil.rmtree(directory / TRAINER_DIR, ignore_errors=True)


def parse_arguments(argv: Sequence[str] | None) -> tuple[TrainConfig, PoolingConfig, AugmentConfig, ShardTrainingArguments]:
    """The command line of `vit-spine train`: our options plus every TrainingArguments one, checked."""
    config, pooling, augment, args = parse_config(
        TrainConfig,
        argv,
        prog="vit-spine train",
        description=__doc__.split("\n")[0],
        extra_types=(PoolingConfig, AugmentConfig, ShardTrainingArguments),
        defaults=training_defaults(),
    )
    options.training_arguments(args)
    return config, pooling, augment, fit_loader_options(args)


def main(argv: Sequence[str] | None = None) -> int:
    config, pooling, augment, args = parse_arguments(argv)
    if args.disable_tqdm:  # transformers' own bars too (saving, loading weights): the Trainer's option covers only its own
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    run = RunDir(Path(args.output_dir))
    pusher = shard_pusher(args)
    try:
        result = run_training(config, pooling, args, augment=augment, on_shard_saved=[pusher] if pusher else [])
    finally:
        failed_pushes = pusher.finish() if pusher is not None else []
    for failure in failed_pushes:
        print(f"push failed: {failure.summary()}")
    if PartialState().is_main_process:
        print()
        print(format_table(result.rows))
        print("\nevery aggregator on the validation studies (weighted log loss, mean AUC C1-C7):")
        print(format_aggregator_table(result.rows))
        print(f"\nmetrics: {run.metrics_path}; best checkpoint: {run.best_link}")
    return 130 if result.interrupted else (1 if failed_pushes else 0)


def shard_pusher(args: TrainingArguments):
    """`--push_to_hub`: a `vit_spine.hub.ShardPusher` for the main process (None without it, and on the other
    processes); the per-shard Trainer's own pushing is turned off, the pusher pushes each finished shard."""
    if not args.push_to_hub:
        return None
    if not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id NAME (e.g. you/vit-spine)")
    args.push_to_hub = False
    if not PartialState().is_main_process:
        return None
    # The command wires the hub in; the shard loop knows it only as a subscriber to its ShardSaved event.
    from vit_spine.hub import ShardPusher

    return ShardPusher(args.hub_model_id, private=bool(args.hub_private_repo), token=args.hub_token)
