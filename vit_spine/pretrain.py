"""`vit-spine pretrain`: self-supervised ViTMAE pretraining on the shards' pixels (labels unused).

A masked autoencoder (`transformers.ViTMAEForPreTraining`) learns to fill in the masked patches of the
training shards' slices; its encoder has the shape `vit-spine train --model_config` builds (the ViT presets of
`vit_spine.models.vit`, same image and patch size) and sees the input `train` feeds the classifier
(`data.model_input` of the uint8 pixels, no augmentation). At the end OUTPUT_DIR/encoder holds that encoder as a
`ViTModel` folder (config.json model_type "vit", no pooler), which `vit-spine train --model_name_or_path
OUTPUT_DIR/encoder` starts from: every encoder tensor as pretrained (MAE's fixed sin-cos position embeddings
become the ViT's learned ones), only the 14-output head new. No masking is applied at fine-tune time.

One `Trainer` over every training shard (and, with --include_validation, the validation shards); a kill at any
moment, then the same command again, continues from the newest complete Trainer checkpoint
(OUTPUT_DIR/trainer/checkpoint-N, marked as train marks its own). OUTPUT_DIR/run_config.json records what the
run was started with; a different one is refused.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from transformers import TrainerCallback, TrainingArguments

from vit_spine import options
from vit_spine.artifacts import RunDir, load_manifest, plan_fingerprint, train_shards, val_shards
from vit_spine.data import ShardDataset, collate_batch
from vit_spine.fs import FolderLock, durable_replace, flush_folder_files, write_json_atomic
from vit_spine.options import aliases, parse_config
from vit_spine.schema import MANIFEST_FILE, TRAINER_DIR
from vit_spine.train import (
    AlignLogs,
    MarkedUint8Trainer,
    StopRequest,
    fit_loader_options,
    last_complete_checkpoint,
    shard_train_loss,
    training_defaults,
)

ENCODER_DIR = "encoder"  # OUTPUT_DIR/encoder: the ViT encoder, for `vit-spine train --model_name_or_path`
PRETRAINING_FILE = "vit_spine_pretraining.json"  # in OUTPUT_DIR/encoder: what it was pretrained on, and how long
RESULTS_FILE = "pretrain_results.json"  # OUTPUT_DIR: steps, loss, slices, time of the run
RUN_KIND = "pretrain"  # run_config.json `command`: a train run folder is never continued as a pretraining

# The MAE decoder by encoder preset: light, as in the MAE paper (it is dropped after pretraining).
DECODER_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                 decoder_intermediate_size=256),
    "small": dict(decoder_hidden_size=256, decoder_num_hidden_layers=4, decoder_num_attention_heads=8,
                  decoder_intermediate_size=1024),
    "base": dict(decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
                 decoder_intermediate_size=2048),
}

# ViTConfig fields the encoder shares with ViTMAEConfig (copied when the encoder is saved as a ViT)
SHARED_CONFIG = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                 "initializer_range", "layer_norm_eps", "qkv_bias")


@dataclass
class PretrainConfig:
    chunks: str = field(metadata={"help": "folder written by `vit-spine chunk` (holds manifest.json); its training "
                                          "shards' pixels are the data (labels are not read)."})
    model_config: str = field(
        default="base",
        metadata={"help": "encoder size, as `vit-spine train --model_config` builds it: tiny, small or base (ViT-B/16)."},
    )
    patch_size: int | None = field(
        default=None, metadata={"help": "ViT patch size (default: the preset's, 16); must divide the chunks' image size."}
    )
    mask_ratio: float = field(default=0.75, metadata={"help": "fraction of each image's patches masked (0 < r < 1)."})
    norm_pix_loss: bool = field(
        default=False, metadata={"help": "reconstruct each patch normalised to zero mean and unit variance (MAE paper)."}
    )
    include_validation: bool = field(
        default=False,
        metadata={"help": "pretrain on the validation shards' pixels too. Their labels are never read, so nothing "
                  "about labels leaks, but the encoder does see the validation images that `train` scores on."},
    )

    def __post_init__(self):
        from vit_spine.models.vit import PRESETS

        if self.model_config not in PRESETS:
            raise ValueError(f"--model_config {self.model_config!r}: choose from {', '.join(PRESETS)}")
        options.at_least(self.patch_size, 1, "--patch_size")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"--mask_ratio must be in (0, 1), got {self.mask_ratio}")
        options.folder_path(self.chunks, "--chunks")
        chunks = Path(self.chunks)
        if not chunks.is_dir():
            raise FileNotFoundError(f"--chunks {chunks}: no such folder; give the --output_dir of `vit-spine chunk`")
        if not (chunks / MANIFEST_FILE).is_file():
            raise FileNotFoundError(f"--chunks {chunks}: no {MANIFEST_FILE}; give the --output_dir of `vit-spine chunk`")
        image_size = load_manifest(chunks)["preprocess"]["image_size"]
        if image_size % self.encoder_sizes()["patch_size"]:
            raise ValueError(f"--patch_size {self.encoder_sizes()['patch_size']} does not divide the chunks' image size "
                             f"{image_size}: choose a divisor of {image_size}")

    def encoder_sizes(self) -> dict[str, int]:
        """The ViT preset's sizes, with --patch_size."""
        from vit_spine.models.vit import PRESETS

        sizes = dict(PRESETS[self.model_config])
        if self.patch_size is not None:
            sizes["patch_size"] = self.patch_size
        return sizes


