"""Shard-to-shard training: weights carried over exactly, loss scaling, metrics rows, early stopping."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from vit_spine import train
from vit_spine.artifacts import RunDir, ShardSaved
from vit_spine.evaluation import PoolingConfig
from vit_spine.models import IGNORE_INDEX, MaskedBCELoss
from vit_spine.schema import CHECKPOINT_META_FILE
from toy_run import SIZE, make_args, run

class StartAndEndWeights(TrainerCallback):
    """Records the weights each shard's Trainer starts from and ends with, by parameter name."""

    def __init__(self):
        self.starts: list[dict[str, torch.Tensor]] = []
        self.ends: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.ends.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def test_each_shard_starts_from_previous_shard_weights(toy_chunks, tmp_path):
    recorder = StartAndEndWeights()
    rows = run(toy_chunks, tmp_path / "run", callbacks=[recorder], max_shards=3, patience=3, args={"learning_rate": 1e-3})
    assert [r["shard"] for r in rows] == [0, 1, 2]
    assert len(recorder.starts) == len(recorder.ends) == 3
    for k in (1, 2):
        # shard k-1's weights went through model.safetensors (save_pretrained -> from_pretrained): each tensor
        # must come back under its own name, bit for bit
        end, start = recorder.ends[k - 1], recorder.starts[k]
        assert list(start) == list(end) and len(start) > 10
        assert len(load_file(str(tmp_path / "run" / f"shard_{k - 1:05d}" / "model.safetensors"))) == len(start)
        for name in start:
            assert torch.equal(start[name], end[name]), name
    for k in range(3):  # and every tensor moved while training each shard, so the equality is not trivial
        for name in recorder.starts[k]:
            assert not torch.equal(recorder.starts[k][name], recorder.ends[k][name]), (k, name)


def test_metrics_rows_files_and_best(toy_chunks, tmp_path):
    out = tmp_path / "run"
    rows = run(toy_chunks, out, max_shards=2, patience=5, args={"learning_rate": 1e-3})
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 == len(rows)
    for k, line in enumerate(lines):
        row = json.loads(line)
        assert row["shard"] == k and row["num_val_studies"] == 10
        for key in ("weighted_log_loss", "weighted_log_loss_uncalibrated", "baseline_weighted_log_loss", "auc", "train_loss"):
            assert key in row
        shard = out / f"shard_{k:05d}"
        assert (shard / "model.safetensors").is_file() and (shard / "config.json").is_file()
        meta = json.loads((shard / "vit_spine.json").read_text())
        assert meta["preprocess"]["image_size"] == SIZE and meta["metrics"]["shard"] == k
        assert not (shard / "trainer").exists()
    best = min(rows, key=lambda r: r["weighted_log_loss"])["shard"]
    assert (out / "best").resolve() == (out / f"shard_{best:05d}").resolve()
    assert json.loads((out / "all_results.json").read_text())["best_shard"] == best


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_stops_after_patience_shards(toy_chunks, tmp_path, patience):
    # learning rate 0 and a fixed aggregator: every shard scores exactly the same, so nothing after shard 0 is an
    # improvement (a learned aggregator would still learn from more studies at every shard)
    out = tmp_path / "run"
    rows = run(toy_chunks, out, patience=patience, args={"learning_rate": 0.0},
               pooling=PoolingConfig(aggregator="max", calibration_folds=2))
    assert [r["shard"] for r in rows] == list(range(patience + 1))
    assert len({r["weighted_log_loss"] for r in rows}) == 1
    assert (out / "best").resolve() == (out / "shard_00000").resolve()
    assert not (out / f"shard_{patience + 1:05d}").exists()


