"""The files the stages hand to each other: their one reader and one writer each.

- **Manifest** (`chunks/manifest.json`, written by `vit-spine chunk`): the plan of the shards, the
  preprocessing and the problems; `load_manifest` merges in what each shard folder says.
- **Shard meta** (`chunks/<shard>/vit_spine_shard.json`): slice count, problems, channel layout and
  the record (sizes, checksums) of the shard's files; it is written last and marks the shard whole.
- **Checkpoint meta** (`<run>/shard_XXXXX/vit_spine.json`): preprocessing, pooling, calibration, the
  shard's metrics row and the record of the weight files; written by `write_checkpoint_meta` only,
  after the weights are on disk, so it marks the shard done.
- **Run folder** (`RunDir`): run_config.json (what the run was started with), and metrics.jsonl, the
  `best` link and all_results.json, derived from the checkpoint metas by the one rule for "best" (`best_row`).

Every reader names the file and the fix when the file is damaged (ValueError / FileNotFoundError:
exit 2). Standard library only; below every stage in the import graph (CONTRACTS.md "Layout").
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vit_spine.fs import DamagedFile, check_files, file_record, flush_folder_files
from vit_spine.fs import write_json_atomic, write_text_atomic
from vit_spine.schema import (
    ALL_RESULTS_FILE,
    BEST_LINK,
    CHECKPOINT_META_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    OUT_OF_SAMPLE_FILE,
    RUN_CONFIG_FILE,
    SHARD_CHECKPOINT_DIR,
    SHARD_META_FILE,
)

MANIFEST_FORMAT = 2  # 2: 'bone25d' shards store one channel per slice; format 1 is refused with the fix
CHECKPOINT_META_FORMAT = 1


def load_json(path: Path, fix: str, text: str | None = None) -> Any:
    """JSON of a file this tool wrote (or `text`, one line of it); ValueError naming the file and `fix`
    when it is not valid JSON (cut short by a kill or a full disk, or edited by hand)."""
    try:
        return json.loads(Path(path).read_text() if text is None else text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}): {fix}") from err


# --- manifest ---------------------------------------------------------------------------------


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """DIR/manifest.json, with what the shard folders say merged in.

    Each shard entry gets `complete` (its shard meta exists) and, when complete, its real `num_slices`
    (planned minus slices that failed to decode); those slices are appended to `problems`.
    """
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run `vit-spine chunk DATA_DIR --output_dir {directory}` first")
    manifest = load_json(path, "the manifest is damaged or cut short: delete it and run the same `vit-spine chunk` "
                               "command again, or chunk into a new --output_dir folder")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{path}: manifest format {manifest.get('format')!r}, this vit-spine reads {MANIFEST_FORMAT}; "
            "chunk the data again into a new --output_dir folder"
        )
    return with_shard_state(manifest, directory)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> bool:
    """DIR/manifest.json, atomically; False when it already held exactly this (nothing written)."""
    return write_json_atomic(Path(directory) / MANIFEST_FILE, manifest)


def with_shard_state(manifest: dict[str, Any], directory: Path) -> dict[str, Any]:
    """`manifest` plus what the shard folders in `directory` say (see `load_manifest`)."""
    manifest = json.loads(json.dumps(manifest))
    known = {(p["path"], p.get("frame", 0), p["reason"]) for p in manifest["problems"]}
    for shard in manifest["shards"]:
        folder = Path(directory) / shard["path"]
        shard["complete"] = (folder / SHARD_META_FILE).is_file()
        if not shard["complete"]:
            continue
        meta = read_shard_meta(folder)
        shard["num_slices"] = meta["num_slices"]
        for problem in meta["problems"]:
            key = (problem["path"], problem.get("frame", 0), problem["reason"])
            if key not in known:
                manifest["problems"].append(problem)
                known.add(key)
    manifest["complete"] = all(s["complete"] for s in manifest["shards"])
    return manifest


def train_shards(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in manifest["shards"] if s["split"] == "train"]


def val_shards(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in manifest["shards"] if s["split"] == "val"]


def plan_fingerprint(manifest: dict[str, Any]) -> str:
    """What a training run was built from: the plan (shards and their studies) and the preprocessing."""
    plan = [(s["path"], s["split"], s["studies"]) for s in manifest["shards"]]
    blob = json.dumps({"plan": plan, "preprocess": manifest["preprocess"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- shard meta -------------------------------------------------------------------------------


def read_shard_meta(folder: Path) -> dict[str, Any]:
    """A shard folder's vit_spine_shard.json (ValueError naming it when damaged)."""
    return load_json(Path(folder) / SHARD_META_FILE, "the shard's metadata is damaged or cut short: delete the shard "
                     "folder and run the same `vit-spine chunk` command again")


