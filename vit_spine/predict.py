"""`vit-spine predict CHECKPOINT PATH... --out submission.csv`: score new CT studies, write a Kaggle submission.

Each PATH is a study folder of `.dcm` files or a folder of study folders (`test_images/`); a study's
StudyInstanceUID is its folder name, as in the RSNA layout. Studies stream one at a time: read
(`read_study`, slices sorted by z) -> preprocess with the options stored in the checkpoint ->
batched forward passes (bf16 autocast on CUDA) -> slice -> vertebra -> patient pooling and the
checkpoint's calibrator, exactly as evaluation scores the validation shard. Memory stays bounded by
one study (by workers + 1 studies with `--workers N`, which decode ahead in other processes). A slice
that cannot be decoded is reported and skipped; its study is still predicted.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from vit_spine import STUDY_TARGETS, VERTEBRAE

# Output probabilities are clipped to [EPS, 1 - EPS]: strictly inside (0, 1) as Kaggle requires, and
# a confidently wrong study costs at most -log(EPS) = 13.8 instead of the metric's 34.5.
EPS = 1e-6
SLICE_TABLE_SUFFIXES = (".csv", ".parquet")


@dataclass
class PredictConfig:
    checkpoint: str = field(
        metadata={"help": "a training run folder (its `best` checkpoint is used) or one shard's checkpoint folder."}
    )
    paths: list[str] = field(
        metadata={
            "help": "study folders of .dcm files, or folders of study folders (test_images/); "
            "a study's StudyInstanceUID is its folder name."
        }
    )
    out: str = field(default="submission.csv", metadata={"help": "submission CSV to write (row_id,fractured)."})
    studies: str | None = field(
        default=None,
        metadata={
            "help": "Kaggle test.csv (row_id,StudyInstanceUID,prediction_type): write exactly its rows, in its order, "
            "and predict only the studies it lists."
        },
    )
    slices_out: str | None = field(
        default=None,
        metadata={"help": "also write per-slice probabilities here (.csv or .parquet): uid, slice_number, z, 14 outputs."},
    )
    batch_size: int = field(default=64, metadata={"help": "slices per forward pass."})
    device: str = field(default="auto", metadata={"help": "torch device: auto (cuda when available), cpu, cuda, cuda:1 ..."})
    workers: int = field(
        default=0,
        metadata={
            "help": "processes reading and preprocessing studies ahead of the model (0 = in this process, one "
            "study in memory at a time; N holds up to N + 1 decoded studies)."
        },
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar over studies."})

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("give at least one PATH (a study folder or a folder of study folders)")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.slices_out and Path(self.slices_out).suffix.lower() not in SLICE_TABLE_SUFFIXES:
            raise ValueError(f"--slices_out {self.slices_out}: the name must end in .csv or .parquet")


@dataclass
class StudyFolder:
    uid: str
    path: Path


@dataclass
class Predictor:
    """A loaded checkpoint with everything needed to turn a study's HU slices into its 8 probabilities."""

    checkpoint: Path
    model: object  # ViTForImageClassification, in eval mode on `device`
    preprocess: object  # PreprocessConfig
    pooling: object  # PoolingConfig
    calibrator: object | None  # metrics.Calibrator fitted on the validation studies, or None
    device: object  # torch.device

    def slice_probabilities(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """uint8 (n, 3, S, S) -> sigmoid probabilities float64 (n, 14), fracture C1..C7 then visible C1..C7."""
        import torch

        from vit_spine.data import normalize

        logits = []
        on_cuda = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on_cuda):
            for start in range(0, len(pixels), batch_size):
                batch = torch.from_numpy(pixels[start : start + batch_size]).to(self.device, non_blocking=True)
                logits.append(self.model(pixel_values=normalize(batch)).logits.float().cpu().numpy())
        # the same float64 sigmoid evaluation applies to the Trainer's logits
        return 1.0 / (1.0 + np.exp(-np.concatenate(logits).astype(np.float64)))

    def study_probabilities(self, uid: str, slice_probs: np.ndarray) -> np.ndarray:
        """(n, 14) slice probabilities of one study -> (8,) [patient_overall, C1..C7], pooled and calibrated."""
        return pool_and_calibrate(np.full(len(slice_probs), uid, dtype=object), slice_probs, self.pooling, self.calibrator)[1][0]