def test_lr_schedule_spans_the_run_not_restarted_per_shard(toy_chunks, tmp_path):
    out = tmp_path / "run"
    run(toy_chunks, out, max_shards=3, patience=5, args={"learning_rate": 1e-3, "warmup_steps": 1})
    lrs = []
    for k in range(3):
        history = json.loads((out / f"shard_{k:05d}" / "trainer_state.json").read_text())["log_history"]
        lrs += [h["learning_rate"] for h in history if "learning_rate" in h]
    assert len(lrs) >= 6
    # logged per step: the rate that step used. One warm-up step for the whole run (not one per shard),
    # then a cosine decay that carries on across shard boundaries instead of restarting.
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:])), lrs
    assert lrs[-1] < 0.05 * 1e-3  # the schedule ends with the last shard


def test_max_steps_counts_optimizer_steps_across_the_run_and_the_schedule_ends_there(toy_chunks, tmp_path, capsys):
    import math

    # 36 slices a shard at batch 8: 5 steps a shard. 7 steps in all: shard 0 whole, shard 1 cut at 2, no shard 2.
    out = tmp_path / "run"
    rows = run(toy_chunks, out, patience=5, args={"learning_rate": 1e-3, "warmup_steps": 1, "max_steps": 7})
    assert [(r["shard"], r["shard_steps"], r["global_step"]) for r in rows] == [(0, 5, 5), (1, 2, 7)]
    lrs = []
    for k in range(2):
        history = json.loads((out / f"shard_{k:05d}" / "trainer_state.json").read_text())["log_history"]
        lrs += [h["learning_rate"] for h in history if "learning_rate" in h]
    # one cosine schedule over the 7 steps (1 of warm-up), logged as the rate each step used
    expected = [0.0] + [1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 6)) for step in range(1, 7)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)
    # run again: nothing left to train
    capsys.readouterr()
    assert run(toy_chunks, out, patience=5, args={"learning_rate": 1e-3, "warmup_steps": 1, "max_steps": 7}) == rows
    assert "--max_steps 7 reached after shard 1" in capsys.readouterr().out
    assert not (out / "shard_00002").exists()


def test_max_steps_and_the_schedule_count_the_batches_drop_last_leaves(toy_chunks, tmp_path):
    # 36 slices at batch 8 without the last, partial batch: 4 steps a shard
    rows = run(toy_chunks, tmp_path / "run", patience=5, args={"dataloader_drop_last": True, "max_steps": 6})
    assert [(r["shard_steps"], r["global_step"]) for r in rows] == [(4, 4), (2, 6)]


def test_max_steps_beyond_the_epochs_is_said_and_the_epochs_decide(toy_chunks, tmp_path, capsys):
    rows = run(toy_chunks, tmp_path / "run", max_shards=1, args={"max_steps": 50})
    assert [r["shard_steps"] for r in rows] == [5]
    assert ("note: --max_steps 50 is more than the 5 steps that --num_train_epochs 1 gives over the shards; "
            "the run ends after 5") in capsys.readouterr().out


NOT_HONOURED = [
    (["--eval_strategy", "steps"], "--eval_strategy steps: not supported by `vit-spine train`: the validation shard is "
     "scored after every shard (metrics.jsonl); leave it at no"),
    (["--eval_on_start", "True"], "--eval_on_start True: not supported by `vit-spine train`: the validation shard is "
     "scored after every shard (metrics.jsonl)"),
    (["--resume_from_checkpoint", "x"], "--resume_from_checkpoint x: not supported by `vit-spine train`: a run resumes "
     "by itself: run the same command again with the same --output_dir"),
    (["--load_best_model_at_end", "True"], "--load_best_model_at_end True: not supported by `vit-spine train`: "
     "OUTPUT_DIR/best points at the best shard (see --patience and --min_delta)"),
    (["--metric_for_best_model", "auc"], "--metric_for_best_model auc: not supported by `vit-spine train`: the best "
     "shard is the one with the lowest validation weighted log loss"),
    (["--greater_is_better", "True"], "--greater_is_better True: not supported by `vit-spine train`: the best shard is "
     "the one with the lowest validation weighted log loss"),
    (["--save_strategy", "best"], "--save_strategy best: not supported by `vit-spine train`: OUTPUT_DIR/best points at "
     "the best shard; choose steps, epoch or no"),
    (["--prediction_loss_only", "True"], "--prediction_loss_only True: not supported by `vit-spine train`: each shard "
     "is scored on its validation predictions"),
    (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor 0.1: not supported by `vit-spine train`: the loss "
     "is vit-spine's masked BCE (see --fracture_pos_weight_max)"),
    (["--report_to", "tensorboard"], "--report_to tensorboard: not supported by `vit-spine train`: each shard's Trainer "
     "counts its steps from 0, so the curves would overlap; OUTPUT_DIR/metrics.jsonl and `vit-spine report` give the run's"),
    (["--hub_strategy", "end"], "--hub_strategy end: not supported by `vit-spine train`: --push_to_hub pushes every "
     "finished shard, the best to main"),
    (["--hub_revision", "dev"], "--hub_revision dev: not supported by `vit-spine train`: --push_to_hub commits the best "
     "shard to main and every shard to its shard-XXXXX branch"),
    (["--hub_always_push", "True"], "--hub_always_push True: not supported by `vit-spine train`: --push_to_hub pushes "
     "every finished shard, one at a time"),
]