# TrainingArguments values a pretraining run cannot honour: (the accepted value, why another is refused).
NOT_HONOURED: dict[str, tuple[object, str]] = {
    "resume_from_checkpoint": (None, "a run resumes by itself: run the same command again with the same --output_dir"),
    "eval_strategy": ("no", "pretraining has no evaluation set; score the fine-tuned model with `vit-spine train`"),
    "eval_on_start": (False, "pretraining has no evaluation set"),
    "load_best_model_at_end": (False, "pretraining has no evaluation set; OUTPUT_DIR/encoder is the last step's"),
    "push_to_hub": (False, "push the fine-tuned checkpoint instead (`vit-spine train --push_to_hub`, `vit-spine push`)"),
}


@dataclass
class PretrainArguments(TrainingArguments):
    """TrainingArguments as `vit-spine pretrain` takes them: --output_dir is the pretraining folder (required)."""

    output_dir: str = field(
        metadata={"help": "pretraining folder: run_config.json, trainer/checkpoint-N (Trainer checkpoints), and at the "
                  f"end {ENCODER_DIR}/ (for `vit-spine train --model_name_or_path OUTPUT_DIR/{ENCODER_DIR}`) and "
                  f"{RESULTS_FILE}.", "aliases": aliases("output")}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "passes over the pretraining slices."})
    max_steps: int = field(
        default=-1, metadata={"help": "optimizer steps of the whole run; overrides --num_train_epochs (-1: no limit)."}
    )

    def __post_init__(self):
        refuse_not_honoured(self)
        super().__post_init__()


def refuse_not_honoured(args) -> None:
    for name, (accepted, why) in NOT_HONOURED.items():
        value = getattr(args, name)
        if value != accepted:
            raise ValueError(f"--{name} {getattr(value, 'value', value)}: not supported by `vit-spine pretrain`: {why}")
    if args.save_strategy == "best":
        raise ValueError("--save_strategy best: not supported by `vit-spine pretrain`: there is no evaluation; "
                         "choose steps, epoch or no")


class PixelDataset(torch.utils.data.Dataset):
    """The pixels of several shards as one Dataset: items {"pixel_values": uint8 (3, S, S)}, no labels.

    `__getitems__` reads a batch with one `ShardDataset.read_uint8` per shard it touches, into one tensor
    whose rows `data.collate_batch` hands on without a copy."""

    def __init__(self, shards: Sequence[ShardDataset]):
        self.shards = list(shards)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.image_size = self.shards[0].image_size

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices) -> list[dict[str, torch.Tensor]]:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        size = self.image_size
        out = np.empty((len(indices), 3, size, size), np.uint8)
        which = np.searchsorted(self.starts, indices, side="right") - 1
        for k in np.unique(which):
            rows = np.flatnonzero(which == k)
            out[rows] = self.shards[k].read_uint8(indices[rows] - self.starts[k])
        return [{"pixel_values": row} for row in torch.from_numpy(out)]


