"""Bad input to any subcommand ends in one clear line naming the problem, and exit code 2."""

from __future__ import annotations

import pytest

from vit_spine import cli


def test_missing_chunks_folder_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "no-such-chunks"
    assert cli.main(["train", "--chunks", str(missing), "--output", str(tmp_path / "run"), "--model-config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vit-spine train: error: ") and str(missing) in err and "Traceback" not in err


def test_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "vit-spine evaluate: error:" in err and "is neither a vit-spine checkpoint" in err


def test_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_SPINE_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["evaluate", str(tmp_path)])


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
