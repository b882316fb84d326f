"""Captions to conditioning: tokenisation and text-encoder forward (with clip skip)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's window (77 for CLIP: 75 + BOS/EOS)."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def count_tokens(tokenizer, caption: str) -> int:
    """Tokens a caption uses inside the window, without BOS/EOS (the lint's 75-token check)."""
    return len(tokenizer(caption, add_special_tokens=False, truncation=False).input_ids)


def encode_text(text_encoder, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """Hidden states the UNet cross-attends to; clip_skip=2 takes the penultimate layer (A1111)."""
    input_ids = input_ids.to(text_encoder.device)
    if clip_skip <= 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    return text_encoder.text_model.final_layer_norm(hidden) if hasattr(text_encoder, "text_model") \
        else text_encoder.final_layer_norm(hidden)


def encode_text_sdxl(text_encoder, text_encoder_2, input_ids: torch.Tensor, input_ids_2: torch.Tensor,
                     clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: (both encoders' hidden states concatenated, pooled embedding of the second).

    SDXL was trained on the penultimate layer of each encoder *without* the final layer norm
    (SGM's ``layer="penultimate"``), so clip_skip=1 means the penultimate layer here and each
    further step goes one layer deeper, as diffusers' SDXL pipeline counts it (its clip_skip is
    ours minus one). The pooled embedding is the second encoder's projected EOS token.
    """
    layer = -(clip_skip + 1)
    first = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True)
    second = text_encoder_2(input_ids_2.to(text_encoder_2.device), output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[layer], second.hidden_states[layer].to(first.hidden_states[layer].dtype)],
                       dim=-1)
    return hidden, second.text_embeds


def check_clip_skip(model_name: str, text_encoders: Iterable, clip_skip: int, label: str = "clip skip") -> None:
    """Refuse a clip skip deeper than the text encoder(s), with the range, before any encoding.

    The deepest is the (shallowest) encoder's number of layers, the range of A1111's "stop at
    last layers" slider: beyond it there is no layer to take.
    """
    from trainer.core.errors import ConfigError

    deepest = min(encoder.config.num_hidden_layers for encoder in text_encoders)
    if not 1 <= clip_skip <= deepest:
        raise ConfigError(f"{label} = {clip_skip} is out of range for {model_name}, whose text encoder has "
                          f"{deepest} layers.", hint=f"Use a clip skip from 1 to {deepest} (2 is A1111's 'clip skip 2').")
