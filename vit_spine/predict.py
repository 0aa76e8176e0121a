"""`vit-spine predict CHECKPOINT PATH... --output_file submission.csv`: score new CT studies, write a Kaggle submission.

Each PATH is one study (a folder holding DICOM files directly) or a folder of studies (`test_images/`):
there, each folder is one study, named by the folder (the Kaggle convention), whatever lies inside it
(nested series folders, extension-less or UID-named files). Studies stream one at a time: the study
assembly (`vit_spine.study`: one axial CT series, ordered along the slice normal) -> preprocess with
the options stored in the checkpoint -> the forward passes of `vit_spine.inference` -> the checkpoint's
aggregator (`vit_spine.aggregate`) and calibrator: the same code evaluation scores the validation shard
with. Memory stays bounded by one study (by workers + 1 studies with `--workers N`, which
decode ahead in other processes).

A submission is never lost: every study found, or listed by `--studies_csv`, gets its 8 rows. A slice that
cannot be decoded is skipped and its study still predicted; a study that cannot be used at all (no
axial CT series, nothing decodable, no folder) gets the checkpoint's prior (the training prevalence)
and is listed with its reason. Everything skipped or left out is written to `<out>.problems.csv`
beside the submission. Exit code 0: every study was predicted; 3: the submission is complete but some
studies got the prior (see the problems file); with `--strict` any such study is an error (exit 1,
no submission written).
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

from vit_spine import options
from vit_spine.artifacts import read_checkpoint_meta, resolve_checkpoint, verify_checkpoint
from vit_spine.options import aliases, parse_config
from vit_spine.schema import STUDY_TARGETS

# Output probabilities are clipped to [EPS, 1 - EPS]: strictly inside (0, 1) as Kaggle requires, and
# a confidently wrong study costs at most -log(EPS) = 13.8 instead of the metric's 34.5.
EPS = 1e-6
SLICE_TABLE_SUFFIXES = (".csv", ".parquet")
EXIT_FALLBACKS = 3  # the submission is complete, but some studies got the prior instead of a prediction
PROBLEM_COLUMNS = ("StudyInstanceUID", "level", "path", "frame", "reason")


@dataclass
class PredictConfig:
    checkpoint: str = field(
        metadata={"help": "a training run folder (its `best` checkpoint is used) or one shard's checkpoint folder.",
                  "aliases": aliases("model_name_or_path")}
    )
    paths: list[str] = field(
        metadata={
            "help": "study folders of .dcm files, or folders of study folders (test_images/); "
            "a study's StudyInstanceUID is its folder name."
        }
    )
    output_file: str = field(
        default="submission.csv",
        metadata={"help": "submission CSV to write (row_id,fractured); NAME.problems.csv beside it lists every study "
                  "that got the prior, every slice skipped and every file left out, with its reason.",
                  "aliases": aliases("out")},
    )
    studies_csv: str | None = field(
        default=None,
        metadata={
            "help": "Kaggle test.csv (row_id,StudyInstanceUID,prediction_type): write exactly its rows, in its order, "
            "and predict only the studies it lists.",
            "aliases": aliases("studies"),
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
    strict: bool = field(
        default=False,
        metadata={"help": "fail (exit 1, no submission) when a study cannot be predicted, instead of giving it the "
                  "checkpoint's prior (exit 3)."},
    )

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("give at least one PATH (a study folder or a folder of study folders)")

        self.workers = options.capped_workers(self.workers, minimum=0)
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.slices_out and Path(self.slices_out).suffix.lower() not in SLICE_TABLE_SUFFIXES:
            raise ValueError(f"--slices_out {self.slices_out}: the name must end in .csv or .parquet")
        options.device(self.device)
        options.folder_path(self.checkpoint, "CHECKPOINT")
        for path in self.paths:
            options.folder_path(path, "PATH")
        options.file_path(self.output_file, "--output_file")
        options.file_path(str(problems_path(Path(self.output_file))), "--output_file (its problems file)")
        options.file_path(self.slices_out, "--slices_out")
        options.file_path(self.studies_csv, "--studies_csv")


@dataclass
class StudyFolder:
    uid: str
    path: Path | None  # None: listed in --studies_csv but found under no PATH


@dataclass
class Predictor:
    """A loaded checkpoint with everything needed to turn a study's HU slices into its 8 probabilities."""

    checkpoint: Path
    model: object  # ViTForImageClassification, in eval mode on `device`
    preprocess: object  # PreprocessConfig
    pooling: object  # PoolingConfig
    aggregator: object  # the checkpoint's aggregator (vit_spine.aggregate), a learned one loaded from the checkpoint
    calibrator: object | None  # metrics.Calibrator fitted on the validation studies, or None
    device: object  # torch.device
    prior: np.ndarray  # (8,) the training prevalence: what a study that cannot be read is given

    def slice_probabilities(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """uint8 (n, 3, S, S) of one study -> sigmoid probabilities float64 (n, 14), fracture C1..C7 then visible C1..C7."""
        from vit_spine.inference import predict_probabilities

        return predict_probabilities(self.model, pixels, batch_size)

    def study_probabilities(self, uid: str, slice_probs: np.ndarray) -> np.ndarray:
        """(n, 14) slice probabilities of one study -> (8,) [patient_overall, C1..C7]: the checkpoint's aggregator
        (as evaluation pools), then its calibrator (when there is one) and the clip to [EPS, 1 - EPS]."""
        from vit_spine.aggregate import aggregate_studies

        _, probs = aggregate_studies(self.aggregator, np.full(len(slice_probs), uid, dtype=object), slice_probs)
        if self.calibrator is not None:
            probs = self.calibrator.transform(probs)
        return np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0 - EPS)[0]


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
    from vit_spine.aggregate import make_aggregator
    from vit_spine.evaluation import PoolingConfig
    from vit_spine.models import load_model
    from vit_spine.preprocess import PreprocessConfig

    path = resolve_checkpoint(checkpoint)
    meta = read_checkpoint_meta(path)
    verify_checkpoint(path, meta)
    if "preprocess" not in meta:
        raise ValueError(f"{path}: vit_spine.json has no `preprocess` entry; cannot know how to render slices")
    preprocess = PreprocessConfig.from_dict(meta["preprocess"])
    pooling = PoolingConfig.from_dict(meta.get("pooling", {}))
    # an aggregator this install does not know, or a learned one the checkpoint lacks, fails here, before any study is read
    aggregator = make_aggregator(pooling, checkpoint=path)
    calibrator = metrics.Calibrator.from_dict(meta["calibration"]) if meta.get("calibration") else None
    torch_device = pick_device(device)
    model = load_model(path).to(torch_device).eval()
    if int(model.config.image_size) != preprocess.image_size:
        raise ValueError(
            f"{path}: the model takes {model.config.image_size} px images but its stored preprocessing "
            f"renders {preprocess.image_size} px"
        )
    # Checkpoints older than the prior's introduction carry no prevalence: 0.5 is the honest "don't know".
    prior = np.clip(np.asarray(meta.get("baseline_prevalence", [0.5] * len(STUDY_TARGETS)), np.float64), EPS, 1.0 - EPS)
    return Predictor(path, model, preprocess, pooling, aggregator, calibrator, torch_device, prior)


