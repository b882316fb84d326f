"""Every ss_* key has the type and shape kohya's train_network.py writes, and A1111/Forge/ComfyUI read it.

The reference table is taken from sd-scripts @ 48d368fa ``train_network.py`` (the metadata dict at
lines 1003-1065, the command-line dataset keys at 1181-1200, network args and model name at
1203-1221, then ``{k: str(v)}`` at 1223, and ``save_model`` at 1299-1303) and ``library/train_util.py`` (bucket_info, 1060-1073;
tag frequency, 800-809). The UI side goes through tests/ui_readers.py, which parses our header the
way A1111's dialog, Forge and ComfyUI do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import ui_readers

from trainer.lora.metadata import (
    ExportInfo,
    build_metadata,
    kohya_bucket_info,
    kohya_value,
    trim_tag_frequency,
)
from trainer.lora.reading import LoraModule
from trainer.lora.writing import (
    VIEWABLE_HEADER_BYTES,
    lora_file_size,
    module_shape,
    save_kohya_lora,
)

# --- what a kohya value looks like ---------------------------------------------------------------


def _is_bool(v: str) -> bool:
    return v in ("True", "False")


def _is_int(v: str) -> bool:
    return re.fullmatch(r"-?\d+", v) is not None


def _is_float(v: str) -> bool:  # Python's repr of a float: "0.0001", "5e-05", "1.0" -- never "1"
    try:
        return repr(float(v)) == v
    except ValueError:
        return False


def _or_none(check):
    return lambda v: v == "None" or check(v)


def _is_tuple2(v: str) -> bool:
    return re.fullmatch(r"\((\d+), (\d+)\)", v) is not None


def _is_json(shape):
    def check(v: str) -> bool:
        value = json.loads(v)
        return json.dumps(value) == v and shape(value)  # json.dumps defaults: ", " / ": ", ASCII escapes
    return check


def _dirs_shape(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(entry, dict) and set(entry) == {"n_repeats", "img_count"}
        and all(type(n) is int for n in entry.values()) for entry in value.values())


def _tags_shape(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(tags, dict) and all(tag == tag.strip().lower() and type(n) is int for tag, n in tags.items())
        for tags in value.values())


def _buckets_shape(value) -> bool:
    if value is None:
        return True
    buckets = value["buckets"]
    return set(value) == {"buckets", "mean_img_ar_error"} and isinstance(value["mean_img_ar_error"], float) and all(
        re.fullmatch(r"\d+", key) and set(b) == {"resolution", "count"} and type(b["count"]) is int
        and len(b["resolution"]) == 2 and all(type(x) is int for x in b["resolution"]) for key, b in buckets.items())


def _args_shape(value) -> bool:  # net_kwargs: "k=v" strings from --network_args, plus an optional dropout
    return isinstance(value, dict) and all(isinstance(v, str) or (k == "dropout" and v is None) for k, v in value.items())


_str = lambda v: isinstance(v, str)  # noqa: E731
_text = lambda v: not v.startswith(("{", "["))  # noqa: E731  A1111 would parse a leading "{" as JSON

# key -> (what kohya stores there, train_network.py line)
KOHYA_KEYS = {
    "ss_session_id": (_is_int, 1004), "ss_training_started_at": (_is_float, 1005),
    "ss_output_name": (_or_none(_text), 1006), "ss_learning_rate": (_is_float, 1007),
    "ss_text_encoder_lr": (_or_none(_is_float), 1008), "ss_unet_lr": (_or_none(_is_float), 1009),
    "ss_num_train_images": (_is_int, 1010), "ss_num_validation_images": (_is_int, 1011),
    "ss_num_reg_images": (_is_int, 1012), "ss_num_batches_per_epoch": (_is_int, 1013),
    "ss_num_epochs": (_is_int, 1014), "ss_gradient_checkpointing": (_is_bool, 1015),
    "ss_gradient_accumulation_steps": (_is_int, 1016), "ss_max_train_steps": (_is_int, 1017),
    "ss_lr_warmup_steps": (_is_int, 1018), "ss_lr_scheduler": (_text, 1019),
    "ss_network_module": (lambda v: v == "networks.lora", 1020), "ss_network_dim": (_is_int, 1021),
    "ss_network_alpha": (_is_float, 1022), "ss_network_dropout": (_or_none(_is_float), 1023),
    "ss_mixed_precision": (lambda v: v in ("no", "fp16", "bf16"), 1024), "ss_full_fp16": (_is_bool, 1025),
    "ss_v2": (_is_bool, 1026),
    "ss_base_model_version": (lambda v: v in ("sd_v1", "sd_v1_v", "sd_v2", "sd_v2_v", "sdxl_base_v1-0"), 1027),
    "ss_clip_skip": (_or_none(_is_int), 1028), "ss_max_token_length": (_or_none(_is_int), 1029),
    "ss_cache_latents": (_is_bool, 1030), "ss_seed": (_or_none(_is_int), 1031), "ss_lowram": (_is_bool, 1032),
    "ss_noise_offset": (_or_none(_is_float), 1033), "ss_multires_noise_iterations": (_or_none(_is_int), 1034),
    "ss_multires_noise_discount": (_is_float, 1035), "ss_adaptive_noise_scale": (_or_none(_is_float), 1036),
    "ss_zero_terminal_snr": (_is_bool, 1037), "ss_training_comment": (_or_none(_text), 1038),
    "ss_optimizer": (lambda v: re.fullmatch(r"[\w.]+\.\w+(\(.*\))?", v) is not None, 1040),
    "ss_max_grad_norm": (_is_float, 1041), "ss_caption_dropout_rate": (_is_float, 1042),
    "ss_caption_dropout_every_n_epochs": (_is_int, 1043), "ss_caption_tag_dropout_rate": (_is_float, 1044),
    "ss_face_crop_aug_range": (_or_none(lambda v: re.fullmatch(r"\([\d.]+, [\d.]+\)", v) is not None), 1045),
    "ss_prior_loss_weight": (_is_float, 1046), "ss_min_snr_gamma": (_or_none(_is_float), 1047),
    "ss_scale_weight_norms": (_or_none(_is_float), 1048), "ss_ip_noise_gamma": (_or_none(_is_float), 1049),
    "ss_debiased_estimation": (_is_bool, 1050), "ss_noise_offset_random_strength": (_is_bool, 1051),
    "ss_ip_noise_gamma_random_strength": (_is_bool, 1052), "ss_loss_type": (_text, 1053),
    "ss_huber_schedule": (_text, 1054), "ss_huber_scale": (_is_float, 1055), "ss_huber_c": (_is_float, 1056),
    "ss_fp8_base": (_is_bool, 1057), "ss_fp8_base_unet": (_is_bool, 1058),
    "ss_validation_seed": (_or_none(_is_int), 1059), "ss_validation_split": (_is_float, 1060),
    "ss_max_validation_steps": (_or_none(_is_int), 1061), "ss_validate_every_n_epochs": (_or_none(_is_int), 1062),
    "ss_validate_every_n_steps": (_or_none(_is_int), 1063), "ss_resize_interpolation": (_or_none(_text), 1064),
    # a command-line run with one dataset (no --dataset_config)
    "ss_batch_size_per_device": (_is_int, 1183), "ss_total_batch_size": (_is_int, 1184),
    "ss_resolution": (_is_tuple2, 1185), "ss_color_aug": (_is_bool, 1186), "ss_flip_aug": (_is_bool, 1187),
    "ss_random_crop": (_is_bool, 1188), "ss_shuffle_caption": (_is_bool, 1189), "ss_enable_bucket": (_is_bool, 1190),
    "ss_bucket_no_upscale": (_is_bool, 1191), "ss_min_bucket_reso": (_or_none(_is_int), 1192),
    "ss_max_bucket_reso": (_or_none(_is_int), 1193), "ss_keep_tokens": (_is_int, 1194),
    "ss_dataset_dirs": (_is_json(_dirs_shape), 1195), "ss_reg_dataset_dirs": (_is_json(_dirs_shape), 1196),
    "ss_tag_frequency": (_is_json(_tags_shape), 1197), "ss_bucket_info": (_is_json(_buckets_shape), 1198),
    "ss_network_args": (_is_json(_args_shape), 1204),
    "ss_sd_model_name": (_str, 1213), "ss_sd_model_hash": (lambda v: re.fullmatch(r"[0-9a-f]{8}", v) is not None, 1210),
    # save_model(): set at each save
    "ss_epoch": (_is_int, 1303), "ss_steps": (_is_int, 1302), "ss_training_finished_at": (_is_float, 1301),
}
# Written by kohya but not by us: it is sd-scripts' git revision, and the VAE / full-file hashes
# (``ss_new_sd_model_hash`` would cost a read of the whole checkpoint at every export).
NOT_OURS = {"ss_sd_scripts_commit_hash"}


def _info(**overrides) -> ExportInfo:
    buckets = [(48, 80), (64, 64), (80, 48)]
    items = [(48, 80), (64, 64), (64, 64), (80, 48)]
    sizes = [(300, 500), (512, 512), (500, 480), (800, 470)]
    values = dict(
        family="sd1", output_name="zxq-style", rank=8, alpha=4.0, resolution=(64, 64), num_train_images=40,
        tag_frequency={"10_zxq": {"zxq": 4, " Red Hair ": 3, "red hair": 1, "café": 2}},
        dataset_dirs={"10_zxq": {"n_repeats": 10, "img_count": 4}},
        bucket_info=kohya_bucket_info(buckets, items, [10] * 4, sizes),
        learning_rate=1e-4, te_learning_rate=5e-5, steps=40, epoch=1, seed=42, started_at=1_718_000_000.25,
        finished_at=1_718_003_600.5, base_model_name="sd15.safetensors", clip_skip=2, trigger_phrase="zxq",
        session_id=3_141_592_653, num_batches_per_epoch=40, num_epochs=1, max_train_steps=40, batch_size=1,
        min_bucket_reso=48, max_bucket_reso=80, base_model_hash="31e35c80", noise_offset=0.05, min_snr_gamma=5.0)
    values.update(overrides)
    return ExportInfo(**values)


INFOS = {
    "buckets": _info(),
    "no buckets, no TE, SD2 v": _info(bucket_info=None, train_text_encoder=False, family="sd2", v_parameterization=True,
                                      noise_offset=None, min_snr_gamma=None, base_model_hash=""),
    "sdxl, rsLoRA": _info(family="sdxl", rslora=True, resolution=(1024, 1024), clip_skip=1),
}


@pytest.mark.parametrize("case", INFOS)
def test_every_ss_key_has_kohyas_type_and_shape(case):
    meta = build_metadata(INFOS[case])
    ours = {k for k in meta if k.startswith("ss_")}
    assert ours - set(KOHYA_KEYS) == set(), "keys kohya does not write"
    assert set(KOHYA_KEYS) - ours - NOT_OURS <= {"ss_sd_model_hash"}, "kohya keys we leave out"
    wrong = {key: meta[key] for key in ours if not KOHYA_KEYS[key][0](meta[key])}
    assert wrong == {}, {key: (value, f"train_network.py:{KOHYA_KEYS[key][1]}") for key, value in wrong.items()}


def test_values_are_kohyas_strings_of_the_run():
    meta = build_metadata(INFOS["buckets"])
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_learning_rate"] == "0.0001" and meta["ss_text_encoder_lr"] == "5e-05"
    assert (meta["ss_clip_skip"], meta["ss_noise_offset"], meta["ss_min_snr_gamma"]) == ("2", "0.05", "5.0")
    assert meta["ss_enable_bucket"] == "True" and meta["ss_min_bucket_reso"] == "48"
    # buckets keyed by their index, resolution [w, h], count with repeats; tags stripped, lower-cased, ASCII-escaped
    assert json.loads(meta["ss_bucket_info"])["buckets"] == {
        "0": {"resolution": [48, 80], "count": 10}, "1": {"resolution": [64, 64], "count": 20},
        "2": {"resolution": [80, 48], "count": 10}}
    assert json.loads(meta["ss_bucket_info"])["mean_img_ar_error"] == pytest.approx(
        (abs(0.6 - 0.6) + 0 + abs(1 - 500 / 480) + abs(80 / 48 - 800 / 470)) / 4)
    assert meta["ss_tag_frequency"] == '{"10_zxq": {"zxq": 4, "red hair": 4, "caf\\u00e9": 2}}'
    off = build_metadata(INFOS["no buckets, no TE, SD2 v"])
    assert (off["ss_bucket_info"], off["ss_enable_bucket"], off["ss_min_bucket_reso"]) == ("null", "False", "None")
    assert (off["ss_text_encoder_lr"], off["ss_noise_offset"], off["ss_base_model_version"]) == ("None", "None", "sd_v2_v")
    assert "ss_sd_model_hash" not in off
    sdxl = build_metadata(INFOS["sdxl, rsLoRA"])
    assert sdxl["ss_network_alpha"] == repr(4.0 * 8 ** 0.5) and sdxl["ss_base_model_version"] == "sdxl_base_v1-0"


@pytest.mark.parametrize(("value", "stored"), [
    (True, "True"), (None, "None"), (16, "16"), (5e-05, "5e-05"), (16.0, "16.0"), ((512, 768), "(512, 768)"),
    ({0: {"count": 1}}, '{"0": {"count": 1}}'), ([1, 2], "[1, 2]"), ("fp16", "fp16"),
])
def test_kohya_value_is_kohyas_str(value, stored):
    assert kohya_value(value) == stored


def test_other_engine_parts_can_set_more_kohya_keys():
    meta = build_metadata(_info(extra={"ss_loss_type": "huber", "ss_num_validation_images": 8,
                                       "ss_caption_tag_dropout_rate": 0.1}))
    assert (meta["ss_loss_type"], meta["ss_num_validation_images"], meta["ss_caption_tag_dropout_rate"]) == (
        "huber", "8", "0.1")


def test_a_bucket_info_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="kohya's shape"):
        build_metadata(_info(bucket_info={"buckets": {"64x64": 8}}))  # what 0.1 wrote


# --- read back the way the UIs read it -----------------------------------------------------------


def _modules(count: int = 3) -> list[LoraModule]:
    g = torch.Generator().manual_seed(0)
    return [LoraModule(f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_{i}_attn2_to_k",
                       torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 2.0) for i in range(count)]


@pytest.mark.parametrize("case", INFOS)
def test_a1111_and_forge_show_our_file(tmp_path, case):
    info = INFOS[case]
    path = tmp_path / f"{info.output_name}.safetensors"
    save_kohya_lora(_modules(), build_metadata(info), path)
    assert path.read_bytes()[8:10] == b'{"'
    meta = ui_readers.read_metadata(path)
    table = dict(ui_readers.metadata_table(meta))  # A1111 1.10 / Forge: raised TypeError on 0.1's files
    assert table["Output name:"] == "zxq-style" and table["Model:"] == "sd15.safetensors"
    assert table["Kohya module:"] == "networks.lora" and table["Date trained:"] == "2024-06-10 06:13"
    assert table["Dataset size:"] == 4
    assert table.get("Clip skip:") == ("2" if info.clip_skip == 2 else "1")
    if info.bucket_info is None:
        assert "Resolution:" not in table and "Resolutions:" not in table
    else:  # height x width, most images first
        assert table["Resolutions:"] == "64x64, 80x48, 48x80"
    assert ui_readers.build_tags(meta) == [("zxq", 4), ("red hair", 4), ("café", 2)]
    want = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[info.family]
    assert ui_readers.a1111_sd_version(meta) == want
    assert ui_readers.forge_sd_version(meta) == ("SD2" if info.family == "sd2" else want)
    assert ui_readers.alias(path, meta, [(path, meta)]) == path.stem
    assert ui_readers.forge_hash(path, meta) == meta["sshs_model_hash"]
    import hashlib

    assert meta["sshs_model_hash"] == hashlib.sha256(path.read_bytes()[8 + ui_readers.header_length(path):]).hexdigest()


def test_the_harness_sees_the_bug_of_issue_12_item_9():
    # 0.1 wrote {"buckets": {"64x64": 8}}: the dialog's table raised; so must our re-implementation
    with pytest.raises(TypeError, match="not subscriptable"):
        ui_readers.metadata_table({"ss_bucket_info": {"buckets": {"64x64": 8}}})
    with pytest.raises((TypeError, ValueError, AttributeError)):
        ui_readers.build_tags({"ss_tag_frequency": {"data": ["zxq"]}})


# --- the 1 MiB header of ComfyUI -----------------------------------------------------------------


def _huge_tags(folders: int = 2, tags: int = 20_000) -> dict[str, dict[str, int]]:
    # natural-language captions split on commas: tens of thousands of distinct "tags", a few common ones
    out = {}
    for f in range(folders):
        counts = {f"a sentence fragment number {i} of caption set {f}": 1 + (i % 7 == 0) for i in range(tags)}
        counts.update({"zxq": 900 + f, "red hair": 300})
        out[f"{f + 1}_set"] = counts
    return out


@pytest.mark.parametrize("modules", [3, 1000])  # 1000 modules: a tensor index the size of a full SDXL LoRA's (~440 KB)
def test_a_huge_tag_list_is_trimmed_so_the_header_stays_viewable(tmp_path, modules):
    info = _info(tag_frequency=_huge_tags())
    meta = build_metadata(info)
    assert len(meta["ss_tag_frequency"]) > 2 * VIEWABLE_HEADER_BYTES  # would not fit untrimmed
    path = tmp_path / "big.safetensors"
    lora = _modules(modules)
    written = save_kohya_lora(lora, meta, path)
    assert ui_readers.header_length(path) <= ui_readers.COMFYUI_MAX_HEADER
    assert ui_readers.header_length(path) > ui_readers.COMFYUI_MAX_HEADER - 4096  # trimmed no more than needed
    kept = ui_readers.read_metadata(path)
    tags = dict(ui_readers.build_tags(kept))
    assert tags["zxq"] == 1801 and tags["red hair"] == 600  # the frequent ones stay
    assert all(n >= 1 for n in tags.values()) and len(tags) > 1000
    # the rarest went first: whatever is left of the count-1 fragments, every count-2 one is still there
    kept_frequency = kept["ss_tag_frequency"]
    for folder, original in info.tag_frequency.items():
        if any(n == 1 for n in kept_frequency[folder].values()):
            assert all(tag in kept_frequency[folder] for tag, n in original.items() if n >= 2)
    # the exact-size prediction follows the same trimming
    assert lora_file_size([module_shape(m) for m in lora], 2, "fp16", alpha=2.0, metadata=meta) == written


def test_trimming_keeps_small_lists_whole():
    meta = build_metadata(_info())
    assert trim_tag_frequency(meta, 0) is meta
    assert json.loads(trim_tag_frequency(meta, 1)["ss_tag_frequency"]) == {"10_zxq": {"zxq": 4, "red hair": 4}}


def test_metadata_json_and_infos_are_plain(tmp_path: Path):
    # safetensors requires str -> str; A1111 needs every value a str (html.escape) or parsable JSON
    for info in INFOS.values():
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in build_metadata(info).items())
