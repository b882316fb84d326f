"""Generate tab: a base model plus any number of LoRA slots, each with its own weight.

The LoRA slots live in one JSON value (``gen-loras``): a list of ``{"id", "file", "weight",
"enabled", "te_weight", "unet_weight", "blocks"}``. The slot widgets are drawn from it with
``gr.render`` and write their edits back into it in the browser (small JS functions, so a click
on Generate right after moving a slider never races a server round trip). The ``generate``
endpoint takes that list, which keeps it easy to call from gradio_client.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from app.errors import user_errors
from app.studio import Studio
from trainer.core.errors import ConfigError, LoraFileError, StudioError

WEIGHT_RANGE = (-2.0, 2.0)
DEFAULT_PROMPT = "zxq, a portrait"


def new_slot(file: str = "", weight: float = 1.0) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex[:8], "file": file, "weight": weight, "enabled": True,
            "te_weight": None, "unet_weight": None, "blocks": ""}


def lora_specs(studio: Studio, slots: list[dict[str, Any]] | None) -> list[Any]:
    """The engine's LoraSpecs for the slots that name a file (empty slots are skipped)."""
    from trainer.generate.requests import BlockWeights, LoraSpec, parse_block_weights

    specs = []
    for slot in slots or []:
        if not isinstance(slot, dict):
            raise ConfigError(f"A LoRA slot must be an object with 'file' and 'weight', not {slot!r}.")
        file = str(slot.get("file") or "").strip()
        if not file:
            continue
        path = resolve_lora_path(studio, file)
        blocks = str(slot.get("blocks") or "").strip()
        specs.append(LoraSpec(
            path=path,
            weight=_number(slot.get("weight", 1.0), "weight", path),
            te_weight=_optional_number(slot.get("te_weight"), "text-encoder weight", path),
            unet_weight=_optional_number(slot.get("unet_weight"), "UNet weight", path),
            blocks=parse_block_weights(blocks) if blocks else BlockWeights(),
            enabled=bool(slot.get("enabled", True)),
        ))
    return specs


def resolve_lora_path(studio: Studio, file: str) -> Path:
    """A slot's file: a path on this computer, or the name of a LoRA this app knows."""
    if not str(file or "").strip():
        raise LoraFileError("No LoRA file is chosen.",
                            hint="Pick one from the list, upload it, or type the full path of a .safetensors file.")
    path = Path(file).expanduser()
    allowed = studio.projects.paths.allows(path)  # checked before the file is touched (--listen)
    if str(file).strip() and allowed and (path.is_file() or path.is_dir()):  # a folder: a PEFT export (name-peft/)
        return path
    for known in studio.projects.lora_files():
        if file in (known.name, known.stem):
            return known
    if not allowed:
        studio.projects.paths.check(path, "LoRA file")
    raise LoraFileError(f"LoRA file not found: {file}.",
                        hint="Pick one from the list, upload it, or type the full path of a .safetensors file.")


def lora_choices(studio: Studio) -> list[tuple[str, str]]:
    """(label, path) of every LoRA this app knows: the label says where it came from."""
    origin = {studio.projects.runs_dir: "trained here", studio.projects.loras_dir: "uploaded",
              studio.projects.outputs_dir: "made in Tools"}
    return [(f"{p.name} ({origin.get(p.parent, 'file')})", str(p)) for p in studio.projects.lora_files()]


def _number(value: Any, label: str, path: Path) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"The {label} of {path.name} must be a number, not {value!r}.") from None


def _optional_number(value: Any, label: str, path: Path) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _number(value, label, path)


# --- layout and wiring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateTab:
    """Components other tabs link to."""

    base: gr.Dropdown
    loras: gr.JSON
    slots_version: gr.Number


