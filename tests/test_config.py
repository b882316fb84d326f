"""Config: defaults, presets, TOML round trip, and validation errors that name field and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config.presets import list_presets, load_preset, resolve_config
from trainer.config.schema import (
    StudioConfig,
    config_from_dict,
    config_to_dict,
    load_toml,
    save_toml,
)
from trainer.core.errors import ConfigError


def test_presets_are_sparse_overrides_with_the_promised_shapes():
    presets = {p.name: p for p in list_presets()}
    assert {"character-lite", "character", "style", "max"} <= set(presets)
    character = resolve_config("character")
    assert (character.network.rank, character.network.alpha) == (32, 16)
    assert character.network.targets == "cross-attn" and character.network.train_text_encoder
    assert resolve_config("character-lite").network.rank == 8
    style = resolve_config("style")
    assert (style.network.rank, style.network.alpha, style.network.targets) == (64, 32, "full")
    # sparse: a preset only names what it changes; everything else is the dataclass default
    assert "data" not in presets["character"].overrides
    assert character.data == StudioConfig().data
    assert all(p.description for p in presets.values())


@pytest.mark.parametrize("name", ["character-lite", "character", "style", "max"])
def test_each_preset_file_says_truly_what_it_is_for_and_how_big_it_gets(name: str):
    """The comment header users read before copying a preset matches what the preset does."""
    import re

    from trainer.cli.console import format_size
    from trainer.lora.sizing import _build, lora_size
    from trainer.models.family import BUNDLED_CONFIGS

    preset = load_preset(name)
    header = preset.path.read_text(encoding="utf-8").split("\n\n")[0]
    assert header.startswith(f"# {name}: ")
    config = resolve_config(name)
    network = config.network
    assert f"Rank {network.rank} / alpha {network.alpha:g} " in header
    assert f"x {config.train.epochs} epochs at batch size 1 = {20 * config.train.epochs}-{50 * config.train.epochs} steps" in header
    sizes = re.search(r"File size \(fp16\): SD 1\.5 (.+?), SDXL (.+?)\.$", header, re.M).groups()
    for family, label, stated in (("sd1", "SD 1.5", sizes[0]), ("sdxl", "SDXL", sizes[1])):
        _, size = lora_size(config, _build(BUNDLED_CONFIGS[family], family, label))
        assert format_size(size) == stated, f"{name} on {label}"


def test_layering_defaults_preset_file_overrides(tmp_path: Path):
    run = tmp_path / "run.toml"
    run.write_text('[network]\nrank = 12\n[optim]\nlr = 3e-4\n', encoding="utf-8")
    config = resolve_config("style", run, {"lr": 5e-5, "trigger": "zxq"})
    assert config.network.rank == 12  # file beats preset
    assert config.network.alpha == 32  # preset beats default
    assert config.optim.lr == 5e-5  # flag beats file
    assert config.data.trigger == "zxq"


def test_toml_round_trip_is_exact(tmp_path: Path):
    config = resolve_config("max", overrides={"sample_prompts": ["a", "b"], "data": "x", "te_lr": 2e-5})
    save_toml(config, tmp_path / "c.toml")
    assert config_from_dict(load_toml(tmp_path / "c.toml")) == config
    assert config_to_dict(config)["output"]["sample_prompts"] == ["a", "b"]


def test_lora_scale_follows_alpha_over_rank_or_rslora():
    assert resolve_config(None, overrides={"rank": 16, "alpha": 8}).lora_scale == 0.5
    assert resolve_config(None, overrides={"rank": 16, "alpha": 8, "rslora": True}).lora_scale == 2.0
    assert resolve_config(None, overrides={"lr": 1e-4}).effective_te_lr == 5e-5


@pytest.mark.parametrize(("overrides", "field", "fix_word"), [
    ({"rank": 0}, "network.rank", "1 or more"),
    ({"lr": -1e-4}, "optim.lr", "positive"),
    ({"alpha": 0}, "network.alpha", "positive"),
    ({"resolution": 32}, "data.resolution", "64"),
    ({"batch_size": 0}, "train.batch_size", "1 or more"),
    ({"caption_dropout": 1.5}, "data.caption_dropout", "[0, 1)"),
    ({"output": "out/lora.ckpt"}, "output.output", ".safetensors"),
    ({"targets": "everything"}, "network.targets", "cross-attn"),
    ({"precision": "fp8"}, "train.precision", "bf16"),
    ({"rank": "eight"}, "network.rank", "whole number"),
    ({"rank": 4.5}, "network.rank", "whole number"),
    ({"flip": "maybe"}, "data.flip", "true or false"),
    ({"lr": float("nan")}, "optim.lr", "finite"),
])
def test_validation_names_field_and_fix(overrides, field, fix_word):
    with pytest.raises(ConfigError) as err:
        resolve_config("character", overrides=overrides)
    assert field in str(err.value)
    assert fix_word in str(err.value)


def test_unknown_settings_suggest_the_right_name(tmp_path: Path):
    with pytest.raises(ConfigError, match="Did you mean 'rank'"):
        resolve_config(None, overrides={"rnak": 8})
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\nrank = 8\nlerning_rate = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"lerning_rate.*\[network\]"):
        resolve_config(None, bad)
    misplaced = tmp_path / "misplaced.toml"
    misplaced.write_text("rank = 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"Put it under \[network\]"):
        resolve_config(None, misplaced)


def test_bad_toml_and_missing_files_are_clear(tmp_path: Path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[network\nrank = 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_config(None, broken)
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(None, tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="Unknown preset 'charactr'"):
        load_preset("charactr")


@pytest.mark.parametrize("preset", [None, *[p.name for p in list_presets()]])
def test_a_first_run_makes_sample_images_without_being_asked(preset) -> None:
    # 20 pictures x 10 epochs at batch 1 (a preset's typical short run) shows pictures along the way
    config = resolve_config(preset)
    every = config.output.sample_every
    assert every > 0 and 200 // every >= 2, every
