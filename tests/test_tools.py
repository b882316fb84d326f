"""LoRA tools on files with known spectra: inspect, resize, merge, bake.

Expected numbers come from full SVDs of the dense ΔW computed here (the tools never form ΔW).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config.schema import ModelConfig
from trainer.core.errors import ConfigError, LoraFileError
from trainer.generate.generator import Generator
from trainer.generate.requests import GenerationRequest, LoraSpec
from trainer.lora.inject import (
    module_in_out,
    text_encoder_target_modules,
    unet_target_modules,
)
from trainer.lora.metadata import ExportInfo, build_metadata
from trainer.lora.names import kohya_module_name
from trainer.lora.reading import LoraModule, read_lora_file
from trainer.lora.writing import save_kohya_lora
from trainer.models.loading import load_base_model
from trainer.tools.bake import bake_loras
from trainer.tools.inspect import inspect_lora
from trainer.tools.resize import merge_loras, resize_lora

RANK, ALPHA = 6, 3.0  # scale 0.5


def dense(module: LoraModule) -> torch.Tensor:
    """(α/r)·B·A as a dense [out, in·k·k] matrix in float64."""
    return (module.alpha / module.down.shape[0]) * module.up.double().flatten(1) @ module.down.double().flatten(1)


def layer_shapes(model) -> dict[str, tuple[int, int, bool]]:
    shapes = {}
    for component, module, paths in (
        ("unet", model.unet, unet_target_modules(model.unet, "full")),
        ("text_encoder", model.text_encoder, text_encoder_target_modules(model.text_encoder, True)),
    ):
        for path in paths:
            layer = module.get_submodule(path)
            in_features, out_features = module_in_out(layer)
            shapes[kohya_module_name(component, path, "sd1")] = (in_features, out_features,
                                                                 isinstance(layer, torch.nn.Conv2d))
    return shapes


def spectral_modules(shapes, seed: int, decay: float = 0.5) -> list[LoraModule]:
    """Layers whose ΔW has singular values ∝ (1, d, d², ...), d = decay or decay², in random directions."""
    generator = torch.Generator().manual_seed(seed)
    modules = []
    for index, (name, (in_features, out_features, conv)) in enumerate(shapes.items()):
        rank = min(RANK, in_features, out_features)
        sigma = (1.0 + index % 3) * (decay ** (1 + index % 2)) ** torch.arange(rank, dtype=torch.float64)
        left, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator, dtype=torch.float64))
        right, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=generator, dtype=torch.float64))
        up, down = (left * sigma.sqrt()).float(), (sigma.sqrt()[:, None] * right.T).float()
        if conv:
            up, down = up[:, :, None, None], down[:, :, None, None]
        modules.append(LoraModule(name, down, up, ALPHA * rank / RANK))
    return modules


@pytest.fixture(scope="module")
def tiny_model(tiny_sd1_dir):
    return load_base_model(ModelConfig(base=str(tiny_sd1_dir)))


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_model) -> tuple[Path, dict[str, LoraModule]]:
    modules = spectral_modules(layer_shapes(tiny_model), seed=0)
    path = tmp_path_factory.mktemp("loras") / "mychar.safetensors"
    info = ExportInfo(family="sd1", output_name="mychar", rank=RANK, alpha=ALPHA, trigger_phrase="zxq girl",
                      tag_frequency={"10_zxq": {"zxq girl": 20, "smile": 7, "red hair": 12}})
    save_kohya_lora(modules, build_metadata(info), path, dtype="fp32")
    return path, {m.name: m for m in modules}


# --- inspect -------------------------------------------------------------------------------------


def test_inspect_reports_spectra_norms_and_blocks(lora_file, tmp_path) -> None:
    path, modules = lora_file
    report = inspect_lora(path, plot=tmp_path / "plot.png")
    assert (report.family, report.style, report.dtype, report.trigger_phrase) == ("sd1", "kohya", "fp32", "zxq girl")
    assert report.top_tags[:2] == (("zxq girl", 20), ("red hair", 12))
    assert len(report.layers) == len(modules) == 60
    for stats in report.layers:
        full = torch.linalg.svdvals(dense(modules[stats.name]))
        energy = torch.cumsum(full ** 2, 0) / (full ** 2).sum()
        assert np.allclose(stats.singular_values, full[:len(stats.singular_values)].numpy(), rtol=1e-5, atol=1e-7)
        assert stats.norm == pytest.approx(float(torch.linalg.matrix_norm(dense(modules[stats.name]))), rel=1e-6)
        assert stats.effective_rank == int((energy < 0.99 - 1e-12).sum()) + 1
        assert (stats.rank, stats.alpha, stats.scale) == (RANK, ALPHA, 0.5)
    counts = {b.block: b.layers for b in report.blocks}
    assert counts == {"te": 12, "te2": 0, "down": 12, "mid": 12, "up": 24, "other": 0}
    assert sum(b.share for b in report.blocks) == pytest.approx(1.0)
    assert report.layers[0].block == "te" and report.layers[-1].block == "up"  # model order
    text = report.text(per_layer=True)
    assert "LoRA for SD 1.x (kohya format, fp32" in text and "Trigger phrase: zxq girl" in text
    assert "Effective rank (99% energy)" in text and path.name in text
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- resize --------------------------------------------------------------------------------------


def test_resize_to_full_rank_reproduces_the_lora(lora_file, tmp_path) -> None:
    path, modules = lora_file
    report = resize_lora(path, tmp_path / "same.safetensors", rank=RANK)
    assert report.energy_kept == pytest.approx(1.0)
    resized = read_lora_file(report.path)
    for name, module in resized.modules.items():
        assert module.alpha == module.rank  # scale 1: the SVD factors carry everything
        torch.testing.assert_close(dense(module), dense(modules[name]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("target", [{"rank": 2}, {"energy": 0.9}, {"rank": 3, "energy": 0.6}])
def test_resize_keeps_the_energy_it_reports(lora_file, tmp_path, target: dict) -> None:
    path, modules = lora_file
    report = resize_lora(path, tmp_path / "small.safetensors", **target, dtype="fp32")
    resized = read_lora_file(report.path)
    total_kept = total = 0.0
    for layer in report.layers:
        full = torch.linalg.svdvals(dense(modules[layer.name])).double()
        cumulative = torch.cumsum(full ** 2, 0) / (full ** 2).sum()
        expected_rank = target.get("rank", RANK)
        if "energy" in target:
            expected_rank = min(expected_rank, int((cumulative < target["energy"] - 1e-12).sum()) + 1)
        assert layer.new_rank == resized.modules[layer.name].rank == expected_rank
        assert layer.energy_kept == pytest.approx(float(cumulative[expected_rank - 1]), rel=1e-9)
        # what the file holds is the best rank-k approximation of ΔW
        u, s, vh = torch.linalg.svd(dense(modules[layer.name]), full_matrices=False)
        best = (u[:, :expected_rank] * s[:expected_rank]) @ vh[:expected_rank]
        torch.testing.assert_close(dense(resized.modules[layer.name]), best, atol=1e-6, rtol=1e-5)
        kept = float((dense(resized.modules[layer.name]) ** 2).sum())
        assert kept / float((full ** 2).sum()) == pytest.approx(layer.energy_kept, rel=1e-5)
        total_kept, total = total_kept + kept, total + float((full ** 2).sum())
    assert report.energy_kept == pytest.approx(total_kept / total, rel=1e-5)
    ranks = {layer.new_rank for layer in report.layers}
    assert resized.metadata["ss_network_dim"] == (str(ranks.pop()) if len(ranks) == 1 else "Dynamic")
    if target == {"energy": 0.9}:  # spectra decaying by 0.5 and 0.25 need ranks 2 and 1
        assert {layer.new_rank for layer in report.layers} == {1, 2}
    assert resized.metadata["modelspec.trigger_phrase"] == "zxq girl" and "resized" in resized.metadata["ss_training_comment"]
    assert "energy kept" in report.text()


def test_resize_needs_a_target(lora_file, tmp_path) -> None:
    with pytest.raises(ConfigError, match="target rank"):
        resize_lora(lora_file[0], tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="fraction"):
        resize_lora(lora_file[0], tmp_path / "x.safetensors", energy=1.5)


# --- merge ---------------------------------------------------------------------------------------


def test_merge_of_one_lora_at_weight_one_reproduces_it(lora_file, tmp_path) -> None:
    path, modules = lora_file
    report = merge_loras([(path, 1.0)], tmp_path / "one.safetensors")
    merged = read_lora_file(report.path)
    assert set(merged.modules) == set(modules) and report.energy_kept == 1.0
    for name, module in merged.modules.items():
        assert torch.equal(module.up, modules[name].up) and torch.equal(module.down, modules[name].down)
        assert module.alpha == modules[name].alpha


def test_merge_two_is_the_weighted_sum(lora_file, tiny_model, tmp_path) -> None:
    path, first = lora_file
    second = {m.name: m for m in spectral_modules(layer_shapes(tiny_model), seed=1, decay=0.8)}
    other = tmp_path / "style.safetensors"
    save_kohya_lora(list(second.values()), build_metadata(ExportInfo(family="sd1", output_name="style", rank=RANK,
                                                                       alpha=ALPHA)), other, dtype="fp32")
    exact = read_lora_file(merge_loras([(path, 0.7), (other, -0.3)], tmp_path / "ab.safetensors", dtype="fp32").path)
    for name, module in exact.modules.items():
        assert module.rank == 2 * RANK
        torch.testing.assert_close(dense(module), 0.7 * dense(first[name]) - 0.3 * dense(second[name]),
                                   atol=1e-6, rtol=1e-5)

    report = merge_loras([(path, 0.7), (other, -0.3)], tmp_path / "ab4.safetensors", rank=4, dtype="fp32")
    kept = total = 0.0
    for name, module in read_lora_file(report.path).modules.items():
        s = torch.linalg.svdvals(0.7 * dense(first[name]) - 0.3 * dense(second[name]))
        kept, total = kept + float((s[:4] ** 2).sum()), total + float((s ** 2).sum())
        assert module.rank == 4
    assert report.energy_kept == pytest.approx(kept / total, rel=1e-6)
    assert "SVD, energy kept" in report.text()


def test_merge_refuses_loras_of_different_families(lora_file, tmp_path) -> None:
    sdxl = tmp_path / "xl.safetensors"
    save_kohya_lora([LoraModule("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", torch.randn(4, 1280),
                                torch.randn(1280, 4), 4.0)], {}, sdxl, dtype="fp32")
    with pytest.raises(LoraFileError, match="different base models"):
        merge_loras([(lora_file[0], 1.0), (sdxl, 1.0)], tmp_path / "bad.safetensors")


# --- bake ----------------------------------------------------------------------------------------


def test_bake_then_plain_generation_equals_the_lora_generation(lora_file, tiny_sd1_dir, tmp_path) -> None:
    path, modules = lora_file
    baked_path = tmp_path / "baked.safetensors"
    report = bake_loras(str(tiny_sd1_dir), [LoraSpec(path, 0.8)], baked_path, dtype="fp32")
    assert report.loras[0].layers == 60 and report.loras[0].unmatched == ()

    baked = load_base_model(ModelConfig(base=str(baked_path), base_config=str(tiny_sd1_dir)))
    base = load_base_model(ModelConfig(base=str(tiny_sd1_dir)))
    proj = "down_blocks.0.attentions.0.proj_in"
    name = kohya_module_name("unet", proj, "sd1")
    expected = base.unet.get_submodule(proj).weight.double() + 0.8 * dense(modules[name]).reshape(
        base.unet.get_submodule(proj).weight.shape)
    torch.testing.assert_close(baked.unet.get_submodule(proj).weight.double(), expected, atol=1e-6, rtol=1e-6)

    request = {"prompt": "zxq girl", "seed": 5, "steps": 2, "width": 64, "height": 64}
    with_lora = Generator(base, fuse=False).generate(GenerationRequest(**request, loras=(LoraSpec(path, 0.8),)))[0]
    plain_baked = Generator(baked).generate(GenerationRequest(**request))[0]
    difference = np.abs(np.asarray(with_lora.image, np.int16) - np.asarray(plain_baked.image, np.int16))
    assert difference.max() <= 2


# --- command line --------------------------------------------------------------------------------


def test_cli_inspect_resize_merge(lora_file, tmp_path, capsys) -> None:
    from trainer.cli.main import main

    path, _ = lora_file
    assert main(["inspect", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    assert "LoRA for SD 1.x" in capsys.readouterr().out and (tmp_path / "p.png").is_file()
    assert main(["resize", str(path), "--rank", "2", "--out", str(tmp_path / "r2.safetensors")]) == 0
    assert "energy kept" in capsys.readouterr().out
    assert read_lora_file(tmp_path / "r2.safetensors").modules[next(iter(lora_file[1]))].rank == 2
    assert main(["merge", f"{path}:0.7", f"{tmp_path / 'r2.safetensors'}:0.3", "--out", str(tmp_path / "m.safetensors")]) == 0
    assert "0.7×mychar.safetensors + 0.3×r2.safetensors" in capsys.readouterr().out
    assert main(["resize", str(path), "--out", str(tmp_path / "x.safetensors")]) == 2  # user error, one line
    assert capsys.readouterr().err.startswith("error: Say how small")


# --- extract -------------------------------------------------------------------------------------


def test_extract_recovers_a_baked_lora(lora_file, tiny_model, tiny_sd1_dir, tmp_path) -> None:
    from trainer.tools.extract import extract_lora

    unet_only = {n: m for n, m in lora_file[1].items() if n.startswith("lora_unet_")}
    source = tmp_path / "unet-only.safetensors"
    save_kohya_lora(list(unet_only.values()), {}, source, dtype="fp32")
    tuned = tmp_path / "tuned.safetensors"
    bake_loras(str(tiny_sd1_dir), [LoraSpec(source, 1.0)], tuned, dtype="fp32")

    report = extract_lora(str(tiny_sd1_dir), str(tuned), tmp_path / "extracted.safetensors", rank=RANK,
                          base_config=str(tiny_sd1_dir), dtype="fp32")
    assert len(report.unchanged) == 12 and all(n.startswith("lora_te_") for n in report.unchanged)
    assert report.energy_kept == pytest.approx(1.0, abs=1e-6)
    extracted = read_lora_file(report.path)
    assert set(extracted.modules) == set(unet_only)
    for name, module in extracted.modules.items():
        torch.testing.assert_close(dense(module), dense(unet_only[name]), atol=1e-5, rtol=1e-4)

    small = extract_lora(str(tiny_sd1_dir), str(tuned), tmp_path / "r1.safetensors", rank=1,
                         base_config=str(tiny_sd1_dir), dtype="fp32")
    for layer in small.layers:
        s = torch.linalg.svdvals(dense(unet_only[layer.name]))
        assert layer.new_rank == 1
        assert layer.energy_kept == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()), rel=1e-4)
