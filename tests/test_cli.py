"""Bad input to any subcommand ends in one clear line naming the problem, and exit code 2."""

from __future__ import annotations

import pytest

from vit_spine import cli, options


def test_missing_chunks_folder_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "no-such-chunks"
    assert cli.main(["train", "--chunks", str(missing), "--output_dir", str(tmp_path / "run"), "--model_config", "tiny"]) == 2
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


# Every option keeps its earlier spellings (dash forms, old names) as aliases of the Hugging Face style name.
SPELLINGS = [
    ("vit_spine.synth:SynthConfig", ("output_dir",),
     ["{tmp}/d", "--studies", "5", "--test-studies", "1", "--slices", "30"],
     ["--output_dir", "{tmp}/d", "--num_studies", "5", "--num_test_studies", "1", "--num_slices", "30"]),
    ("vit_spine.scan:ScanConfig", ("data_dir",), ["{tmp}", "--out", "{tmp}/t.parquet"], ["{tmp}", "--output_file", "{tmp}/t.parquet"]),
    ("vit_spine.chunk:ChunkConfig", (), ["--out", "{tmp}/c", "--shard-size", "9"], ["--output_dir", "{tmp}/c", "--shard_size", "9"]),
    ("vit_spine.evaluation:EvaluateConfig", ("checkpoint",), ["{tmp}", "--out", "{tmp}/m.json"],
     ["--model_name_or_path", "{tmp}", "--output_file", "{tmp}/m.json"]),
    ("vit_spine.predict:PredictConfig", ("checkpoint", "paths"), ["{tmp}", "{tmp}", "--out", "{tmp}/s.csv", "--studies", "{tmp}/t.csv"],
     ["{tmp}", "{tmp}", "--output_file", "{tmp}/s.csv", "--studies_csv", "{tmp}/t.csv"]),
    ("vit_spine.hub:PushConfig", ("checkpoint",), ["{tmp}", "--repo-id", "a/b", "--private"],
     ["{tmp}", "--hub_model_id", "a/b", "--hub_private_repo"]),
    ("vit_spine.report:ReportConfig", ("run_dir",),
     ["{tmp}", "--out", "{tmp}/r", "--studies", "2", "--saliency-slices", "1", "--smoothgrad_samples", "3"],
     ["{tmp}", "--output_dir", "{tmp}/r", "--num_studies", "2", "--num_saliency_slices", "1", "--num_smoothgrad_samples", "3"]),
    ("vit_spine.demo:DemoConfig", (), ["--output", "{tmp}/run", "--studies", "20", "--test_studies", "2", "--slices", "30"],
     ["--output_dir", "{tmp}/run", "--num_studies", "20", "--num_test_studies", "2", "--num_slices", "30"]),
]


@pytest.mark.parametrize("target, positionals, old, new", SPELLINGS, ids=[s[0].split(":")[1] for s in SPELLINGS])
def test_old_spellings_parse_to_the_same_options_as_the_new_ones(target, positionals, old, new, tmp_path):
    import importlib

    module, name = target.split(":")
    config_cls = getattr(importlib.import_module(module), name)

    def parsed(argv):
        return options.parse_config(config_cls, [a.format(tmp=tmp_path) for a in argv], prog="t", description="",
                                positionals=positionals)

    assert parsed(old) == parsed(new)


def test_train_takes_output_dir_and_model_name_or_path_under_their_old_names_too(tmp_path):
    from vit_spine import train

    old = train.parse_arguments(["--chunks", "c", "--output", str(tmp_path), "--model", "google/vit-base-patch16-224-in21k"])
    new = train.parse_arguments(["--chunks", "c", "--output_dir", str(tmp_path),
                                 "--model_name_or_path", "google/vit-base-patch16-224-in21k"])
    assert old[0] == new[0] and old[0].model_name_or_path == "google/vit-base-patch16-224-in21k"
    assert old[3].output_dir == new[3].output_dir == str(tmp_path)


def test_an_option_given_under_two_names_with_different_values_is_refused(tmp_path, capsys):
    argv = ["train", "--chunks", str(tmp_path), "--output", str(tmp_path / "a"), "--output_dir", str(tmp_path / "b")]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"vit-spine train: error: --output {tmp_path / 'a'} and --output_dir {tmp_path / 'b'} both set --output_dir: "
        "give it once (`vit-spine train --help` lists the options)\n")
    same = ["--chunks", "c", "--output", str(tmp_path / "a"), "--output_dir", str(tmp_path / "a")]
    from vit_spine import train

    assert train.parse_arguments(same)[3].output_dir == str(tmp_path / "a")  # the same value twice is no conflict


def test_argparse_messages_name_an_option_by_its_canonical_spelling(capsys):
    assert cli.main(["synth", "out", "--studies", "many"]) == 2
    assert capsys.readouterr().err == ("vit-spine synth: error: argument --num_studies: invalid int value: 'many' "
                                       "(`vit-spine synth --help` lists the options)\n")