def holds_dicom_files(folder: Path) -> bool:
    """Whether a folder holds a DICOM file directly (by content, whatever the file names)."""
    from vit_spine.dicom import looks_like_dicom

    return any(looks_like_dicom(p) for p in sorted(folder.iterdir()) if p.is_file())


def find_study_folders(paths: Sequence[str | Path]) -> list[StudyFolder]:
    """The studies under `paths`, in the given order (folders of studies sorted by name).

    A PATH that holds DICOM files directly is one study; any other PATH is a folder of studies, where
    each folder is one study named by its folder, whatever lies inside it.
    """
    studies: list[StudyFolder] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder (expected a study folder or a folder of study folders)")
        if holds_dicom_files(path):
            studies.append(StudyFolder(path.resolve().name, path))
            continue
        subfolders = sorted(p for p in path.iterdir() if p.is_dir())
        if not subfolders:
            raise FileNotFoundError(f"{path}: neither a study folder (no DICOM file in it) nor a folder of study folders")
        studies += [StudyFolder(p.name, p) for p in subfolders]
    seen: dict[str, Path | None] = {}
    for study in studies:
        if study.uid in seen:
            raise ValueError(f"study {study.uid} is given twice: {seen[study.uid]} and {study.path}")
        seen[study.uid] = study.path
    return studies


def select_listed_studies(studies: list[StudyFolder], test_table: pd.DataFrame) -> list[StudyFolder]:
    """The studies `test_table` lists, in its order; a listed study without a folder gets path None
    (it is predicted with the prior and reported)."""
    by_uid = {study.uid: study for study in studies}
    listed = list(dict.fromkeys(test_table["StudyInstanceUID"]))
    return [by_uid.get(uid, StudyFolder(uid, None)) for uid in listed]


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
    pixels: np.ndarray  # uint8 (n, 3, S, S), in volume order (along the slice normal, towards the head)
    slice_numbers: list[int]
    zs: np.ndarray  # float64 (n,): mm along the slice normal (NaN when the study has no positions)
    problems: list[tuple[str, int, str]]  # (path, frame, reason) of the slices that failed to decode
    left_out: list[tuple[str, int, str]]  # (path, frame, reason) of what the study assembly left out
    error: str  # why the study cannot be predicted at all ("" when it can)
    seconds: float  # reading + preprocessing


