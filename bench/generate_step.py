"""Generation benchmark: a denoising step with two LoRAs, unfused and fused, against the base.

    python -m bench.generate_step                       # CPU default: 128 px, fp32
    python -m bench.generate_step --device cuda --resolution 512 --json out/gen.json

Model: the real SD 1.5 architecture with random weights (see ``bench.train_step``), loaded
through ``trainer.generate.generator.Generator`` with two kohya-format LoRA files of random weights on
every transformer Linear/1x1 of the UNet plus the text encoder's attention (kohya's default
layer set), ranks ``--ranks``, weights 0.8 and 0.5.

A denoising step is what the pipeline repeats ``steps`` times: the UNet on the
classifier-free-guidance batch (negative + positive prompt), the guidance mix and the
scheduler update. Cases, timed interleaved in one run:

- **base**: the UNet with no LoRA machinery at all (a second module tree over the unfused
  generator's weight tensors, so it costs no memory);
- **two unfused**: a Generator with ``fuse=False``: the base weights untouched, both adapters
  packed into one low-rank product per adapted layer (``trainer.generate.packed``), which adds
  x·Aᵀ·Bᵀ (rank r1 + r2) to the base output in one fused multiply-add;
- **two fused**: a second Generator (its own copy of the weights) with the default ``fuse=True``:
  the adapters are merged into the weights.

Goals (issue 6): unfused ≤ 1.05× base, fused 1.00×.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    environment,
    format_table,
    quiet_libraries,
    resolve_device,
    run_interleaved,
    write_json,
    write_random_sd15,
)


@dataclass(frozen=True)
class GenSettings:
    device: str
    resolution: int
    precision: str
    ranks: tuple[int, int]
    rounds: int
    warmup: int
    base: str
    model_dir: str
    seed: int


def parse_args(argv: list[str] | None = None) -> tuple[GenSettings, str]:
    p = argparse.ArgumentParser(prog="python -m bench.generate_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=0, help="pixels (default 128 on CPU, 512 on CUDA)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--ranks", default="32,16", help="ranks of the two LoRA files")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--base", default="", help="a real SD 1.x model instead of random weights")
    p.add_argument("--model-dir", default="", help="where to write (or reuse) the random SD 1.5 folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    ranks = tuple(int(r) for r in a.ranks.split(","))
    if len(ranks) != 2:
        p.error("--ranks takes two ranks, e.g. 32,16")
    cuda = a.device.startswith("cuda")
    return GenSettings(a.device, a.resolution or (512 if cuda else 128), a.precision, ranks,  # type: ignore[arg-type]
                       a.rounds or (20 if cuda else 3), a.warmup, a.base, a.model_dir, a.seed), a.json


def write_random_lora(path: Path, model: Any, rank: int, seed: int) -> Path:
    """A kohya-format LoRA with random A and B on kohya's default layers of ``model``."""
    from safetensors.torch import save_file

    from trainer.lora.inject import text_encoder_target_modules, unet_target_modules
    from trainer.lora.names import kohya_module_name
    from trainer.lora.reading import LoraModule
    from trainer.lora.writing import kohya_state_dict

    generator = torch.Generator().manual_seed(seed)
    modules = []
    for component, module, paths in (("unet", model.unet, unet_target_modules(model.unet, "full")),
                                      ("text_encoder", model.text_encoder,
                                       text_encoder_target_modules(model.text_encoder, include_mlp=False))):
        for name in paths:
            layer = module.get_submodule(name)
            w = layer.weight
            down = torch.randn(rank, *w.shape[1:], generator=generator) / w.shape[1] ** 0.5
            up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=generator) * 0.01
            modules.append(LoraModule(kohya_module_name(component, name, model.family), down, up, alpha=rank / 2))
    save_file(kohya_state_dict(modules), str(path),
              metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    return path


class DenoiseStep:
    """One classifier-free-guidance denoising step of ``unet``."""

    def __init__(self, unet: torch.nn.Module, scheduler: Any, latents: torch.Tensor, embeddings: torch.Tensor,
                 cfg_scale: float = 7.0) -> None:
        self.unet, self.scheduler, self.latents, self.embeddings = unet, scheduler, latents, embeddings
        self.cfg_scale = cfg_scale
        self.t = scheduler.timesteps[len(scheduler.timesteps) // 2]

    @torch.inference_mode()
    def __call__(self) -> torch.Tensor:
        model_input = self.scheduler.scale_model_input(torch.cat([self.latents] * 2), self.t)
        noise = self.unet(model_input, self.t, encoder_hidden_states=self.embeddings).sample
        uncond, cond = noise.chunk(2)
        guided = uncond + self.cfg_scale * (cond - uncond)
        self.scheduler._step_index = None
        return self.scheduler.step(guided, self.t, self.latents).prev_sample


def main(argv: list[str] | None = None) -> dict[str, Any]:
    quiet_libraries()
    settings, json_path = parse_args(argv)
    device = resolve_device(settings.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-studio-genbench-") as tmp:
        tmp_path = Path(tmp)
        base = settings.base or str(write_random_sd15(Path(settings.model_dir) if settings.model_dir
                                                       else tmp_path / "sd15-random", seed=settings.seed))
        results = run(settings, base, tmp_path, device)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    print()
    print(report_text(results))
    if json_path:
        write_json(json_path, results)
        print(f"\nJSON written to {json_path}")
    return results


def run(settings: GenSettings, base: str, tmp: Path, device: torch.device) -> dict[str, Any]:
    from bench.train_step import share_weights
    from trainer.generate.generator import Generator
    from trainer.generate.requests import GenerationRequest, LoraSpec
    from trainer.generate.schedulers import make_scheduler, parse_sampler

    # Two generators (two copies of the weights) so that unfused and fused run interleaved.
    unfused_gen = Generator.from_base(base, precision=settings.precision, device=str(device), fuse=False)
    fused_gen = Generator.from_base(base, precision=settings.precision, device=str(device), fuse=True)
    model = unfused_gen.model
    dtype = model.unet.dtype
    print(f"SD 1.5 architecture, {settings.resolution} px, CFG batch 2, {str(dtype).replace('torch.', '')} on {device}; "
          f"LoRA ranks {settings.ranks}; {settings.warmup} warm-up + {settings.rounds} rounds per case")
    base_unet = share_weights(model.unet).to(device)  # before any adapter: plain modules, same tensors
    files = [write_random_lora(tmp / f"lora_{i}_r{r}.safetensors", model, r, seed=10 + i)
             for i, r in enumerate(settings.ranks)]
    specs = [LoraSpec(files[0], 0.8), LoraSpec(files[1], 0.5)]
    for generator in (unfused_gen, fused_gen):
        generator.prepare(GenerationRequest(prompt="zxq", loras=tuple(specs)))
        generator.apply(specs)

    side = settings.resolution // model.vae_scale_factor
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    with torch.inference_mode():
        ids = model.tokenizer(["", "a photo of zxq person"], padding="max_length", truncation=True,
                              max_length=model.tokenizer.model_max_length, return_tensors="pt").input_ids
        embeddings = model.text_encoder(ids.to(device))[0].to(dtype)  # the same prompt for every case
    scheduler = make_scheduler(parse_sampler("euler"), model.scheduler_config, model.prediction_type)
    scheduler.set_timesteps(20, device=device)
    cases = {
        "base (no LoRA)": DenoiseStep(base_unet, scheduler, latents, embeddings),
        "two LoRAs, unfused": DenoiseStep(unfused_gen.model.unet, scheduler, latents, embeddings),
        "two LoRAs, fused": DenoiseStep(fused_gen.model.unet, scheduler, latents, embeddings),
    }
    results = run_interleaved(cases, device, warmup=settings.warmup, rounds=settings.rounds)
    with torch.inference_mode():
        out = {name: step().float().cpu() for name, step in cases.items()}
    base_result = results["base (no LoRA)"]
    rows = [{"case": name, "step_seconds": round(result.best, 4), "step_seconds_median": round(result.median, 4),
             "samples": [round(s, 4) for s in result.seconds], "spread": round(result.spread, 3),
             "x_base": round(result.best / base_result.best, 3),
             "x_base_median": round(result.median / base_result.median, 3)} for name, result in results.items()]
    return {
        "benchmark": "generate_step", "settings": asdict(settings), "environment": environment(device),
        "dtype": str(dtype).replace("torch.", ""), "rows": rows,
        "unfused_over_base": rows[1]["x_base"], "fused_over_base": rows[2]["x_base"],
        "goal_unfused_le_1.05": rows[1]["x_base"] <= 1.05, "goal_fused_le_1.00": rows[2]["x_base"] <= 1.005,
        "check_lora_changes_output_max_abs": (out["two LoRAs, unfused"] - out["base (no LoRA)"]).abs().max().item(),
        "check_fused_minus_unfused_max_abs": (out["two LoRAs, fused"] - out["two LoRAs, unfused"]).abs().max().item(),
    }


def report_text(results: dict[str, Any]) -> str:
    s = results["settings"]
    head = (f"SD 1.5 architecture, {s['resolution']} px, CFG batch 2, {results['dtype']}, "
            f"{results['environment']['device']} ({results['environment']['torch_threads']} threads, load "
            f"{results['environment'].get('load_average_1min')}); LoRA ranks {s['ranks']} on kohya's default layers; "
            f"best and median of {s['rounds']} interleaved rounds after {s['warmup']} warm-up; ratios of the best")
    table = format_table(["case", "step s (best)", "median", "× base", "× base (medians)"],
                         [[r["case"], r["step_seconds"], r["step_seconds_median"], f"{r['x_base']:.3f}",
                           f"{r['x_base_median']:.3f}"]
                          for r in results["rows"]])
    return "\n".join([
        head, "", table, "",
        (f"two unfused / base = {results['unfused_over_base']:.3f} (goal ≤ 1.05); "
         f"two fused / base = {results['fused_over_base']:.3f} (goal 1.00)"),
        (f"checks: LoRAs change the prediction by up to {results['check_lora_changes_output_max_abs']:.3g}; "
         f"fused − unfused differ by up to {results['check_fused_minus_unfused_max_abs']:.3g}"),
        f"total wall time {results.get('wall_seconds', 0):.0f} s",
    ])


if __name__ == "__main__":
    main()
