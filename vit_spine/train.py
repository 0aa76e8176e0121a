"""`vit-spine train`: fine-tune a ViT on one shard after another, judged after each shard.

Per shard (DESIGN.md pitfalls 1-3): a fresh `Trainer` whose model is `from_pretrained(previous
shard's checkpoint)`; one learning-rate schedule spans the whole run (warm-up once, decay across
shards); after the shard the validation shard is predicted, pooled to vertebra and patient level,
calibrated (cross-fitted, so the reported score never sees its own labels) and scored with the
competition's weighted log loss. A row goes to OUTPUT/metrics.jsonl, the weights and their
preprocessing/calibration to OUTPUT/shard_XXXXX/, OUTPUT/best points at the best shard, and the run
stops after --patience shards without improvement.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import ConcatDataset, Dataset, Subset
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from vit_spine import chunk as chunking
from vit_spine.cli import parse_config
from vit_spine.data import AugmentConfig, ShardDataset, balanced_sampler, collate_batch, model_input
from vit_spine.evaluation import (
    CHECKPOINT_META,
    METRICS_FILE,
    best_row,
    checkpoint_weight_files,
    read_checkpoint_meta,
    verify_checkpoint,
    PoolingConfig,
    ValidationSet,
    format_table,
    score_predictions,
    train_prevalence,
)
from vit_spine.fs import FolderLock, check_files, durable_replace, file_record, flush_folder_files, write_json_atomic, write_text_atomic
from vit_spine.model import IGNORE_INDEX, MaskedBCELoss, create_model, fracture_pos_weight, load_model

RUN_CONFIG_FILE = "run_config.json"


@dataclass
class TrainConfig:
    chunks: str = field(metadata={"help": "folder written by `vit-spine chunk` (holds manifest.json)."})
    output: str = field(metadata={"help": "run folder: shard_XXXXX/ checkpoints, metrics.jsonl, best -> shard."})
    model: str | None = field(
        default=None,
        metadata={
            "help": "pretrained backbone, a Hub name in the local cache or a local folder "
            "(default google/vit-base-patch16-224-in21k when --model-config is not given)."
        },
    )
    model_config: str | None = field(
        default=None, metadata={"help": "random-init ViT size instead of pretrained weights: tiny, small or base."}
    )
    patch_size: int | None = field(
        default=None, metadata={"help": "with --model-config: ViT patch size (default 16); smaller sees finer detail, costs more."}
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
            "default: plain shuffling. Not combinable with --replay-fraction."
        },
    )
    keep_trainer_checkpoints: bool = field(
        default=False,
        metadata={"help": "keep each finished shard's intermediate Trainer checkpoints (optimizer state; large)."},
    )

    def __post_init__(self):
        from vit_spine import options
        from vit_spine.model import MODEL_CONFIGS, check_model_folder

        if self.model and self.model_config:
            raise ValueError("give either --model or --model_config, not both")
        if self.model_config is not None and self.model_config not in MODEL_CONFIGS:
            raise ValueError(f"--model_config {self.model_config!r}: choose from {', '.join(MODEL_CONFIGS)}")
        if self.model:
            check_model_folder(self.model)
        if self.patch_size is not None and not self.model_config:
            raise ValueError("--patch_size applies to a random-init --model_config only")
        options.at_least(self.patch_size, 1, "--patch_size")
        if self.patch_size and (Path(self.chunks) / chunking.MANIFEST).is_file():
            # checked here, before the run folder is made; the image size is the chunks'
            image_size = chunking.load_manifest(self.chunks)["preprocess"]["image_size"]
            if image_size % self.patch_size:
                raise ValueError(f"--patch_size {self.patch_size} does not divide the chunks' image size {image_size}: "
                                 f"choose a divisor of {image_size}")
        if not 0 <= self.replay_fraction <= 1:
            raise ValueError(f"--replay_fraction must be in [0, 1], got {self.replay_fraction}")
        options.at_least(self.patience, 1, "--patience")
        options.at_least(self.min_delta, 0, "--min_delta")
        options.at_least(self.max_shards, 1, "--max_shards")
        options.positive(self.fracture_pos_weight_max, "--fracture_pos_weight_max")
        if self.positive_fraction is not None:
            if not 0 < self.positive_fraction < 1:
                raise ValueError(f"--positive_fraction must be in (0, 1), got {self.positive_fraction}")
            if self.replay_fraction > 0:
                raise ValueError("--positive_fraction and --replay_fraction cannot be combined")
        options.folder_path(self.chunks, "--chunks")
        options.folder_path(self.output, "--output")


PREFETCH_BATCHES = 4  # batches each DataLoader worker keeps ready


# Our defaults for TrainingArguments (the user may override any of them on the command line).
def training_defaults() -> dict:
    on_gpu = torch.cuda.is_available()
    workers = min(8, (os.cpu_count() or 2) // 2) if on_gpu else 0
    return dict(
        output_dir="unused",  # replaced per shard by OUTPUT/shard_XXXXX/trainer
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


class ShardTrainer(Trainer):
    """A Trainer for uint8 shard batches whose LR schedule is one slice of a schedule spanning every shard of the run.

    Batches arrive as uint8 and become the model's input on the device (`model_input`): normalised, and
    augmented when `augment` is given and the model is training.
    """

    def __init__(self, *args, schedule_offset: int = 0, schedule_total: int = 1, positive_fraction: float | None = None,
                 augment: AugmentConfig | None = None, **kwargs):
        self.schedule_offset = schedule_offset
        self.schedule_total = schedule_total
        self.positive_fraction = positive_fraction
        self.augment = augment
        super().__init__(*args, **kwargs)

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


CHECKPOINT_COMPLETE = "vit_spine_complete.json"  # in a Trainer checkpoint-N: its files' sizes and checksums


def mark_checkpoint_complete(folder: Path) -> None:
    """Flush a finished Trainer checkpoint to disk, then record its files; the record is the "complete" mark."""
    flush_folder_files(folder)
    write_json_atomic(folder / CHECKPOINT_COMPLETE, file_record(folder))


def checkpoint_damage(folder: Path) -> list[str]:
    """Why a Trainer checkpoint cannot be resumed from ([] when it is whole: marked, and its files as recorded)."""
    marker = folder / CHECKPOINT_COMPLETE
    if not marker.is_file():
        return ["not marked complete: it was being written when the run stopped"]
    try:
        record = json.loads(marker.read_text())
    except ValueError:
        return [f"{CHECKPOINT_COMPLETE} is damaged"]
    record.pop(CHECKPOINT_COMPLETE, None)
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
    """Optimizer steps the Trainer takes for one shard (same arithmetic as Trainer)."""
    batches = math.ceil(num_examples / (args.per_device_train_batch_size * args.world_size))
    per_epoch = max(1, math.ceil(batches / args.gradient_accumulation_steps))
    return math.ceil(per_epoch * args.num_train_epochs)


def shard_dir(output: Path, index: int) -> Path:
    return output / f"shard_{index:05d}"


def with_replay(current: ShardDataset, earlier: list[ShardDataset], fraction: float, seed: int) -> Dataset:
    """The current shard plus `fraction * len(current)` slices drawn uniformly from earlier shards."""
    count = int(round(fraction * len(current)))
    if count == 0 or not earlier:
        return current
    pool = ConcatDataset(earlier)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return ConcatDataset([current, Subset(pool, np.sort(picked).tolist())])


def load_validation(chunks: Path, manifest: dict) -> tuple[Dataset, ValidationSet]:
    shards = [ShardDataset(chunks / s["path"]) for s in chunking.val_shards(manifest)]
    if not shards:
        raise ValueError(f"{chunks / 'manifest.json'} lists no validation shard; re-chunk with --val-fraction > 0")
    dataset = shards[0] if len(shards) == 1 else ConcatDataset(shards)
    validation = ValidationSet(
        study_ids=np.concatenate([s.study_ids for s in shards]),
        study_labels=np.concatenate([s.study_labels for s in shards]),
    )
    return dataset, validation


def training_statistics(shards: list[ShardDataset]) -> tuple[np.ndarray, float]:
    """(prevalence of the 8 study targets over training studies, positive rate of fracture slice targets)."""
    prevalence = train_prevalence(
        np.concatenate([s.study_labels for s in shards]), np.concatenate([s.study_ids for s in shards])
    )
    fracture = np.concatenate([s.labels[:, :7] for s in shards])
    known = fracture[~np.isnan(fracture)]
    return prevalence, float(known.mean()) if known.size else 0.0


def check_run_config(output: Path, current: dict) -> None:
    """Refuse to continue a run whose data or model differ from what it was started with."""
    path = output / RUN_CONFIG_FILE
    if not path.exists():
        return
    from vit_spine.evaluation import load_json

    saved = load_json(path, "use a new --output folder, or, when the run's chunks and model are unchanged, delete it "
                            "and run the same `vit-spine train` command again")
    # a key an older run did not record cannot have differed
    differs = [k for k in current if k in saved and saved[k] != current[k]]
    if differs:
        details = "; ".join(f"{k}: was {saved.get(k)!r}, now {current[k]!r}" for k in differs)
        raise ValueError(f"{output} holds a run with another configuration ({details}). Use a new --output folder.")


def point_best(output: Path, index: int) -> None:
    link = output / "best"
    tmp = output / ".best.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(shard_dir(output, index).name)
    os.replace(tmp, link)


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
    failed_pushes: list = field(default_factory=list)  # vit_spine.hub.PushResult of pushes that failed


@dataclass
class Run:
    """What every shard of one run shares."""

    config: TrainConfig
    pooling: PoolingConfig
    args: TrainingArguments
    manifest: dict
    train_sets: list[ShardDataset]
    val_dataset: Dataset
    validation: ValidationSet
    prevalence: np.ndarray
    loss: MaskedBCELoss
    augment: AugmentConfig | None
    schedule_total: int
    state: PartialState
    hub_model_id: str | None  # push every finished shard here (main holds the best)

    @property
    def output(self) -> Path:
        return Path(self.config.output)


def prepare_run(config: TrainConfig, pooling: PoolingConfig, args: TrainingArguments, augment: AugmentConfig) -> Run:
    chunks, output = Path(config.chunks), Path(config.output)
    hub_model_id = None
    if args.push_to_hub:
        if not args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id NAME (e.g. you/vit-spine)")
        # we push each finished shard ourselves; the per-shard Trainer must not push on its own
        hub_model_id, args.push_to_hub = args.hub_model_id, False
    manifest = chunking.load_manifest(chunks)
    image_size = int(manifest["preprocess"]["image_size"])
    entries = chunking.train_shards(manifest)[: config.max_shards]
    if not entries:
        raise ValueError(f"{chunks / 'manifest.json'} lists no training shard")
    missing = [e["path"] for e in [*entries, *chunking.val_shards(manifest)] if not e["complete"]]
    if missing:
        raise FileNotFoundError(
            f"shards listed in {chunks / 'manifest.json'} are not written yet: {', '.join(missing)}; finish `vit-spine chunk` first"
        )

    state = PartialState()
    identity = {
        "chunks": str(chunks.resolve()),
        "model": config.model,
        "model_config": config.model_config,
        "patch_size": config.patch_size,
        "image_size": image_size,
        "preprocess": manifest["preprocess"],
        "manifest": chunking.plan_fingerprint(manifest),  # the shards it was built from: a re-chunk is refused
        "min_delta": config.min_delta,  # part of the one "best" rule
    }
    check_run_config(output, identity)
    if state.is_main_process:
        write_json_atomic(output / RUN_CONFIG_FILE, identity, indent=2)
    state.wait_for_everyone()

    train_sets = [ShardDataset(chunks / e["path"]) for e in entries]
    val_dataset, validation = load_validation(chunks, manifest)
    prevalence, positive_rate = training_statistics(train_sets)
    sizes = [len(s) + int(round(config.replay_fraction * len(s))) * (k > 0) for k, s in enumerate(train_sets)]
    return Run(
        config=config,
        pooling=pooling,
        args=args,
        manifest=manifest,
        train_sets=train_sets,
        val_dataset=val_dataset,
        validation=validation,
        prevalence=prevalence,
        loss=MaskedBCELoss(fracture_pos_weight(positive_rate, config.fracture_pos_weight_max)),
        augment=augment if config.augment else None,
        schedule_total=sum(update_steps(n, args) for n in sizes),
        state=state,
        hub_model_id=hub_model_id,
    )


def starting_model(run: Run, k: int, resume_from: str | None):
    if resume_from is not None:
        # from_pretrained restores the renamed ViT weights; the Trainer then restores optimizer,
        # scheduler, RNG and data position from the same checkpoint (DESIGN.md pitfall 1).
        return load_model(resume_from)
    if k == 0:
        image_size = int(run.manifest["preprocess"]["image_size"])
        return create_model(run.config.model, run.config.model_config, image_size=image_size, seed=run.args.seed,
                            patch_size=run.config.patch_size)
    previous = shard_dir(run.output, k - 1)
    verify_checkpoint(previous, read_checkpoint_meta(previous))  # shard k starts from exactly these weights
    return load_model(previous)


def train_shard(run: Run, k: int, offset: int, stop: StopRequest, callbacks: Sequence[TrainerCallback]) -> dict | None:
    """Train, score and save shard k. Returns its metrics row, or None when stopped by a signal."""
    start = time.time()
    args = run.args
    args.output_dir = str(shard_dir(run.output, k) / "trainer")
    if run.state.is_main_process:
        last_complete_checkpoint(Path(args.output_dir), remove_torn=True)
    run.state.wait_for_everyone()
    resume_from = last_complete_checkpoint(Path(args.output_dir), remove_torn=False)
    if resume_from is not None:
        print(f"shard {k}: resuming from {resume_from}", flush=True)
    train_dataset = with_replay(run.train_sets[k], run.train_sets[:k], run.config.replay_fraction, seed=args.seed + k)
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
    if stop.requested and trainer.state.global_step < trainer.state.max_steps:
        print(
            f"stopped in shard {k} at step {trainer.state.global_step}; checkpoint in {args.output_dir}. "
            "Run the same command again (or ./run.sh resume ...) to continue.",
            flush=True,
        )
        return None
    logits = trainer.predict(run.val_dataset).predictions
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    scores, calibrator, _ = score_predictions(probs, run.validation, run.prevalence, run.pooling, seed=args.seed)
    steps = trainer.state.global_step
    row = {
        "shard": k,
        "shard_path": chunking.train_shards(run.manifest)[k]["path"],
        "global_step": offset + steps,
        "shard_steps": steps,
        "world_size": args.world_size,
        "train_loss": shard_train_loss(trainer.state.log_history),  # the whole shard's, across resumes
        "train_slices": len(train_dataset),
        **scores,
        "elapsed_s": round(time.time() - start, 1),
    }
    if run.state.is_main_process:
        save_shard(trainer, shard_dir(run.output, k), row, run, calibrator)
    # the next shard loads this one's weights on every process
    run.state.wait_for_everyone()
    return row


def run_training(
    config: TrainConfig,
    pooling: PoolingConfig,
    args: TrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
    augment: AugmentConfig | None = None,
) -> RunResult:
    """Train shard after shard, continuing a run folder where an earlier invocation stopped.

    `augment` sets the augmentation used when `config.augment` is on (default: `AugmentConfig()`).
    """
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"--output {output}: a file, not a folder")
    lock = FolderLock(output, "vit-spine train") if PartialState().is_main_process else contextlib.nullcontext()
    with lock:
        return _run_training(config, pooling, args, callbacks, augment)


def finished_rows(output: Path) -> list[dict]:
    """The metrics rows of the run's finished shards, from their checkpoints (the marker holds the row),
    in shard order. metrics.jsonl is derived from them, so a kill between the two cannot lose a row."""
    rows = []
    for folder in sorted(output.glob("shard_*")):
        meta_path = folder / CHECKPOINT_META
        if meta_path.is_file():
            rows.append(read_checkpoint_meta(folder)["metrics"])  # a damaged one is named, with the fix
    return sorted(rows, key=lambda row: row["shard"])


def write_run_files(run: Run, rows: list[dict]) -> None:
    """metrics.jsonl, `best` and all_results.json from the finished rows: each rewritten whole, atomically."""
    path = run.output / METRICS_FILE
    if not run.state.is_main_process or (not rows and not path.exists()):
        return
    metrics = "".join(json.dumps(row) + "\n" for row in rows)
    if not path.is_file() or path.read_text() != metrics:
        write_text_atomic(path, metrics)
    best = best_row(rows, run.config.min_delta)
    if best is not None:
        link = run.output / "best"
        if not link.is_symlink() or os.readlink(link) != shard_dir(run.output, best["shard"]).name:
            point_best(run.output, best["shard"])
        write_summary(run.output, rows, best)


def _run_training(config, pooling, args, callbacks, augment) -> RunResult:
    run = prepare_run(config, pooling, args, augment or AugmentConfig())
    rows = finished_rows(run.output)
    write_run_files(run, rows)  # repairs what a kill between a shard's checkpoint and these files left
    done = {row["shard"] for row in rows}
    stop = StopRequest()
    stop.install()
    interrupted = False
    pusher = ShardPusher(run) if run.hub_model_id and run.state.is_main_process else None
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
            row = train_shard(run, k, offset, stop, callbacks)
            if row is None:
                interrupted = True
                break
            rows.append(row)
            done.add(k)
            write_run_files(run, rows)
            best = best_row(rows, config.min_delta)
            print(format_table([row]).splitlines()[-1], flush=True)
            if pusher is not None:
                pusher.submit(k, is_best=best["shard"] == k)
            if k - best["shard"] >= config.patience:
                print(f"early stopping: {config.patience} shard(s) without improvement since shard {best['shard']}")
    finally:
        stop.uninstall()
        failed_pushes = pusher.finish() if pusher is not None else []
    for failure in failed_pushes:
        print(f"push failed: {failure.summary()}")
    best = best_row(rows, config.min_delta)
    return RunResult(
        rows=rows,
        best_shard=None if best is None else best["shard"],
        interrupted=interrupted,
        failed_pushes=failed_pushes,
    )


class ShardPusher:
    """Pushes finished shards to the Hub in a background thread, one at a time and in order, so that
    the next shard trains during the upload (a ViT-B/16 checkpoint is about 350 MB).

    The thread is a daemon: huggingface_hub's HTTP calls have no timeout, and Ctrl-C while the run
    waits for a stalled upload at its end must still end the process (the checkpoints stay on disk).
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.queue: queue.Queue = queue.Queue()
        self.pending: list[tuple[int, Future]] = []
        threading.Thread(target=self._work, name="hub-push", daemon=True).start()

    def submit(self, k: int, is_best: bool) -> None:
        """Plan shard k's commit now (its model card reads metrics.jsonl), upload it in the background."""
        from vit_spine.hub import plan_push

        plan = plan_push(shard_dir(self.run.output, k), self.run.hub_model_id, self.run.output, is_best, None)
        future: Future = Future()
        self.queue.put((plan, future))
        self.pending.append((k, future))

    def finish(self) -> list:
        """Wait for every push; returns the PushResults of those that failed."""
        self.queue.put(None)
        waiting = [k for k, future in self.pending if not future.done()]
        if waiting:
            print(f"waiting for the Hub push of {self._names(waiting)} (Ctrl-C abandons it)", flush=True)
        try:
            # Wake up every second: a Ctrl-C that the kernel hands to the push thread only raises here
            # when this thread runs Python code again.
            futures = [future for _, future in self.pending]
            while wait(futures, timeout=1.0).not_done:
                pass
        except KeyboardInterrupt:
            unfinished = [k for k, future in self.pending if not future.done()]
            print(
                f"abandoned the Hub push of {self._names(unfinished)}; the checkpoints are kept: push them with "
                f"`vit-spine push {self.run.output}/shard_XXXXX --repo-id {self.run.hub_model_id}`",
                flush=True,
            )
            raise
        results = [future.result() for _, future in self.pending]
        return [result for result in results if not result.ok]

    @staticmethod
    def _names(shards: list[int]) -> str:
        return "shard(s) " + ", ".join(f"{k:05d}" for k in shards)

    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            plan, future = job
            try:
                future.set_result(self._send(plan))
            except BaseException as error:  # a bug here must reach finish(), not leave it waiting
                future.set_exception(error)

    def _send(self, plan):
        from vit_spine.hub import PushResult, send_push

        repo_id = self.run.hub_model_id
        try:
            result = send_push(plan, repo_id, private=bool(self.run.args.hub_private_repo))
        except Exception as error:  # noqa: BLE001 - reported like any failed push; training goes on
            result = PushResult(False, plan.checkpoint, repo_id, plan.revision, 1, error=f"{type(error).__name__}: {error}")
        print(result.summary(), flush=True)
        return result