def pool_and_calibrate(study_ids: np.ndarray, slice_probs: np.ndarray, pooling, calibrator) -> tuple[np.ndarray, np.ndarray]:
    """Slice probabilities (n, 14) -> (uids (m,), study probabilities (m, 8)), the way evaluation pools them,
    then the stored calibrator (when there is one) and the clip to [EPS, 1 - EPS]."""
    from vit_spine import metrics

    uids, vertebra = metrics.pool_slices_to_studies(study_ids, slice_probs[:, : len(VERTEBRAE)], how=pooling.slice_pool)
    patient = metrics.vertebra_to_patient(vertebra, how=pooling.patient_pool)
    probs = metrics.study_matrix(uids, vertebra, patient)
    if calibrator is not None:
        probs = calibrator.transform(probs)
    return np.asarray(uids), np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0 - EPS)


def pick_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_predictor(checkpoint: str | Path, device: str = "auto") -> Predictor:
    """Load a checkpoint (or a run folder's `best`) with its preprocessing, pooling and calibration."""
    from vit_spine import metrics
    from vit_spine.evaluation import PoolingConfig, read_checkpoint_meta, resolve_checkpoint
    from vit_spine.model import load_model
    from vit_spine.preprocess import PreprocessConfig

    path = resolve_checkpoint(checkpoint)
    meta = read_checkpoint_meta(path)
    if "preprocess" not in meta:
        raise ValueError(f"{path}: vit_spine.json has no `preprocess` entry; cannot know how to render slices")
    preprocess = PreprocessConfig.from_dict(meta["preprocess"])
    pooling = PoolingConfig(**meta.get("pooling", {}))
    calibrator = metrics.Calibrator.from_dict(meta["calibration"]) if meta.get("calibration") else None
    torch_device = pick_device(device)
    model = load_model(path).to(torch_device).eval()
    if int(model.config.image_size) != preprocess.image_size:
        raise ValueError(
            f"{path}: the model takes {model.config.image_size} px images but its stored preprocessing "
            f"renders {preprocess.image_size} px"
        )
    return Predictor(path, model, preprocess, pooling, calibrator, torch_device)


def has_dicom_files(folder: Path) -> bool:
    return any(folder.glob("*.dcm"))


def find_study_folders(paths: Sequence[str | Path]) -> tuple[list[StudyFolder], list[tuple[str, str]]]:
    """Study folders under `paths`, in the given order (folders of studies sorted by name).

    Returns (studies, skipped) where skipped lists (path, reason) of sub-folders without .dcm files.
    """
    studies: list[StudyFolder] = []
    skipped: list[tuple[str, str]] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder (expected a study folder or a folder of study folders)")
        if has_dicom_files(path):
            studies.append(StudyFolder(path.resolve().name, path))
            continue
        subfolders = sorted(p for p in path.iterdir() if p.is_dir())
        found = [p for p in subfolders if has_dicom_files(p)]
        if not found:
            raise FileNotFoundError(f"{path}: neither a study folder (no .dcm files) nor a folder of study folders")
        studies += [StudyFolder(p.name, p) for p in found]
        skipped += [(str(p), "no .dcm files in this folder; not a study") for p in subfolders if p not in found]
    seen: dict[str, Path] = {}
    for study in studies:
        if study.uid in seen:
            raise ValueError(f"study {study.uid} is given twice: {seen[study.uid]} and {study.path}")
        seen[study.uid] = study.path
    return studies, skipped


def select_listed_studies(studies: list[StudyFolder], test_table: pd.DataFrame, source: str) -> list[StudyFolder]:
    """The study folders `test_table` lists, in its order; a listed study without a folder is an error."""
    by_uid = {study.uid: study for study in studies}
    listed = list(dict.fromkeys(test_table["StudyInstanceUID"]))
    missing = [uid for uid in listed if uid not in by_uid]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{source} lists {len(missing)} study(ies) with no images under the given path(s): {shown}")
    return [by_uid[uid] for uid in listed]


