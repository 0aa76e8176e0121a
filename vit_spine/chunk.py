"""`vit-spine chunk DATA_DIR --output_dir DIR`: labelled training slices -> ~15k-slice shards + validation shards.

1. Plan (deterministic, from the slice table of `vit-spine scan`): whole studies per shard, validation
   studies held out by study (a `fold` of train.csv, else a label-stratified fraction), studies dealt to
   shards so that every shard carries about the same share of positive studies and of each vertebra's
   fractures (see `stratified_order` and `deal`). Rank 0 writes the plan to DIR/manifest.json (and the
   slice table to DIR/slice_table.parquet) before any pixel is decoded.
2. Write: worker processes decode and preprocess one study each into reusable shared-memory slots; the
   main process streams each study into the shard's Arrow file as one record batch, so memory stays at
   about (workers + 2) studies whatever the dataset size. A shard is built in DIR/.tmp-NAME and renamed
   to DIR/NAME when complete: a finished shard is never redone, a killed run leaves no partial shard
   under a final name, and a re-run over a finished output writes nothing. `--rank/--world_size` (or
   RANK/WORLD_SIZE from `accelerate launch` / torchrun) give each process every world_size-th shard.

Each shard folder is a `datasets` Dataset (`datasets.load_from_disk` opens it) with the features of
`shard_features`, plus `vit_spine_shard.json` (its studies, slice count, the slices that failed to
decode, and the channel scheme's layout). A shard stores what `render_slice` makes of each slice: one
bone-window channel for 'bone25d' (each slice once; `ShardDataset` assembles the neighbours below and
above when it reads, a third of the bytes of storing all three), three windows for 'windows'. The rows of a study
are contiguous and sorted by z. `vit_spine.artifacts` reads and writes the manifest and the shard metas
(`load_manifest(DIR)` merges the shard files into the manifest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from vit_spine import options
from vit_spine.artifacts import (
    MANIFEST_FORMAT,
    load_manifest,
    train_shards,
    val_shards,
    with_shard_state,
    write_manifest,
    write_shard_meta,
)
from vit_spine.fs import (
    TMP_PREFIX,
    FolderLock,
    crc32_of,
    durable_replace,
    flush_folder_files,
    flush_to_disk,
)
from vit_spine.options import aliases, parse_config
from vit_spine.preprocess import PreprocessConfig, render_volume
from vit_spine.schema import MANIFEST_FILE, SLICE_TABLE_FILE, SLICE_TARGETS, STUDY_LABEL_COLUMNS, STUDY_TARGETS, VERTEBRAE
from vit_spine.shards import ARROW_FILE, features_dict, record_batch, shard_schema, write_dataset_files
from vit_spine.shards import damage as shard_files_damage

if TYPE_CHECKING:  # the study module imports pydicom; training reads shards without it
    from vit_spine.study import SliceRef

REQUIRED_COLUMNS = (
    "StudyInstanceUID", "slice_number", "path", "frame", "image_set", "slice_index", "position", "z",
    "pixel_spacing", "pixel_spacing_column", "problem", *SLICE_TARGETS, *STUDY_LABEL_COLUMNS,
)
# Options that change the plan or the pixels: a resumed run must use the same ones.
PLAN_OPTIONS = ("shard_size", "val_fraction", "val_fold", "ignore_folds", "seed")


@dataclass
class ChunkConfig:
    data_dir: str | None = field(
        default=None,
        metadata={"help": "dataset root in the RSNA 2022 layout (scanned unless --slice_table is given)."},
    )
    output_dir: str = field(
        default="chunks", metadata={"help": "output folder for shards and manifest.json.", "aliases": aliases("out")}
    )
    slice_table: str | None = field(
        default=None, metadata={"help": "Parquet slice table from `vit-spine scan` (skips scanning DATA_DIR)."}
    )
    shard_size: int = field(
        default=15000,
        metadata={"help": "target slices per shard: round(total / shard_size) shards of whole studies each."},
    )
    val_fraction: float = field(
        default=0.1,
        metadata={"help": "share of studies held out for validation (label-stratified) when folds are not used."},
    )
    val_fold: int | None = field(
        default=None,
        metadata={"help": "hold out the studies of this train.csv fold (default: fold 0 when there is a fold column)."},
    )
    ignore_folds: bool = field(
        default=False, metadata={"help": "use --val_fraction even when train.csv has a fold column."}
    )
    workers: int = field(
        default_factory=lambda: os.cpu_count() or 1,
        metadata={"help": "decoding processes (default: all CPU cores; 0 = decode in the main process)."},
    )
    seed: int = field(default=0, metadata={"help": "seed of the plan's shuffles (the plan is deterministic)."})
    rank: int | None = field(
        default=None, metadata={"help": "this process's index among --world_size (default: $RANK or 0)."}
    )
    world_size: int | None = field(
        default=None, metadata={"help": "processes sharing the shards, each writes every world_size-th (default: $WORLD_SIZE or 1)."}
    )
    verify: bool = field(
        default=False,
        metadata={"help": "check the checksum of every finished shard's files, not only their sizes (reads every "
                  "shard once); a damaged shard is rewritten."},
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars."})

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"--shard_size must be >= 1, got {self.shard_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")

        self.workers = options.capped_workers(self.workers, minimum=0)
        options.folder_path(self.data_dir, "DATA_DIR")
        options.folder_path(self.output_dir, "--output_dir")
        options.file_path(self.slice_table, "--slice_table")
        # inputs that must exist are checked before --output_dir is made: a refused chunk leaves no empty folder
        if self.slice_table and not Path(self.slice_table).exists():
            raise FileNotFoundError(f"--slice_table {self.slice_table}: no such file")
        if self.data_dir and not Path(self.data_dir).exists():
            raise FileNotFoundError(f"DATA_DIR {self.data_dir}: no such directory")
        resolve_rank(self.rank, self.world_size)  # a bad --rank / --world_size too

    def plan_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PLAN_OPTIONS}


@dataclass
class ShardPlan:
    path: str
    split: str  # "train" | "val"
    studies: list[str]
    num_slices: int
    num_positive_studies: int
    fractured_studies: dict[str, int]  # vertebra -> studies with that vertebra fractured

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- manifest


def versions() -> dict[str, str]:
    import datasets
    import pyarrow
    import pydicom
    import torch

    from vit_spine import __version__

    return {
        "vit_spine": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pyarrow.__version__,
        "datasets": datasets.__version__,
        "torch": torch.__version__,
        "pydicom": pydicom.__version__,
    }


# ---------------------------------------------------------------- slice table -> studies


def load_slice_table(config: ChunkConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The slice table of --slice_table (checked to come from DATA_DIR), or a fresh scan of DATA_DIR; and
    where it came from: {"data_dir", "slice_table", "slice_table_crc32"}."""
    if config.slice_table:
        path = Path(config.slice_table)
        if not path.is_file():
            raise FileNotFoundError(f"--slice_table {path}: no such file")
        source = slice_table_source(path)
        if config.data_dir and source["data_dir"] and source["data_dir"] != str(Path(config.data_dir).resolve()):
            raise ValueError(
                f"--slice_table {path} was scanned from {source['data_dir']}, not from {Path(config.data_dir).resolve()}: "
                f"scan this dataset (`vit-spine scan {config.data_dir} --output_file TABLE`) or give the table's own DATA_DIR"
            )
        table = pd.read_parquet(path)
        where = str(path)
    else:
        if not config.data_dir:
            raise ValueError("give DATA_DIR or --slice_table")
        from vit_spine.scan import ScanConfig, scan

        workers = max(config.workers, 1)
        table = scan(config.data_dir, ScanConfig(data_dir=config.data_dir, workers=workers, progress=config.progress))
        source = {"data_dir": str(Path(config.data_dir).resolve()), "slice_table": None, "slice_table_crc32": None}
        where = f"scan of {config.data_dir}"
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{where}: slice table lacks column(s) {', '.join(missing)}; re-run `vit-spine scan`")
    return table, source


