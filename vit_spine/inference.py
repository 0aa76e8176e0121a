"""The one way slices become model outputs: uint8 slice batches -> logits (n, 14) -> probabilities.

`vit-spine evaluate`, training's per-shard validation, `report` and `predict` all call `predict_logits`
(through `predict_probabilities`), so a slice gets the same logits whichever of them scores it:
- **one precision rule** (`autocast_dtype`): bf16 autocast on CUDA where the GPU supports bf16, fp32
  everywhere else. The training run's `--bf16` does not change it: a checkpoint is scored the same way
  whether it is being trained, evaluated or deployed.
- **the same batches**: batches never span two studies (`batch_plan`), and a study's slices are cut into
  `batch_size` pieces from its first slice on. A shard's study and the same study decoded by `predict`
  therefore go through the model in identical batches (on a GPU a kernel may depend on the batch shape).
- uint8 pixels go to the device (pinned, non-blocking on CUDA) and are normalised there
  (`data.normalize`); the logits stay on the device until one `.cpu()` at the end.
- under `accelerate launch` (several processes) each process runs a contiguous share of the batches
  and every process gets all rows back, in order.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from vit_spine.data import normalize


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The one precision rule: bf16 on CUDA with bf16 support, None (fp32) anywhere else."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float64 probabilities of logits, evaluated in float64 (the one place the model's outputs become probabilities)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def batch_plan(num_slices: int, batch_size: int, study_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Row indices of each batch: consecutive rows, at most `batch_size`, never two studies in one batch.

    `study_ids` (n,) names each row's study (a study's rows are contiguous, as in a shard); None: all
    rows are one study (a decoded volume).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if study_ids is None or num_slices == 0:
        starts = np.array([0]) if num_slices else np.zeros(0, dtype=int)
    else:
        ids = np.asarray(study_ids)
        starts = np.concatenate([[0], np.flatnonzero(ids[1:] != ids[:-1]) + 1])
    ends = [*starts[1:], num_slices]
    return [np.arange(s, min(s + batch_size, end)) for start, end in zip(starts, ends) for s in range(start, end, batch_size)]


def read_pixels(slices: np.ndarray | torch.utils.data.Dataset, rows: np.ndarray) -> np.ndarray | torch.Tensor:
    """uint8 (len(rows), 3, S, S) of `rows` of `slices`: a rendered volume uint8 (n, 3, S, S), or a Dataset of
    shard items (`data.ShardDataset`, a ConcatDataset of them, any Dataset of {"pixel_values": uint8 (3, S, S)})."""
    if isinstance(slices, np.ndarray):
        return slices[rows]
    if hasattr(slices, "read_uint8"):  # a ShardDataset: one copy out of the memory map
        return slices.read_uint8(rows)
    if isinstance(slices, torch.utils.data.Subset) and hasattr(slices.dataset, "read_uint8"):  # some studies of a shard
        return slices.dataset.read_uint8(np.asarray(slices.indices)[rows])
    if isinstance(slices, torch.utils.data.ConcatDataset):
        part = bisect.bisect_right(slices.cumulative_sizes, int(rows[0]))
        offset = slices.cumulative_sizes[part - 1] if part else 0
        if int(rows[-1]) < slices.cumulative_sizes[part]:  # a batch of one study lies in one shard
            return read_pixels(slices.datasets[part], rows - offset)
    return torch.stack([slices[int(i)]["pixel_values"] for i in rows])


def process_share(batches: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """(this process's contiguous share of `batches`, number of processes): all of them in one process."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == 1:
        return batches, 1
    shares = np.array_split(np.arange(len(batches)), state.num_processes)
    return [batches[i] for i in shares[state.process_index]], state.num_processes


@torch.inference_mode()
def _forward(model, slices: np.ndarray | torch.utils.data.Dataset, batches: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    dtype = autocast_dtype(device)
    pin = device.type == "cuda"
    outputs = []
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for rows in batches:
            pixels = torch.as_tensor(read_pixels(slices, rows))
            if pin:
                pixels = pixels.pin_memory()  # so the copy below runs while the previous batch computes
            pixels = pixels.to(device, non_blocking=True)
            outputs.append(model(pixel_values=normalize(pixels)).logits.float())
    if not outputs:
        return torch.zeros((0, model.config.num_labels), device=device)
    return torch.cat(outputs)


def predict_logits(model, slices: np.ndarray | torch.utils.data.Dataset, batch_size: int, study_ids: np.ndarray | None = None) -> np.ndarray:
    """float32 logits (n, 14) of every slice of `slices` (see `read_pixels`), in order, computed on the model's
    device in eval mode (the model's train/eval mode is restored after). `study_ids`: see `batch_plan`."""
    device = next(model.parameters()).device
    batches, num_processes = process_share(batch_plan(len(slices), batch_size, study_ids))
    was_training = model.training
    model.eval()
    try:
        logits = _forward(model, slices, batches, device).cpu().numpy()  # the one host sync
    finally:
        model.train(was_training)
    if num_processes > 1:
        from accelerate.utils import gather_object

        logits = np.concatenate(gather_object([logits]))
    return logits


def predict_probabilities(model, slices: np.ndarray | torch.utils.data.Dataset, batch_size: int, study_ids: np.ndarray | None = None) -> np.ndarray:
    """float64 sigmoid probabilities (n, 14) of `predict_logits`."""
    return sigmoid(predict_logits(model, slices, batch_size, study_ids))