@pytest.mark.parametrize("option, line", NOT_HONOURED, ids=[o[0][0] for o in NOT_HONOURED])
def test_training_arguments_the_shard_loop_cannot_honour_are_refused_in_one_line(option, line, toy_chunks, tmp_path,
                                                                                  monkeypatch, capsys):
    from vit_spine import cli

    monkeypatch.delenv("VIT_SPINE_TRACEBACK", raising=False)
    argv = ["train", "--chunks", str(toy_chunks), "--output_dir", str(tmp_path / "run"), "--model_config", "tiny", *option]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"vit-spine train: error: {line} (set VIT_SPINE_TRACEBACK=1 to see where)\n"
    assert not (tmp_path / "run").exists()
    assert set(train.NOT_HONOURED) | {"save_strategy"} == {o[0][2:] for o, _ in NOT_HONOURED}  # each one tested


def test_run_training_refuses_them_from_python_too(toy_chunks, tmp_path):
    with pytest.raises(ValueError, match="^--resume_from_checkpoint x: not supported"):
        run(toy_chunks, tmp_path / "run", args={"resume_from_checkpoint": "x"})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("strategy", ["no", "steps", "epoch"])
def test_save_strategies_the_loop_honours_are_accepted(strategy, tmp_path):
    args = train.parse_arguments(["--chunks", "c", "--output_dir", str(tmp_path), "--save_strategy", strategy])[3]
    assert args.save_strategy == strategy


