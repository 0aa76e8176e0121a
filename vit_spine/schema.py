"""The orders and names every stage agrees on: the targets, the label columns and the files on disk.

The one owner of each: a stage that writes or reads one of these imports it from here, so a change
is one line and every reader follows. Standard library only, and nothing from the package: this
module is the bottom of the import graph (CONTRACTS.md "Layout").
"""

from __future__ import annotations

# --- targets ----------------------------------------------------------------------------------

VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
# Study level, the competition's order: every study-level prediction or label vector, the metric's columns.
STUDY_TARGETS = ("patient_overall", *VERTEBRAE)
NUM_STUDY_TARGETS = len(STUDY_TARGETS)

# Slice level, the model's 14 outputs: fractures first, then visibility (segmentation) of each vertebra.
FRACTURE_TARGETS = tuple(f"fracture_{v}" for v in VERTEBRAE)
VISIBLE_TARGETS = tuple(f"visible_{v}" for v in VERTEBRAE)
SLICE_TARGETS = (*FRACTURE_TARGETS, *VISIBLE_TARGETS)
NUM_SLICE_TARGETS = len(SLICE_TARGETS)
# The model's outputs that are fractures: `outputs[:, FRACTURES]`.
FRACTURES = slice(0, len(FRACTURE_TARGETS))
VISIBLE = slice(len(FRACTURE_TARGETS), NUM_SLICE_TARGETS)

# The slice table's study labels (train.csv's patient_overall, C1..C7), in STUDY_TARGETS order.
STUDY_LABEL_COLUMNS = ("label_overall", *(f"label_{v}" for v in VERTEBRAE))

# --- file names -------------------------------------------------------------------------------

# chunks folder (`vit-spine chunk`)
MANIFEST_FILE = "manifest.json"  # the plan and the state of every shard
SHARD_META_FILE = "vit_spine_shard.json"  # in each shard folder: counts, problems, file record
SLICE_TABLE_FILE = "slice_table.parquet"  # the planned slices, so that a resumed chunk need not scan again

# run folder (`vit-spine train --output_dir`)
RUN_CONFIG_FILE = "run_config.json"  # what the run was started with; a different one is refused
METRICS_FILE = "metrics.jsonl"  # one row per finished shard, derived from the shards' checkpoint metas
ALL_RESULTS_FILE = "all_results.json"  # the run's summary (best shard, its score), Hugging Face style
BEST_LINK = "best"  # symlink to the best shard's checkpoint folder
SHARD_CHECKPOINT_DIR = "shard_{:05d}"  # one checkpoint folder per training shard: shard_00000, ...
TRAINER_DIR = "trainer"  # in a shard's checkpoint: the Trainer's checkpoint-N folders while it trains

# checkpoint folder (one per shard)
CHECKPOINT_META_FILE = "vit_spine.json"  # preprocessing, pooling, calibration, metrics; written last: "done"
TRAINER_CHECKPOINT_COMPLETE_FILE = "vit_spine_complete.json"  # in a Trainer checkpoint-N: the "whole" marker
# shard k's model's logits of the studies of training shard k+1 (which it never trained on): what the learned
# aggregators are fitted on (`train`)
OUT_OF_SAMPLE_FILE = "next_shard_logits.npz"
EVAL_RESULTS_FILE = "eval_results.json"  # what `vit-spine evaluate` writes by default
TRAINER_STATE_FILE = "trainer_state.json"  # the Trainer's state of the shard: its log history (losses)
