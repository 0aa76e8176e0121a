"""`vit-spine bench gpu`: ViT training img/s through the whole data path against the model alone, on one device.

Writes a shard of random pixels (`bone25d`, one stored channel per slice, as `vit-spine chunk` writes it)
and, per variant and batch size, times:
- model alone: forward + backward + AdamW step on a batch already on the device, already normalised;
- full path: ShardDataset -> DataLoader workers -> pinned memory -> non-blocking copy -> normalise and
  augment on the device -> ShardTrainer, with the options `vit-spine train` uses on this machine
  (`train.training_defaults`, bf16 where supported);
- data wait: the share of the full path's time spent between one step and the next, getting the batch;
- loader alone (SDPA rows): the same DataLoader, batches copied to the device and nothing else;
- peak device memory of the full path;
then predict's slices/s from uint8 batches through `Predictor.slice_probabilities`.

Only the two ends of each timed window wait for the device (`torch.cuda.synchronize`); the warm-up steps
before it (compilation, cuDNN/cuBLAS set-up, workers starting) are not timed. On CUDA the data wait is read
from pairs of CUDA events around each batch fetch, read once at the end: the time the GPU's stream spent
from the end of one step to the start of the next (idle while the host waits for a batch, plus the batch's
copy). On the CPU it is the wall time of each fetch. The DataLoader's queue (workers x prefetch batches),
filled during the warm-up, can hide a loader slower than the model for that many steps: the loader-alone
column says whether it keeps up for good.

MFU = img/s x training FLOPs per image / the device's peak FLOP/s, with the training FLOPs 3x the forward
FLOPs of `vit_forward_flops` (a multiply-add counts 2 FLOPs, the convention of peak TFLOP/s figures).
Needs torch, transformers (with accelerate), numpy and pyarrow only: no `datasets`, no DICOM packages.
Without CUDA the same code runs on the CPU, with a tiny model by default.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vit_spine import options
from vit_spine.options import parse_config

TRAIN_FLOPS_PER_FORWARD = 3  # the backward pass costs about twice the forward
H200_BF16_TFLOPS = 790.0


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str
    attention: str = "sdpa"
    optim: str = "adamw_torch_fused"
    compile: bool = False


VARIANTS = {
    v.name: v
    for v in (
        Variant("sdpa", "SDPA attention, fused AdamW: what `vit-spine train` runs"),
        Variant("eager", "eager attention (matmul, softmax, matmul)", attention="eager"),
        Variant("adamw_foreach", "multi-tensor AdamW instead of the fused kernel", optim="adamw_torch"),
        Variant("compile", "SDPA, fused AdamW and torch.compile (--compile_backend)", compile=True),
    )
}
BASE_VARIANT = "sdpa"  # runs at every --batch_sizes entry; the others at --variant_batch_size


@dataclass
class GpuBenchConfig:
    model_config: str = field(default="base", metadata={"help": "random-init ViT size: tiny, small or base (ViT-B/16)."})
    image_size: int = field(default=224, metadata={"help": "image side of the random shard and the model."})
    patch_size: int | None = field(default=None, metadata={"help": "ViT patch size (default: the size's own, 16)."})
    num_slices: int = field(default=20480, metadata={"help": "slices in the random shard."})
    slices_per_study: int = field(default=320, metadata={"help": "slices per study (one record batch each), as in real CT."})
    batch_sizes: str = field(default="128,256,512", metadata={"help": "comma-separated batch sizes of the SDPA rows."})
    variants: str = field(
        default=",".join(VARIANTS),
        metadata={"help": "comma-separated variants to time: " + "; ".join(f"{v.name}: {v.summary}" for v in VARIANTS.values())},
    )
    variant_batch_size: int | None = field(
        default=None, metadata={"help": "batch size of the variants other than sdpa (default: the middle of --batch_sizes)."}
    )
    warmup_steps: int = field(default=10, metadata={"help": "untimed steps before each timed window (compilation included)."})
    steps: int = field(default=50, metadata={"help": "timed optimizer steps per run."})
    workers: int | None = field(
        default=None, metadata={"help": "DataLoader workers (default: what `vit-spine train` uses on this machine)."}
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on where the GPU supports it)."})
    augment: bool = field(default=True, metadata={"help": "augment on the device in the full path, as training does."})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend of the compile variant."})
    peak_tflops: float | None = field(
        default=None,
        metadata={
            "help": f"the device's peak TFLOP/s for MFU (default: {H200_BF16_TFLOPS:g} on CUDA, the H200 bf16 figure "
            "of the issue; none on the CPU, MFU n/a)."
        },
    )
    predict_batch_sizes: str = field(default="64,256", metadata={"help": "comma-separated batch sizes for predict."})
    predict_slices: int = field(default=4096, metadata={"help": "slices per timed predict call."})
    tmp: str | None = field(default=None, metadata={"help": "folder for the random shard (default: the system's temp)."})
    seed: int = field(default=0, metadata={"help": "seed of the random pixels, labels and models."})

    def __post_init__(self) -> None:
        self.batch_list = parse_sizes(self.batch_sizes, "--batch_sizes")
        self.predict_batch_list = parse_sizes(self.predict_batch_sizes, "--predict_batch_sizes")
        self.variant_list = [name.strip() for name in self.variants.split(",") if name.strip()]
        unknown = [name for name in self.variant_list if name not in VARIANTS]
        if unknown or not self.variant_list:
            raise ValueError(f"--variants {self.variants!r}: choose from {', '.join(VARIANTS)}")
        if self.variant_batch_size is None:
            self.variant_batch_size = self.batch_list[len(self.batch_list) // 2]
        if self.warmup_steps < 1 or self.steps < 1:
            raise ValueError("--warmup_steps and --steps must be at least 1")
        largest = max(self.batch_list + [self.variant_batch_size])
        if self.num_slices < largest:
            raise ValueError(f"--num_slices {self.num_slices} is smaller than the largest batch ({largest})")
        if self.workers is not None:
            self.workers = options.capped_workers(self.workers, minimum=0)
        options.at_least(self.patch_size, 1, "--patch_size")
        options.at_least(self.slices_per_study, 1, "--slices_per_study")
        options.at_least(self.predict_slices, 1, "--predict_slices")
        options.folder_path(self.tmp, "--tmp")


def cpu_defaults() -> dict:
    """Defaults without CUDA: a tiny model that runs the same code on the CPU in about a minute.
    (inductor builds C++ for a minute per model on a small CPU; aot_eager traces the same graphs.)"""
    return dict(model_config="tiny", image_size=64, num_slices=2048, slices_per_study=64, batch_sizes="16,32,64",
                warmup_steps=3, steps=30, compile_backend="aot_eager", predict_batch_sizes="64", predict_slices=512)


def parse_sizes(text: str, option: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"{option} {text!r}: expected comma-separated integers") from error
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{option} {text!r}: expected positive integers")
    return sizes


# ---------------------------------------------------------------- FLOPs


def vit_forward_flops(config) -> float:
    """Forward FLOPs of one image through a ViT (`ViTConfig`), counting a multiply-add as 2 FLOPs.

    With d = hidden size, f = MLP size, N = patches + 1 (class token) tokens, per layer: the Q, K, V and
    output projections 4 x 2 N d^2, the MLP 2 x 2 N d f, attention scores Q K^T and their product with V
    2 x 2 N^2 d; plus the patch embedding (2 x channels p^2 d per patch) and the head (2 d x labels). Norms,
    softmax, GELU and biases are left out (under 1 %). ViT-B/16 at 224 px: N = 197, 35.1 GFLOP, which is
    the 17.6 G multiply-adds usually quoted as "17.6 GFLOPs".
    """
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    patches = (config.image_size // config.patch_size) ** 2
    tokens = patches + 1
    per_layer = tokens * (8 * d * d + 4 * d * f) + 4 * tokens * tokens * d
    embedding = patches * 2 * config.num_channels * config.patch_size**2 * d
    head = 2 * d * config.num_labels
    return float(layers * per_layer + embedding + head)


def mfu(images_per_s: float, forward_flops: float, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation of training at `images_per_s` (None without a peak to compare with)."""
    if not peak_tflops:
        return None
    return images_per_s * TRAIN_FLOPS_PER_FORWARD * forward_flops / (peak_tflops * 1e12)


