"""Shard-to-shard training: weights carried over exactly, loss scaling, metrics rows, early stopping."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from vit_spine import train
from vit_spine.evaluation import CHECKPOINT_META, PoolingConfig
from vit_spine.model import IGNORE_INDEX, MaskedBCELoss
from toy_run import SIZE, make_args, run

class StartWeights(TrainerCallback):
    """Records the weights each shard's Trainer starts from."""

    def __init__(self):
        self.starts: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def test_each_shard_starts_from_previous_shard_weights(toy_chunks, tmp_path):
    recorder = StartWeights()
    rows = run(toy_chunks, tmp_path / "run", callbacks=[recorder], max_shards=3, patience=3, args={"learning_rate": 1e-3})
    assert [r["shard"] for r in rows] == [0, 1, 2]
    assert len(recorder.starts) == 3
    for k in (1, 2):
        saved = load_file(str(tmp_path / "run" / f"shard_{k - 1:05d}" / "model.safetensors"))
        start = recorder.starts[k]
        assert len(saved) == len(start) > 10
        # from_pretrained maps saved names onto the module's; compare by value, every tensor
        saved_values = sorted((tuple(v.shape), v.float().sum().item(), v.float().abs().sum().item()) for v in saved.values())
        start_values = sorted((tuple(v.shape), v.float().sum().item(), v.float().abs().sum().item()) for v in start.values())
        assert saved_values == start_values
        # and the weights really moved during shard k-1 (so equality is not trivial)
        assert any(not torch.equal(recorder.starts[k - 1][n], start[n]) for n in start)


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
    # learning rate 0: every shard scores exactly the same, so nothing after shard 0 is an improvement
    out = tmp_path / "run"
    rows = run(toy_chunks, out, patience=patience, args={"learning_rate": 0.0})
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
    cfg = train.TrainConfig(chunks=str(toy_chunks), output=str(out), model_config="small", augment=False)
    with pytest.raises(ValueError, match="model_config: was 'tiny', now 'small'"):
        train.run_training(cfg, PoolingConfig(), make_args())


def test_train_pushes_each_finished_shard_and_main_holds_the_best(toy_chunks, tmp_path, monkeypatch):
    import huggingface_hub
    from hub_server import FakeHub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_abc")
    out = tmp_path / "run"
    with FakeHub("hf_test_token_abc", user="alice") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        rows = run(toy_chunks, out, max_shards=2, patience=5,
                   args={"learning_rate": 1e-3, "push_to_hub": True, "hub_model_id": "alice/spine"})
        commits = hub.commits("alice/spine")
        main_files = hub.files("alice/spine", "main")
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
    cfg = train.TrainConfig(chunks=str(toy_chunks), output=str(tmp_path / "run"), model_config="tiny", augment=False,
                            max_shards=2, patience=5)
    args = make_args(learning_rate=1e-3, push_to_hub=True, hub_model_id="alice/spine")
    result = train.run_training(cfg, PoolingConfig(calibration_folds=2), args, [CountShards()])
    assert pushes == [(0, 2), (1, 2)]  # in order; shard 0's upload overlapped shard 1's training
    assert [(r.checkpoint.name, r.error) for r in result.failed_pushes] == [("shard_00001", "refused by the test")]


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
    run = SimpleNamespace(output=tmp_path, hub_model_id="alice/spine", args=SimpleNamespace(hub_private_repo=False))
    pusher = train.ShardPusher(run)
    pusher.submit(0, is_best=True)
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
    out = capsys.readouterr().out
    assert "waiting for the Hub push of shard(s) 00000" in out
    assert f"abandoned the Hub push of shard(s) 00000; the checkpoints are kept: push them with `vit-spine push {tmp_path}/" in out


def test_a_shard_checkpoint_is_on_disk_before_its_marker_says_done(toy_chunks, tmp_path, disk_events):
    out = tmp_path / "run"
    run(toy_chunks, out, max_shards=1, args={"learning_rate": 0.0})
    shard = os.path.realpath(out / "shard_00000")
    marked_at = disk_events.index(("rename", f"{shard}/{CHECKPOINT_META}"))
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
    assert "baseline" in capsys.readouterr().out


def test_uint8_batches_become_model_input_on_the_device_augmented_only_in_training(toy_chunks, tmp_path):
    from vit_spine.data import AugmentConfig, ShardDataset, model_input
    from vit_spine.model import create_model

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
    from vit_spine.cli import parse_config

    pretend_cuda(monkeypatch)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    argv = ["--chunks", "c", "--output", str(tmp_path), "--use_cpu", "True", "--bf16", "False", *extra]
    _, args = parse_config(train.TrainConfig, argv, prog="t", description="", extra_types=(TrainingArguments,),
                           defaults=train.training_defaults())
    args = train.fit_loader_options(args)
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
    from vit_spine.model import create_model

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
    from vit_spine.model import create_model

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