def build_generate_tab(studio: Studio, demo: gr.Blocks) -> GenerateTab:
    from trainer.generate.schedulers import DEFAULT_SAMPLER, sampler_names

    with gr.Row():
        base = gr.Dropdown(choices=studio.projects.base_model_choices(), value=None, allow_custom_value=True,
                           label="Base model", info="The model the LoRAs were trained for (same family).",
                           elem_id="gen-base", scale=3)
    gr.Markdown("#### LoRAs\nEach slot: a file (from your runs, uploaded, or any path), its weight (−2…2; "
                "negative pushes away from what it learned) and an on/off switch.", elem_id="gen-loras-help")
    loras = gr.JSON(value=[new_slot()], visible=False, elem_id="gen-loras")
    slots_version = gr.Number(value=0, visible=False, elem_id="gen-slots-version")

    @gr.render(inputs=[loras], triggers=[demo.load, slots_version.change])
    def draw_slots(slots: list[dict[str, Any]]):
        choices = lora_choices(studio)
        for index, slot in enumerate(slots or []):
            sid = slot.get("id") or str(index)
            with gr.Group(key=f"slot-{sid}", elem_id=f"gen-lora-{index}"):
                with gr.Row(key=f"row-{sid}", equal_height=True):
                    file = gr.Dropdown(choices=choices, value=slot.get("file") or None, allow_custom_value=True,
                                       label=f"LoRA {index + 1}", key=f"file-{sid}", elem_id=f"gen-lora-{index}-file",
                                       interactive=True, scale=4)
                    upload = gr.UploadButton("Upload .safetensors", file_types=[".safetensors"], key=f"up-{sid}",
                                             elem_id=f"gen-lora-{index}-upload", scale=1)
                    weight = gr.Slider(*WEIGHT_RANGE, value=float(slot.get("weight", 1.0)), step=0.05, label="Weight",
                                       key=f"w-{sid}", elem_id=f"gen-lora-{index}-weight", interactive=True, scale=3)
                    enabled = gr.Checkbox(value=bool(slot.get("enabled", True)), label="On", key=f"on-{sid}",
                                          elem_id=f"gen-lora-{index}-enabled", interactive=True, scale=1, min_width=60)
                    remove = gr.Button("Remove", key=f"rm-{sid}", elem_id=f"gen-lora-{index}-remove", scale=1,
                                       size="sm", min_width=60)
                with gr.Accordion("Text encoder / UNet split and block weights", open=False, key=f"adv-{sid}"):
                    with gr.Row(key=f"advrow-{sid}"):
                        te_weight = gr.Number(value=slot.get("te_weight"), label="Text-encoder weight",
                                              info="Empty = same as Weight.", key=f"te-{sid}",
                                              elem_id=f"gen-lora-{index}-te", interactive=True)
                        unet_weight = gr.Number(value=slot.get("unet_weight"), label="UNet weight",
                                                info="Empty = same as Weight.", key=f"unet-{sid}",
                                                elem_id=f"gen-lora-{index}-unet", interactive=True)
                        blocks = gr.Textbox(value=slot.get("blocks", ""), label="Block weights",
                                            info="down=1,mid=1,up=0.5, an LBW vector, or a preset (OUTALL, INS, …).",
                                            key=f"blk-{sid}", elem_id=f"gen-lora-{index}-blocks", interactive=True)
            for component, field_name in ((file, "file"), (weight, "weight"), (enabled, "enabled"),
                                          (te_weight, "te_weight"), (unet_weight, "unet_weight"), (blocks, "blocks")):
                component.change(None, [component, loras], loras, js=_slot_setter(sid, field_name))
            upload.upload(user_errors(lambda path, items, version, sid=sid: upload_lora(path, items, version, sid)),
                          [upload, loras, slots_version], [loras, slots_version], api_name=False)
            remove.click(lambda items, version, sid=sid: ([s for s in items if s.get("id") != sid], version + 1),
                         [loras, slots_version], [loras, slots_version], api_name=False)

    add = gr.Button("+ Add a LoRA", elem_id="gen-add-lora", size="sm")
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(value=DEFAULT_PROMPT, lines=2, label="Prompt",
                                info="Put the trigger word in. <lora:name:0.8> tags are read by A1111, not here: "
                                     "use the slots above.", elem_id="gen-prompt")
            negative = gr.Textbox(lines=1, label="Negative prompt", elem_id="gen-negative")
        with gr.Column(scale=2):
            with gr.Row():
                seed = gr.Number(value=-1, precision=0, label="Seed", info="-1 = a new random seed each time.",
                                 elem_id="gen-seed", scale=3)
                randomise = gr.Button("Random seed", elem_id="gen-seed-random", scale=1, min_width=80)
            with gr.Row():
                steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="gen-steps")
                cfg = gr.Slider(0, 20, value=7.0, step=0.5, label="CFG scale", elem_id="gen-cfg")
    with gr.Row():
        width = gr.Number(value=0, precision=0, label="Width", info="0 = the model's own size.", elem_id="gen-width")
        height = gr.Number(value=0, precision=0, label="Height", info="0 = the model's own size.", elem_id="gen-height")
        scheduler = gr.Dropdown(choices=sampler_names(), value=DEFAULT_SAMPLER, label="Sampler",
                                allow_custom_value=True, elem_id="gen-scheduler")
        batch = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="gen-batch")
        compare = gr.Checkbox(value=False, label="Compare with LoRA off",
                              info="Same seed, each image also without any LoRA.", elem_id="gen-compare")
    run = gr.Button("Generate", variant="primary", elem_id="gen-run")
    notes = gr.Markdown(elem_id="gen-notes")
    with gr.Row():
        gallery = gr.Gallery(label="Images", columns=4, height=420, object_fit="contain", elem_id="gen-gallery",
                             scale=3)
        infotext = gr.Textbox(label="Generation parameters (A1111 infotext)", lines=8,
                              info="Of the selected image; also saved in its PNG, where A1111/Forge's PNG Info reads it.",
                              buttons=["copy"], elem_id="gen-infotext", scale=2)
    infotexts = gr.State([])

    @user_errors
    def upload_lora(path: str | None, items: list[dict[str, Any]], version: float, sid: str):
        if not path:
            raise StudioError("No file was received.")
        stored = studio.projects.store_lora_upload(path)
        updated = [dict(s, file=str(stored)) if s.get("id") == sid else s for s in items]
        return updated, version + 1

    @user_errors
    def generate(base_model: str, lora_slots: list[dict[str, Any]], prompt_text: str, negative_prompt: str,
                 seed_value: float, sampling_steps: float, cfg_scale: float, image_width: float, image_height: float,
                 sampler: str, images: float, compare_off: bool, progress: gr.Progress = gr.Progress()):
        from trainer.generate.requests import GenerationRequest, save_images

        if not str(base_model or "").strip():
            raise ConfigError("No base model is chosen.",
                              hint="Pick the demo model or the model your LoRA was trained on.")
        if isinstance(lora_slots, str):
            try:
                lora_slots = json.loads(lora_slots or "[]")
            except json.JSONDecodeError:
                raise ConfigError(f"The LoRA slots {lora_slots[:60]!r} are not JSON.",
                                  hint='Send a list such as [{"file": "name.safetensors", "weight": 0.8}].') from None
        request = GenerationRequest(
            prompt=str(prompt_text or ""), negative_prompt=str(negative_prompt or ""),
            seed=int(seed_value if seed_value is not None else -1), steps=int(sampling_steps),
            cfg_scale=float(cfg_scale),
            width=int(image_width or 0), height=int(image_height or 0), scheduler=sampler, batch_count=int(images),
            loras=tuple(lora_specs(studio, lora_slots)), compare_without_loras=bool(compare_off),
        )
        waited: list[str] = []  # ids of the runs this request waited for

        def on_wait(run) -> None:
            if not waited:
                gr.Info(waiting_text(run), duration=10)
            waited.append(run.id)
            progress(0, desc=waiting_text(run))

        def on_progress(p) -> None:
            progress((p.image * p.steps + p.step) / max(p.images * p.steps, 1),
                     desc=f"Image {p.image + 1} of {p.images}")

        with studio.gpu_job(on_wait):
            progress(0, desc="Loading the base model…")
            generator = studio.generator(base_model)
            found = generator.prepare(request)
            results = generator.generate(request, on_progress)
        paths = save_images(results, studio.projects.outputs_dir / "images")
        items = [(str(path), f"seed {r.seed}" + ("" if r.loras_on else " · LoRA off"))
                 for path, r in zip(paths, results, strict=True)]
        texts = [r.infotext.to_text() for r in results]
        enabled = [s for s in request.loras if s.enabled]
        summary = (f"Made {len(results)} image{'s' * (len(results) != 1)} with "
                   + (", ".join(f"{s.name} × {s.weight:g}" for s in enabled) if enabled else "no LoRA")
                   + f". Saved in `{paths[0].parent}`." if paths else "")
        waited_note = ["Waited for the training run to finish first (it used the GPU)."] if waited else []
        notes_text = "\n\n".join([summary, *waited_note, *[f"⚠ {n}" for n in found]])
        return items, texts[0] if texts else "", texts, notes_text

    def show_infotext(texts: list[str], evt: gr.SelectData) -> str:
        return texts[evt.index] if texts and 0 <= evt.index < len(texts) else ""

    add.click(lambda items, version: ([*(items or []), new_slot()], version + 1), [loras, slots_version],
              [loras, slots_version], api_name=False)
    randomise.click(lambda: random.randrange(2 ** 32), None, seed, api_name=False)
    run.click(generate, [base, loras, prompt, negative, seed, steps, cfg, width, height, scheduler, batch, compare],
              [gallery, infotext, infotexts, notes], api_name="generate", concurrency_id="gpu", concurrency_limit=1)
    gallery.select(show_infotext, [infotexts], infotext, api_name=False)
    demo.load(lambda: gr.update(choices=studio.projects.base_model_choices()), None, base, api_name=False)
    return GenerateTab(base=base, loras=loras, slots_version=slots_version)