def slice_table_source(path: Path) -> dict[str, Any]:
    """What a slice table file says it was scanned from (its Parquet metadata), and its checksum."""
    from vit_spine.scan import read_scan_metadata

    try:
        data_dir = read_scan_metadata(path).get("data_dir")
    except ValueError:  # a table written by other means: its origin is unknown, not wrong
        data_dir = None
    return {"data_dir": data_dir, "slice_table": str(path.resolve()), "slice_table_crc32": crc32_of(path)}


@dataclass
class TrainingSlices:
    slices: pd.DataFrame  # good slices of labelled train studies, grouped by study, z ascending
    studies: pd.DataFrame  # StudyInstanceUID, num_slices, patient_overall, C1..C7[, fold]
    problems: list[dict[str, str]]  # {"path", "reason"} of train slices the scan could not use
    skipped_studies: list[dict[str, Any]]  # {"StudyInstanceUID", "reason", "num_slices"}


def select_training_slices(table: pd.DataFrame) -> TrainingSlices:
    """The volumes' readable slices of labelled train_images studies, in volume order (`slice_index`,
    the study assembly's order along the slice normal); everything left out is listed with a reason."""
    train = table[table["image_set"] == "train"]
    bad = (train["problem"].fillna("") != "") | (train["slice_index"] < 0)
    problems = [
        {"path": str(p), "frame": int(f), "reason": str(r)}
        for p, f, r in zip(train.loc[bad, "path"], train.loc[bad, "frame"], train.loc[bad, "problem"])
    ]
    good = train[~bad]
    labelled = good["label_overall"].notna()
    skipped = [
        {"StudyInstanceUID": uid, "reason": "no labels in train.csv", "num_slices": int(n)}
        for uid, n in good[~labelled].groupby("StudyInstanceUID").size().items()
    ]
    good = good[labelled]
    labelled_train = train[train["label_overall"].notna()]
    for uid in sorted(set(labelled_train["StudyInstanceUID"]) - set(good["StudyInstanceUID"])):
        reasons = labelled_train.loc[labelled_train["StudyInstanceUID"] == uid, "problem"].value_counts()
        skipped.append({"StudyInstanceUID": uid, "reason": f"no usable slice ({reasons.index[0]})", "num_slices": 0})
    good = good.sort_values(["StudyInstanceUID", "slice_index"], kind="stable", ignore_index=True)
    groups = good.groupby("StudyInstanceUID", sort=True)
    studies = groups[list(STUDY_LABEL_COLUMNS)].first()
    studies.columns = list(STUDY_TARGETS)
    studies = studies.astype(int)
    studies.insert(0, "num_slices", groups.size())
    if "fold" in good.columns and good["fold"].notna().any():
        studies["fold"] = groups["fold"].first()
    return TrainingSlices(good, studies.reset_index(), problems, skipped)


