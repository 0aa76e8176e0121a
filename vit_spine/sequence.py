"""The learned study head: a small bidirectional GRU over a study's z-ordered slice logits -> C1-C7 and patient logits.

Why a sequence model: on the slices where two vertebrae are visible, the slice model's fracture score of the
fractured vertebra's neighbour fires as high as the fractured one's, and a max over slices cannot tell them
apart. Looking along z can: a break of C2 also shows on the slices where only C2 is visible, a break of C3 on
slices of C3 alone. The top RSNA 2022 solutions all put such a model over the slice sequence.

Shape of the head, kept small because it learns from a few hundred studies:
- one GRU, its weights shared by the seven vertebrae: vertebra v reads, per slice, its own fracture and
  visibility logits, those of its neighbours v-1 and v+1 (a missing neighbour reads "absent"), and which
  vertebra it is (one-hot). Sharing gives it seven sequences per study to learn from.
- per slice it gives a score and an attention weight; the vertebra's logit is the attention-weighted mean of
  the scores (a soft max over z that does not grow with the number of slices).
- the patient logit is an affine function of the log-sum-exp of the vertebra logits (a soft "any vertebra").
- a study longer than `max_length` slices is max-pooled into `max_length` bins along z first, so the cost and
  the input statistics do not depend on the slice thickness.
It is fitted with the competition's weights (patient 7 / 14, vertebra 1 / 2 for a negative / positive label)
on full batches with AdamW, from a fixed seed on the CPU: the same sequences give the same head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vit_spine.metrics import NEGATIVE_WEIGHTS, POSITIVE_WEIGHTS
from vit_spine.schema import FRACTURES, NUM_SLICE_TARGETS, NUM_STUDY_TARGETS, VERTEBRAE, VISIBLE

N_VERTEBRAE = len(VERTEBRAE)
LOGIT_CLIP = 12.0  # slice logits beyond +-12 (p within 6e-6 of 0 or 1) carry no more information here
ABSENT = -LOGIT_CLIP  # what a missing neighbour (left of C1, right of C7) reads: not visible, not fractured
FEATURES = 6 + N_VERTEBRAE  # own, upper and lower neighbour (fracture, visible) + which vertebra


@dataclass(frozen=True)
class HeadConfig:
    """The sequence head's sizes and fitting schedule (PoolingConfig's `sequence_*` options)."""

    hidden: int = 16
    members: int = 3
    max_length: int = 64
    epochs: int = 150
    learning_rate: float = 0.01
    weight_decay: float = 0.01


def logits_of(slice_probs: np.ndarray) -> np.ndarray:
    """(n, 14) probabilities -> float32 logits clipped to +-LOGIT_CLIP (aggregators are handed probabilities)."""
    p = np.clip(np.asarray(slice_probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.clip(np.log(p) - np.log1p(-p), -LOGIT_CLIP, LOGIT_CLIP).astype(np.float32)


def binned(logits: np.ndarray, max_length: int) -> np.ndarray:
    """(n, 14) -> (min(n, max_length), 14): consecutive slices max-pooled into equal bins along z."""
    n = len(logits)
    if n <= max_length:
        return logits
    edges = np.linspace(0, n, max_length + 1).round().astype(int)
    return np.maximum.reduceat(logits, edges[:-1], axis=0)


def vertebra_features(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, 14) slice logits -> (B * 7, T, FEATURES): per vertebra its own, its neighbours' and its one-hot."""
    batch, length, _ = logits.shape
    fracture, visible = logits[..., FRACTURES], logits[..., VISIBLE]
    pad = torch.full((batch, length, 1), ABSENT, dtype=logits.dtype, device=logits.device)
    padded_f, padded_v = torch.cat([pad, fracture, pad], dim=-1), torch.cat([pad, visible, pad], dim=-1)
    own = torch.stack([fracture, visible], dim=-1)  # (B, T, 7, 2)
    upper = torch.stack([padded_f[..., :-2], padded_v[..., :-2]], dim=-1)
    lower = torch.stack([padded_f[..., 2:], padded_v[..., 2:]], dim=-1)
    which = torch.eye(N_VERTEBRAE, dtype=logits.dtype, device=logits.device).expand(batch, length, -1, -1)
    features = torch.cat([own / LOGIT_CLIP, upper / LOGIT_CLIP, lower / LOGIT_CLIP, which], dim=-1)  # (B, T, 7, F)
    return features.permute(0, 2, 1, 3).reshape(batch * N_VERTEBRAE, length, FEATURES)