def submission_rows(uids: Sequence[str], probs: np.ndarray) -> pd.DataFrame:
    """8 rows per study: <uid>_patient_overall, <uid>_C1 .. <uid>_C7."""
    row_ids = [f"{uid}_{target}" for uid in uids for target in STUDY_TARGETS]
    return pd.DataFrame({"row_id": row_ids, "fractured": np.asarray(probs, dtype=np.float64).reshape(-1)})


def rows_for_test_table(predicted: pd.DataFrame, test_table: pd.DataFrame) -> pd.DataFrame:
    """The predicted rows test.csv asks for, in its order."""
    lookup = predicted.set_index("row_id")["fractured"]
    return pd.DataFrame({"row_id": test_table["row_id"].to_numpy(), "fractured": lookup.loc[test_table["row_id"]].to_numpy()})


@dataclass
class DecodedStudy:
    """One study read and preprocessed: what the model needs, and what went wrong on the way."""

    uid: str
    pixels: np.ndarray  # uint8 (n, 3, S, S), z ascending
    slice_numbers: list[int | None]
    zs: np.ndarray  # float64 (n,)
    problems: list[tuple[str, str]]  # (path, reason) of the slices skipped
    seconds: float  # reading + preprocessing


def decode_study(folder: StudyFolder, preprocess) -> DecodedStudy:
    """read_study (slices sorted by z; bad slices reported, not fatal) -> preprocess_study."""
    from vit_spine.dicom import read_study
    from vit_spine.preprocess import preprocess_study

    start = time.perf_counter()
    study = read_study(folder.path)
    pixels = preprocess_study([hu for _, hu in study.slices], preprocess)
    headers = [header for header, _ in study.slices]
    return DecodedStudy(
        uid=folder.uid,
        pixels=pixels,
        slice_numbers=[h.slice_number for h in headers],
        zs=np.array([h.z for h in headers], dtype=np.float64),
        problems=list(study.problems),
        seconds=time.perf_counter() - start,
    )


def _init_decoder() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already


def decoded_studies(folders: Sequence[StudyFolder], preprocess, workers: int) -> Iterator[DecodedStudy]:
    """Decoded studies in the order of `folders`: here (workers=0) or in `workers` processes.

    At most workers + 1 studies are decoded ahead, so memory stays bounded by a few studies.
    """
    if workers == 0:
        for folder in folders:
            yield decode_study(folder, preprocess)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads / CUDA
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_decoder) as pool:
        pending: deque = deque()
        queue = iter(folders)
        while True:
            while len(pending) <= workers:
                folder = next(queue, None)
                if folder is None:
                    break
                pending.append(pool.submit(decode_study, folder, preprocess))
            if not pending:
                return
            yield pending.popleft().result()


@dataclass
class StudyPrediction:
    uid: str
    probs: np.ndarray  # (8,) patient_overall, C1..C7: pooled, calibrated, clipped
    slices: pd.DataFrame  # StudyInstanceUID, slice_number, z, fracture_C1..C7, visible_C1..C7
    model_seconds: float


def predict_decoded(predictor: Predictor, study: DecodedStudy, batch_size: int) -> StudyPrediction:
    from vit_spine.model import LABEL_NAMES

    start = time.perf_counter()
    probs = predictor.slice_probabilities(study.pixels, batch_size)
    seconds = time.perf_counter() - start
    slices = pd.DataFrame(
        {
            "StudyInstanceUID": study.uid,
            "slice_number": pd.array(study.slice_numbers, dtype="Int64"),
            "z": study.zs,
        }
    )
    slices = pd.concat([slices, pd.DataFrame(probs, columns=list(LABEL_NAMES))], axis=1)
    return StudyPrediction(study.uid, predictor.study_probabilities(study.uid, probs), slices, seconds)


@dataclass
class Predictions:
    submission: pd.DataFrame  # row_id, fractured
    slices: pd.DataFrame  # StudyInstanceUID, slice_number, z, fracture_C1..C7, visible_C1..C7
    problems: list[tuple[str, str]]  # (path, reason) of every slice or folder skipped
    unlisted: list[str]  # studies found under the paths but not asked for by --studies, so not predicted
    checkpoint: Path
    num_studies: int
    num_slices: int
    decode_seconds: float  # reading DICOM + preprocessing, summed over studies (in the workers, if any)
    decode_wait_seconds: float  # wall time the model side waited for decoded studies
    model_seconds: float  # forward passes, including host <-> device copies
    wall_seconds: float


