"""Natural-language captions from any transformers image-to-text model (BLIP, Florence-2, GIT, ...).

The model and its processor load with ``AutoModelForImageTextToText``/``AutoProcessor`` from a
local folder or a hub id (downloaded once, read from the local cache afterwards). The prompt is
the model's own kind: a text BLIP continues ("a picture of"), a Florence-2 task token
(``<MORE_DETAILED_CAPTION>``, the default for Florence-2), or, for chat models, the instruction
put through the processor's chat template. Decoding is greedy, so a picture always gets the same
caption; the prompt itself never ends up in the caption.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from trainer.core.devices import resolve_device
from trainer.core.errors import ConfigError, ModelLoadError
from trainer.data.captions import clean_caption

SUGGESTED_CAPTIONERS = ("Salesforce/blip-image-captioning-large", "florence-community/Florence-2-base")
DEFAULT_PROMPTS = {"florence2": "<MORE_DETAILED_CAPTION>"}
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
_PROMPT_FREE_TYPES = {"blip", "blip-2", "florence2", "git", "vision-encoder-decoder"}  # no chat template needed
_CHAT_DEFAULT = "Describe this picture in one sentence."
_TASK_TOKEN = re.compile(r"</?[A-Z_]+>")


class TransformersCaptioner:
    """One loaded image-to-text model; ``caption_batch`` turns pictures into sentences."""

    kind = "captioner"

    def __init__(self, source: str, *, prompt: str = "", max_new_tokens: int = 75, num_beams: int = 1,
                 device: str = "auto") -> None:
        if max_new_tokens < 1 or num_beams < 1:
            raise ConfigError("Max new tokens and beams must be 1 or more.", hint="75 tokens, 1-3 beams are usual.")
        import torch

        text = str(source or "").strip()
        if not text:
            raise ModelLoadError("No captioning model is chosen.", hint=download_help())
        local = Path(text).expanduser()
        if not local.is_dir() and not _looks_like_hub_id(text):
            raise ModelLoadError(f"Captioning model not found: {text}.", hint=download_help())
        self.name = local.name if local.is_dir() else text
        self.device = resolve_device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.processor, self.model = _load(str(local) if local.is_dir() else text, local.is_dir(), self.dtype)
        self.model.to(self.device).eval()
        self.model_type = str(getattr(self.model.config, "model_type", ""))
        self.prompt = prompt.strip() or DEFAULT_PROMPTS.get(self.model_type, "")
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams

    def caption_batch(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        images = [image.convert("RGB") for image in images]
        text = self._model_prompt()
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if text:
            kwargs["text"] = [text] * len(images)
            if len(images) > 1:
                kwargs["padding"] = True
        inputs = self.processor(**kwargs)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                         do_sample=False)
        prompt_ids = inputs.get("input_ids")
        if (prompt_ids is not None and not self.model.config.is_encoder_decoder and output.shape[1] >= prompt_ids.shape[1]
                and torch.equal(output[:, :prompt_ids.shape[1]], prompt_ids)):
            output = output[:, prompt_ids.shape[1]:]  # a decoder-only model repeats its prompt
        decoded = self.processor.batch_decode(output, skip_special_tokens=True)
        return [self._clean(caption) for caption in decoded]

    def _model_prompt(self) -> str:
        if self.model_type in _PROMPT_FREE_TYPES or getattr(self.processor, "chat_template", None) is None:
            return self.prompt
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt or _CHAT_DEFAULT}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def _clean(self, caption: str) -> str:
        caption = " ".join(_TASK_TOKEN.sub(" ", caption).split())
        prompt = " ".join(_TASK_TOKEN.sub(" ", self.prompt).split())
        if prompt and caption.casefold().startswith(prompt.casefold()):
            caption = caption[len(prompt):].strip(" ,:")  # BLIP continues its prompt: keep only the continuation
        return clean_caption(caption)


def download_help(folder: str | Path = "models/captioners") -> str:
    """What to download once, and where, to caption offline."""
    repo = SUGGESTED_CAPTIONERS[0]
    return (f"Download a captioning model once, e.g. 'hf download {repo} --local-dir {Path(folder) / 'blip-large'}' "
            f"(or {SUGGESTED_CAPTIONERS[1]} for Florence-2), then choose that folder.")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _load(source: str, local: bool, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local)
        model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=local, dtype=dtype,
                                                            use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        where = "that folder" if local else "the hub (or the local cache)"
        raise ModelLoadError(f"Cannot load an image-to-text model from {source}: {first}.",
                             hint=f"Check that {where} holds a transformers captioning model with its processor. "
                                  + download_help()) from None
    return processor, model
