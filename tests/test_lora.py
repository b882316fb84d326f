"""LoRA injection: step 0 is the base model, only LoRA weights train, scale is alpha/r."""

from __future__ import annotations

import math
import re

import pytest
import torch

from trainer.config.schema import NetworkConfig
from trainer.lora.inject import (
    inject_lora,
    lora_layers,
    lora_parameters,
    plan_lora,
    scaling_of,
    text_encoder_target_modules,
    unet_target_modules,
)
from trainer.models.demo import build_tiny_sd1


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


@pytest.mark.parametrize(("targets", "expected"), [
    # tiny UNet: 4 transformer blocks (down0, mid, up1 x2)
    ("cross-attn", {"attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}),
    ("attn", {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}),
    ("full", {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
     | {"ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"}),
])
def test_target_sets_select_the_right_layers(targets, expected):
    unet = build_tiny_sd1().unet
    names = unet_target_modules(unet, targets)
    suffixes = {re.sub(r"^.*\.(transformer_blocks\.\d+|attentions\.\d+)\.", "", n) for n in names}
    assert suffixes == expected
    blocks = 4
    per_block = len(expected) - (2 if targets == "full" else 0)
    assert len(names) == blocks * per_block + (2 * blocks if targets == "full" else 0)


def test_text_encoder_targets_attention_and_optionally_mlp():
    te = build_tiny_sd1().text_encoder
    attn = text_encoder_target_modules(te, include_mlp=False)
    assert len(attn) == 2 * 4 and all("self_attn" in n for n in attn)
    assert len(text_encoder_target_modules(te, include_mlp=True)) == 2 * 6


@pytest.mark.parametrize("targets", ["cross-attn", "attn", "full"])
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_step_zero_equals_base_model_exactly(targets, init):
    parts = build_tiny_sd1()
    x, t, ctx = _unet_inputs()
    ids = parts.tokenizer(["zxq girl"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        base_unet, base_te = parts.unet(x, t, ctx).sample, parts.text_encoder(ids)[0]
    network = NetworkConfig(rank=4, alpha=2, targets=targets, lora_init=init)
    plan = plan_lora(network, parts.unet, {"text_encoder": parts.text_encoder})
    inject_lora(parts.unet, plan.modules["unet"], network)
    inject_lora(parts.text_encoder, plan.modules["text_encoder"], network)
    with torch.no_grad():
        assert torch.equal(parts.unet(x, t, ctx).sample, base_unet)
        assert torch.equal(parts.text_encoder(ids)[0], base_te)
    for layer in lora_layers(parts.unet).values():
        a = layer.lora_A["lora_studio"].weight
        assert a.abs().sum() > 0, "A must be randomly initialised"
        assert torch.count_nonzero(layer.lora_B["lora_studio"].weight) == 0, "B must start at zero"


def test_only_lora_parameters_receive_gradients():
    parts = build_tiny_sd1()
    for p in parts.unet.parameters():
        p.requires_grad_(False)
    network = NetworkConfig(rank=4, alpha=4, targets="attn")
    inject_lora(parts.unet, unet_target_modules(parts.unet, "attn"), network)
    x, t, ctx = _unet_inputs()
    parts.unet(x, t, ctx).sample.pow(2).mean().backward()
    trainable = {id(p) for p in lora_parameters(parts.unet)}
    for name, p in parts.unet.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.dtype == torch.float32
            if "lora_A" in name:
                assert p.grad is None or torch.count_nonzero(p.grad) == 0  # B = 0 blocks A's gradient at step 0
            else:
                assert p.grad is not None and torch.count_nonzero(p.grad) > 0
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize(("rank", "alpha", "rslora", "scale"), [
    (4, 2, False, 0.5), (16, 16, False, 1.0), (16, 8, True, 2.0), (8, 32, False, 4.0),
])
def test_forward_is_w0_plus_scaled_ba(rank, alpha, rslora, scale):
    layer = torch.nn.Sequential(torch.nn.Linear(6, 5))
    torch.manual_seed(0)
    inject_lora(layer, ["0"], NetworkConfig(rank=rank, alpha=alpha, rslora=rslora))
    wrapped = lora_layers(layer)["0"]
    assert math.isclose(scaling_of(wrapped), scale)
    with torch.no_grad():
        wrapped.lora_B["lora_studio"].weight.normal_()
    a, b = wrapped.lora_A["lora_studio"].weight, wrapped.lora_B["lora_studio"].weight
    base = wrapped.get_base_layer()
    x = torch.randn(3, 6)
    expected = x @ (base.weight + scale * b @ a).T + base.bias
    torch.testing.assert_close(layer(x), expected)
