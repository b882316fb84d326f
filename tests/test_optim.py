"""The optimiser the engine builds: fused AdamW where torch has the kernel, the same update as plain AdamW."""

from __future__ import annotations

import pytest
import torch

from trainer.config.presets import resolve_config
from trainer.train.optim import build_optimizer


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((8, 16), (16, 8), (4,))]


def _run_steps(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int) -> None:
    g = torch.Generator().manual_seed(99)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


def test_adamw_is_fused_on_cpu_and_updates_like_plain_adamw():
    config = resolve_config(None, None, {"base": "x", "data": "x", "output": "x.safetensors", "lr": 1e-2,
                                         "weight_decay": 0.05})
    ours, reference = _params(0), _params(0)
    optimizer = build_optimizer(config, [{"params": ours, "lr": 1e-2}], torch.device("cpu"), pytest.fail)
    assert optimizer.param_groups[0]["fused"] is True
    _run_steps(optimizer, ours, 5)
    _run_steps(torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.05, foreach=False), reference, 5)
    for a, b, start in zip(ours, reference, _params(0)):
        assert not torch.equal(a, start)  # the steps moved the weights
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_falls_back_to_the_unfused_kernel_where_there_is_no_fused_one(monkeypatch):
    real = torch.optim.AdamW

    def no_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    config = resolve_config(None, None, {"base": "x", "data": "x", "output": "x.safetensors"})
    params = _params(1)
    optimizer = build_optimizer(config, [{"params": params, "lr": 1e-3}], torch.device("cpu"), pytest.fail)
    assert not optimizer.param_groups[0]["fused"]
    before = [p.detach().clone() for p in params]
    _run_steps(optimizer, params, 1)
    assert all(not torch.equal(a, b) for a, b in zip(params, before))