class PretrainTrainer(MarkedUint8Trainer):
    """train's uint8 Trainer (`model_input` on the device, no augmentation: the input `train` gives the classifier;
    each checkpoint marked complete), resuming from the weights `from_pretrained` loaded."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        # The weights came from `from_pretrained(checkpoint)`, which maps the names transformers saves back; the
        # Trainer's own strict=False load does not (it would warn that every layer is missing, and load none).
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)


@dataclass
class PretrainResult:
    model: torch.nn.Module  # the ViTMAEForPreTraining after the last step
    encoder: Path | None  # OUTPUT_DIR/encoder (None when stopped by a signal)
    global_step: int
    num_slices: int  # slices in the pretraining data (training shards, plus validation with --include_validation)
    train_loss: float  # mean reconstruction loss over the run's steps, across resumes
    interrupted: bool  # stopped by a signal; run the same command again to continue


def mae_config(config: PretrainConfig, image_size: int):
    from transformers import ViTMAEConfig

    return ViTMAEConfig(image_size=image_size, num_channels=3, **config.encoder_sizes(), mask_ratio=config.mask_ratio,
                        norm_pix_loss=config.norm_pix_loss, **DECODER_PRESETS[config.model_config])


def sincos_position_embedding(num_patches: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding (1, num_patches + 1, dim), a zero row for the CLS token, in the
    layout of the released ViTMAE weights (the two halves rotated, as transformers' `initialize_weights` does)."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    grid = int(round(num_patches**0.5))
    table = build_2d_sinusoidal_position_embedding(height=grid, width=grid, embed_dim=dim, cls_token=True)
    half = dim // 2
    return torch.cat([table[..., half:], table[..., :half]], dim=-1).unsqueeze(0)


@torch.no_grad()
def init_mae(model) -> None:
    """The MAE paper's initialisation of what a random-init ViTMAEForPreTraining (transformers 5.x) leaves
    wrong: its `_init_weights` skips the embeddings' own init and zeroes the decoder's, so both fixed position
    embeddings (never trained) would stay zero, leaving the model without any position information. Here:
    sin-cos position embeddings for encoder and decoder, xavier-uniform patch projection, N(0, 0.02) CLS and
    mask tokens (drawn from torch's RNG, seeded before)."""
    embeddings, decoder = model.vit.embeddings, model.decoder
    num_patches = embeddings.patch_embeddings.num_patches
    embeddings.position_embeddings.copy_(sincos_position_embedding(num_patches, embeddings.position_embeddings.shape[-1]))
    decoder.decoder_pos_embed.copy_(sincos_position_embedding(num_patches, decoder.decoder_pos_embed.shape[-1]))
    weight = embeddings.patch_embeddings.projection.weight
    torch.nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    torch.nn.init.normal_(embeddings.cls_token, std=model.config.initializer_range)
    torch.nn.init.normal_(decoder.mask_token, std=model.config.initializer_range)


def freeze_position_embeddings(model) -> None:
    """MAE's position embeddings are fixed (requires_grad False), as the MAE model creates them."""
    model.vit.embeddings.position_embeddings.requires_grad_(False)
    model.decoder.decoder_pos_embed.requires_grad_(False)


def pretraining_data(config: PretrainConfig, manifest: dict) -> tuple[PixelDataset, list[str]]:
    chunks = Path(config.chunks)
    entries = train_shards(manifest) + (val_shards(manifest) if config.include_validation else [])
    if not train_shards(manifest):
        raise ValueError(f"{chunks / MANIFEST_FILE} lists no training shard")
    missing = [e["path"] for e in entries if not e["complete"]]
    if missing:
        raise FileNotFoundError(f"shards listed in {chunks / MANIFEST_FILE} are not written yet: {', '.join(missing)}; "
                                "finish `vit-spine chunk` first")
    return PixelDataset([ShardDataset(chunks / e["path"]) for e in entries]), [e["path"] for e in entries]


def check_run_folder(output: Path, identity: dict) -> None:
    """Refuse a folder that holds another kind of run (a `vit-spine train` one), or a pretraining started with
    other chunks, sizes or masking (`RunDir.check_run_config`)."""
    run = RunDir(output)
    saved = run.read_run_config("use a new --output_dir folder, or delete it and run the same `vit-spine pretrain` "
                                "command again")
    if isinstance(saved, dict) and saved.get("command") != RUN_KIND:
        raise ValueError(f"--output_dir {output}: holds a `vit-spine train` run, not a pretraining; use a new --output_dir folder")
    run.check_run_config(identity)


def pretrain(config: PretrainConfig, args: TrainingArguments, callbacks: Sequence[TrainerCallback] = ()) -> PretrainResult:
    """Pretrain (or continue pretraining) in `args.output_dir`; the encoder is written at the end."""
    refuse_not_honoured(args)
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"--output_dir {output}: a file, not a folder")
    lock = FolderLock(output, "vit-spine pretrain") if PartialState().is_main_process else contextlib.nullcontext()
    with lock:
        return _pretrain(config, args, callbacks)