# ---------------------------------------------------------------- the random shard


def write_random_shard(folder: Path, num_slices: int, image_size: int, slices_per_study: int, seed: int) -> Path:
    """A one-channel ('bone25d') shard of random pixels and labels, written as `vit-spine chunk` writes one,
    with pyarrow alone (`vit_spine.shards`)."""
    import pyarrow as pa

    from vit_spine import shards
    from vit_spine.artifacts import write_shard_meta
    from vit_spine.schema import NUM_SLICE_TARGETS, NUM_STUDY_TARGETS, VISIBLE

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    schema = shards.shard_schema(image_size, channels=1)
    with pa.OSFile(str(folder / shards.ARROW_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for study, start in enumerate(range(0, num_slices, slices_per_study)):
            n = min(slices_per_study, num_slices - start)
            labels = (rng.random((n, NUM_SLICE_TARGETS)) < 0.05).astype(np.float32)
            labels[: n // 10, VISIBLE] = np.nan  # some unknown visibility, masked in the loss as in real shards
            pixels = rng.integers(0, 256, (n, 1, image_size, image_size), dtype=np.uint8)
            writer.write_batch(shards.record_batch(
                pixels, labels, np.zeros((n, NUM_STUDY_TARGETS), np.float32), [f"1.2.826.0.{study}"] * n,
                np.arange(1, n + 1), np.arange(n, dtype=np.float32), schema,
            ))
    shards.write_dataset_files(folder, schema, "train", f"{seed:016x}")
    write_shard_meta(folder, {"num_slices": num_slices, "neighbor_offset": 1})
    return folder


# ---------------------------------------------------------------- clocks


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def release(device: torch.device) -> None:
    """Free what the last run left (models, compiled graphs, worker processes) before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class WaitClock:
    """Time spent fetching batches, without a host sync per step (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.running = False
        self.marks: list[tuple] = []

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self) -> float:
        """Total time of the marked fetches; on CUDA, call it after the last synchronize."""
        if self.cuda:
            return sum(begin.elapsed_time(end) for begin, end in self.marks) / 1000.0
        return sum(end - begin for begin, end in self.marks)


def timed_trainer_class():
    """ShardTrainer that marks the start and end of every batch fetch of the timed window."""
    from vit_spine.train import ShardTrainer

    class TimedTrainer(ShardTrainer):
        def __init__(self, *args, wait_clock: WaitClock, **kwargs):
            self.wait_clock = wait_clock
            super().__init__(*args, **kwargs)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            clock = self.wait_clock
            if not clock.running:
                return super().get_batch_samples(epoch_iterator, num_batches, device)
            begin = clock.now()
            result = super().get_batch_samples(epoch_iterator, num_batches, device)
            clock.marks.append((begin, clock.now()))
            return result

    return TimedTrainer


def timed_window_callback(warmup: int, steps: int, device: torch.device, clock: WaitClock):
    """A callback that opens the timed window at the end of the last warm-up step and closes it at the end
    of the last timed step: the only two places the host waits for the device."""
    from transformers import TrainerCallback

    class TimedWindow(TrainerCallback):
        start = stop = 0.0
        peak_gib: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                synchronize(device)
                reset_peak_memory(device)
                self.start, clock.running = time.perf_counter(), True
            elif state.global_step == warmup + steps:
                synchronize(device)
                self.stop, clock.running = time.perf_counter(), False
                self.peak_gib = peak_memory_gib(device)

    return TimedWindow()


# ---------------------------------------------------------------- runs


@dataclass
class Row:
    variant: str
    batch: int
    model_rate: float
    full_rate: float
    wait_share: float
    full_peak_gib: float | None
    loader_rate: float | None = None


def new_model(config: GpuBenchConfig, variant: Variant, device: torch.device):
    from vit_spine.models import create_model

    with device:  # initialised on the device: ViT-B's random init takes seconds on a CPU
        model = create_model(model_config=config.model_config, image_size=config.image_size, seed=config.seed,
                             patch_size=config.patch_size)
    model.set_attn_implementation(variant.attention)
    return model


def time_model_alone(config: GpuBenchConfig, variant: Variant, batch: int, device: torch.device, bf16: bool) -> float:
    """img/s of forward + backward + clipped AdamW step on one batch that is already on the device."""
    from vit_spine.data import model_input
    from vit_spine.models import MaskedBCELoss

    model = new_model(config, variant, device).train()
    forward = torch.compile(model, backend=config.compile_backend) if variant.compile else model
    fused = variant.optim == "adamw_torch_fused"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused, foreach=None if fused else True)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    shape = (batch, 3, config.image_size, config.image_size)
    pixels = model_input(torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator))
    labels = (torch.rand(batch, 14, device=device, generator=generator) < 0.05).float()
    loss_fn, known = MaskedBCELoss(), torch.tensor(labels.numel(), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = forward(pixel_values=pixels)
        loss_fn(outputs, labels, num_items_in_batch=known).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer clips too
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(config.warmup_steps):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(config.steps):
        step()
    synchronize(device)
    return batch * config.steps / (time.perf_counter() - start)


def training_args(config: GpuBenchConfig, variant: Variant, batch: int, workdir: str, bf16: bool):
    """The TrainingArguments `vit-spine train` would use here, for a run of warm-up + timed steps."""
    from transformers import TrainingArguments

    from vit_spine.train import fit_loader_options, training_defaults

    values = training_defaults()
    values.update(
        output_dir=workdir, max_steps=config.warmup_steps + config.steps, per_device_train_batch_size=batch,
        save_strategy="no", disable_tqdm=True, dataloader_drop_last=True, seed=config.seed, bf16=bf16,
        optim=variant.optim, torch_compile=variant.compile,
        torch_compile_backend=config.compile_backend if variant.compile else None,
    )
    if config.workers is not None:
        values["dataloader_num_workers"] = config.workers
    return fit_loader_options(TrainingArguments(**values))


def time_full_path(config: GpuBenchConfig, variant: Variant, batch: int, dataset, device: torch.device,
                   bf16: bool, workdir: str) -> tuple[float, float, float | None]:
    """(img/s, data-wait share, peak GiB) of ShardTrainer training on `dataset`, as `vit-spine train` runs it."""
    from transformers.trainer_callback import PrinterCallback

    from vit_spine.data import AugmentConfig
    from vit_spine.models import MaskedBCELoss
    from vit_spine.train import StopRequest, collate

    clock = WaitClock(device)
    window = timed_window_callback(config.warmup_steps, config.steps, device, clock)
    trainer = timed_trainer_class()(
        model=new_model(config, variant, device), args=training_args(config, variant, batch, workdir, bf16),
        train_dataset=dataset, data_collator=collate, compute_loss_func=MaskedBCELoss(),
        callbacks=[StopRequest(), window],  # StopRequest as in training (no signal handler installed)
        augment=AugmentConfig() if config.augment else None, schedule_total=config.warmup_steps + config.steps,
        wait_clock=clock,
    )
    trainer.remove_callback(PrinterCallback)  # it would print every log line
    trainer.train()
    seconds = window.stop - window.start
    wait = clock.seconds()
    del trainer  # with its persistent workers, before the next run starts its own
    return batch * config.steps / seconds, wait / seconds, window.peak_gib


def time_loader(config: GpuBenchConfig, batch: int, dataset, device: torch.device, args) -> float:
    """img/s of the training DataLoader alone, each batch copied to the device, after its queue has drained once."""
    from torch.utils.data import DataLoader, RandomSampler

    from vit_spine.train import collate

    queue = max(1, args.dataloader_num_workers) * (args.dataloader_prefetch_factor or 1)
    warmup, timed = queue + 1, max(config.steps, 2 * queue)
    sampler = RandomSampler(dataset, num_samples=(warmup + timed) * batch)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, collate_fn=collate, drop_last=True,
                        num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                        prefetch_factor=args.dataloader_prefetch_factor)
    batches = iter(loader)
    for _ in range(warmup):
        next(batches)["pixel_values"].to(device, non_blocking=True)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(timed):
        next(batches)["pixel_values"].to(device, non_blocking=True)
    synchronize(device)
    rate = batch * timed / (time.perf_counter() - start)
    del batches
    return rate


def time_predict(config: GpuBenchConfig, dataset, device: torch.device) -> dict[int, float]:
    """slices/s of `Predictor.slice_probabilities` (predict's own loop) per batch size, from host uint8 slices."""
    from vit_spine.predict import Predictor

    model = new_model(config, VARIANTS[BASE_VARIANT], device).eval()
    # only the model and the device matter to slice_probabilities; the rest of a Predictor stays empty
    predictor = Predictor(**{f.name: None for f in dataclasses.fields(Predictor)} | {"model": model, "device": device})
    count = min(config.predict_slices, len(dataset))
    pixels = dataset.read_uint8(np.arange(count))
    rates = {}
    for batch in config.predict_batch_list:
        predictor.slice_probabilities(pixels[: 2 * batch], batch)  # warm-up; it returns host arrays, so it waited
        start = time.perf_counter()
        predictor.slice_probabilities(pixels, batch)
        rates[batch] = count / (time.perf_counter() - start)
    return rates


# ---------------------------------------------------------------- report


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def format_table(rows: list[Row], forward_flops: float, peak_tflops: float | None) -> str:
    header = ("variant", "batch", "model img/s", "full img/s", "full/model", "MFU model", "MFU full", "data wait",
              "loader img/s", "peak GiB")
    lines = [header]
    for r in rows:
        lines.append((
            r.variant, str(r.batch), f"{r.model_rate:.1f}", f"{r.full_rate:.1f}", f"{r.full_rate / r.model_rate:.3f}",
            percent(mfu(r.model_rate, forward_flops, peak_tflops)), percent(mfu(r.full_rate, forward_flops, peak_tflops)),
            percent(r.wait_share), "-" if r.loader_rate is None else f"{r.loader_rate:.0f}",
            "n/a" if r.full_peak_gib is None else f"{r.full_peak_gib:.2f}",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rule = "|".join("-" * (w + 2) for w in widths)
    text = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    return "\n".join([text[0], "|" + rule + "|", *text[1:]])


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"


def runs(config: GpuBenchConfig) -> list[tuple[Variant, int]]:
    """(variant, batch size) pairs in the order they are timed."""
    pairs = []
    for name in config.variant_list:
        sizes = config.batch_list if name == BASE_VARIANT else [config.variant_batch_size]
        pairs += [(VARIANTS[name], batch) for batch in sizes]
    return pairs


def run(config: GpuBenchConfig) -> list[Row]:
    import transformers

    from vit_spine.data import ShardDataset
    from vit_spine.train import training_defaults

    began = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = training_defaults()["bf16"] if config.bf16 is None else config.bf16
    peak_tflops = config.peak_tflops if config.peak_tflops is not None else (H200_BF16_TFLOPS if device.type == "cuda" else None)
    model_config = new_model(config, VARIANTS[BASE_VARIANT], torch.device("meta")).config
    forward_flops = vit_forward_flops(model_config)
    print(f"device: {describe_device(device)}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"ViT-{config.model_config} at {config.image_size} px (patch {model_config.patch_size}, "
          f"{(config.image_size // model_config.patch_size) ** 2 + 1} tokens): {forward_flops / 1e9:.4g} GFLOP forward, "
          f"{TRAIN_FLOPS_PER_FORWARD * forward_flops / 1e9:.4g} per training image; peak "
          f"{'n/a' if peak_tflops is None else f'{peak_tflops:g} TFLOP/s'}; bf16 {'on' if bf16 else 'off'}", flush=True)
    with tempfile.TemporaryDirectory(dir=config.tmp) as tmp:
        start = time.perf_counter()
        shard = write_random_shard(Path(tmp) / "shard", config.num_slices, config.image_size, config.slices_per_study,
                                   config.seed)
        dataset = ShardDataset(shard)
        print(f"random bone25d shard: {len(dataset)} slices written in {time.perf_counter() - start:.1f} s", flush=True)
        args = training_args(config, VARIANTS[BASE_VARIANT], config.batch_list[0], tmp, bf16)
        print(f"{config.steps} timed steps after {config.warmup_steps} warm-up steps; full path with "
              f"{args.dataloader_num_workers} DataLoader worker(s), prefetch {args.dataloader_prefetch_factor or '-'}, "
              f"pin_memory {args.dataloader_pin_memory}, augment {'on' if config.augment else 'off'}", flush=True)
        rows = []
        for variant, batch in runs(config):
            model_rate = time_model_alone(config, variant, batch, device, bf16)
            release(device)
            full_rate, wait, peak = time_full_path(config, variant, batch, dataset, device, bf16, tmp)
            release(device)
            loader_rate = time_loader(config, batch, dataset, device, args) if variant.name == BASE_VARIANT else None
            rows.append(Row(variant.name, batch, model_rate, full_rate, wait, peak, loader_rate))
            print(f"  {variant.name} batch {batch}: model {model_rate:.1f} img/s, full {full_rate:.1f} img/s, "
                  f"data wait {percent(wait)}", flush=True)
        print()
        print(format_table(rows, forward_flops, peak_tflops))
        best = max(rows, key=lambda r: r.full_rate)
        ceiling = f"; ceiling at 100 % MFU {peak_tflops * 1e12 / (TRAIN_FLOPS_PER_FORWARD * forward_flops):.0f} img/s" if peak_tflops else ""
        print(f"best full path: {best.full_rate:.1f} img/s ({best.variant}, batch {best.batch}), MFU "
              f"{percent(mfu(best.full_rate, forward_flops, peak_tflops))}{ceiling}")
        from vit_spine.inference import autocast_dtype

        precision = "fp32" if autocast_dtype(device) is None else "bf16"  # the rule predict's forward passes follow
        for batch, rate in time_predict(config, dataset, device).items():
            print(f"predict (Predictor.slice_probabilities, uint8 host batches, {precision}): "
                  f"batch {batch}: {rate:.1f} slices/s")
        del dataset
    print(f"total {time.perf_counter() - began:.0f} s")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    (config,) = parse_config(
        GpuBenchConfig, argv, prog="vit-spine bench gpu", description=__doc__.split("\n")[0],
        defaults=None if torch.cuda.is_available() else cpu_defaults(),
    )
    if not torch.cuda.is_available():
        print("no CUDA device: running on the CPU (tiny defaults unless given); these are not GPU figures", file=sys.stderr)
    run(config)
    return 0