def waiting_text(run: Any) -> str:
    """What a generation waiting for the GPU tells the user."""
    where = f" (step {run.step} of {run.total_steps})" if run.total_steps else ""
    return (f"Waiting for the training run '{run.name}'{where} to finish: it is using the GPU, and generating "
            "beside it would need a second model in GPU memory. Stop the run on the Train tab to generate now.")


def _slot_setter(sid: str, field_name: str) -> str:
    """Browser-side: write one widget's value into slot ``sid`` of the LoRA list."""
    return (f"(value, items) => {{ const copy = JSON.parse(JSON.stringify(items || [])); "
            f"const slot = copy.find(s => s.id === {json.dumps(sid)}); "
            f"if (slot) {{ slot[{json.dumps(field_name)}] = value; }} return [copy]; }}")


def open_in_generate(path: str, base: str, slots: list[dict[str, Any]],
                     version: float) -> tuple[list[dict[str, Any]], float, Any]:
    """Put ``path`` into the first empty LoRA slot (or a new one) and choose the base it was trained on."""
    if not path:
        raise StudioError("There is no finished LoRA to open yet.")
    if not isinstance(slots or [], list) or not all(isinstance(s, dict) for s in slots or []):
        raise ConfigError(f"The LoRA slots must be a list of objects with 'file' and 'weight', not {slots!r:.60}.")
    version = float(version or 0)
    slots = [dict(s) for s in (slots or [])]
    if not any(s.get("file") == path for s in slots):
        for slot in slots:
            if not slot.get("file"):
                slot["file"] = path
                break
        else:
            slots.append(new_slot(path))
    return slots, version + 1, base or gr.skip()