class SequenceHead(nn.Module):
    """(B, T, 14) slice logits + (B, T) mask of real slices -> (B, 8) study logits [patient_overall, C1..C7]."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.gru = nn.GRU(FEATURES, hidden, batch_first=True, bidirectional=True)
        self.slice_out = nn.Linear(2 * hidden, 2)  # per slice: score, attention
        # patient = a * logsumexp(vertebra logits) + b, starting at a = 1, b = 0: "any vertebra broken". A random
        # start could make `a` negative, and the fit then ranks the patients backwards.
        self.patient = nn.Linear(1, 1)
        nn.init.ones_(self.patient.weight)
        nn.init.zeros_(self.patient.bias)
        self.max_weight = nn.Parameter(torch.ones(()))

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = logits.shape
        real = mask.repeat_interleave(N_VERTEBRAE, dim=0)
        # The padding after a shorter study reads "nothing visible, nothing broken" (`padded_batch`): to the GRU
        # the scan just goes on past the neck, so no packing is needed (on a CPU it costs 3x the time).
        states, _ = self.gru(vertebra_features(logits))
        score, attention = self.slice_out(states).unbind(-1)  # (B * 7, T) each
        weights = torch.softmax(attention.masked_fill(~real, float("-inf")), dim=-1)
        vertebra = (weights * score).sum(-1).reshape(batch, N_VERTEBRAE)
        # plus a learned multiple of the vertebra's max slice logit: the head starts from what max-pooling knows
        strongest = logits[..., FRACTURES].masked_fill(~mask[..., None], -LOGIT_CLIP).amax(dim=1)
        vertebra = vertebra + self.max_weight * strongest
        patient = self.patient(torch.logsumexp(vertebra, dim=-1, keepdim=True))
        return torch.cat([patient, vertebra], dim=-1)


def padded_batch(studies: Sequence[np.ndarray], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice logits of many studies -> (B, T, 14) padded after each study's end with ABSENT (no vertebra visible,
    none broken: what a slice beyond the neck reads), (B, T) mask of real slices."""
    pieces = [binned(s, max_length) for s in studies]
    length = max((len(p) for p in pieces), default=1)
    batch = np.full((len(pieces), length, NUM_SLICE_TARGETS), ABSENT, dtype=np.float32)
    mask = np.zeros((len(pieces), length), dtype=bool)
    for i, piece in enumerate(pieces):
        batch[i, : len(piece)] = piece
        mask[i, : len(piece)] = True
    return torch.from_numpy(batch), torch.from_numpy(mask)


class HeadEnsemble(nn.Module):
    """`members` heads fitted from different seeds; the study logits are their mean. Fitted on a few hundred
    studies, one head's result depends on its random start (measured on the demo: 0.28 to 0.38 weighted log loss
    on the same sequences); the mean of a few is steadier."""

    def __init__(self, hidden: int, members: int) -> None:
        super().__init__()
        self.members = nn.ModuleList(SequenceHead(hidden) for _ in range(members))

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(logits, mask) for member in self.members]).mean(0)


def fit_head(studies: Sequence[np.ndarray], labels: np.ndarray, config: HeadConfig, seed: int) -> HeadEnsemble:
    """Fit `config.members` heads on the slice logits (n_i, 14) of each study and its labels (m, 8), member i
    from seed `seed * 1000 + i`; deterministic for a seed."""
    ensemble = HeadEnsemble(config.hidden, config.members)
    for i in range(config.members):
        ensemble.members[i] = fit_member(studies, labels, config, seed * 1000 + i)
    return ensemble.eval()


def fit_member(studies: Sequence[np.ndarray], labels: np.ndarray, config: HeadConfig, seed: int) -> SequenceHead:
    """Fit one head on the slice logits (n_i, 14) of each study and its labels (m, 8); deterministic for a seed."""
    if len(studies) != len(labels) or not len(studies):
        raise ValueError(f"the sequence head needs one label row per study, got {len(studies)} studies, {len(labels)} rows")
    with torch.random.fork_rng(devices=[]):  # the caller's RNG (training's) is left as it was
        torch.manual_seed(seed)
        head = SequenceHead(config.hidden)
        x, mask = padded_batch(studies, config.max_length)
        y = torch.as_tensor(labels, dtype=torch.float32)
        weights = torch.as_tensor(np.where(labels == 1, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS), dtype=torch.float32)
        weights = weights / weights.sum(dim=1, keepdim=True)  # each study counts once, as in the metric
        optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        for _ in range(config.epochs):
            optimizer.zero_grad()
            loss = (weights * nn.functional.binary_cross_entropy_with_logits(head(x, mask), y, reduction="none")).sum(1).mean()
            loss.backward()
            optimizer.step()
    return head.eval()


@torch.inference_mode()
def head_probabilities(head: HeadEnsemble, studies: Sequence[np.ndarray], max_length: int) -> np.ndarray:
    """(m, 8) float64 probabilities of each study's slice logits (n_i, 14)."""
    if not len(studies):
        return np.zeros((0, NUM_STUDY_TARGETS))
    x, mask = padded_batch(studies, max_length)
    return 1.0 / (1.0 + np.exp(-head(x, mask).double().numpy()))


def save_head(head: HeadEnsemble, path: Path, metadata: dict[str, str] | None = None) -> None:
    """The head's tensors (and `metadata`, strings) as safetensors, written atomically."""
    from safetensors.torch import save

    from vit_spine.fs import write_bytes_atomic

    write_bytes_atomic(Path(path), save({k: v.contiguous() for k, v in head.state_dict().items()}, metadata=metadata))


def load_head(path: Path, config: HeadConfig) -> tuple[HeadEnsemble, dict[str, str]]:
    """(the head saved at `path`, its metadata); ValueError naming the file when it does not fit `config`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    head = HeadEnsemble(config.hidden, config.members)
    try:
        with safe_open(str(path), "pt") as stored:
            metadata = stored.metadata() or {}
        head.load_state_dict(load_file(str(path)))
    except (RuntimeError, SafetensorError) as error:
        raise ValueError(f"{path}: not a sequence head of {config.members} members of hidden size {config.hidden} "
                         f"({str(error).splitlines()[0]})") from None
    return head.eval(), metadata
