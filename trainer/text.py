"""Captions to conditioning: tokenisation and text-encoder forward (with clip skip)."""

from __future__ import annotations

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