def write_shard_meta(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """vit_spine_shard.json of a shard folder whose data files are written: `meta` plus the record of
    every other file in the folder (sizes and checksums, checked by every later reader). Returns it."""
    meta = {**meta, "files": file_record(Path(folder))}
    (Path(folder) / SHARD_META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# --- checkpoint meta --------------------------------------------------------------------------

# besides the *.safetensors (the model, a learned aggregator's head): what `from_pretrained` needs, and the
# out-of-sample logits that the next shards' aggregator fits read
WEIGHT_FILES = ("config.json", OUT_OF_SAMPLE_FILE)
CHECKPOINT_FIX = "use another shard's checkpoint, or delete {name}/{meta} and run the same `vit-spine train` command again to train it anew"


def _checkpoint_fix(checkpoint: Path) -> str:
    return CHECKPOINT_FIX.format(name=Path(checkpoint).name, meta=CHECKPOINT_META_FILE)


def checkpoint_weight_files(checkpoint: Path) -> list[str]:
    """The files of a checkpoint that hold the model: its safetensors (and index) and config.json."""
    names = sorted(p.name for p in Path(checkpoint).glob("*.safetensors*"))
    return names + [name for name in WEIGHT_FILES if (Path(checkpoint) / name).is_file()]


def write_checkpoint_meta(checkpoint: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The one writer of vit_spine.json: `meta` (with `shard` and `metrics`) plus its format and the record
    of the weight files, renamed into place after the checkpoint's files are flushed to disk, so that it
    marks a checkpoint whose weights are whole. Returns what was written."""
    checkpoint = Path(checkpoint)
    meta = {"format": CHECKPOINT_META_FORMAT, **meta}
    meta["files"] = file_record(checkpoint, checkpoint_weight_files(checkpoint))  # checked whenever it is loaded
    flush_folder_files(checkpoint)  # the weights are on disk before the marker says "done"
    write_text_atomic(checkpoint / CHECKPOINT_META_FILE, json.dumps(meta, indent=2))
    return meta


def read_checkpoint_meta(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / CHECKPOINT_META_FILE
    fix = _checkpoint_fix(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing: {fix}")
    meta = load_json(path, fix)
    if not isinstance(meta, dict) or not isinstance(meta.get("shard"), int) or not isinstance(meta.get("metrics"), dict):
        raise ValueError(f"{path}: expected integer `shard` and a `metrics` object: {fix}")
    return meta


def verify_checkpoint(checkpoint: Path, meta: dict[str, Any]) -> None:
    """DamagedFile naming the checkpoint, what differs and how to repair it, unless its weight files have
    the sizes and checksums recorded when it was saved (checkpoints saved before the record: not checked)."""
    record = meta.get("files")
    if not record:
        return
    damage = check_files(Path(checkpoint), record, checksums=True)
    if damage:
        raise DamagedFile(f"checkpoint {checkpoint} is damaged ({'; '.join(damage)}): {_checkpoint_fix(checkpoint)}")


def resolve_checkpoint(path: str | Path) -> Path:
    """A shard checkpoint folder; a run folder stands for its `best` shard."""
    path = Path(path).resolve()
    if (path / CHECKPOINT_META_FILE).is_file():
        return path
    if (path / BEST_LINK / CHECKPOINT_META_FILE).is_file():
        return (path / BEST_LINK).resolve()
    raise FileNotFoundError(
        f"{path} is neither a vit-spine checkpoint ({CHECKPOINT_META_FILE}) nor a run folder with a `{BEST_LINK}` checkpoint"
    )


# --- run folder -------------------------------------------------------------------------------


def best_row(rows: list[dict], min_delta: float = 0.0) -> dict | None:
    """The run's best shard: in shard order, a shard is the new best when its validation weighted log loss
    is below the best so far by more than `min_delta` (train's --min_delta). The one rule for "best"."""
    best = None
    for row in sorted(rows, key=lambda r: r["shard"]):
        if best is None or row["weighted_log_loss"] < best["weighted_log_loss"] - min_delta:
            best = row
    return best


@dataclass(frozen=True)
class RunDir:
    """A training run folder: shard_XXXXX/ checkpoints, metrics.jsonl, run_config.json, best, all_results.json."""

    path: Path

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir | None:
        """The run folder a shard checkpoint belongs to (its parent, when that holds metrics.jsonl or `best`)."""
        parent = Path(checkpoint).resolve().parent
        run = cls(parent)
        return run if run.metrics_path.is_file() or run.best_link.exists() else None

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def run_config_path(self) -> Path:
        return self.path / RUN_CONFIG_FILE

    @property
    def best_link(self) -> Path:
        return self.path / BEST_LINK

    def shard(self, index: int) -> Path:
        """The checkpoint folder of training shard `index`."""
        return self.path / SHARD_CHECKPOINT_DIR.format(index)

    # metrics rows

    def read_rows(self) -> list[dict]:
        """The rows of metrics.jsonl ([] when there is none yet)."""
        path = self.metrics_path
        if not path.exists():
            return []
        fix = "run the same `vit-spine train` command again to rewrite it from the shards' checkpoints"
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                row = load_json(path, f"line {number} is damaged: {fix}", text=line)
                if not isinstance(row, dict) or "shard" not in row or "weighted_log_loss" not in row:
                    raise ValueError(f"{path}: line {number} is not a metrics row: {fix}")
                rows.append(row)
        return rows

    def finished_rows(self) -> list[dict]:
        """The metrics rows of the finished shards, from their checkpoint metas (which hold the row), in shard
        order. metrics.jsonl is derived from them, so a kill between the two cannot lose a row."""
        rows = []
        for folder in sorted(self.path.glob("shard_*")):
            if (folder / CHECKPOINT_META_FILE).is_file():
                rows.append(read_checkpoint_meta(folder)["metrics"])  # a damaged one is named, with the fix
        return sorted(rows, key=lambda row: row["shard"])

    def write_rows(self, rows: list[dict], min_delta: float) -> None:
        """metrics.jsonl, `best` and all_results.json from the finished rows: each rewritten whole, atomically,
        and only when it changes."""
        if not rows and not self.metrics_path.exists():
            return
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if not self.metrics_path.is_file() or self.metrics_path.read_text() != text:
            write_text_atomic(self.metrics_path, text)
        best = best_row(rows, min_delta)
        if best is not None:
            if not self.best_link.is_symlink() or os.readlink(self.best_link) != self.shard(best["shard"]).name:
                self.point_best(best["shard"])
            self.write_summary(rows, best)

    def best(self) -> dict | None:
        """The best row of metrics.jsonl by the run's own --min_delta (from run_config.json)."""
        return best_row(self.read_rows(), self.min_delta())

    # run_config.json

    def read_run_config(self, fix: str) -> Any:
        """run_config.json (None when the run has none); `fix` says what to do when it is not valid JSON."""
        if not self.run_config_path.is_file():
            return None
        return load_json(self.run_config_path, fix)

    def write_run_config(self, identity: dict) -> None:
        write_json_atomic(self.run_config_path, identity, indent=2)

    def check_run_config(self, current: dict) -> None:
        """Refuse to continue a run whose data or model differ from what it was started with."""
        saved = self.read_run_config(
            "use a new --output_dir folder, or, when the run's chunks and model are unchanged, delete it "
            "and run the same `vit-spine train` command again"
        )
        if not isinstance(saved, dict):
            return
        # a key an older run did not record cannot have differed
        differs = [k for k in current if k in saved and saved[k] != current[k]]
        if differs:
            details = "; ".join(f"{k}: was {saved.get(k)!r}, now {current[k]!r}" for k in differs)
            raise ValueError(f"{self.path} holds a run with another configuration ({details}). Use a new --output_dir folder.")

    def min_delta(self) -> float:
        """The run's --min_delta, part of its "best" rule (0 for runs that did not record it)."""
        try:
            saved = self.read_run_config("run the same `vit-spine train` command again to rewrite it")
        except ValueError:
            saved = None  # the strict readers (train, evaluate) name the damage; here the plain rule applies
        return float(saved.get("min_delta", 0.0)) if isinstance(saved, dict) else 0.0

    def chunks(self) -> Path:
        """The chunks folder the run was trained on (from run_config.json)."""
        fix = "pass --chunks DIR (the next `vit-spine train` of this run rewrites it)"
        saved = self.read_run_config(fix)
        if saved is None:
            raise FileNotFoundError(f"{self.run_config_path} not found: pass --chunks DIR")
        if not isinstance(saved, dict) or not isinstance(saved.get("chunks"), str):
            raise ValueError(f"{self.run_config_path}: names no `chunks` folder: pass --chunks DIR")
        return Path(saved["chunks"])

    # best link and all_results.json

    def point_best(self, index: int) -> None:
        tmp = self.path / f".{BEST_LINK}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(self.shard(index).name)
        os.replace(tmp, self.best_link)

    def is_best(self, checkpoint: Path) -> bool:
        return self.best_link.exists() and self.best_link.resolve() == Path(checkpoint).resolve()

    def write_summary(self, rows: list[dict], best: dict) -> None:
        summary = {
            "best_shard": best["shard"],
            "best_weighted_log_loss": best["weighted_log_loss"],
            "baseline_weighted_log_loss": best["baseline_weighted_log_loss"],
            "shards_trained": len(rows),
            "global_step": max(r["global_step"] for r in rows),
        }
        write_json_atomic(self.path / ALL_RESULTS_FILE, summary, indent=2)


def default_chunks(checkpoint: Path) -> Path:
    """The chunks folder a shard checkpoint's run was trained on."""
    return RunDir(Path(checkpoint).parent).chunks()


@dataclass(frozen=True)
class ShardSaved:
    """The event `train` emits after a shard's checkpoint is marked done and the run files are rewritten
    (subscribers: `vit_spine.hub.ShardPusher`, or any `on_shard_saved(event)` callable)."""

    run: RunDir
    shard: int
    is_best: bool  # the run's best so far, by the run's rule

    @property
    def checkpoint(self) -> Path:
        return self.run.shard(self.shard)
