"""The app with SDXL and SD 2.x base models, driven through gradio_client: plan, train, generate, refuse.

One server for the module; the tiny SDXL and SD2 models are written to a temporary folder and
typed into the base-model field as paths (as a user would type their own checkpoint), not
picked as the demo model. Each family gets a plan with its own exact file size and estimate, a
two-step run whose LoRA says which base it was made for, and images from that LoRA; an SD1 LoRA
on the SDXL base is refused with a message, not a traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser.app_server import upload_pictures
from conftest import make_pattern_image
from gradio_client import Client
from gradio_client.exceptions import AppError
from safetensors import safe_open

from trainer.models.demo import write_tiny_sd2, write_tiny_sdxl

APP_PORT = 7910  # app_server's first port for this module
DATASET = "families-set"
PRESET = "character-lite"
# The tiny models are 64 px natives (sample_size 8); two steps are enough to finish and export.
SETTINGS = {"steps": 2, "rank": 4, "alpha": 4, "resolution": 64, "sample_every": 0, "save_every": 0,
            "trigger": "zxq"}
METADATA_SLACK = 600  # bytes: lora_size estimates the JSON header, the run's real metadata differs a little


@dataclass(frozen=True)
class Family:
    name: str  # the engine's family id
    label: str  # what the plan calls it
    base_model_version: str  # ss_base_model_version of an exported LoRA (the tiny SD2 is v-prediction: "_v")
    write_model: object


FAMILIES = [Family("sdxl", "SDXL", "sdxl_base_v1-0", write_tiny_sdxl),
            Family("sd2", "SD 2.x", "sd_v2_v", write_tiny_sd2)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("family-models")
    return {f.name: f.write_model(folder / f"tiny-{f.name}", seed=0) for f in FAMILIES}


@pytest.fixture(scope="module")
def dataset(app_client: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    return upload_pictures(app_client, DATASET, tmp_path_factory.mktemp("family-pictures"), 4, make_pattern_image)


@pytest.fixture(scope="module")
def trained(app_server, app_client: Client, dataset: str, models: dict[str, Path]) -> dict[str, Path]:
    """Each family's finished LoRA, trained through /start_training and followed with /watch_run."""
    outputs = {}
    for family in FAMILIES:
        run_id, _, _ = app_client.predict(dataset, str(models[family.name]), PRESET, f"{family.name}-run", SETTINGS,
                                          api_name="/start_training")
        progress, status, *_ = app_client.predict(run_id, api_name="/watch_run")  # returns when the run ends
        assert 'data-status="finished"' in progress, status
        outputs[family.name] = app_server.projects.runs_dir / f"{family.name}-run.safetensors"
        assert outputs[family.name].is_file()
    return outputs


def generate(client: Client, base: str, lora: Path, **kwargs):
    """/generate with one LoRA slot, two steps, one image at the model's own size."""
    return client.predict(base, [{"file": str(lora), "weight": 1.0, "enabled": True}], "zxq, a portrait", "", 7, 2,
                          5.0, 0, 0, "Euler a", 1, False, api_name="/generate", **kwargs)


def expected_size(base: Path) -> int:
    from trainer.config.presets import resolve_config
    from trainer.lora.sizing import architecture_for, lora_size

    config = resolve_config(PRESET, overrides={**SETTINGS, "base": str(base)})
    return lora_size(config, architecture_for(str(base)), config.output.export_dtype)[1]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_plan_names_the_family_with_its_size_and_estimate(app_client: Client, dataset: str, models: dict[str, Path],
                                                          family: Family) -> None:
    base = models[family.name]
    at_native_size = {k: v for k, v in SETTINGS.items() if k != "resolution"}  # 0: the model's own size
    plan = app_client.predict(dataset, str(base), PRESET, f"{family.name}-plan", at_native_size,
                              api_name="/check_training")
    assert f"({family.label})" in plan, plan
    # the plan's size is exact for the run (its header built as the export will); the tensors fix all but the header
    shown = re.search(r"\.safetensors, ([\d.]+) kB \((\d+) layers", plan)
    assert shown is not None, plan
    assert abs(float(shown.group(1)) * 1000 - expected_size(base)) <= METADATA_SLACK, plan
    assert "Estimate on CPU" in plan and "of RAM" in plan and "at 64 px" in plan, plan
    assert "Demo model" not in plan


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_run_exports_a_lora_for_its_family(app_client: Client, trained: dict[str, Path], models: dict[str, Path],
                                             family: Family) -> None:
    output = trained[family.name]
    with safe_open(str(output), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == family.base_model_version
    assert metadata["ss_v2"] == str(family.name == "sd2")
    assert abs(output.stat().st_size - expected_size(models[family.name])) <= METADATA_SLACK
    summary, _ = app_client.predict(str(output), api_name="/inspect_lora")
    assert f"{output.name}: LoRA for {family.label}" in summary, summary


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_generate_with_the_trained_lora(app_client: Client, trained: dict[str, Path], models: dict[str, Path],
                                        family: Family) -> None:
    gallery, infotext, notes = generate(app_client, str(models[family.name]), trained[family.name])
    assert len(gallery) == 1 and Path(gallery[0]["image"]["path"]).is_file()
    assert f"<lora:{family.name}-run:1>" in infotext and "Size: 64x64" in infotext, infotext
    assert f"{family.name}-run × 1" in notes


def test_an_sd1_lora_on_the_sdxl_base_is_refused_clearly(app_client: Client, models: dict[str, Path],
                                                          tmp_path: Path) -> None:
    sd1_lora = _sd1_lora(tmp_path / "sd1-style.safetensors")
    with pytest.raises(AppError) as info:
        generate(app_client, str(models["sdxl"]), sd1_lora)
    message = str(info.value)
    assert "made for SD 1.x but the loaded model is SDXL" in message, message
    assert "Traceback" not in message and "internal error" not in message


def _sd1_lora(path: Path) -> Path:
    """A small SD1 LoRA file (tiny SD1 model, random LoRA weights)."""
    from trainer.config.schema import NetworkConfig
    from trainer.lora.inject import inject_lora, plan_lora
    from trainer.lora.metadata import ExportInfo, build_metadata
    from trainer.lora.writing import collect_lora_modules, save_kohya_lora
    from trainer.models.demo import build_tiny_sd1

    parts = build_tiny_sd1()
    network = NetworkConfig(rank=2, alpha=2, train_text_encoder=False)
    plan = plan_lora(network, parts.unet, {})
    inject_lora(parts.unet, plan.modules["unet"], network)
    save_kohya_lora(collect_lora_modules("unet", parts.unet, "sd1"),
                    build_metadata(ExportInfo(family="sd1", output_name=path.stem, rank=2, alpha=2)), path)
    return path
