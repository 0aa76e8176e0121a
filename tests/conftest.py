"""Fixtures shared by the stage tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vit_spine.synth import SynthConfig, synthesize

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_config(tmp_path_factory: pytest.TempPathFactory) -> SynthConfig:
    """The options `synth_data` was written with (10 studies, 3 of them test, 40 slices of 128 px)."""
    out = tmp_path_factory.mktemp("synth") / "data"
    return SynthConfig(out=str(out), studies=10, test_studies=3, slices=40, size=128, seed=0)


@pytest.fixture(scope="session")
def synth_data(synth_config: SynthConfig) -> Path:
    """A small synthetic dataset in the RSNA 2022 layout, written once per test session.

    Holds every transfer syntax and pixel format synth writes, both slice orders, segmentations,
    boxes and `ground_truth.csv`. Treat it as read-only: other tests share it.
    """
    out = Path(synth_config.out)
    synthesize(out, synth_config)
    return out


@pytest.fixture(scope="session")
def shared_rsna() -> Path:
    """The real RSNA 2022 label files in ../shared/rsna2022 (dev workspace only)."""
    path = REPO_ROOT.parent / "shared" / "rsna2022"
    if not (path / "train.csv").is_file():
        pytest.skip("../shared/rsna2022 not present (only in the dev workspace)")
    return path


@pytest.fixture
def disk_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Records ("fsync", real path) and ("rename", real target path) for os.fsync/rename/replace, in order."""
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(source, target):
        real_rename(source, target)
        events.append(("rename", os.path.realpath(target)))

    def replace(source, target):
        real_replace(source, target)
        events.append(("rename", os.path.realpath(target)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return events