def save_shard(trainer: Trainer, directory: Path, row: dict, run: Run, calibrator) -> None:
    """Weights, trainer state and vit_spine.json; vit_spine.json is written last and marks the shard done."""
    trainer.save_model(str(directory))
    trainer.state.save_to_json(str(directory / "trainer_state.json"))
    meta = {
        "format": 1,
        "shard": row["shard"],
        "metrics": row,
        "preprocess": run.manifest["preprocess"],
        "pooling": asdict(run.pooling),
        "calibration": None if calibrator is None else calibrator.to_dict(),
        "model": run.config.model,
        "model_config": run.config.model_config,
        "seed": run.args.seed,  # seeds the cross-fitted calibration folds; evaluate reuses it
        "baseline_prevalence": run.prevalence.tolist(),  # of the training studies; evaluate's baseline
    }
    meta["files"] = file_record(directory, checkpoint_weight_files(directory))  # checked whenever it is loaded
    flush_folder_files(directory)  # the weights are on disk before the marker says "done"
    tmp = directory / (CHECKPOINT_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    durable_replace(tmp, directory / CHECKPOINT_META)
    if not run.config.keep_trainer_checkpoints:
        shutil.rmtree(directory / "trainer", ignore_errors=True)


def write_summary(output: Path, rows: list[dict], best: dict) -> None:
    summary = {
        "best_shard": best["shard"],
        "best_weighted_log_loss": best["weighted_log_loss"],
        "baseline_weighted_log_loss": best["baseline_weighted_log_loss"],
        "shards_trained": len(rows),
        "global_step": max(r["global_step"] for r in rows),
    }
    write_json_atomic(output / "all_results.json", summary, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    config, pooling, augment, args = parse_config(
        TrainConfig,
        argv,
        prog="vit-spine train",
        description=__doc__.split("\n")[0],
        extra_types=(PoolingConfig, AugmentConfig, TrainingArguments),
        defaults=training_defaults(),
    )
    from vit_spine import options

    options.training_arguments(args)
    if args.disable_tqdm:  # transformers' own bars too (saving, loading weights): the Trainer's option covers only its own
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = run_training(config, pooling, fit_loader_options(args), augment=augment)
    if PartialState().is_main_process:
        print()
        print(format_table(result.rows))
        print(f"\nmetrics: {Path(config.output) / METRICS_FILE}; best checkpoint: {Path(config.output) / 'best'}")
    return 130 if result.interrupted else (1 if result.failed_pushes else 0)
