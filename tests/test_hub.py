"""Hub push against a local fake Hub (tests/hub_server.py): commits, branches, files, model card, failures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml

from hub_server import FakeHub
from vit_spine.artifacts import RunDir, read_checkpoint_meta, write_checkpoint_meta
from vit_spine.evaluation import PoolingConfig
from vit_spine.preprocess import PreprocessConfig
from vit_spine.hub import model_card, plan_push, push_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_fakeTestToken" + hashlib.sha1(b"vit-spine").hexdigest()[:16]
SCORES = [0.6000, 0.5500, 0.5800]  # shard 1 is the run's best
BASELINE = 0.5638
# as chunk writes them into the manifest and train copies them into vit_spine.json
PREPROCESS = PreprocessConfig(image_size=32, channels="windows", windows="400:1800,50:400,40:80").to_dict()
POOLING = asdict(PoolingConfig(aggregator="max"))
UPLOADED = ("model.safetensors", "config.json", "vit_spine.json", "trainer_state.json")


@pytest.fixture(scope="module")
def template_run(tmp_path_factory) -> Path:
    """A run folder as `vit-spine train` leaves it: three shards (different weights), metrics.jsonl, best."""
    from vit_spine.models import create_model

    run = tmp_path_factory.mktemp("template") / "run"
    rows = []
    for k, score in enumerate(SCORES):
        shard = run / f"shard_{k:05d}"
        create_model(model_config="tiny", image_size=32, seed=k).save_pretrained(shard)
        row = {
            "shard": k,
            "global_step": 10 * (k + 1),
            "weighted_log_loss": score,
            "weighted_log_loss_uncalibrated": score + 0.01,
            "baseline_weighted_log_loss": BASELINE,
            "auc": {"patient_overall": 0.70 + k / 100, **{f"C{i}": 0.6 for i in range(1, 8)}},
        }
        write_checkpoint_meta(shard, {"shard": k, "metrics": row, "preprocess": PREPROCESS, "pooling": POOLING, "calibration": None})
        (shard / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": [{"loss": score}]}))
        rows.append(row)
    RunDir(run).write_rows(rows, min_delta=0.0)  # metrics.jsonl, best -> shard_00001, all_results.json
    return run


@pytest.fixture
def run_dir(tmp_path, template_run) -> Path:
    return Path(shutil.copytree(template_run, tmp_path / "run", symlinks=True))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hub; HF_ENDPOINT / HF_TOKEN set in the environment as a user would."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(TOKEN, user="alice") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_tree_equals_checkpoint(files: dict[str, bytes], checkpoint: Path) -> None:
    assert set(files) == {".gitattributes", "README.md", *UPLOADED}
    for name in UPLOADED:
        assert files[name] == (checkpoint / name).read_bytes(), name


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_each_shard_is_one_commit_and_main_holds_the_best(hub, run_dir, capsys):
    # as train pushes: after each shard, with its best-so-far decision (0.60 best, 0.55 best, 0.58 not)
    results = [
        push_checkpoint(run_dir / f"shard_{k:05d}", "alice/spine-run", is_best=best, backoff_s=0)
        for k, best in enumerate([True, True, False])
    ]
    assert [r.ok for r in results] == [True, True, True], [r.error for r in results]
    assert [r.revision for r in results] == ["main", "main", "shard-00002"]
    assert [r.attempts for r in results] == [1, 1, 1]

    assert list(hub.repos) == ["alice/spine-run"]
    commits = hub.commits("alice/spine-run")
    assert [(c.branch, c.message) for c in commits] == [
        ("main", "shard 00000: val weighted log loss 0.6000 (baseline 0.5638) [best]"),
        ("main", "shard 00001: val weighted log loss 0.5500 (baseline 0.5638) [best]"),
        ("shard-00002", "shard 00002: val weighted log loss 0.5800 (baseline 0.5638)"),
    ]
    assert [r.commit_oid for r in results] == [c.oid for c in commits]
    # each commit carries the shard's files; huggingface_hub leaves out a file the branch already
    # holds unchanged (config.json is the same for every shard here)
    assert set(commits[0].changed) == {"README.md", *UPLOADED}
    assert all(set(c.changed) == {"README.md", "model.safetensors", "vit_spine.json", "trainer_state.json"} for c in commits[1:])

    repo = hub.repos["alice/spine-run"]
    assert repo.branches["main"] == commits[1].oid
    assert repo.branches["shard-00000"] == commits[0].oid  # best shards get a ref at their main commit
    assert repo.branches["shard-00001"] == commits[1].oid
    assert repo.branches["shard-00002"] == commits[2].oid
    assert commits[2].parent == commits[1].oid  # a non-best branch starts from the best so far
    assert_tree_equals_checkpoint(hub.files("alice/spine-run", "main"), run_dir / "shard_00001")
    assert_tree_equals_checkpoint(hub.files("alice/spine-run", "shard-00002"), run_dir / "shard_00002")
    assert_tree_equals_checkpoint(hub.files("alice/spine-run", "shard-00000"), run_dir / "shard_00000")

    card = hub.files("alice/spine-run", "main")["README.md"].decode()
    assert 'from_pretrained("alice/spine-run")' in card
    assert "**00001 (best)** (this checkpoint)" in card
    branch_card = hub.files("alice/spine-run", "shard-00002")["README.md"].decode()
    assert 'from_pretrained("alice/spine-run", revision="shard-00002")' in branch_card
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err


def test_model_card_has_metric_table_preprocessing_labels_and_loading(run_dir):
    checkpoint = run_dir / "shard_00001"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    card = model_card(checkpoint, read_checkpoint_meta(checkpoint), rows, "alice/spine-run", "main")

    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "image-classification"
    table = [line for line in card.splitlines() if line.startswith("| ") and "0.5638" in line]
    assert len(table) == 3  # one row per shard from metrics.jsonl
    assert table[0].split(" | ")[1:5] == ["10", "0.6000", "0.6100", "0.5638"]
    assert "0.5500" in table[1] and "(this checkpoint)" in table[1] and "0.710" in table[1]
    labels = [f"`fracture_C{i}`" for i in range(1, 8)] + [f"`visible_C{i}`" for i in range(1, 8)]
    assert ", ".join(labels) in card  # the label order, read from the checkpoint's config.json
    assert "ViTForImageClassification.from_pretrained(\"alice/spine-run\")" in card
    assert "| channels | `windows` |" in card and "| windows | `400:1800,50:400,40:80` |" in card
    assert "| image_size | `32` |" in card and "| crop | `1.0` |" in card
    assert "| aggregator | `max` |" in card and "| patient_pool | `max` |" in card
    assert "(n_slices, 3, 32, 32)" in card


def test_the_card_marks_the_best_shard_by_the_runs_own_rule(run_dir):
    run = RunDir(run_dir)
    run.write_run_config({"min_delta": 0.06})  # shard 1 (0.55) beats shard 0 (0.60) by less than that
    run.write_rows(run.read_rows(), min_delta=0.06)
    plan = plan_push(run.shard(2), "alice/spine-run", run_dir, None, None)
    assert [line.split(" | ")[0] for line in plan.card.splitlines() if "(best)" in line] == ["| 00000 (best)"]
    assert (plan.best, plan.revision) == (False, "shard-00002")
    assert run.best_link.resolve() == run.shard(0).resolve()


def test_cli_pushes_the_runs_best_with_hf_endpoint_from_the_environment(run_dir, tmp_path):
    before = snapshot(run_dir)
    with FakeHub(TOKEN, user="alice") as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        # huggingface_hub reads these when it is imported in the child process
        env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf_home"))
        proc = subprocess.run(
            [sys.executable, "-m", "vit_spine", "push", str(run_dir), "--repo-id", "alice/cli-run"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0, proc.stderr
    assert "pushed" in proc.stdout and "alice/cli-run@main" in proc.stdout
    assert TOKEN not in proc.stdout + proc.stderr
    commits = hub.commits("alice/cli-run")
    assert [(c.branch, c.message) for c in commits] == [
        ("main", "shard 00001: val weighted log loss 0.5500 (baseline 0.5638) [best]")
    ]
    assert_tree_equals_checkpoint(hub.files("alice/cli-run"), run_dir / "shard_00001")
    assert snapshot(run_dir) == before


def test_cli_takes_the_token_and_the_repo_under_their_hugging_face_names(run_dir, tmp_path):
    with FakeHub(TOKEN, user="alice") as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # no HF_TOKEN: --hub_token alone
        env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf_home"))
        proc = subprocess.run(
            [sys.executable, "-m", "vit_spine", "push", str(run_dir), "--hub_model_id", "alice/named", "--hub_token", TOKEN],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0, proc.stderr
    assert "alice/named@main" in proc.stdout and TOKEN not in proc.stdout + proc.stderr
    assert [c.branch for c in hub.commits("alice/named")] == ["main"]


def test_cli_unreachable_endpoint_gives_a_clear_message_and_keeps_the_checkpoint(run_dir, tmp_path):
    before = snapshot(run_dir)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf_home"))
    shard = run_dir / "shard_00002"
    proc = subprocess.run(
        [sys.executable, "-m", "vit_spine", "push", str(shard), "--repo-id", "alice/x", "--retries", "2", "--backoff", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert f"cannot reach the Hugging Face Hub at {endpoint}" in proc.stderr
    assert "(after 2 attempts)" in proc.stderr and "attempt 1/2 failed" in proc.stderr
    assert f"The checkpoint is kept at {shard}; push it later with `vit-spine push {shard} --hub_model_id alice/x`" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert snapshot(run_dir) == before


def test_rejected_token_is_reported_once_without_printing_it(hub, run_dir, capsys, caplog):
    before = snapshot(run_dir)
    hub.reject_all_tokens = True  # its 401 echoes the Authorization header, as some proxies do
    result = push_checkpoint(run_dir, "alice/spine-run", backoff_s=0)
    assert not result.ok
    assert result.attempts == 1  # a refused token is not retried
    assert "refused the token (401 Unauthorized" in result.error and "HF_TOKEN" in result.error
    assert f"kept at {run_dir / 'shard_00001'}" in result.error
    assert "hf_***" in result.error  # the echoed token was there, and masked
    out = capsys.readouterr()
    assert TOKEN not in result.error + result.summary() + out.out + out.err + caplog.text
    assert hub.requests and not hub.repos
    assert snapshot(run_dir) == before


def test_server_error_is_retried_and_lands_once(hub, run_dir, capsys):
    hub.fail_next_commits = 1
    result = push_checkpoint(run_dir / "shard_00000", "alice/spine-run", is_best=True, backoff_s=0)
    assert result.ok and result.attempts == 2
    assert len(hub.commits("alice/spine-run")) == 1
    err = capsys.readouterr().err
    assert "attempt 1/3 failed: the Hub at" in err and "answered 500" in err and TOKEN not in err


def test_pushing_the_same_checkpoint_again_makes_no_second_commit(hub, run_dir):
    first = push_checkpoint(run_dir / "shard_00001", "alice/spine-run", is_best=True, backoff_s=0)
    again = push_checkpoint(run_dir / "shard_00001", "alice/spine-run", is_best=True, backoff_s=0)
    assert first.ok and again.ok
    assert len(hub.commits("alice/spine-run")) == 1  # a retried push whose answer was lost does not duplicate
    assert again.commit_oid == first.commit_oid


def test_branch_follows_the_runs_best_link(hub, run_dir):
    not_best = push_checkpoint(run_dir / "shard_00002", "alice/spine-run", backoff_s=0)
    best = push_checkpoint(run_dir / "best", "alice/spine-run", backoff_s=0)
    forced = push_checkpoint(run_dir / "shard_00000", "alice/spine-run", revision="experiments", backoff_s=0)
    assert (not_best.ok, best.ok, forced.ok) == (True, True, True)
    assert (not_best.revision, best.revision, forced.revision) == ("shard-00002", "main", "experiments")
    assert_tree_equals_checkpoint(hub.files("alice/spine-run", "main"), run_dir / "shard_00001")
    assert_tree_equals_checkpoint(hub.files("alice/spine-run", "experiments"), run_dir / "shard_00000")


def test_offline_mode_and_missing_token_fail_before_any_request(hub, run_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    offline = push_checkpoint(run_dir, "alice/spine-run", backoff_s=0)
    assert not offline.ok and offline.attempts == 1 and "HF_HUB_OFFLINE is set" in offline.error

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    no_token = push_checkpoint(run_dir, "alice/spine-run", backoff_s=0)
    assert not no_token.ok and "no Hugging Face token found" in no_token.error and "hf auth login" in no_token.error
    assert hub.requests == []


def test_incomplete_checkpoint_is_refused_before_any_request(hub, run_dir):
    (run_dir / "shard_00002" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard_00002 is not a complete checkpoint: missing \*\.safetensors"):
        push_checkpoint(run_dir / "shard_00002", "alice/spine-run")
    with pytest.raises(FileNotFoundError, match="neither a vit-spine checkpoint"):
        push_checkpoint(run_dir / "missing", "alice/spine-run")
    assert hub.requests == []