def _weights_after_one_step(chunks: Path, out: Path, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    run(
        chunks,
        out,
        max_shards=1,
        pooling=PoolingConfig(calibration_folds=0),
        args={
            "learning_rate": 0.5,
            "optim": "sgd",  # SGD: the update is proportional to the gradient, so mis-scaling shows (Adam hides it)
            "weight_decay": 0.0,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": accumulation,
            "max_steps": 1,
        },
    )
    return load_file(str(out / "shard_00000" / "model.safetensors"))


def test_loss_scaling_same_for_gradient_accumulation_1_and_4(toy_chunks, tmp_path):
    one = _weights_after_one_step(toy_chunks, tmp_path / "ga1", batch=8, accumulation=1)
    four = _weights_after_one_step(toy_chunks, tmp_path / "ga4", batch=2, accumulation=4)
    train.create_model(model_config="tiny", image_size=SIZE, seed=0).save_pretrained(tmp_path / "init")
    init = load_file(str(tmp_path / "init" / "model.safetensors"))  # same (saved) parameter names
    moved = 0
    for name, value in one.items():
        torch.testing.assert_close(four[name], value, rtol=1e-4, atol=1e-6)
        moved += int(not torch.allclose(value, init[name]))
    assert moved > 0


def test_masked_bce_ignores_unknown_and_divides_by_known_count():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([[1.0, IGNORE_INDEX], [0.0, 1.0]])
    loss = MaskedBCELoss()({"logits": logits}, labels, num_items_in_batch=torch.tensor(3))
    expected = (np.log(2) + np.log1p(np.exp(1.0)) + np.log1p(np.exp(1.0))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_changed_configuration_is_refused(toy_chunks, tmp_path):
    out = tmp_path / "run"
    run(toy_chunks, out, max_shards=1, args={"learning_rate": 0.0})
    cfg = train.TrainConfig(chunks=str(toy_chunks), model_config="small", augment=False)
    with pytest.raises(ValueError, match="model_config: was 'tiny', now 'small'"):
        train.run_training(cfg, PoolingConfig(), make_args(output_dir=str(out)))


def test_train_pushes_each_finished_shard_and_main_holds_the_best(toy_chunks, tmp_path, monkeypatch):
    import huggingface_hub
    from hub_server import FakeHub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_abc")
    out = tmp_path / "run"
    argv = ["--chunks", str(toy_chunks), "--output_dir", str(out), "--model_config", "tiny", "--augment", "False",
            "--max_shards", "2", "--patience", "5", "--calibration_folds", "2", "--per_device_train_batch_size", "8",
            "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "True", "--disable_tqdm", "True", "--seed", "0",
            "--learning_rate", "1e-3", "--push_to_hub", "True", "--hub_model_id", "alice/spine"]
    with FakeHub("hf_test_token_abc", user="alice") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        assert train.main(argv) == 0  # the command subscribes the hub's pusher to the shard loop
        commits = hub.commits("alice/spine")
        main_files = hub.files("alice/spine", "main")
    rows = RunDir(out).read_rows()
    assert len(commits) == 2
    assert [c.message.split(":")[0] for c in commits] == ["shard 00000", "shard 00001"]
    best = min(rows, key=lambda r: r["weighted_log_loss"])["shard"]
    assert main_files["model.safetensors"] == (out / f"shard_{best:05d}" / "model.safetensors").read_bytes()
    assert "README.md" in main_files


def test_the_next_shard_trains_while_a_push_uploads_and_a_failed_push_is_reported(toy_chunks, tmp_path, monkeypatch):
    from vit_spine import hub

    shards_begun = []

    class CountShards(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            shards_begun.append(len(shards_begun))

    pushes = []

    def slow_push(plan, repo_id, **kwargs):
        if plan.shard == 0:  # upload "until" shard 1 has started training (a synchronous push never sees that)
            deadline = time.monotonic() + 20
            while len(shards_begun) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
        pushes.append((plan.shard, len(shards_begun)))
        ok = plan.shard == 0
        return hub.PushResult(ok, plan.checkpoint, repo_id, plan.revision, 1, error=None if ok else "refused by the test")

    monkeypatch.setattr(hub, "send_push", slow_push)
    cfg = train.TrainConfig(chunks=str(toy_chunks), model_config="tiny", augment=False,
                            max_shards=2, patience=5)
    args = make_args(output_dir=str(tmp_path / "run"), learning_rate=1e-3)
    pusher = hub.ShardPusher("alice/spine")
    train.run_training(cfg, PoolingConfig(calibration_folds=2), args, [CountShards()], on_shard_saved=[pusher])
    failed = pusher.finish()
    assert pushes == [(0, 2), (1, 2)]  # in order; shard 0's upload overlapped shard 1's training
    assert [(r.checkpoint.name, r.error) for r in failed] == [("shard_00001", "refused by the test")]


def test_run_training_refuses_push_to_hub_without_a_subscriber(toy_chunks, tmp_path):
    cfg = train.TrainConfig(chunks=str(toy_chunks), model_config="tiny", augment=False)
    args = make_args(output_dir=str(tmp_path / "run"), push_to_hub=True, hub_model_id="alice/spine")
    with pytest.raises(ValueError, match="--push_to_hub: run_training pushes nothing itself; subscribe a vit_spine.hub.ShardPusher"):
        train.run_training(cfg, PoolingConfig(), args)
    assert not (tmp_path / "run" / "shard_00000").exists()


def test_ctrl_c_while_waiting_for_a_stalled_push_ends_the_wait_and_names_the_shard(tmp_path, monkeypatch, capsys):
    import _thread
    import threading
    from types import SimpleNamespace

    from vit_spine import hub

    release = threading.Event()
    monkeypatch.setattr(hub, "plan_push", lambda checkpoint, *args: SimpleNamespace(checkpoint=checkpoint, shard=0))

    def stalled_upload(plan, repo_id, **kwargs):
        release.wait()
        return hub.PushResult(False, plan.checkpoint, repo_id, "main", 1, error="stalled")

    monkeypatch.setattr(hub, "send_push", stalled_upload)
    pusher = hub.ShardPusher("alice/spine")
    pusher(ShardSaved(RunDir(tmp_path), 0, is_best=True))
    # interrupt_main does nothing unless Python's own SIGINT handler is the installed one
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Timer(0.5, _thread.interrupt_main).start()
    watchdog = threading.Timer(15, release.set)  # a wait that ignores the Ctrl-C fails the test, never hangs it
    watchdog.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            pusher.finish()
        assert time.monotonic() - start < 10
    finally:
        release.set()
        watchdog.cancel()
        signal.signal(signal.SIGINT, previous_handler)
    out = capsys.readouterr().out
    assert "waiting for the Hub push of shard(s) 00000" in out
    assert f"abandoned the Hub push of shard(s) 00000; the checkpoints are kept: push them with `vit-spine push {tmp_path}/" in out


def test_a_shard_checkpoint_is_on_disk_before_its_marker_says_done(toy_chunks, tmp_path, disk_events):
    out = tmp_path / "run"
    run(toy_chunks, out, max_shards=1, args={"learning_rate": 0.0})
    shard = os.path.realpath(out / "shard_00000")
    marked_at = disk_events.index(("rename", f"{shard}/{CHECKPOINT_META_FILE}"))
    flushed = {path for kind, path in disk_events[:marked_at] if kind == "fsync"}
    assert {f"{shard}/model.safetensors", f"{shard}/config.json", f"{shard}/trainer_state.json"} <= flushed
    assert disk_events[marked_at + 1] == ("fsync", shard)


def test_evaluate_reproduces_the_logged_metric_of_the_best_shard(toy_chunks, tmp_path, capsys):
    from vit_spine.evaluation import main as evaluate_main

    out = tmp_path / "run"
    rows = run(toy_chunks, out, max_shards=2, patience=5, args={"learning_rate": 1e-3, "seed": 3})
    best = min(rows, key=lambda r: r["weighted_log_loss"])
    assert evaluate_main([str(out), "--chunks", str(toy_chunks)]) == 0  # a run folder stands for its best
    result = json.loads((out / f"shard_{best['shard']:05d}" / "eval_results.json").read_text())
    assert result["shard"] == best["shard"]
    for key in ("weighted_log_loss", "weighted_log_loss_uncalibrated", "baseline_weighted_log_loss"):
        assert result[key] == pytest.approx(best[key], abs=1e-12)
    assert result["aggregator"] == best["aggregator"] == "sequence" and result["aggregators"] == best["aggregators"]
    printed = capsys.readouterr().out
    assert "baseline" in printed and "sequence wll" in printed  # every aggregator, side by side


def test_uint8_batches_become_model_input_on_the_device_augmented_only_in_training(toy_chunks, tmp_path):
    from vit_spine.data import AugmentConfig, ShardDataset, model_input
    from vit_spine.models import create_model

    dataset = ShardDataset(toy_chunks / "shard_00000")
    model = create_model(model_config="tiny", image_size=SIZE)
    seen: list[tuple[bool, torch.Tensor]] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append((module.training, kwargs["pixel_values"])),
                                    with_kwargs=True)
    args = make_args(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=len(dataset),
                     per_device_eval_batch_size=len(dataset))
    trainer = train.ShardTrainer(model=model, args=args, train_dataset=dataset, data_collator=train.collate,
                                 compute_loss_func=MaskedBCELoss(), augment=AugmentConfig())
    trainer.train()
    trainer.predict(dataset)
    (training, trained_on), (evaluating, predicted_on) = seen
    stored = train.collate(dataset.__getitems__(list(range(len(dataset)))))["pixel_values"]
    assert training and not evaluating and stored.dtype == torch.uint8
    assert trained_on.dtype == predicted_on.dtype == torch.float32
    torch.testing.assert_close(predicted_on, model_input(stored), rtol=0, atol=0)  # evaluation: exactly normalised
    assert trained_on.shape == predicted_on.shape
    # training: augmented (compared order-free, since the training batch is shuffled)
    assert not torch.allclose(trained_on.sort(dim=0).values, predicted_on.sort(dim=0).values)


def pretend_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_gpu_defaults_pin_memory_copy_without_blocking_and_skip_the_per_step_nan_check(monkeypatch):
    pretend_cuda(monkeypatch)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    values = train.training_defaults()
    assert values["bf16"] is True and values["dataloader_num_workers"] == 8
    assert values["dataloader_pin_memory"] is True and values["dataloader_persistent_workers"] is True
    assert values["accelerator_config"] == {"non_blocking": True}
    assert values["logging_nan_inf_filter"] is False
    args = train.fit_loader_options(TrainingArguments(**{**values, "use_cpu": True, "bf16": False}))
    assert args.dataloader_prefetch_factor == train.PREFETCH_BATCHES and args.dataloader_persistent_workers
    assert args.accelerator_config.non_blocking is True


def test_cpu_defaults_keep_the_nan_check_and_use_no_workers():
    values = train.training_defaults()
    assert values["dataloader_num_workers"] == 0 and values["dataloader_persistent_workers"] is False
    assert values["logging_nan_inf_filter"] is True and values["accelerator_config"] == {"non_blocking": False}


@pytest.mark.parametrize(
    "extra, persistent, prefetch",
    [([], True, 4), (["--dataloader_num_workers", "0"], False, None), (["--dataloader_prefetch_factor", "2"], True, 2)],
)
def test_worker_options_follow_the_worker_count_given_on_the_command_line(monkeypatch, tmp_path, extra, persistent, prefetch):
    pretend_cuda(monkeypatch)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    argv = ["--chunks", "c", "--output", str(tmp_path), "--use_cpu", "True", "--bf16", "False", *extra]
    *_, args = train.parse_arguments(argv)
    assert (args.dataloader_persistent_workers, args.dataloader_prefetch_factor) == (persistent, prefetch)


def stop_step(stop: train.StopRequest, signal_step: int, steps: int, logging_every: int | None = None) -> int | None:
    """The step at whose end `stop` ends training when the signal arrives during step `signal_step`."""
    from transformers import TrainerControl

    for step in range(1, steps + 1):
        if step == signal_step:
            stop.requested = True
        control = TrainerControl(should_log=bool(logging_every) and step % logging_every == 0)
        stop.on_step_end(SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(global_step=step), control)
        if control.should_training_stop:
            assert control.should_save
            return step
    return None


def test_stop_request_reads_no_tensor_in_one_process(monkeypatch):
    made = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real_tensor(*a, **k))
    assert stop_step(train.StopRequest(), signal_step=3, steps=5) == 3  # the very step of the signal
    assert made == []  # no device tensor, so no device sync per step


def test_stop_request_under_ddp_all_reduces_only_on_log_and_check_steps(monkeypatch):
    reduced_at: list[int] = []
    current = {"step": 0}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda flag, op=None: reduced_at.append(current["step"]))
    stop = train.StopRequest(check_every=10)
    real_on_step_end = stop.on_step_end

    def tracked(args, state, control, **kwargs):
        current["step"] = state.global_step
        return real_on_step_end(args, state, control, **kwargs)

    stop.on_step_end = tracked
    assert stop_step(stop, signal_step=13, steps=30, logging_every=4) == 16  # the next log step
    assert reduced_at == [4, 8, 10, 12, 16]  # log steps and every 10th, not every step


