"""Tag controls, regularization pictures and masked loss: what a step trains on and how it is weighted."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_pattern_image
from diffusers import DDPMScheduler
from PIL import Image
from safetensors import safe_open

from trainer.config.presets import resolve_config
from trainer.config.schema import DataConfig, TrainConfig, load_toml
from trainer.core.errors import ConfigError, DatasetError
from trainer.data.captions import compose_caption, process_caption
from trainer.data.lint import lint_dataset
from trainer.data.masks import latent_mask
from trainer.data.regularization import balance_reg_repeats, scan_regularization
from trainer.data.scan import scan_dataset
from trainer.data.tag_stats import tag_table
from trainer.data.training_set import TrainingSet
from trainer.train.losses import diffusion_loss


def picture(path: Path, caption: str | None = None, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_pattern_image(size, seed).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


# --- tag controls --------------------------------------------------------------------------------


@pytest.mark.parametrize(("caption", "settings", "text", "head", "tail"), [
    ("1girl, smile", {"trigger": "zxq", "keep_tokens": 1}, "zxq, 1girl, smile", 1, 0),
    ("zxq, 1girl", {"trigger": "zxq", "keep_tokens": 1}, "zxq, 1girl", 1, 0),  # already there: not repeated
    ("a, b ||| c, d, e ||| f, g", {"trigger": "zxq", "separator": "|||"}, "zxq, a, b, c, d, e, f, g", 3, 2),
    ("c, d", {"prefix": "zxq, 1girl |||", "separator": "|||", "trigger": "zxq"}, "zxq, 1girl, c, d", 2, 0),
    ("smile", {"prefix": "masterpiece", "suffix": "by artist", "trigger": "zxq", "keep_tokens": 1},
     "zxq, masterpiece, smile, by artist", 1, 0),
    ("a ||| b", {"separator": ""}, "a ||| b", 0, 0),  # separator off: the text is left alone
], ids=["trigger first", "trigger present", "two separators", "prefix holds the separator", "prefix and suffix",
        "separator off"])
def test_compose_caption_resolves_prefix_suffix_trigger_and_separator(caption, settings, text, head, tail) -> None:
    composed = compose_caption(caption, **settings)
    assert (composed.text, composed.keep_head, composed.keep_tail) == (text, head, tail)


def test_tag_dropout_never_drops_the_trigger_or_the_fixed_tags() -> None:
    caption = "a, b, c, d, e, f, g, h, zxq, tail"  # the trigger in the middle: protected by name
    kept = Counter()
    for seed in range(400):
        out = process_caption(caption, shuffle=True, keep_tokens=1, keep_tail=1, dropout=0.0, rng=random.Random(seed),
                              tag_dropout=0.5, protected={"zxq"})
        tags = out.split(", ")
        assert tags[0] == "a" and tags[-1] == "tail" and "zxq" in tags
        kept.update(tags)
    for tag in "bcdefgh":
        assert 0.4 < kept[tag] / 400 < 0.6  # each free tag dropped independently with p = 0.5


def test_training_set_tag_dropout_is_deterministic_and_keeps_the_separator_part(tmp_path: Path) -> None:
    for i in range(4):
        picture(tmp_path / f"p{i}.png", "1girl, red hair ||| smile, outdoors, hat, coat ||| by artist", seed=i)
    cfg = DataConfig(data=str(tmp_path), trigger="zxq", tag_dropout=0.5, shuffle_captions=True)
    training_set = TrainingSet(scan_dataset(cfg), cfg, 64, bucket_step=16)
    assert not training_set.is_caption_static
    refs = [ref for batch in training_set.epoch_batches(0, 1, 0) for ref in batch]
    first = [training_set.caption_for(ref, 0, 0) for ref in refs]
    assert first == [training_set.caption_for(ref, 0, 0) for ref in refs]  # a resumed run sees the same
    assert first != [training_set.caption_for(ref, 1, 0) for ref in refs]
    for caption in first:
        tags = caption.split(", ")
        assert tags[:3] == ["zxq", "1girl", "red hair"] and tags[-1] == "by artist" and "|||" not in caption
        assert len(tags) < 8 or set(tags[3:-1]) == {"smile", "outdoors", "hat", "coat"}


def test_tag_table_says_which_tags_every_caption_has() -> None:
    table = tag_table(["zxq, red hair, smile", "zxq, Red Hair, outdoors", "zxq, red hair, smile, hat"], "zxq")
    assert [(r.tag, r.captions) for r in table.rows] == [("red hair", 3), ("zxq", 3), ("smile", 2), ("hat", 1),
                                                         ("outdoors", 1)]
    assert table.absorbed == ["red hair"]
    assert table.note(table.rows[0]) == 'in every caption: absorbed into the trigger "zxq"'
    assert table.note(table.rows[1]) == "the trigger word"
    assert '"red hair"' in table.summary() and 'absorbed into the trigger "zxq"' in table.summary()


@pytest.mark.parametrize(("overrides", "field"), [
    ({"tag_dropout": 1.0}, "data.tag_dropout"),
    ({"keep_tokens_separator": ","}, "data.keep_tokens_separator"),
    ({"prior_loss_weight": -1}, "data.prior_loss_weight"),
    ({"data": "/x/pics", "reg_data": "/x/pics/"}, "data.reg_data"),
])
def test_bad_data_prep_settings_name_the_field(overrides, field) -> None:
    with pytest.raises(ConfigError, match=field):
        resolve_config("character", overrides=overrides)


# --- regularization pictures ---------------------------------------------------------------------


def _items(repeats: list[int]):
    from trainer.data.scan import DatasetItem

    return [DatasetItem(Path(f"r{i}.png"), "a woman", n, 64, 64, f"{i:064x}") for i, n in enumerate(repeats)]


@pytest.mark.parametrize(("train_samples", "reg_repeats", "balanced"), [
    (8, [1, 1, 1], [3, 3, 2]),  # fewer reg samples: one more repeat each, round-robin
    (8, [1] * 20, [1] * 8),  # more: only the first 8 pictures are used
    (8, [2] * 5, [2, 2, 2, 2]),  # their own repeats count
    (7, [2] * 5, [2, 2, 2, 2]),  # a picture is kept whole when its repeats overshoot
    (5, [10], [10]),
])
def test_reg_pictures_are_balanced_like_kohya(train_samples, reg_repeats, balanced) -> None:
    assert [item.repeats for item in balance_reg_repeats(train_samples, _items(reg_repeats))] == balanced


@pytest.fixture
def reg_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """4 training pictures x 2 repeats; 3 uncaptioned reg pictures (at the top) + 2 in '1_man' with captions."""
    train = tmp_path / "train"
    for i in range(4):
        picture(train / "2_zxq" / f"t{i}.png", f"zxq, pose {i}", seed=i)
    reg = tmp_path / "reg"
    for i in range(3):
        picture(reg / f"r{i}.png", seed=10 + i)
    for i in range(2):
        picture(reg / "1_man" / f"m{i}.png", "a man, standing", seed=20 + i)
    return train, reg


def test_reg_pictures_join_the_batches_with_their_weight(reg_dataset) -> None:
    train, reg = reg_dataset
    cfg = DataConfig(data=str(train), trigger="zxq", reg_data=str(reg), class_prompt="a woman",
                     prior_loss_weight=0.5, caption_prefix="masterpiece")
    reg_scan = scan_regularization(cfg)
    assert {i.path.name: i.caption for i in reg_scan.items} == {
        "m0.png": "a man, standing", "m1.png": "a man, standing",  # no trigger or prefix on class pictures
        "r0.png": "a woman", "r1.png": "a woman", "r2.png": "a woman"}
    training_set = TrainingSet(scan_dataset(cfg), cfg, 64, bucket_step=16, reg=reg_scan)
    assert training_set.num_train_items == 4 and training_set.reg.num_reg_images == 5
    assert training_set.num_samples == 8 + 8  # reg samples match the 4 x 2 training samples
    assert training_set.steps_per_epoch(1) == 16  # the epoch doubles
    batches = training_set.epoch_batches(0, 4, seed=1)
    seen = Counter(training_set.is_reg(ref.index) for batch in batches for ref in batch)
    assert seen == {False: 8, True: 8}
    mixed = next(b for b in batches if len({training_set.is_reg(r.index) for r in b}) == 2)
    weights = training_set.loss_weights(mixed)
    assert weights.tolist() == [0.5 if training_set.is_reg(r.index) else 1.0 for r in mixed]
    train_only = [[r for r in b if not training_set.is_reg(r.index)] for b in batches]
    assert all(training_set.loss_weights(b) is None for b in train_only if b)

    report = lint_dataset(scan_dataset(cfg), cfg, 64, None, epochs=2, batch_size=1, bucket_step=16)
    assert report.steps.text() == ("4 images × repeats = 8 samples per epoch + 8 regularization samples (from 5 "
                                   "class pictures) ÷ batch 1 → 16 steps per epoch × 2 epochs = 32 steps")


def test_reg_problems_are_reported(reg_dataset, tmp_path: Path) -> None:
    train, reg = reg_dataset
    for i in range(20):
        picture(reg / f"x{i:02d}.png", seed=40 + i)
    cfg = DataConfig(data=str(train), reg_data=str(reg))
    report = lint_dataset(scan_dataset(cfg), cfg, 64, None, epochs=1, batch_size=1, bucket_step=16)
    codes = {i.code: i for i in report.issues}
    assert "23 regularization pictures have no caption" in codes["reg_no_caption"].message
    assert "--class-prompt" in codes["reg_no_caption"].fix
    assert codes["reg_unused"].message.startswith("17 of 25 regularization pictures are never used")
    with pytest.raises(DatasetError, match="regularization folder .* does not exist"):
        scan_regularization(DataConfig(data=str(train), reg_data=str(tmp_path / "nope")))


SCHEDULER = DDPMScheduler()
PLAIN_L2 = TrainConfig(loss="l2", min_snr_gamma=0.0)  # no per-timestep weighting: the weights under test stand alone


def test_sample_weights_scale_each_sample_and_the_batch_mean_is_plain() -> None:
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    weights = torch.tensor([1.0, 0.25, 3.0])
    loss = diffusion_loss(prediction, target, SCHEDULER, torch.zeros(3, dtype=torch.long), PLAIN_L2, sample_weights=weights)
    assert loss.item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-6)
    plain = diffusion_loss(prediction, target, SCHEDULER, torch.zeros(3, dtype=torch.long), PLAIN_L2)
    assert plain.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)


# --- masked loss ---------------------------------------------------------------------------------


def test_masked_out_latent_pixels_get_exactly_zero_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    prediction = torch.randn(2, 4, 8, 8, generator=g).requires_grad_()
    target = torch.randn(2, 4, 8, 8, generator=g)
    pixel_mask = torch.ones(64, 64)
    pixel_mask[:, 32:] = 0.0  # right half ignored
    pixel_mask[:8, :8] = 0.5  # one latent pixel at half weight
    mask = torch.stack([latent_mask(pixel_mask, (8, 8)), torch.ones(1, 8, 8)])
    assert mask[0, 0, 0, 0] == 0.5 and mask[0, 0, :, 4:].eq(0).all() and mask[0, 0, 1:, :4].eq(1).all()
    loss = diffusion_loss(prediction, target, SCHEDULER, torch.zeros(2, dtype=torch.long), PLAIN_L2, mask=mask)
    loss.backward()
    assert prediction.grad[0, :, :, 4:].eq(0).all()  # exactly zero, not small
    assert prediction.grad[0, :, :, :4].ne(0).all() and prediction.grad[1].ne(0).all()
    expected = (((prediction - target) ** 2) * mask).mean(dim=(1, 2, 3)).mean()  # kohya: / elements, not mask sum
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def _masked_dataset(root: Path) -> Path:
    """Two 64 px pictures: a.png with a mask file (left half white), b.png with an alpha channel."""
    picture(root / "a.png", "zxq, a", seed=1)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask, "L").save(root / "a.mask.png")
    rgba = np.dstack([np.asarray(make_pattern_image((64, 64), 2)), np.full((64, 64), 255, np.uint8)])
    rgba[40:, :, 3] = 0  # bottom transparent
    Image.fromarray(rgba, "RGBA").save(root / "b.png")
    (root / "b.txt").write_text("zxq, b", encoding="utf-8")
    return root


def test_masks_follow_the_picture_and_mask_files_are_not_pictures(tmp_path: Path) -> None:
    root = _masked_dataset(tmp_path / "set")
    cfg = DataConfig(data=str(root), masked_loss=True, flip=True)
    scan = scan_dataset(cfg)
    assert [i.path.name for i in scan.items] == ["a.png", "b.png"] and scan.mask_files == (root / "a.mask.png",)
    assert [i.mask.kind for i in scan.items] == ["file", "alpha"]
    training_set = TrainingSet(scan, cfg, 64, bucket_step=16)
    refs = {(r.index, r.flip): r for e in range(6) for b in training_set.epoch_batches(e, 1, 0) for r in b}
    a_plain, a_flipped = training_set.load_mask(refs[0, False]), training_set.load_mask(refs[0, True])
    assert a_plain[:, :32].eq(1).all() and a_plain[:, 32:].eq(0).all()
    assert torch.equal(a_flipped, a_plain.flip(-1))  # flipped with its picture
    b = training_set.load_mask(refs[1, False])
    assert b[:40].eq(1).all() and b[40:].eq(0).all()
    assert scan_dataset(DataConfig(data=str(root))).items[0].mask is None  # masked loss off: not even looked for


def test_the_linter_flags_wrong_size_and_unused_masks(tmp_path: Path) -> None:
    root = _masked_dataset(tmp_path / "set")
    Image.new("L", (32, 32), 255).save(root / "a.mask.png")
    Image.new("L", (64, 64), 255).save(root / "gone.mask.png")
    for masked, expected in ((True, {"mask_size", "mask_orphan"}), (False, {"mask_size", "mask_orphan", "masks_unused"})):
        cfg = DataConfig(data=str(root), masked_loss=masked)
        report = lint_dataset(scan_dataset(cfg), cfg, 64, None, epochs=1, batch_size=1, bucket_step=16)
        found = {i.code: i for i in report.issues if i.code.startswith("mask")}
        assert set(found) == expected
        assert found["mask_size"].severity == "error" and "32×32 but a.png is 64×64" in found["mask_size"].message


def test_one_training_step_ignores_the_masked_out_region(tiny_sd1_dir: Path, tmp_path: Path, monkeypatch,
                                                         one_torch_thread) -> None:
    """Whatever the loss target asks for where the mask is black, the LoRA gradients stay the same."""
    from trainer.train import loop
    from trainer.train.session import open_session

    root = tmp_path / "set"
    picture(root / "a.png", "zxq, a", seed=3)
    mask = np.full((64, 64), 255, np.uint8)
    mask[:, 32:] = 0
    Image.fromarray(mask, "L").save(root / "a.mask.png")
    config = resolve_config("character", overrides={
        "base": str(tiny_sd1_dir), "data": str(root), "output": str(tmp_path / "out" / "lora.safetensors"),
        "rank": 4, "alpha": 4, "steps": 1, "masked_loss": True, "resolution": 64, "min_snr_gamma": 0.0})
    session = open_session(config, lambda level, text: None)
    session.warm_caches(lambda level, text: None)
    params = [p for group in session.optimizer.param_groups for p in group["params"]]
    original_target = loop.prediction_target

    def gradients(perturb: bool) -> list[torch.Tensor]:
        def target(scheduler, latents, noise, timesteps):
            out = original_target(scheduler, latents, noise, timesteps).clone()
            if perturb:
                out[..., 4:] += 100.0  # latent columns 4-7 = the black right half
            return out

        monkeypatch.setattr(loop, "prediction_target", target)
        session.batch_cursor = 0
        session.noise_generator.manual_seed(5)
        torch.manual_seed(5)
        session.optimizer.zero_grad(set_to_none=True)
        loop.training_step(session)
        return [p.grad.detach().clone() for p in params if p.grad is not None]

    plain, perturbed = gradients(False), gradients(True)
    assert plain and any(g.abs().sum() > 0 for g in plain)
    assert all(torch.equal(a, b) for a, b in zip(plain, perturbed, strict=True))
    session.config = config.replace(masked_loss=False)  # control: without the mask the same change matters
    unmasked = gradients(True)
    assert any(not torch.equal(a, b) for a, b in zip(plain, unmasked, strict=True))


def test_the_latent_cache_keys_on_the_mask(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    from trainer.data.caches import LatentCache

    root = _masked_dataset(tmp_path / "set")
    cfg = DataConfig(data=str(root), masked_loss=True)
    training_set = TrainingSet(scan_dataset(cfg), cfg, 64, bucket_step=16)
    ref = next(r for b in training_set.epoch_batches(0, 1, 0) for r in b if r.index == 0)
    vae = AutoencoderKL.from_pretrained(str(tiny_sd1_dir / "vae"))
    item = training_set.items[0]

    def get(cache, key):
        return cache.get(item.sha256, ref.bucket, ref.flip, lambda: training_set.load_pixels(ref), key,
                         lambda: training_set.load_mask(ref))

    first = get(LatentCache(vae, tmp_path / "cache"), item.mask.key)
    assert first.mask.shape == (1, 8, 8) and first.mask[0, :, :4].eq(1).all() and first.mask[0, :, 4:].eq(0).all()
    again = LatentCache(vae, tmp_path / "cache")
    assert torch.equal(get(again, item.mask.key).mask, first.mask) and again.encoded == 0  # from disk
    Image.new("L", (64, 64), 255).save(root / "a.mask.png")  # the user edits the mask
    edited = scan_dataset(cfg).items[0]
    assert edited.mask.key != item.mask.key
    fresh = LatentCache(vae, tmp_path / "cache")
    assert get(fresh, edited.mask.key).mask is None and fresh.encoded == 1  # all white: no mask, re-read


# --- everything reaches the LoRA file and config.toml --------------------------------------------


def test_a_run_records_the_data_prep_settings(tiny_sd1_dir: Path, reg_dataset, tmp_path: Path, monkeypatch,
                                              one_torch_thread) -> None:
    from trainer.train import loop
    from trainer.train.loop import train

    train_dir, reg = reg_dataset
    _masked_dataset(train_dir / "1_extra")
    seen_weights = []
    original = loop.diffusion_loss

    def spy(*args, mask=None, sample_weights=None):
        seen_weights.append(None if sample_weights is None else sample_weights.tolist())
        return original(*args, mask=mask, sample_weights=sample_weights)

    monkeypatch.setattr(loop, "diffusion_loss", spy)
    out = tmp_path / "out"
    config = resolve_config("character", overrides={
        "base": str(tiny_sd1_dir), "data": str(train_dir), "output": str(out / "lora.safetensors"), "rank": 4,
        "alpha": 4, "epochs": 1, "batch_size": 2, "resolution": 64, "trigger": "zxq", "reg_data": str(reg),
        "class_prompt": "a woman", "prior_loss_weight": 0.25, "masked_loss": True, "tag_dropout": 0.2,
        "caption_prefix": "masterpiece |||", "caption_suffix": "by me", "shuffle_captions": True})
    events = list(train(config))
    assert type(events[-1]).__name__ == "RunFinished"
    assert len(seen_weights) == 10  # (10 training + 10 reg samples) / batch 2, one epoch
    assert any(w and 0.25 in w for w in seen_weights)
    with safe_open(str(out / "lora.safetensors"), "pt") as fh:
        meta = fh.metadata()
    # kohya counts training images with their repeats (the 1_extra folder repeats its pictures); reg pictures apart
    assert meta["ss_num_reg_images"] == "5" and meta["ss_num_train_images"] == "10"
    assert (meta["ss_prior_loss_weight"], meta["lorastudio_masked_loss"], meta["ss_caption_tag_dropout_rate"]) == (
        "0.25", "True", "0.2")
    assert (meta["lorastudio_caption_prefix"], meta["lorastudio_caption_suffix"], meta["lorastudio_keep_tokens_separator"]) == (
        "masterpiece |||", "by me", "|||")
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 1, "img_count": 3},
                                                       "1_man": {"n_repeats": 1, "img_count": 2}}
    saved = load_toml(out / "lora_run" / "config.toml")["data"]
    assert {k: saved[k] for k in ("reg_data", "class_prompt", "prior_loss_weight", "masked_loss", "tag_dropout",
                                  "caption_prefix", "caption_suffix", "keep_tokens_separator")} == {
        "reg_data": str(reg), "class_prompt": "a woman", "prior_loss_weight": 0.25, "masked_loss": True,
        "tag_dropout": 0.2, "caption_prefix": "masterpiece |||", "caption_suffix": "by me",
        "keep_tokens_separator": "|||"}


def test_reg_pictures_made_from_the_base_model_are_seeded_and_resumable(tiny_sd1_dir: Path, tmp_path: Path,
                                                                        capsys, one_torch_thread) -> None:
    from trainer.cli.main import main
    from trainer.generate.generator import Generator
    from trainer.generate.reg_images import RegImagesRequest, make_reg_images

    generator = Generator.from_base(str(tiny_sd1_dir), device="cpu")
    request = RegImagesRequest("a woman", 2, seed=7, steps=2)
    progress = []
    first = make_reg_images(generator, request, tmp_path / "reg", progress.append)
    assert [p.name for p in first] == ["a-woman-000007.png", "a-woman-000008.png"]
    assert [(p.done, p.total) for p in progress] == [(1, 2), (2, 2)]
    assert all(p.with_suffix(".txt").read_text(encoding="utf-8") == "a woman\n" for p in first)
    pixels = [np.asarray(Image.open(p)) for p in first]
    assert pixels[0].shape == (64, 64, 3) and not np.array_equal(pixels[0], pixels[1])  # one seed each
    stamp = first[0].stat().st_mtime_ns
    more = make_reg_images(generator, RegImagesRequest("a woman", 3, seed=7, steps=2), tmp_path / "reg")
    assert len(more) == 3 and first[0].stat().st_mtime_ns == stamp  # kept, not rendered again
    again = make_reg_images(generator, request, tmp_path / "again")
    assert np.array_equal(np.asarray(Image.open(again[1])), pixels[1])  # the seed decides the picture
    reg = scan_regularization(DataConfig(data=str(tmp_path / "x"), reg_data=str(tmp_path / "reg")))
    assert [i.caption for i in reg.items] == ["a woman"] * 3
    with pytest.raises(ConfigError, match="No class prompt"):
        RegImagesRequest(" ", 3)

    code = main(["reg-images", "--base", str(tiny_sd1_dir), "--class-prompt", "a cat", "-n", "1", "--steps", "1",
                 "--out", str(tmp_path / "cli"), "--device", "cpu"])
    assert code == 0 and (tmp_path / "cli" / "a-cat-000000.txt").is_file()
    assert f"train with --reg-data {tmp_path / 'cli'}" in capsys.readouterr().out