def predict_studies(
    checkpoint: str | Path,
    paths: Sequence[str | Path],
    studies: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    workers: int = 0,
    progress: bool = True,
    on_problem: Callable[[str, str], None] | None = None,
) -> Predictions:
    """Predict every study under `paths` (only those `studies` = test.csv lists, when given).

    `on_problem(path, reason)` is called for each skipped slice as it happens (default: printed).
    """
    from vit_spine.labels import read_test_table

    started = time.perf_counter()
    report = on_problem or (lambda path, reason: tqdm.write(f"skipped slice {path}: {reason}", file=sys.stderr))
    predictor = load_predictor(checkpoint, device)
    folders, problems = find_study_folders(paths)
    test_table = None
    unlisted: list[str] = []
    if studies is not None:
        test_table = read_test_table(studies)
        listed = select_listed_studies(folders, test_table, str(studies))
        unlisted = sorted({f.uid for f in folders} - {f.uid for f in listed})
        folders = listed

    results: list[StudyPrediction] = []
    decode_seconds = wait_seconds = 0.0
    bar = tqdm(total=len(folders), desc="predicting", unit="study", disable=not progress)
    decoded = decoded_studies(folders, predictor.preprocess, workers)
    while True:
        waited = time.perf_counter()
        study = next(decoded, None)
        wait_seconds += time.perf_counter() - waited
        if study is None:
            break
        for path, reason in study.problems:
            report(path, reason)
        problems += study.problems
        decode_seconds += study.seconds
        results.append(predict_decoded(predictor, study, batch_size))
        bar.update()
        del study
    bar.close()

    probs = np.array([r.probs for r in results]).reshape(-1, len(STUDY_TARGETS))
    submission = submission_rows([r.uid for r in results], probs)
    if test_table is not None:
        submission = rows_for_test_table(submission, test_table)
    slices = pd.concat([r.slices for r in results], ignore_index=True) if results else pd.DataFrame()
    return Predictions(
        submission=submission,
        slices=slices,
        problems=problems,
        unlisted=unlisted,
        checkpoint=predictor.checkpoint,
        num_studies=len(results),
        num_slices=len(slices),
        decode_seconds=decode_seconds,
        decode_wait_seconds=wait_seconds,
        model_seconds=sum(r.model_seconds for r in results),
        wall_seconds=time.perf_counter() - started,
    )


def write_table(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


def problem_summary(problems: list[tuple[str, str]], shown: int = 20) -> str:
    lines = [f"{len(problems)} file(s)/folder(s) skipped:"]
    lines += [f"  {path}: {reason}" for path, reason in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more (each was printed as it happened)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from vit_spine.cli import parse_config
    from vit_spine.dicom import DicomReadError

    (config,) = parse_config(
        PredictConfig,
        argv,
        prog="vit-spine predict",
        description=__doc__.split("\n")[0],
        positionals=("checkpoint", "paths"),
    )
    try:
        result = predict_studies(
            config.checkpoint,
            config.paths,
            studies=config.studies,
            batch_size=config.batch_size,
            device=config.device,
            workers=config.workers,
            progress=config.progress,
        )
    except (FileNotFoundError, ValueError, DicomReadError) as error:
        print(f"vit-spine predict: error: {error}", file=sys.stderr)
        return 1
    out = Path(config.out)
    write_table(result.submission, out)
    print(f"checkpoint {result.checkpoint}")
    print(f"{result.num_studies} studies, {result.num_slices} slices in {result.wall_seconds:.1f} s")
    print(f"submission: {out} ({len(result.submission)} rows)")
    if config.slices_out:
        write_table(result.slices, Path(config.slices_out))
        print(f"slice scores: {config.slices_out}")
    if result.unlisted:
        print(f"{len(result.unlisted)} study folder(s) not listed in {config.studies} were not predicted")
    if result.problems:
        print(problem_summary(result.problems), file=sys.stderr)
    return 0