def test_shard_trainer_copies_batches_without_blocking(toy_chunks, tmp_path, monkeypatch):
    from vit_spine.data import ShardDataset
    from vit_spine.models import create_model

    dataset = ShardDataset(toy_chunks / "shard_00000")
    trainer = train.ShardTrainer(model=create_model(model_config="tiny", image_size=SIZE),
                                 args=make_args(output_dir=str(tmp_path)), train_dataset=dataset,
                                 data_collator=train.collate, compute_loss_func=MaskedBCELoss())
    calls = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(k) or real_to(self, *a, **k))
    inputs = trainer._prepare_inputs(train.collate(dataset.__getitems__([0, 1, 2])))
    assert inputs["pixel_values"].dtype == torch.float32 and inputs["labels"].shape == (3, 14)
    assert [k.get("non_blocking") for k in calls[:2]] == [True, True]  # pixel_values and labels


def test_torch_compile_trains_through_the_shard_trainer_like_eager(toy_chunks, tmp_path):
    """torch_compile wraps the model; batches still become its input in _prepare_inputs. aot_eager compiles
    the same graphs as inductor without a C++ build (inductor takes a minute on this CPU)."""
    from vit_spine.data import AugmentConfig, ShardDataset
    from vit_spine.models import create_model

    dataset = ShardDataset(toy_chunks / "shard_00000")
    losses, wrapped = [], []
    for compiled in (False, True):
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainer = train.ShardTrainer(
            model=create_model(model_config="tiny", image_size=SIZE),
            args=make_args(output_dir=str(tmp_path / str(compiled)), max_steps=3, dataloader_drop_last=True, **extra),
            train_dataset=dataset, data_collator=train.collate, compute_loss_func=MaskedBCELoss(), augment=AugmentConfig(),
        )
        losses.append(trainer.train().training_loss)
        wrapped.append(type(trainer.model_wrapped).__name__)
    assert wrapped == ["ViTForImageClassification", "OptimizedModule"]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


