"""A1111 infotext: what we write reads back the same, and A1111's own text parses."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from trainer.generate.infotext import (
    Infotext,
    LoraTag,
    lora_tags,
    parse_infotext,
    read_png_infotext,
    save_png,
    strip_lora_tags,
)

FULL = Infotext(
    prompt="zxq girl reading in a cafe, warm light <lora:mychar:0.8> <lora:watercolor:0.4>",
    negative_prompt="blurry, lowres",
    steps=25,
    sampler="DPM++ 2M",
    schedule_type="Karras",
    cfg_scale=7.0,
    seed=7,
    width=512,
    height=768,
    model_hash="6ce0161689",
    model="v1-5-pruned-emaonly",
    lora_hashes={"mychar": "0123456789ab", "watercolor": "ba9876543210"},
    extra={"Clip skip": "2", "Version": "LoRA Studio"},
)


@pytest.mark.parametrize("info", [
    FULL,
    Infotext(prompt="a cat", seed=1, sampler="Euler a"),
    Infotext(prompt="line one\nline two: with colon, and comma", negative_prompt="neg\nmore", cfg_scale=7.5,
             seed=4294967295, width=64, height=64, extra={"Note": 'has "quotes", commas: and colons'}),
    Infotext(prompt="", negative_prompt="", seed=0),
])
def test_infotext_round_trip(info: Infotext) -> None:
    assert parse_infotext(info.to_text()) == info


def test_written_text_is_a1111_layout() -> None:
    lines = FULL.to_text().split("\n")
    assert lines[0] == FULL.prompt
    assert lines[1] == "Negative prompt: blurry, lowres"
    assert lines[2] == ('Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 7, Size: 512x768, '
                        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, '
                        'Lora hashes: "mychar: 0123456789ab, watercolor: ba9876543210", Clip skip: 2, Version: LoRA Studio')


def test_parses_text_written_by_a1111() -> None:
    text = ("masterpiece, 1girl <lora:add_detail:0.5>\nNegative prompt: (worst quality:1.4)\n"
            "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3054817384, Size: 512x640, "
            "Model hash: 7f96a1a9ca, Model: anything-v5, Denoising strength: 0.45, Clip skip: 2, "
            "Hires upscale: 2, Hires upscaler: Latent, Lora hashes: \"add_detail: 7c6bad76eb54\", Version: v1.6.0")
    info = parse_infotext(text)
    assert info.prompt == "masterpiece, 1girl <lora:add_detail:0.5>"
    assert info.negative_prompt == "(worst quality:1.4)"
    assert (info.steps, info.sampler, info.schedule_type, info.cfg_scale, info.seed) == (30, "DPM++ 2M Karras", "", 6.5, 3054817384)
    assert (info.width, info.height, info.model_hash, info.model) == (512, 640, "7f96a1a9ca", "anything-v5")
    assert info.lora_hashes == {"add_detail": "7c6bad76eb54"}
    assert info.extra["Clip skip"] == "2" and info.extra["Hires upscaler"] == "Latent"
    assert info.lora_tags == [LoraTag("add_detail", 0.5)]


@pytest.mark.parametrize("prompt, expected", [
    ("a <lora:x:0.8>", [LoraTag("x", 0.8)]),
    ("<lora:x>", [LoraTag("x", 1.0)]),
    ("<lora:my-char_v2:-0.5:1.2>", [LoraTag("my-char_v2", -0.5, 1.2)]),
    ("<lora:x:te=0.2:unet=0.9>", [LoraTag("x", 0.2, 0.9)]),
    ("<lora:x:1:lbw=1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0>", [LoraTag("x", 1.0, None, "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0")]),
    ("<lyco:a:0.3> and <LORA:b:2>", [LoraTag("a", 0.3), LoraTag("b", 2.0)]),
])
def test_lora_tags(prompt: str, expected: list[LoraTag]) -> None:
    assert lora_tags(prompt) == expected
    assert lora_tags(" ".join(tag.text() for tag in expected)) == expected  # our spelling reads back


def test_strip_lora_tags_leaves_the_words() -> None:
    assert strip_lora_tags("zxq girl <lora:a:0.8>, cafe  <lora:b:1:lbw=OUTS>") == "zxq girl , cafe"


def test_png_carries_parameters_chunk(tmp_path: Path) -> None:
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    path = save_png(image, tmp_path / "out" / "00001-7.png", FULL)
    assert read_png_infotext(path) == FULL.to_text()
    assert parse_infotext(read_png_infotext(path)) == FULL
    with Image.open(path) as reread:
        assert reread.size == (64, 64) and reread.getpixel((3, 3)) == (200, 30, 30)
    assert [p.name for p in path.parent.iterdir()] == ["00001-7.png"]  # no temp file left behind
    plain = tmp_path / "plain.png"
    image.save(plain)
    assert read_png_infotext(plain) is None