def decode_study(folder: StudyFolder, preprocess) -> DecodedStudy:
    """The study assembly (one axial CT volume, ordered) -> decoded slices -> preprocess_study.

    Never raises for a study's data: what cannot be used ends up in `problems`, `left_out` or `error`
    (an unexpected exception while reading one study included: one study must not cost the submission).
    """
    start = time.perf_counter()
    try:
        return _decode_study(folder, preprocess, start)
    except Exception as error:  # noqa: BLE001 - reported as this study's reason, the others go on
        return _unusable(folder.uid, preprocess, f"unexpected error while reading: {type(error).__name__}: {error}", start)


def _unusable(uid: str, preprocess, error: str, start: float, left_out=(), problems=()) -> DecodedStudy:
    empty = np.zeros((0, 3, preprocess.image_size, preprocess.image_size), np.uint8)
    return DecodedStudy(uid, empty, [], np.zeros(0), list(problems), list(left_out), error, time.perf_counter() - start)


def _decode_study(folder: StudyFolder, preprocess, start: float) -> DecodedStudy:
    from vit_spine.preprocess import render_volume, stack_channels
    from vit_spine.study import SliceRef, assemble_folder, slice_number

    if folder.path is None:
        return _unusable(folder.uid, preprocess, "listed in --studies_csv, but no folder of this name under the given path(s)", start)
    assembly = assemble_folder(folder.path)
    left_out = [(item.path, item.frame or 0, item.reason) for item in assembly.left_out]
    rendered, problems = render_volume([SliceRef.of(h) for h in assembly.slices], preprocess)
    kept = [i for i, image in enumerate(rendered) if image is not None]
    if assembly.error:
        return _unusable(folder.uid, preprocess, assembly.error, start, left_out)
    if not kept:
        error = f"none of the volume's {len(rendered)} slices could be decoded (first: {problems[0][2]})"
        return _unusable(folder.uid, preprocess, error, start, left_out, problems)
    return DecodedStudy(
        uid=folder.uid,
        pixels=stack_channels([rendered[i] for i in kept], preprocess),
        slice_numbers=[slice_number(assembly.slices[i]) for i in kept],
        zs=np.array([np.nan if assembly.positions[i] is None else assembly.positions[i] for i in kept], np.float64),
        problems=problems,
        left_out=left_out,
        error="",
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
    probs: np.ndarray  # (8,) patient_overall, C1..C7: pooled, calibrated, clipped (or the prior)
    slices: pd.DataFrame  # StudyInstanceUID, slice_number, z, fracture_C1..C7, visible_C1..C7
    model_seconds: float
    fallback: str = ""  # why the study got the prior ("" when it was predicted)


def predict_decoded(predictor: Predictor, study: DecodedStudy, batch_size: int) -> StudyPrediction:
    """The model's study probabilities, or the prior when the study could not be read."""
    from vit_spine.schema import SLICE_TARGETS

    if study.error:
        return StudyPrediction(study.uid, predictor.prior.copy(), pd.DataFrame(), 0.0, study.error)
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
    slices = pd.concat([slices, pd.DataFrame(probs, columns=list(SLICE_TARGETS))], axis=1)
    return StudyPrediction(study.uid, predictor.study_probabilities(study.uid, probs), slices, seconds)


@dataclass
class Predictions:
    submission: pd.DataFrame  # row_id, fractured
    slices: pd.DataFrame  # StudyInstanceUID, slice_number, z, fracture_C1..C7, visible_C1..C7
    problems: pd.DataFrame  # PROBLEM_COLUMNS: studies given the prior, slices skipped, files left out
    fallbacks: list[tuple[str, str]]  # (uid, reason) of the studies that got the prior
    unlisted: list[str]  # studies found under the paths but not asked for by --studies_csv, so not predicted
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
    """Predict every study under `paths` (only those `studies` = test.csv lists, when given, and every one of them).

    `on_problem(where, reason)` is called for each skipped slice and each study given the prior as it
    happens (default: printed).
    """
    from vit_spine.labels import read_test_table

    started = time.perf_counter()
    report = on_problem or (lambda where, reason: tqdm.write(f"{where}: {reason}", file=sys.stderr))
    folders = find_study_folders(paths)
    test_table = None
    unlisted: list[str] = []
    if studies is not None:
        test_table = read_test_table(studies)
        listed = select_listed_studies(folders, test_table)
        unlisted = sorted({f.uid for f in folders} - {f.uid for f in listed})
        folders = listed
    predictor = load_predictor(checkpoint, device)  # after the inputs are checked: a bad PATH fails at once

    results: list[StudyPrediction] = []
    problem_rows: list[tuple] = []
    decode_seconds = wait_seconds = 0.0
    bar = tqdm(total=len(folders), desc="predicting", unit="study", disable=not progress)
    decoded = decoded_studies(folders, predictor.preprocess, workers)
    while True:
        waited = time.perf_counter()
        study = next(decoded, None)
        wait_seconds += time.perf_counter() - waited
        if study is None:
            break
        for path, frame, reason in study.problems:
            report(f"skipped slice {path}" + (f" frame {frame}" if frame else ""), reason)
        if study.error:
            report(f"study {study.uid} gets the prior", study.error)
        problem_rows += study_problem_rows(study)
        decode_seconds += study.seconds
        results.append(predict_decoded(predictor, study, batch_size))
        bar.update()
        del study
    bar.close()

    probs = np.array([r.probs for r in results]).reshape(-1, len(STUDY_TARGETS))
    submission = submission_rows([r.uid for r in results], probs)
    if test_table is not None:
        submission = rows_for_test_table(submission, test_table)
    predicted = [r.slices for r in results if len(r.slices)]
    slices = pd.concat(predicted, ignore_index=True) if predicted else pd.DataFrame()
    return Predictions(
        submission=submission,
        slices=slices,
        problems=pd.DataFrame(problem_rows, columns=list(PROBLEM_COLUMNS)),
        fallbacks=[(r.uid, r.fallback) for r in results if r.fallback],
        unlisted=unlisted,
        checkpoint=predictor.checkpoint,
        num_studies=len(results),
        num_slices=len(slices),
        decode_seconds=decode_seconds,
        decode_wait_seconds=wait_seconds,
        model_seconds=sum(r.model_seconds for r in results),
        wall_seconds=time.perf_counter() - started,
    )


def study_problem_rows(study: DecodedStudy) -> list[tuple]:
    """Rows of the problems file for one study: its fallback, its skipped slices, what was left out."""
    rows = [(study.uid, "study", "", "", f"given the prior: {study.error}")] if study.error else []
    rows += [(study.uid, "slice", path, frame, reason) for path, frame, reason in study.problems]
    rows += [(study.uid, "left_out", path, frame, reason) for path, frame, reason in study.left_out]
    return rows


def problems_path(out: Path) -> Path:
    """OUT.problems.csv beside the submission (submission.csv -> submission.problems.csv)."""
    return out.with_name(f"{out.stem}.problems.csv")


def write_table(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


def problem_summary(result: Predictions, shown: int = 20) -> str:
    """What the run could not predict or read, for the end of its output."""
    problems = result.problems
    lines = []
    if result.fallbacks:
        lines.append(f"{len(result.fallbacks)} study(ies) got the checkpoint's prior instead of a prediction:")
        lines += [f"  {uid}: {reason}" for uid, reason in result.fallbacks[:shown]]
        if len(result.fallbacks) > shown:
            lines.append(f"  ... and {len(result.fallbacks) - shown} more")
    skipped = problems[problems["level"] == "slice"]
    if len(skipped):
        lines.append(f"{len(skipped)} slice(s) could not be decoded and were skipped (their studies were predicted)")
    left_out = problems[problems["level"] == "left_out"]
    if len(left_out):
        kinds = left_out["reason"].str.extract(r"^left out \((\w+)\)")[0].value_counts()
        listed = ", ".join(f"{kind} {count}" for kind, count in kinds.items())
        lines.append(f"{len(left_out)} file(s)/frame(s) left out by the study assembly ({listed})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    (config,) = parse_config(
        PredictConfig,
        argv,
        prog="vit-spine predict",
        description=__doc__.split("\n")[0],
        positionals=("checkpoint", "paths"),
    )
    result = predict_studies(
        config.checkpoint,
        config.paths,
        studies=config.studies_csv,
        batch_size=config.batch_size,
        device=config.device,
        workers=config.workers,
        progress=config.progress,
    )
    out = Path(config.output_file)
    write_table(result.problems, problems_path(out))
    print(f"checkpoint {result.checkpoint}")
    print(f"{result.num_studies} studies, {result.num_slices} slices in {result.wall_seconds:.1f} s")
    summary = problem_summary(result)
    if summary:
        print(summary, file=sys.stderr)
    if result.fallbacks and config.strict:
        print(f"vit-spine predict: error: --strict: {len(result.fallbacks)} study(ies) could not be predicted; "
              f"no submission written (reasons in {problems_path(out)})", file=sys.stderr)
        return 1
    write_table(result.submission, out)
    print(f"submission: {out} ({len(result.submission)} rows); problems: {problems_path(out)} ({len(result.problems)} rows)")
    if config.slices_out:
        write_table(result.slices, Path(config.slices_out))
        print(f"slice scores: {config.slices_out}")
    if result.unlisted:
        print(f"{len(result.unlisted)} study folder(s) not listed in {config.studies_csv} were not predicted")
    return EXIT_FALLBACKS if result.fallbacks else 0