def _pretrain(config: PretrainConfig, args: TrainingArguments, callbacks: Sequence[TrainerCallback]) -> PretrainResult:
    from transformers import ViTMAEForPreTraining

    start = time.time()
    output, chunks = Path(args.output_dir), Path(config.chunks)
    manifest = load_manifest(chunks)
    image_size = int(manifest["preprocess"]["image_size"])
    dataset, shard_paths = pretraining_data(config, manifest)
    identity = {
        "command": RUN_KIND,
        "model": "vit_mae",  # `vit-spine train` compares its --model_name_or_path with it: a train run here is refused
        "chunks": str(chunks.resolve()),
        "model_config": config.model_config,
        "patch_size": config.encoder_sizes()["patch_size"],
        "image_size": image_size,
        "mask_ratio": config.mask_ratio,
        "norm_pix_loss": config.norm_pix_loss,
        "include_validation": config.include_validation,
        "preprocess": manifest["preprocess"],
        "manifest": plan_fingerprint(manifest),
    }
    state = PartialState()
    check_run_folder(output, identity)
    if state.is_main_process:
        RunDir(output).write_run_config(identity)
    state.wait_for_everyone()

    args = copy.copy(args)
    args.output_dir = str(output / TRAINER_DIR)
    if state.is_main_process:
        last_complete_checkpoint(Path(args.output_dir), remove_torn=True)
    state.wait_for_everyone()
    resume_from = last_complete_checkpoint(Path(args.output_dir), remove_torn=False)
    if resume_from is not None:
        print(f"pretrain: resuming from {resume_from}", flush=True)
        # from_pretrained maps the saved names back (the Trainer's own strict=False load may skip renamed ones);
        # the Trainer then restores optimizer, scheduler, RNG and data position
        model = ViTMAEForPreTraining.from_pretrained(resume_from, attn_implementation="sdpa")
        freeze_position_embeddings(model)  # from_pretrained makes them trainable: the optimizer state would not fit
    else:
        torch.manual_seed(args.seed)
        model = ViTMAEForPreTraining._from_config(mae_config(config, image_size), attn_implementation="sdpa")
        init_mae(model)
    if state.is_main_process:
        print(f"pretrain: {len(dataset)} slices of {', '.join(shard_paths)} ({image_size} px, {config.model_config} "
              f"encoder, patch {config.encoder_sizes()['patch_size']}, mask ratio {config.mask_ratio:g})", flush=True)
    stop = StopRequest()
    trainer = PretrainTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collate_batch,
        callbacks=[AlignLogs(), stop, *callbacks],
    )
    stop.install()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        stop.uninstall()
    steps = trainer.state.global_step
    loss = shard_train_loss(trainer.state.log_history)
    if stop.requested and steps < trainer.state.max_steps:
        print(f"pretrain: stopped at step {steps}; checkpoint in {args.output_dir}. Run the same command again "
              "to continue.", flush=True)
        return PretrainResult(trainer.model, None, steps, len(dataset), loss, interrupted=True)
    encoder = output / ENCODER_DIR
    if state.is_main_process:
        summary = {"global_step": steps, "train_loss": loss, "num_slices": len(dataset), "shards": shard_paths,
                   "elapsed_s": round(time.time() - start, 1)}
        save_encoder(trainer.model, encoder, {**identity, **summary})
        write_json_atomic(output / RESULTS_FILE, summary, indent=2)
        print(f"pretrain: {steps} steps, mean reconstruction loss {loss:.4f}; encoder: {encoder} "
              f"(vit-spine train --model_name_or_path {encoder})", flush=True)
    state.wait_for_everyone()
    return PretrainResult(trainer.model, encoder, steps, len(dataset), loss, interrupted=False)


def encoder_vit(mae) -> torch.nn.Module:
    """The MAE's encoder as a `ViTModel` (no pooler) holding the very same tensors' values: embeddings (the
    fixed sin-cos position embeddings copied into the ViT's learned ones), every layer, the final layernorm."""
    from transformers import ViTConfig, ViTModel

    sizes = {name: getattr(mae.config, name) for name in SHARED_CONFIG}
    vit = ViTModel(ViTConfig(**sizes), add_pooling_layer=False)
    state = {name[len("vit."):]: tensor for name, tensor in mae.state_dict().items() if name.startswith("vit.")}
    vit.load_state_dict(state, strict=True)  # any name or shape that does not map is an error here, not a random tensor
    return vit


def save_encoder(mae, folder: Path, meta: dict) -> None:
    """OUTPUT_DIR/encoder, written beside it, flushed, then renamed into place (an old one replaced)."""
    partial = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(partial, ignore_errors=True)
    encoder_vit(mae).save_pretrained(str(partial))
    (partial / PRETRAINING_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    flush_folder_files(partial)
    if folder.exists():
        shutil.rmtree(folder)
    durable_replace(partial, folder)


def parse_arguments(argv: Sequence[str] | None) -> tuple[PretrainConfig, PretrainArguments]:
    config, args = parse_config(
        PretrainConfig,
        argv,
        prog="vit-spine pretrain",
        description=__doc__.split("\n")[0],
        extra_types=(PretrainArguments,),
        defaults=training_defaults(),
    )
    options.training_arguments(args)
    return config, fit_loader_options(args)


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_arguments(argv)
    if args.disable_tqdm:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = pretrain(config, args)
    return 130 if result.interrupted else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
