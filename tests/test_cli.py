"""The CLI: flags map onto the config, user errors are one line with exit code 2, presets show sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from trainer.cli.main import build_parser, main
from trainer.cli.train import config_overrides
from trainer.config.schema import field_index, load_toml
from trainer.lora.sizing import architecture_for, lora_size


def test_every_config_field_is_a_flag_and_the_stable_names_exist():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001 - argparse has no public accessor
    flags = {opt for action in train._actions for opt in action.option_strings}  # noqa: SLF001
    for name in field_index():
        assert "--" + name.replace("_", "-") in flags, name
    stable = ["--base", "--data", "--preset", "--config", "--output", "--steps", "--epochs", "--rank", "--alpha",
              "--lr", "--te-lr", "--targets", "--train-text-encoder", "--no-train-text-encoder", "--resolution",
              "--batch-size", "--seed", "--precision", "--save-every", "--resume", "--trigger"]
    assert set(stable) <= flags


def test_flags_become_overrides_only_when_given():
    args = build_parser().parse_args(["train", "--rank", "8", "--no-train-text-encoder", "--sample-prompts", "a", "b"])
    assert config_overrides(args) == {"rank": 8, "train_text_encoder": False, "sample_prompts": ["a", "b"]}


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--base", "x"], "No dataset given"),
    (["train", "--data", "x"], "No base model given"),
    (["train", "--data", "x", "--base", "m", "--rank", "0"], "network.rank = 0"),
    (["train", "--data", "x", "--base", "m", "--lr", "-1"], "optim.lr"),
    (["train", "--data", "x", "--base", "m", "--preset", "nope"], "Unknown preset 'nope'"),
    (["train", "--data", "x", "--base", "m", "--config", "missing.toml"], "Config file not found"),
])
def test_user_errors_are_one_actionable_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1


TRAIN = ["train", "--data", "x", "--base", "m"]
GENERATE = ["generate", "--base", "m", "--prompt", "p"]


@pytest.mark.parametrize(("argv", "message"), [
    ([*TRAIN, "--lr", "-1e-4"], "optim.lr = -0.0001 is out of range"),
    ([*TRAIN, "--te-lr", "-5E-5"], "optim.te_lr = -5e-05"),
    ([*TRAIN, "--alpha", "-.5"], "network.alpha = -0.5"),
    ([*TRAIN, "--noise-offset", "-0.05"], "train.noise_offset = -0.05"),
    ([*TRAIN, "--min-snr-gamma", "-5"], "train.min_snr_gamma = -5.0"),
    ([*TRAIN, "--caption-dropout", "-1e-2"], "data.caption_dropout = -0.01"),
    ([*TRAIN, "--rank", "-8"], "network.rank = -8"),
    ([*TRAIN, "--save-every", "-1_000"], "output.save_every = -1000"),
    ([*GENERATE, "--cfg", "-1e0"], "The cfg must be a number >= 0"),
    ([*GENERATE, "--seed", "-2"], "The seed must be -1 (random)"),
    ([*GENERATE, "--width", "-64"], "The width/height must be positive"),
    (["resize", "a.safetensors", "--energy", "-0.5", "--out", "b.safetensors"], "fraction in (0, 1], not -0.5"),
    (["merge", "a.safetensors:-0.5", "--energy", "-1e-2", "--out", "b.safetensors"], "fraction in (0, 1], not -0.01"),
    (["extract", "--base", "m", "--tuned", "t", "--rank", "-4", "--out", "o.safetensors"], "at least 1, not -4"),
])
def test_negative_numbers_reach_the_validation_that_explains_them(argv, message, capsys):
    """``--lr -1e-4`` is the value -1e-4 (refused by the range check), not an unknown option to argparse."""
    assert main(argv) == 2  # a return, not argparse's SystemExit(2)
    err = capsys.readouterr().err
    assert message in err and "expected one argument" not in err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "dest", "value"), [
    ([*TRAIN, "--seed", "-7"], "seed", -7),
    ([*TRAIN, "--trigger", "-1e3"], "trigger", "-1e3"),
    ([*TRAIN, "--sample-prompts", "-3d render", "-1e3"], "sample_prompts", ["-3d render", "-1e3"]),
    ([*GENERATE, "--seed", "-1"], "seed", -1),
    ([*GENERATE, "--lora", "a.safetensors:-0.5", "--lora", "b.safetensors:-1e-1"], "lora",
     ["a.safetensors:-0.5", "b.safetensors:-1e-1"]),
    (["generate", "--base", "m", "--prompt", "-.5 scale"], "prompt", "-.5 scale"),
])
def test_values_that_start_with_a_minus_are_values(argv, dest, value):
    assert getattr(build_parser().parse_args(argv), dest) == value


def test_a_negative_seed_goes_into_the_saved_config(tmp_path: Path):
    path = tmp_path / "run.toml"
    assert main(["train", "--seed", "-7", "--lr", "2e-4", "--save-config", str(path)]) == 0
    saved = load_toml(path)
    assert saved["train"]["seed"] == -7 and saved["optim"]["lr"] == 2e-4


def test_train_end_to_end_in_a_subprocess(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path):
    out = tmp_path / "out" / "mychar.safetensors"
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--base", str(tiny_sd1_dir), "--data", str(image_folder),
           "--preset", "character-lite", "--steps", "3", "--rank", "4", "--output", str(out), "--trigger", "zxq"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"done at step 3: {out}" in result.stdout
    assert "3/3" in result.stderr  # the tqdm bar (it draws on stderr)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["modelspec.trigger_phrase"] == "zxq"
    # and a missing folder fails the same way from the shell
    bad = subprocess.run(cmd[:6] + ["--data", str(tmp_path / "nope")] + cmd[8:], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nope" in bad.stderr


def test_check_prints_the_dataset_report(tiny_sd1_dir: Path, image_folder: Path, capsys):
    (image_folder / "img00.txt").write_text("", encoding="utf-8")
    code = main(["train", "--check", "--base", str(tiny_sd1_dir), "--data", str(image_folder), "--trigger", "zxq"])
    out = capsys.readouterr().out
    assert "8 images" in out and "empty" in out.lower()
    assert code in (0, 2)


def test_presets_command_lists_exact_sizes_for_sd15(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "character" in out and "11.1 MB" in out and "99.2 MB" in out


def test_sd15_sizes_match_the_parameter_counts_of_design_notes():
    arch = architecture_for(None)
    from trainer.config.schema import NetworkConfig

    def params_per_rank(**kw):
        r = 8
        modules, size = lora_size(NetworkConfig(rank=r, alpha=4, **kw), arch, dtype="fp32")
        tensor_bytes = size - 8 - 1400 - 200 * modules  # header is ~200 bytes per module; bounded below
        return modules, tensor_bytes / 4 / r

    modules, per_rank = params_per_rank(targets="full", te_mlp=True)
    assert modules == 192 + 72
    assert abs(per_rank - 589_824) / 589_824 < 0.02
    modules, per_rank = params_per_rank(targets="cross-attn")
    assert modules == 64 + 48
    assert abs(per_rank - 173_184) / 173_184 < 0.02


def test_predicted_size_equals_the_trained_file(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path):
    from trainer.config.presets import resolve_config
    from trainer.train.loop import train

    config = resolve_config("style", overrides=dict(base=str(tiny_sd1_dir), data=str(image_folder), steps=1, rank=4,
                                                    output=str(tmp_path / "s.safetensors")))
    finished = list(train(config))[-1]
    _, predicted = lora_size(config, architecture_for(str(tiny_sd1_dir)))
    assert abs(predicted - finished.size_bytes) <= 600  # only the run metadata differs from the estimate
