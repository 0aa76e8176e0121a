"""Push shard checkpoints to the Hugging Face Hub: `vit-spine push CHECKPOINT --hub_model_id NAME`.

Layout on the Hub (one model repo per run):

- Every pushed shard is exactly ONE commit holding its weights (`*.safetensors`), `config.json`,
  `vit_spine.json` (preprocessing, pooling, calibration, metrics), `trainer_state.json` and a
  generated `README.md` model card. The commit message names the shard and its validation score:
  `shard 00002: val weighted log loss 0.4123 (baseline 0.5638) [best]`.
- A shard that is the run's best so far is committed to `main`, so `main` always holds the best
  checkpoint (`from_pretrained(repo_id)` gets it) and main's history is the run's sequence of
  improvements. Any other shard is committed to its own branch `shard-XXXXX`, created from main.
- Every shard is reachable as `revision="shard-XXXXX"`: for a best shard that name is a branch
  created at its main commit (no extra commit). A branch of that name left by an earlier push is
  reused as it is.

The token comes from `--hub_token`, else `HF_TOKEN` or `hf auth login` (huggingface_hub resolves it) and is never
printed: every message that leaves this module has it masked. A push never writes to the local
checkpoint; a failed one is retried (connection errors, 5xx, 429) with a doubling backoff, and
is returned as `PushResult(ok=False, error=...)` with a message that says what to do; nothing is
retried when the Hub refuses the token (401/403) or the request (other 4xx).

The endpoint is `HF_ENDPOINT` as set when `push_checkpoint` runs (read here: huggingface_hub itself
reads it only once, when it is imported), else https://huggingface.co.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path

from vit_spine import options
from vit_spine.artifacts import RunDir, ShardSaved, best_row, read_checkpoint_meta, resolve_checkpoint
from vit_spine.evaluation import format_aggregator_table, format_table
from vit_spine.options import aliases, parse_config
from vit_spine.schema import CHECKPOINT_META_FILE, EVAL_RESULTS_FILE, TRAINER_STATE_FILE

REQUIRED_FILES = ("config.json", CHECKPOINT_META_FILE)
OPTIONAL_FILES = (TRAINER_STATE_FILE, EVAL_RESULTS_FILE)
DEFAULT_ENDPOINT = "https://huggingface.co"
RETRYABLE_STATUS = (408, 409, 429, 500, 502, 503, 504)  # 409: a concurrent commit moved the branch


@dataclass
class PushResult:
    ok: bool
    checkpoint: Path
    repo_id: str
    revision: str  # the branch the commit went to
    attempts: int
    commit_url: str | None = None
    commit_oid: str | None = None
    error: str | None = None

    def summary(self) -> str:
        if self.ok:
            return f"pushed {self.checkpoint} to {self.repo_id}@{self.revision}: {self.commit_url}"
        return f"push of {self.checkpoint} to {self.repo_id} failed: {self.error}"


# --- local side: which checkpoint, which files, which branch, what the card says ------------------


def checkpoint_files(checkpoint: Path) -> list[Path]:
    """The files a push uploads: weights, config, vit_spine.json and trainer state (not Trainer folders)."""
    missing = [name for name in REQUIRED_FILES if not (checkpoint / name).is_file()]
    weights = sorted(checkpoint.glob("*.safetensors")) + sorted(checkpoint.glob("*.safetensors.index.json"))
    if not weights:
        missing.append("*.safetensors")
    if missing:
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint: missing {', '.join(missing)}")
    extra = [checkpoint / name for name in OPTIONAL_FILES if (checkpoint / name).is_file()]
    return weights + [checkpoint / name for name in REQUIRED_FILES] + extra


def shard_branch(shard: int) -> str:
    return f"shard-{shard:05d}"


def commit_message(meta: dict, best: bool) -> str:
    metrics = meta["metrics"]
    message = f"shard {meta['shard']:05d}: val weighted log loss {metrics['weighted_log_loss']:.4f}"
    if metrics.get("baseline_weighted_log_loss") is not None:
        message += f" (baseline {metrics['baseline_weighted_log_loss']:.4f})"
    return message + (" [best]" if best else "")


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def key_value_table(values: dict) -> str:
    lines = ["| setting | value |", "|---|---|"]
    for key, value in values.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        lines.append(f"| {key} | `{shown}` |")
    return "\n".join(lines)


def model_card(checkpoint: Path, meta: dict, rows: list[dict], repo_id: str, revision: str, min_delta: float = 0.0) -> str:
    """README.md for the Hub: metrics, preprocessing, label order, pooling and how to load the model.
    `rows` are the run's metrics rows and `min_delta` its --min_delta: together they say which shard is best."""
    from huggingface_hub import ModelCardData

    config = json.loads((checkpoint / "config.json").read_text())
    id2label = config.get("id2label") or {}
    labels = [id2label[k] for k in sorted(id2label, key=int)]
    preprocess = meta.get("preprocess") or {}
    pooling = meta.get("pooling") or {}
    rows = rows or [{"shard": meta["shard"], **meta["metrics"]}]
    if all(r["shard"] != meta["shard"] for r in rows):
        rows = [*rows, {"shard": meta["shard"], **meta["metrics"]}]
    shard = meta["shard"]
    revision_arg = "" if revision == "main" else f', revision="{revision}"'
    size = preprocess.get("image_size", config.get("image_size", "S"))
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["vit", "vit-spine", "medical-imaging", "computed-tomography", "cervical-spine-fracture"],
    ).to_yaml()
    calibration = "fitted on the validation studies, stored in `vit_spine.json`" if meta.get("calibration") else "none"
    table = format_table(sorted(rows, key=lambda r: r["shard"]), "markdown", best_shard=best_row(rows, min_delta)["shard"],
                         current_shard=shard)
    return f"""---
{metadata}
---

# {repo_id}

A Vision Transformer fine-tuned with vit-spine to detect cervical spine (C1-C7)
fractures on axial CT slices (RSNA 2022 Cervical Spine Fracture Detection layout). It was trained on
one shard of slices after another, each shard starting from the previous shard's weights.

This revision (`{revision}`) holds **shard {shard:05d}**. The `main` branch always holds the best
checkpoint of the run; every pushed shard stays available as `revision="{shard_branch(shard)}"`.

## Validation metrics

Competition weighted log loss on held-out studies (lower is better; the baseline predicts the
training prevalence of each target), and ROC AUC at study level.

{table}

## How to load it

```python
import torch
from transformers import ViTForImageClassification

model = ViTForImageClassification.from_pretrained("{repo_id}"{revision_arg}).eval()
# pixel_values: (n_slices, 3, {size}, {size}) float32, preprocessed as below, then x / 255 scaled to [-1, 1]
with torch.no_grad():
    probs = torch.sigmoid(model(pixel_values=pixel_values).logits)
fracture = probs[:, :7]  # fracture C1..C7, per slice
visible = probs[:, 7:]   # vertebra C1..C7 visible in the slice
```

The {len(labels)} sigmoid outputs (multi-label), in this order: {", ".join(f"`{name}`" for name in labels)}.

Per study, slice scores are pooled to vertebrae and the patient by the `{pooling.get("aggregator", "max")}` aggregator
(`max`: a vertebra's most suspicious slice; `topk`: the mean of its k most suspicious; `sequence`: a small
bidirectional GRU over the study's z-ordered slice logits, fitted on studies the slice model had not trained on,
stored as `aggregator_sequence.safetensors`):

{key_value_table(pooling) if pooling else "(pooling not recorded)"}

Every aggregator on the validation studies, per shard (weighted log loss with cross-fitted calibration, mean AUC C1-C7):

{format_aggregator_table(sorted(rows, key=lambda r: r["shard"]), "markdown") if any("aggregators" in r for r in rows) else "(not recorded)"}

Calibration: {calibration}. `vit-spine predict` applies the preprocessing, pooling and calibration of
`vit_spine.json` and writes a Kaggle submission.

## Preprocessing

Each DICOM slice is converted to Hounsfield units (modality LUT), windowed into 3 channels and
resized to {size} px, stored as uint8:

{key_value_table(preprocess) if preprocess else "(preprocessing not recorded)"}

## Files

- `model.safetensors`, `config.json`: the `ViTForImageClassification` weights and config
- `vit_spine.json`: shard index, validation metrics, preprocessing, pooling, calibration
- `aggregator_sequence.safetensors` (when the run fitted it): the sequence aggregator's head
- `next_shard_logits.npz` (shards before the last): this model's logits of the next shard's studies, what the
  later shards' sequence heads were fitted on
- `trainer_state.json`: the Trainer's log of this shard
"""


