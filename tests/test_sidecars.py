"""A1111/Forge sidecars: name.json as their "edit metadata" dialog saves it, the preview, and keeping
both in step when a LoRA is re-exported, renamed, copied, resized or merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import ui_readers
from conftest import make_pattern_image

from trainer.cli.main import build_parser, main
from trainer.lora.metadata import ExportInfo, build_metadata
from trainer.lora.reading import LoraModule
from trainer.lora.sidecars import (
    WRITTEN_KEY,
    Sidecar,
    copy_sidecars,
    json_path,
    move_sidecars,
    preview_path,
    remove_sidecars,
    sidecar_files,
    sidecar_for_export,
    write_sidecars,
)
from trainer.lora.writing import save_kohya_lora
from trainer.tools.resize import merge_loras, resize_lora

DIALOG_KEYS = ["description", "sd version", "activation text", "preferred weight", "negative text", "notes"]


def _info(**overrides) -> ExportInfo:
    values = dict(family="sd1", output_name="zxq-style", rank=2, alpha=2.0, trigger_phrase="zxq café", steps=40,
                  epoch=4, base_model_name="sd15.safetensors", dataset_dirs={"10_zxq": {"n_repeats": 10, "img_count": 4}})
    return ExportInfo(**{**values, **overrides})


def _lora(path: Path, info: ExportInfo | None = None, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    modules = [LoraModule(f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_{p}",
                          torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 2.0) for p in "kv"]
    save_kohya_lora(modules, build_metadata(info or _info(output_name=path.stem)), path, dtype="fp32")
    return path


def _png(path: Path, seed: int) -> Path:
    make_pattern_image((32, 32), seed).save(path)
    return path


def test_the_export_card_is_what_the_a1111_dialog_saves(tmp_path):
    lora = _lora(tmp_path / "zxq-style.safetensors")
    sample = _png(tmp_path / "step-000040-0.png", seed=1)
    written = write_sidecars(lora, sidecar_for_export(_info()), preview=sample)
    assert written == [tmp_path / "zxq-style.json", tmp_path / "zxq-style.preview.png"]
    text = json_path(lora).read_text(encoding="utf-8")
    data = json.loads(text)
    assert text == json.dumps(data, indent=4, ensure_ascii=False) and "zxq café" in text  # A1111's json.dump
    assert list(data) == [*DIALOG_KEYS, WRITTEN_KEY] and isinstance(data["preferred weight"], float)
    assert "zxq" not in json.dumps(data[WRITTEN_KEY])  # fingerprints of what we wrote, not a second copy
    assert data["sd version"] in ui_readers.SD_VERSIONS and data["sd version"] == "SD1"
    assert data["description"] == "SD 1.x LoRA trained with LoRA Studio on 4 images."
    assert "sd15.safetensors" in data["notes"] and "40 steps (epoch 4)" in data["notes"]
    # clicking the card: the alias (ss_output_name), A1111's default weight (0 = none preferred), the trigger
    meta = ui_readers.read_metadata(lora)
    assert ui_readers.card_prompt(lora, meta) == "<lora:zxq-style:1.0> zxq café"
    assert ui_readers.card_preview(lora) == preview_path(lora)
    assert preview_path(lora).read_bytes() == sample.read_bytes()


EDITS = {  # what the user changed in A1111's dialog -> the keys that must keep the user's value
    "nothing": ({}, set()),
    "notes and description": ({"notes": "works best at 0.7", "description": "my character"}, {"notes", "description"}),
    "cleared the trigger": ({"activation text": ""}, {"activation text"}),
    "weight and an extra key": ({"preferred weight": 0.8, "my key": [1, 2]}, {"preferred weight", "my key"}),
}


@pytest.mark.parametrize("case", EDITS)
def test_re_export_keeps_what_the_user_edited(tmp_path, case):
    edits, kept = EDITS[case]
    lora = _lora(tmp_path / "zxq-style.safetensors")
    write_sidecars(lora, sidecar_for_export(_info()))
    ui_readers.save_user_metadata(lora, edits)
    newer = sidecar_for_export(_info(trigger_phrase="zxq2", steps=80, epoch=8, family="sdxl"))
    write_sidecars(lora, newer)
    data = ui_readers.user_metadata(lora)
    for key in DIALOG_KEYS:
        assert data[key] == (edits[key] if key in kept else newer.user_metadata()[key]), key
    assert data.get("my key") == edits.get("my key")
    # and once more: an edit survives any number of exports, an unedited key keeps following them
    write_sidecars(lora, sidecar_for_export(_info(trigger_phrase="zxq3")))
    assert ui_readers.user_metadata(lora)["activation text"] == ("" if "activation text" in kept else "zxq3")


def test_a_card_made_in_a1111_before_the_export_is_kept(tmp_path):
    lora = _lora(tmp_path / "zxq-style.safetensors")
    ui_readers.save_user_metadata(lora, {"activation text": "mine", "notes": "from A1111"})
    write_sidecars(lora, sidecar_for_export(_info()))
    data = ui_readers.user_metadata(lora)
    assert (data["activation text"], data["notes"], data["sd version"]) == ("mine", "from A1111", "SD1")


def test_an_unreadable_card_is_set_aside_not_lost(tmp_path):
    lora = _lora(tmp_path / "zxq-style.safetensors")
    json_path(lora).write_text('{"notes": "half an edit', encoding="utf-8")
    write_sidecars(lora, sidecar_for_export(_info()))
    assert (tmp_path / "zxq-style.json.bak").read_text(encoding="utf-8") == '{"notes": "half an edit'
    assert ui_readers.user_metadata(lora)["activation text"] == "zxq café"


def _with_cards(lora: Path) -> Path:
    write_sidecars(lora, sidecar_for_export(_info(output_name=lora.stem)), preview=_png(lora.parent / "s.png", 2))
    (lora.parent / f"{lora.stem}.txt").write_text("A1111 description file", encoding="utf-8")
    return lora


def test_a_renamed_run_takes_its_cards_along(tmp_path):
    old = _with_cards(_lora(tmp_path / "run1.safetensors"))
    ui_readers.save_user_metadata(old, {"notes": "edited before the rename"})
    before = {p.name.replace("run1", "hero"): p.read_bytes() for p in sidecar_files(old)}
    new = old.rename(tmp_path / "hero.safetensors")
    move_sidecars(old, new)
    assert sidecar_files(old) == []
    assert {p.name: p.read_bytes() for p in sidecar_files(new)} == before
    write_sidecars(new, sidecar_for_export(_info(trigger_phrase="hero")))  # a re-export after the rename
    assert ui_readers.user_metadata(new)["notes"] == "edited before the rename"
    assert ui_readers.user_metadata(new)["activation text"] == "hero"
    assert move_sidecars(new, new) == [] and len(sidecar_files(new)) == 3  # onto itself: nothing lost


def test_an_epoch_copied_over_the_output_brings_its_card_and_keeps_the_users_edits(tmp_path):
    output = _with_cards(_lora(tmp_path / "run.safetensors"))
    ui_readers.save_user_metadata(output, {"notes": "mine"})
    epoch = _lora(tmp_path / "run-000003.safetensors", seed=3)
    write_sidecars(epoch, Sidecar(activation_text="zxq", sd_version="SD1", notes="epoch 3"),
                   preview=_png(tmp_path / "e.png", 3))
    copy_sidecars(epoch, output)
    data = ui_readers.user_metadata(output)
    assert (data["notes"], data["activation text"]) == ("mine", "zxq")
    assert preview_path(output).read_bytes() == preview_path(epoch).read_bytes()
    assert (tmp_path / "run.txt").is_file()  # the epoch has no description file: the output's stays
    bare = _lora(tmp_path / "bare.safetensors")
    assert copy_sidecars(bare, output) == [] and ui_readers.user_metadata(output)["notes"] == "mine"


def test_cards_of_a_longer_name_are_not_taken_for_ours(tmp_path):
    a = _with_cards(_lora(tmp_path / "a.safetensors"))
    ab = _with_cards(_lora(tmp_path / "a.b.safetensors"))
    assert {p.name for p in sidecar_files(a)} == {"a.json", "a.preview.png", "a.txt"}
    remove_sidecars(a)
    assert sidecar_files(a) == [] and len(sidecar_files(ab)) == 3


def test_resize_and_merge_outputs_get_cards_from_their_inputs(tmp_path):
    first = _with_cards(_lora(tmp_path / "first.safetensors", _info(output_name="first", trigger_phrase="zxq")))
    ui_readers.save_user_metadata(first, {"activation text": "zxq, red hair", "preferred weight": 0.8})
    second = _lora(tmp_path / "second.safetensors", _info(output_name="second", trigger_phrase="inkstyle"), seed=1)
    small = resize_lora(first, tmp_path / "first-r1.safetensors", rank=1)
    data = ui_readers.user_metadata(small.path)
    assert (data["activation text"], data["preferred weight"], data["sd version"]) == ("zxq, red hair", 0.8, "SD1")
    assert data["notes"].startswith("Resized from rank 2 to 1 by LoRA Studio") and "sd15.safetensors" in data["notes"]
    assert ui_readers.card_preview(small.path).read_bytes() == preview_path(first).read_bytes()
    assert set(small.sidecars) == {tmp_path / "first-r1.json", tmp_path / "first-r1.preview.png"}

    merged = merge_loras([(first, 0.7), (second, 0.5)], tmp_path / "both.safetensors")
    data = ui_readers.user_metadata(merged.path)
    assert data["activation text"] == "zxq, red hair, inkstyle" and data["preferred weight"] == 0.0
    assert data["description"] == "Merge of 0.7×first.safetensors + 0.5×second.safetensors."
    assert ui_readers.card_preview(merged.path).read_bytes() == preview_path(first).read_bytes()

    plain = merge_loras([(second, 1.0)], tmp_path / "plain.safetensors", sidecars=False)
    assert plain.sidecars == () and sidecar_files(plain.path) == []
    assert main(["resize", str(second), "--rank", "1", "--out", str(tmp_path / "cli.safetensors"), "--no-sidecars"]) == 0
    assert sidecar_files(tmp_path / "cli.safetensors") == []


def test_no_sidecars_is_a_training_flag():
    args = build_parser().parse_args(["train", "--no-sidecars"])
    assert args.sidecars is False and build_parser().parse_args(["train"]).sidecars is None