# ---------------------------------------------------------------- plan


def stratified_order(studies: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Studies sorted into strata by label pattern, in a seeded random order within each stratum.

    Sort keys: patient_overall, then the vertebrae from the rarest to the most common fracture. Every
    positive study thus sits in one contiguous block, and each vertebra's fractured studies in few
    blocks (the rarest in one), which `deal` spreads evenly over the shards.
    """
    ordered = studies.sort_values("StudyInstanceUID", ignore_index=True)
    ordered = ordered.iloc[np.random.default_rng(seed).permutation(len(ordered))]
    prevalence = ordered[list(VERTEBRAE)].mean()
    rare_first = sorted(VERTEBRAE, key=lambda v: (prevalence[v], VERTEBRAE.index(v)))
    keys = ["patient_overall", *rare_first]
    return ordered.sort_values(keys, ascending=False, kind="stable", ignore_index=True)


def choose_validation(ordered: pd.DataFrame, val_fraction: float, val_fold: int | None, seed: int) -> np.ndarray:
    """Boolean mask over `ordered` (from `stratified_order`): the validation studies.

    With a fold: the studies of that fold. Otherwise every (1/val_fraction)-th study of the stratified
    order (systematic sampling from a seeded offset): each stratum gives its share, +-1 study.
    """
    if val_fold is not None:
        return (ordered["fold"] == val_fold).to_numpy()
    if val_fraction <= 0:
        return np.zeros(len(ordered), bool)
    start = np.random.default_rng(seed + 1).random()
    position = start + np.arange(len(ordered) + 1) * val_fraction
    return np.diff(np.floor(position)) > 0


def number_of_shards(num_slices: int, shard_size: int, num_studies: int) -> int:
    """round(num_slices / shard_size), at least 1 and at most one shard per study (0 without studies)."""
    return min(max(1, int(round(num_slices / shard_size))), num_studies) if num_slices else 0


def deal(ordered: pd.DataFrame, num_shards: int) -> list[list[int]]:
    """Deal studies (rows of `ordered`, in order) to shards in rounds: every shard gets one study per round.

    Within a round, studies with the most fractured targets go first, each to the free shard where it
    adds the least to `sum over its positive targets of count / expected count` plus `slices / target
    slices`: label counts and slice counts stay even. With RSNA prevalences the count of every target
    (patient_overall, C1..C7) differs by at most 2 between any two shards (tests/test_chunk.py).
    """
    if num_shards == 0:
        return []
    labels = ordered[list(STUDY_TARGETS)].to_numpy(np.float64)
    sizes = ordered["num_slices"].to_numpy(np.float64)
    expected = np.maximum(labels.sum(axis=0) / max(num_shards, 1), 1e-9)
    target_slices = max(sizes.sum() / max(num_shards, 1), 1.0)
    counts = np.zeros((num_shards, labels.shape[1]))
    load = np.zeros(num_shards)
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for start in range(0, len(ordered), num_shards):
        rows = sorted(range(start, min(start + num_shards, len(ordered))), key=lambda r: (-labels[r].sum(), -sizes[r], r))
        free = list(range(num_shards))
        for row in rows:
            cost = ((counts[free] + labels[row]) / expected * labels[row]).sum(axis=1) + (load[free] + sizes[row]) / target_slices
            shard = free.pop(int(np.argmin(cost)))
            shards[shard].append(row)
            counts[shard] += labels[row]
            load[shard] += sizes[row]
    return shards


def plan_shards(
    studies: pd.DataFrame, shard_size: int, val_fraction: float, val_fold: int | None, seed: int
) -> tuple[list[ShardPlan], dict[str, Any]]:
    """Split studies (StudyInstanceUID, num_slices, patient_overall, C1..C7[, fold]) into train and val shards.

    `val_fold` None means: fold 0 if `studies` has a fold column, else `val_fraction`. Returns the shard
    plans (train shards first) and a description of the validation split.
    """
    if val_fold is None and "fold" in studies.columns:
        val_fold = 0
    if val_fold is not None:
        if "fold" not in studies.columns:
            raise ValueError("--val_fold needs a fold column in train.csv; use --val_fraction instead")
        folds = sorted(int(f) for f in studies["fold"].dropna().unique())
        if val_fold not in folds:
            raise ValueError(f"--val_fold {val_fold}: train.csv has folds {folds}")
        validation = {"method": "fold", "fold": val_fold}
    else:
        validation = {"method": "fraction", "fraction": val_fraction}
    ordered = stratified_order(studies, seed)
    is_val = choose_validation(ordered, val_fraction, val_fold, seed)
    plans = []
    for split, prefix, rows in (("train", "shard", ~is_val), ("val", "val", is_val)):
        part = ordered[rows].reset_index(drop=True)
        for index, members in enumerate(deal(part, number_of_shards(int(part["num_slices"].sum()), shard_size, len(part)))):
            chosen = part.iloc[members]
            plans.append(
                ShardPlan(
                    path=f"{prefix}_{index:05d}",
                    split=split,
                    studies=chosen["StudyInstanceUID"].tolist(),
                    num_slices=int(chosen["num_slices"].sum()),
                    num_positive_studies=int(chosen["patient_overall"].sum()),
                    fractured_studies={v: int(chosen[v].sum()) for v in VERTEBRAE},
                )
            )
    validation["num_studies"] = int(is_val.sum())
    return plans, validation


# ---------------------------------------------------------------- shard files


def shard_features(image_size: int, channels: int = 3):
    """The shard's columns as `datasets.Features`, for writing a shard through `datasets` (tests, `bench train`)."""
    import datasets

    return datasets.Features.from_dict(features_dict(image_size, channels))


def study_record_batch(pixels: np.ndarray, rows: pd.DataFrame, schema):
    """One study's slices as an Arrow record batch; the pixel column wraps `pixels` without copying."""
    return record_batch(
        pixels,
        rows[list(SLICE_TARGETS)].to_numpy(np.float32),
        rows[list(STUDY_LABEL_COLUMNS)].to_numpy(np.float32),
        rows["StudyInstanceUID"].astype(str).tolist(),
        rows["slice_number"].to_numpy(np.int32),
        rows["position"].to_numpy(np.float32),  # the shard's `z`: mm along the slice normal (z for axial slices)
        schema,
    )


def shard_fingerprint(plan: ShardPlan, preprocess: PreprocessConfig) -> str:
    blob = json.dumps({"format": MANIFEST_FORMAT, "plan": plan.to_dict(), "preprocess": preprocess.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- decoding (worker side)


def render_study(slices: Sequence[SliceRef], config: PreprocessConfig, out: np.ndarray | None = None):
    """Decode and preprocess one study's slices (in volume order).

    Returns (pixels uint8 (n_ok, k, S, S) as the shard stores them (k = `config.stored_channels()`) -- a
    view of `out` when given --, ok mask over `slices`, problems [(path, frame, reason)] of the slices
    that failed to decode).
    """
    rendered, problems = render_volume(slices, config)
    ok = np.array([image is not None for image in rendered], bool)
    shape = (int(ok.sum()), config.stored_channels(), config.image_size, config.image_size)
    pixels = np.empty(shape, np.uint8) if out is None else out[: shape[0]]
    for i, image in enumerate(image for image in rendered if image is not None):
        pixels[i] = image
    return pixels, ok, problems


def slice_refs(rows: pd.DataFrame) -> list[SliceRef]:
    """The slices of a study's rows of the slice table, in row order."""
    from vit_spine.study import SliceRef

    spacing = zip(rows["pixel_spacing"].to_numpy(float), rows["pixel_spacing_column"].to_numpy(float))
    return [
        SliceRef(str(p), int(f), (r, c) if np.isfinite(r) and np.isfinite(c) else None)
        for p, f, (r, c) in zip(rows["path"], rows["frame"], spacing)
    ]


_WORKER: dict[str, Any] = {}


def _init_worker(config: PreprocessConfig) -> None:
    _WORKER["config"] = config
    _WORKER["slots"] = {}


def _render_into_slot(task: tuple[str, list[SliceRef], str]) -> tuple[str, np.ndarray, list]:
    uid, paths, slot_name = task
    slots = _WORKER["slots"]
    if slot_name not in slots:
        slots[slot_name] = shared_memory.SharedMemory(name=slot_name)
    config: PreprocessConfig = _WORKER["config"]
    size = config.image_size
    buffer = np.ndarray((len(paths), config.stored_channels(), size, size), np.uint8, buffer=slots[slot_name].buf)
    _, ok, problems = render_study(paths, config, out=buffer)
    del buffer
    return uid, ok, problems


# ---------------------------------------------------------------- decoding (main side)


@dataclass
class RenderedStudy:
    uid: str
    pixels: np.ndarray  # valid until the next study is requested
    ok: np.ndarray
    problems: list[tuple[str, int, str]]  # (path, frame, reason)


def render_studies(
    tasks: list[tuple[str, list[SliceRef]]], config: PreprocessConfig, workers: int
) -> Iterator[RenderedStudy]:
    """Rendered studies in the order of `tasks`, decoded by `workers` processes (0: here).

    Workers write pixels into shared-memory slots (workers + 2 of them, each sized for the largest
    study) that are reused: no pickling of pixels, no fresh pages per study, bounded memory.
    """
    if workers == 0:
        for uid, paths in tasks:
            pixels, ok, problems = render_study(paths, config)
            yield RenderedStudy(uid, pixels, ok, problems)
        return
    size = config.image_size
    channels = config.stored_channels()
    slot_bytes = max(len(paths) for _, paths in tasks) * channels * size * size
    num_slots = workers + 2
    check_shared_memory(slot_bytes * num_slots)
    slots = [shared_memory.SharedMemory(create=True, size=slot_bytes) for _ in range(num_slots)]
    try:
        free = deque(slots)
        pending: deque = deque()
        queue = iter(tasks)
        with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(config,)) as pool:
            while True:
                while free:
                    task = next(queue, None)
                    if task is None:
                        break
                    slot = free.popleft()
                    pending.append((slot, pool.apply_async(_render_into_slot, ((task[0], task[1], slot.name),))))
                if not pending:
                    break
                slot, result = pending.popleft()
                uid, ok, problems = result.get()
                pixels = np.ndarray((int(ok.sum()), channels, size, size), np.uint8, buffer=slot.buf)
                yield RenderedStudy(uid, pixels, ok, problems)
                del pixels
                free.append(slot)
    finally:
        for slot in slots:
            try:
                slot.close()
            except BufferError:  # a view still alive in an exception's traceback; unlink frees it later
                pass
            slot.unlink()


def check_shared_memory(needed: int) -> None:
    """Fail early, naming the fix, when /dev/shm is too small (Docker's default is 64 MB)."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    stat = os.statvfs(shm)
    available = stat.f_bavail * stat.f_frsize
    if available < needed:
        raise RuntimeError(
            f"/dev/shm has {available / 2**20:.0f} MiB free, decoding needs {needed / 2**20:.0f} MiB "
            f"((workers + 2) x largest study): use fewer --workers, --workers 0, or a larger /dev/shm "
            f"(docker run --shm-size)"
        )


# ---------------------------------------------------------------- writing


def write_shard(
    out: Path,
    plan: ShardPlan,
    studies: Iterator[RenderedStudy],
    slices_by_study: dict[str, pd.DataFrame],
    preprocess: PreprocessConfig,
    progress: tqdm | None = None,
) -> dict[str, Any]:
    """Stream the studies of `plan` into OUT/.tmp-NAME, then rename it to OUT/NAME. Returns the shard meta."""
    import pyarrow as pa

    final, tmp = out / plan.path, out / f"{TMP_PREFIX}{plan.path}"
    if tmp.exists():  # left by a killed run
        shutil.rmtree(tmp)
    tmp.mkdir()
    schema = shard_schema(preprocess.image_size, preprocess.stored_channels())
    num_slices, problems = 0, []
    with pa.OSFile(str(tmp / ARROW_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for uid in plan.studies:
            study = next(studies)
            if study.uid != uid:
                raise RuntimeError(f"internal error: expected study {uid}, got {study.uid}")
            rows = slices_by_study[uid][study.ok]
            if len(rows):
                writer.write_batch(study_record_batch(study.pixels, rows, schema))
            num_slices += len(rows)
            problems += [{"path": p, "frame": f, "reason": r} for p, f, r in study.problems]
            if progress is not None:
                progress.update(len(study.ok))
            del study
    fingerprint = shard_fingerprint(plan, preprocess)
    write_dataset_files(tmp, schema, plan.split, fingerprint)
    meta = {
        "path": plan.path,
        "split": plan.split,
        "num_slices": num_slices,
        "planned_slices": plan.num_slices,
        "studies": plan.studies,
        "problems": problems,
        "fingerprint": fingerprint,
    }
    # ShardDataset assembles the model's channels with it, without the scheme's code
    meta["channel_layout"] = [list(pair) for pair in preprocess.channel_layout()]
    meta = write_shard_meta(tmp, meta)
    flush_folder_files(tmp)
    os.rename(tmp, final)
    flush_to_disk(out)
    return meta


# ---------------------------------------------------------------- the command


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """--rank/--world_size, else RANK/WORLD_SIZE (set by accelerate launch and torchrun), else 0/1."""
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    me = rank if rank is not None else int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= me < world:
        raise ValueError(f"--rank {me} / --world_size {world}: need 0 <= rank < world_size")
    return me, world


def make_manifest(
    config: ChunkConfig, preprocess: PreprocessConfig, selection: TrainingSlices, source: dict[str, Any]
) -> dict[str, Any]:
    studies = selection.studies.drop(columns=["fold"]) if config.ignore_folds and "fold" in selection.studies else selection.studies
    plans, validation = plan_shards(studies, config.shard_size, config.val_fraction, config.val_fold, config.seed)
    return {
        "format": MANIFEST_FORMAT,
        "data_dir": source["data_dir"],
        "source": source,
        "options": config.plan_options(),
        "preprocess": preprocess.to_dict(),
        "stored_channels": preprocess.stored_channels(),  # of `preprocess.channels`, the scheme: pixel_values (k, S, S)
        "validation": validation,
        "totals": {
            "train_slices": sum(p.num_slices for p in plans if p.split == "train"),
            "val_slices": sum(p.num_slices for p in plans if p.split == "val"),
            "studies": len(selection.studies),
        },
        "shards": [p.to_dict() for p in plans],
        "problems": selection.problems,
        "skipped_studies": selection.skipped_studies,
        "versions": versions(),
    }


def chunk(
    config: ChunkConfig,
    preprocess: PreprocessConfig | None = None,
    on_shard_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Plan (or reload the plan of) DIR, write this rank's missing or damaged shards, return `load_manifest(DIR)`.

    One process per rank and folder: a second `chunk` of the same rank on the same --output_dir fails at once,
    naming the process that holds it (ranks of one job share the folder, each with its own lock).
    """
    preprocess = preprocess or PreprocessConfig()
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output_dir {out}: a file, not a folder")
    rank, world = resolve_rank(config.rank, config.world_size)
    with FolderLock(out, "vit-spine chunk", name=f".vit-spine-chunk-rank{rank}.lock"):
        return _chunk_locked(out, rank, world, config, preprocess, on_shard_done)


def _chunk_locked(out: Path, rank: int, world: int, config: ChunkConfig, preprocess: PreprocessConfig,
                  on_shard_done: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    manifest_path = out / MANIFEST_FILE
    selection: TrainingSlices | None = None
    if manifest_path.is_file():
        manifest = load_manifest(out)
        check_same_options(manifest, config, preprocess, manifest_path)
        check_same_source(manifest, config, manifest_path)
    else:
        table, source = load_slice_table(config)
        selection = select_training_slices(table)
        manifest = make_manifest(config, preprocess, selection, source)
        if rank == 0:
            write_slice_table(selection.slices, out)
            write_manifest(out, manifest)
        manifest = with_shard_state(manifest, out)
    mine = [s for i, s in enumerate(manifest["shards"]) if i % world == rank]
    damaged = remove_damaged_shards(out, [s for s in mine if (out / s["path"]).is_dir()], config.verify)
    todo = [plan_from_entry(s) for s in mine if not (out / s["path"]).is_dir()]
    print(
        f"chunk: {len(manifest['shards'])} shards ({len(train_shards(manifest))} train, {len(val_shards(manifest))} val); "
        f"rank {rank}/{world}: {len(mine)} shards, {len(todo)} to write" + (f" ({damaged} damaged)" if damaged else "")
        + f"; {len(manifest['problems'])} problem slices, {len(manifest['skipped_studies'])} skipped studies"
    )
    if todo:
        if selection is None:
            slices = pd.read_parquet(out / SLICE_TABLE_FILE)
        else:
            slices = selection.slices
        write_shards(out, todo, slices, preprocess, config, on_shard_done)
    if not manifest_path.is_file():  # rank > 0 with its own output folder: rank 0 holds the manifest
        return with_shard_state(manifest, out)
    final = load_manifest(out)
    if final["complete"] and write_manifest(out, final):
        print(f"chunk: all shards written; manifest updated: {manifest_path}")
    return final


def remove_damaged_shards(out: Path, entries: list[dict[str, Any]], checksums: bool) -> int:
    """Remove each finished shard whose files differ from their record (sizes; checksums with --verify),
    so it is written again. Returns how many were removed."""
    removed = 0
    for entry in entries:
        try:
            damage = shard_files_damage(out / entry["path"], checksums)
        except ValueError as error:  # its vit_spine_shard.json is itself damaged
            damage = [str(error)]
        if damage:
            print(f"chunk: {entry['path']} is damaged ({'; '.join(damage)}): writing it again")
            shutil.rmtree(out / entry["path"])
            removed += 1
    return removed


def check_same_source(manifest: dict, config: ChunkConfig, path: Path) -> None:
    """A resumed folder must be fed from the dataset and slice table it was planned from."""
    source = manifest.get("source") or {"data_dir": manifest.get("data_dir")}
    if config.data_dir and source.get("data_dir") and source["data_dir"] != str(Path(config.data_dir).resolve()):
        raise ValueError(f"{path} was planned from {source['data_dir']}, not from {Path(config.data_dir).resolve()}; "
                         "use another --output_dir folder for another dataset")
    if config.slice_table and source.get("slice_table_crc32"):
        given = slice_table_source(Path(config.slice_table))
        if given["slice_table_crc32"] != source["slice_table_crc32"]:
            raise ValueError(f"{path} was planned from the slice table {source['slice_table']}, and --slice_table "
                             f"{config.slice_table} holds another one; use another --output_dir folder for another table")


def plan_from_entry(entry: dict[str, Any]) -> ShardPlan:
    return ShardPlan(**{f.name: entry[f.name] for f in dataclasses.fields(ShardPlan)})


def write_slice_table(slices: pd.DataFrame, out: Path) -> None:
    partial = out / f"{TMP_PREFIX}{SLICE_TABLE_FILE}"
    slices.to_parquet(partial, index=False)
    durable_replace(partial, out / SLICE_TABLE_FILE)


def check_same_options(manifest: dict, config: ChunkConfig, preprocess: PreprocessConfig, path: Path) -> None:
    # from_dict fills options added since the folder was written with their defaults
    saved_preprocess = PreprocessConfig.from_dict(manifest["preprocess"]).to_dict()
    saved = {**manifest["options"], **{f"preprocess.{k}": v for k, v in saved_preprocess.items()}}
    wanted = {**config.plan_options(), **{f"preprocess.{k}": v for k, v in preprocess.to_dict().items()}}
    differs = [f"{k}: {saved.get(k)!r} there, {wanted[k]!r} now" for k in wanted if saved.get(k) != wanted[k]]
    if differs:
        raise ValueError(f"{path} was planned with other options ({'; '.join(differs)}); use another --output_dir folder")


def write_shards(
    out: Path,
    todo: list[ShardPlan],
    slices: pd.DataFrame,
    preprocess: PreprocessConfig,
    config: ChunkConfig,
    on_shard_done: Callable[[dict[str, Any]], None] | None,
) -> None:
    wanted = {uid for plan in todo for uid in plan.studies}
    slices = slices[slices["StudyInstanceUID"].isin(wanted)].sort_values(["StudyInstanceUID", "slice_index"], kind="stable")
    by_study = {uid: rows.reset_index(drop=True) for uid, rows in slices.groupby("StudyInstanceUID", sort=False)}
    missing = wanted - set(by_study)
    if missing:
        raise ValueError(f"{out / SLICE_TABLE_FILE}: no slices for planned studies {sorted(missing)[:5]}")
    tasks = [(uid, slice_refs(by_study[uid])) for plan in todo for uid in plan.studies]
    total = sum(len(by_study[uid]) for uid, _ in tasks)
    studies = render_studies(tasks, preprocess, config.workers)
    try:
        with tqdm(total=total, unit="slice", desc="chunk", disable=not config.progress, smoothing=0.05) as bar:
            for plan in todo:
                bar.set_postfix_str(plan.path)
                meta = write_shard(out, plan, studies, by_study, preprocess, bar)
                if meta["problems"]:
                    print(f"chunk: {plan.path}: {len(meta['problems'])} slice(s) failed to decode (see manifest problems)")
                if on_shard_done is not None:
                    on_shard_done(meta)
    finally:
        studies.close()  # stops the workers and frees the shared memory, also when interrupted


def main(argv: Sequence[str] | None = None) -> int:
    config, preprocess = parse_config(
        ChunkConfig,
        argv,
        prog="vit-spine chunk",
        description="Preprocess the labelled training slices into ~15k-slice shards (HF datasets) plus "
        "validation shards, with a deterministic, label-stratified plan; resumable.",
        positionals=("data_dir",),
        extra_types=(PreprocessConfig,),
    )
    if not config.data_dir and not config.slice_table and not (Path(config.output_dir) / MANIFEST_FILE).is_file():
        raise ValueError("give DATA_DIR or --slice_table")
    manifest = chunk(config, preprocess)
    done = sum(s["complete"] for s in manifest["shards"])
    print(f"chunk: {done}/{len(manifest['shards'])} shards complete in {config.output_dir}")
    return 0