# --- Hub side ---------------------------------------------------------------------------------


@dataclass
class PushPlan:
    checkpoint: Path
    files: list[Path]
    shard: int
    revision: str
    best: bool
    message: str
    description: str
    card: str


def plan_push(
    checkpoint: Path, repo_id: str, run_dir: Path | None, is_best: bool | None, revision: str | None
) -> PushPlan:
    meta = read_checkpoint_meta(checkpoint)
    files = checkpoint_files(checkpoint)
    run = RunDir(run_dir) if run_dir is not None else None
    best = (run is not None and run.is_best(checkpoint)) if is_best is None else is_best
    revision = revision or ("main" if best else shard_branch(meta["shard"]))
    metrics = meta["metrics"]
    description = (
        f"Checkpoint {checkpoint.name}, global step {metrics.get('global_step', 'n/a')}; "
        f"uncalibrated weighted log loss {_fmt(metrics.get('weighted_log_loss_uncalibrated'))}."
    )
    rows, min_delta = (run.read_rows(), run.min_delta()) if run is not None else ([], 0.0)
    card = model_card(checkpoint, meta, rows, repo_id, revision, min_delta)
    return PushPlan(checkpoint, files, meta["shard"], revision, best, commit_message(meta, best), description, card)


def hub_endpoint(endpoint: str | None = None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def push_checkpoint(
    checkpoint_dir: str | Path,
    repo_id: str,
    *,
    is_best: bool | None = None,
    run_dir: str | Path | None = None,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    retries: int = 3,
    backoff_s: float = 2.0,
    endpoint: str | None = None,
) -> PushResult:
    """Push one shard checkpoint as one commit (see the module docstring for the branch layout).

    `checkpoint_dir`: a shard folder, or a run folder (then its `best`). `is_best`: commit to main
    (True) or to `shard-XXXXX` (False); None = main when `run_dir/best` points at this checkpoint.
    `run_dir` (default: the checkpoint's parent when it is a run folder) fills the card's metric
    table from metrics.jsonl. `revision` forces the branch. `retries` attempts in all, waiting
    `backoff_s`, then twice that, ... between them.

    Raises FileNotFoundError / ValueError for an invalid checkpoint (checked before any request);
    every Hub-side failure comes back as `PushResult(ok=False, error=...)`.
    """
    checkpoint = resolve_checkpoint(checkpoint_dir)
    run = RunDir(Path(run_dir)) if run_dir is not None else RunDir.of_checkpoint(checkpoint)
    if retries < 1:
        raise ValueError(f"retries={retries}: need at least one attempt")
    plan = plan_push(checkpoint, repo_id, run.path if run else None, is_best, revision)
    return send_push(plan, repo_id, private=private, token=token, retries=retries, backoff_s=backoff_s, endpoint=endpoint)


def send_push(
    plan: PushPlan,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    retries: int = 3,
    backoff_s: float = 2.0,
    endpoint: str | None = None,
) -> PushResult:
    """Upload a planned push as one commit, retrying as `push_checkpoint` describes.

    Reads only the checkpoint's files, so it can run in a background thread while training writes
    the next shard (the plan, with the model card, is made beforehand from the run's metrics).
    """
    checkpoint = plan.checkpoint
    endpoint = hub_endpoint(endpoint)
    result = PushResult(ok=False, checkpoint=checkpoint, repo_id=repo_id, revision=plan.revision, attempts=0)

    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        result.error = (
            "no Hugging Face token found: set HF_TOKEN to a token with write access or run `hf auth login`. "
            + keep_hint(checkpoint, repo_id)
        )
        return result
    api = HfApi(endpoint=endpoint, token=token)
    for attempt in range(1, retries + 1):
        result.attempts = attempt
        try:
            info = push_once(api, repo_id, plan, private)
        except Exception as err:  # noqa: BLE001 - every failure becomes a report, training goes on
            reason, retryable = describe_failure(err, endpoint, repo_id)
            reason = mask(reason, token)
            if not retryable or attempt == retries:
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                result.error = f"{reason}{tries}. {keep_hint(checkpoint, repo_id)}"
                return result
            wait = backoff_s * 2 ** (attempt - 1)
            print(
                f"push {checkpoint.name} -> {repo_id}: attempt {attempt}/{retries} failed: {reason}; "
                f"retrying in {wait:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(wait)
            continue
        result.ok, result.commit_url, result.commit_oid = True, info.commit_url, info.oid
        return result
    return result


def push_once(api, repo_id: str, plan: PushPlan, private: bool):
    """create repo (if needed) -> branch (if needed) -> one commit -> shard ref for a main commit."""
    from huggingface_hub import CommitOperationAdd

    # private=None keeps an organisation's default visibility for new repos
    repo_id = api.create_repo(repo_id, private=True if private else None, exist_ok=True).repo_id
    if plan.revision != "main":
        api.create_branch(repo_id, branch=plan.revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in plan.files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode()))
    info = api.create_commit(
        repo_id,
        operations,
        commit_message=plan.message,
        commit_description=plan.description,
        revision=plan.revision,
    )
    if plan.revision == "main":
        api.create_branch(repo_id, branch=shard_branch(plan.shard), revision=info.oid, exist_ok=True)
    return info


def keep_hint(checkpoint: Path, repo_id: str) -> str:
    return (
        f"The checkpoint is kept at {checkpoint}; push it later with "
        f"`vit-spine push {checkpoint} --hub_model_id {repo_id}`"
    )


def mask(text: str, token: str | None) -> str:
    return text.replace(token, "hf_***") if token else text


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's network errors (huggingface_hub 2.x uses httpx2, 1.x httpx)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return (httpx.TransportError, ConnectionError, TimeoutError)


def describe_failure(err: Exception, endpoint: str, repo_id: str) -> tuple[str, bool]:
    """(a clear one-line reason, whether another attempt may succeed)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so huggingface_hub makes no request: unset it to push", False
    if isinstance(err, _transport_errors()):
        return f"cannot reach the Hugging Face Hub at {endpoint}: {type(err).__name__}: {err}", True
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if status == 401:
            lines = dict.fromkeys((getattr(err, "server_message", None) or "").splitlines())  # unique, in order
            server = f": {'; '.join(line for line in lines if line)}" if any(lines) else ""
            return (
                f"the Hub at {endpoint} refused the token (401 Unauthorized{server}): it is missing, invalid or "
                "expired. Set HF_TOKEN to a token with write access, or run `hf auth login`",
                False,
            )
        if status == 403:
            return (
                f"the token may not write to {repo_id} (403 Forbidden): use a token with write access "
                "to that namespace",
                False,
            )
        return f"the Hub at {endpoint} answered {status}: {detail}", status in RETRYABLE_STATUS
    return f"{type(err).__name__}: {err}", False


# --- pushing a run while it trains -------------------------------------------------------------


class ShardPusher:
    """Pushes a training run's finished shards to the Hub in a background thread, one at a time and in
    order, so that the next shard trains during the upload (a ViT-B/16 checkpoint is about 350 MB).

    It subscribes to train's "shard saved" event: `run_training(..., on_shard_saved=[pusher])` calls it
    with each `ShardSaved` once the shard's checkpoint and the run's files are written; `finish()` waits
    for the uploads. The thread is a daemon: huggingface_hub's HTTP calls have no timeout, and Ctrl-C
    while the run waits for a stalled upload at its end must still end the process (the checkpoints stay
    on disk).
    """

    def __init__(self, repo_id: str, *, private: bool = False, token: str | None = None) -> None:
        self.repo_id, self.private, self.token = repo_id, private, token
        self.run_dir: Path | None = None  # of the shards pushed, for the "push them later" hint
        self.queue: queue.Queue = queue.Queue()
        self.pending: list[tuple[int, Future]] = []
        threading.Thread(target=self._work, name="hub-push", daemon=True).start()

    def __call__(self, event: ShardSaved) -> None:
        """Plan the shard's commit now (its model card reads metrics.jsonl), upload it in the background."""
        self.run_dir = event.run.path
        plan = plan_push(event.checkpoint, self.repo_id, event.run.path, event.is_best, None)
        future: Future = Future()
        self.queue.put((plan, future))
        self.pending.append((event.shard, future))

    def finish(self) -> list[PushResult]:
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
                f"`vit-spine push {self.run_dir}/shard_XXXXX --hub_model_id {self.repo_id}`",
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

    def _send(self, plan: PushPlan) -> PushResult:
        try:
            result = send_push(plan, self.repo_id, private=self.private, token=self.token)
        except Exception as error:  # noqa: BLE001 - reported like any failed push; training goes on
            result = PushResult(False, plan.checkpoint, self.repo_id, plan.revision, 1, error=f"{type(error).__name__}: {error}")
        print(result.summary(), flush=True)
        return result


# --- CLI ----------------------------------------------------------------------------------------


@dataclass
class PushConfig:
    checkpoint: str = field(
        metadata={"help": "a shard checkpoint folder, or a run folder (then its `best` shard and the run's metrics).",
                  "aliases": aliases("model_name_or_path")}
    )
    hub_model_id: str = field(
        metadata={"help": "Hub model repo `owner/name`; created when missing.", "aliases": aliases("repo_id")}
    )
    hub_private_repo: bool = field(
        default=False,
        metadata={"help": "create the repo private (an existing repo keeps its visibility).", "aliases": aliases("private")},
    )
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token with write access (default: $HF_TOKEN or the `hf auth login` one); never printed."}
    )
    run_dir: str | None = field(
        default=None,
        metadata={"help": "run folder whose metrics.jsonl fills the model card (default: the checkpoint's run folder)."},
    )
    revision: str | None = field(
        default=None,
        metadata={"help": "branch to commit to (default: main for the run's best checkpoint, shard-XXXXX otherwise)."},
    )
    retries: int = field(default=3, metadata={"help": "attempts in all before giving up on a network or server error."})
    backoff: float = field(default=2.0, metadata={"help": "seconds before the first retry; doubled before each next one."})

    def __post_init__(self):
        if self.hub_model_id.count("/") != 1 or not all(self.hub_model_id.split("/")):
            raise ValueError(f"--hub_model_id {self.hub_model_id!r}: expected `owner/name`")
        if self.retries < 1:
            raise ValueError(f"--retries {self.retries}: need at least 1")

        options.at_least(self.backoff, 0, "--backoff")
        options.folder_path(self.checkpoint, "CHECKPOINT")
        options.folder_path(self.run_dir, "--run_dir")


def main(argv: Sequence[str] | None = None) -> int:
    (config,) = parse_config(
        PushConfig, argv, prog="vit-spine push", description=__doc__.split("\n")[0], positionals=("checkpoint",)
    )
    result = push_checkpoint(
        config.checkpoint,
        config.hub_model_id,
        run_dir=config.run_dir,
        revision=config.revision,
        private=config.hub_private_repo,
        token=config.hub_token,
        retries=config.retries,
        backoff_s=config.backoff,
    )
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1