# ------------------------------------------------ the first run of a real user: a Hub base ViT


HUB_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16, image_size=SIZE)
# Where transformers 5.x keeps each tensor that transformers 4.x wrote for a ViTModel (its modules were renamed):
# the classification model holds the ViTModel as `vit`, without its pooler.
RENAMED_BY_TRANSFORMERS_5 = [
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"vit.layers.\1.attention.q_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"vit.layers.\1.attention.k_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"vit.layers.\1.attention.v_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"vit.layers.\1.attention.o_proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"vit.layers.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"vit.layers.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.(layernorm_before|layernorm_after)\.", r"vit.layers.\1.\2."),
    (r"^(embeddings|layernorm)\.", r"vit.\1."),
]


def hub_vit_shapes(hidden_size: int, num_hidden_layers: int, intermediate_size: int, patch_size: int, image_size: int,
                   **_) -> dict[str, tuple[int, ...]]:
    """The tensors of `google/vit-base-patch16-224-in21k`'s model.safetensors, by the names transformers 4.x wrote:
    a ViTModel (no `vit.` prefix) with its pooler."""
    shapes = {
        "embeddings.cls_token": (1, 1, hidden_size),
        "embeddings.position_embeddings": (1, (image_size // patch_size) ** 2 + 1, hidden_size),
        "embeddings.patch_embeddings.projection.weight": (hidden_size, 3, patch_size, patch_size),
        "embeddings.patch_embeddings.projection.bias": (hidden_size,),
    }
    for n in range(num_hidden_layers):
        layer = f"encoder.layer.{n}."
        for linear in ("attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense"):
            shapes |= {f"{layer}{linear}.weight": (hidden_size, hidden_size), f"{layer}{linear}.bias": (hidden_size,)}
        shapes |= {f"{layer}intermediate.dense.weight": (intermediate_size, hidden_size), f"{layer}intermediate.dense.bias": (intermediate_size,),
                   f"{layer}output.dense.weight": (hidden_size, intermediate_size), f"{layer}output.dense.bias": (hidden_size,)}
        for norm in ("layernorm_before", "layernorm_after"):
            shapes |= {f"{layer}{norm}.weight": (hidden_size,), f"{layer}{norm}.bias": (hidden_size,)}
    return shapes | {"layernorm.weight": (hidden_size,), "layernorm.bias": (hidden_size,),
                     "pooler.dense.weight": (hidden_size, hidden_size), "pooler.dense.bias": (hidden_size,)}


def write_hub_vit(folder: Path, leave_out: str | None = None) -> dict[str, torch.Tensor]:
    """A tiny base ViT stored as the Hub's in21k one is (config.json with architectures ViTModel, safetensors with
    the 4.x names); every tensor random, so a re-initialised one cannot pass for loaded."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(7)
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in hub_vit_shapes(**HUB_VIT).items() if name != leave_out}
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["ViTModel"], "model_type": "vit", **HUB_VIT, "num_channels": 3, "qkv_bias": True,
              "hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
              "initializer_range": 0.02, "transformers_version": "4.13.0.dev0"}
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def renamed_by_transformers_5(name: str) -> str:
    import re

    for pattern, replacement in RENAMED_BY_TRANSFORMERS_5:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    raise AssertionError(f"{name}: no rename known")


def hub_train_argv(chunks: Path, model: Path, output: Path) -> list[str]:
    return ["train", "--chunks", str(chunks), "--output_dir", str(output), "--model_name_or_path", str(model),
            "--max_shards", "1", "--per_device_train_batch_size", "8", "--use_cpu", "--disable_tqdm", "True",
            "--report_to", "none", "--augment", "False", "--calibration_folds", "2"]


def test_train_from_a_hub_base_vit_carries_every_backbone_tensor_and_adds_only_the_head(toy_chunks, tmp_path, monkeypatch):
    from vit_spine import cli

    hub = write_hub_vit(tmp_path / "vit-base-in21k")
    started: dict[str, torch.Tensor] = {}
    create_model = train.create_model

    def recording_create_model(*args, **kwargs):  # the model the first shard's Trainer is given, before any step
        model = create_model(*args, **kwargs)
        started.update({name: value.detach().clone() for name, value in model.state_dict().items()})
        return model

    monkeypatch.setattr(train, "create_model", recording_create_model)
    assert cli.main(hub_train_argv(toy_chunks, tmp_path / "vit-base-in21k", tmp_path / "run")) == 0

    backbone = {renamed_by_transformers_5(name): value for name, value in hub.items() if not name.startswith("pooler.")}
    assert sorted(started) == sorted([*backbone, "classifier.weight", "classifier.bias"])  # the pooler is dropped
    for name, value in backbone.items():
        assert torch.equal(started[name], value), name  # bit for bit, none re-initialised
    assert started["classifier.weight"].shape == (14, HUB_VIT["hidden_size"]) and started["classifier.bias"].shape == (14,)
    assert [row["shard"] for row in RunDir(tmp_path / "run").read_rows()] == [0]


def test_a_hub_vit_missing_a_backbone_tensor_is_refused_not_silently_initialised(toy_chunks, tmp_path, monkeypatch, capsys):
    from vit_spine import cli

    monkeypatch.delenv("VIT_SPINE_TRACEBACK", raising=False)
    model = tmp_path / "vit-base-in21k"
    write_hub_vit(model, leave_out="encoder.layer.1.attention.attention.key.weight")
    assert cli.main(hub_train_argv(toy_chunks, model, tmp_path / "run")) == 2
    assert capsys.readouterr().err == (
        f"vit-spine train: error: --model_name_or_path {model}: its weights lack 1 backbone tensor(s) of this ViT, or "
        "hold them at another size (vit.layers.1.attention.k_proj.weight), so they would start at random; give a ViT "
        "saved with `save_pretrained`, or train from random init with --model_config tiny|small|base "
        "(set VIT_SPINE_TRACEBACK=1 to see where)\n"
    )
