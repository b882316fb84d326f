"""After export: does the *written file* render what the run's samples showed?

The first sample prompt's seed is rendered again from the exported file, loaded the way the
Generate tab loads any file (a fresh base model, ``Generator`` with the file as a LoRA), and
compared with the in-training sample of the same step. A mean difference beyond what the export
dtype's rounding explains means the file is not the LoRA that was trained (a key-mapping, alpha
or dtype bug, a disk fault): "the samples looked right, the file is wrong" becomes a warning
instead of a surprise in A1111.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.generate.prompt_file import SamplePrompt

# Mean |difference| in grey levels (0-255) that rounding explains. In fp32 the fp16 file's rounding
# vanishes in the 8-bit picture (0.0 on the tiny models); fp16/bf16 weights add fused-vs-unfused
# rounding through every denoising step (DESIGN §7). A wrong scale or wrong layers move it further.
PARITY_TOLERANCE = 1.0
HALF_PRECISION_TOLERANCE = 4.0
_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class ParityResult:
    difference: float  # mean |a - b| in grey levels
    tolerance: float = PARITY_TOLERANCE

    @property
    def ok(self) -> bool:
        return self.difference <= self.tolerance

    def warning(self, path: Path) -> str:
        if self.ok:
            return ""
        return (f"The written file {path.name} renders differently from the in-training sample (mean difference "
                f"{self.difference:.1f} grey levels, rounding explains up to {self.tolerance:g}): the file may not hold "
                "the LoRA that was trained. Check it in the Generate tab; the checkpoints were kept, so it can be "
                "exported again (--resume auto).")


def image_difference(a, b) -> ParityResult:
    """Mean absolute difference of two same-size RGB pictures (a different size is a full mismatch)."""
    first, second = np.asarray(a.convert("RGB"), dtype=np.float32), np.asarray(b.convert("RGB"), dtype=np.float32)
    if first.shape != second.shape:
        return ParityResult(255.0)
    return ParityResult(float(np.abs(first - second).mean()))


def render_from_file(base: str, base_config: str, lora: Path, prompt: SamplePrompt, clip_skip: int,
                     device: str, precision: str):
    """``prompt`` (settings filled in) rendered with ``lora`` at weight 1 by the Generate tab's path."""
    from trainer.generate.generator import Generator
    from trainer.generate.requests import GenerationRequest, LoraSpec

    generator = Generator.from_base(base, base_config=base_config, precision=precision, device=device)
    request = GenerationRequest(prompt.prompt, negative_prompt=prompt.negative, seed=prompt.seed, steps=prompt.steps,
                                cfg_scale=prompt.cfg, width=prompt.width, height=prompt.height,
                                scheduler=prompt.sampler, loras=(LoraSpec(str(lora), 1.0),), clip_skip=clip_skip)
    return generator.generate(request)[0].image


def check_written_file(session, output: Path, step: int) -> ParityResult | None:
    """Compare ``output`` with the in-training sample of the first prompt at ``step`` (rendered now if
    the run made none at that step); None when there is nothing to render."""
    from PIL import Image

    from trainer.train.sampling import render_in_training, run_sample_prompts

    prompt = run_sample_prompts(session)[0]
    sample = session.run_dir / "samples" / f"step-{step:06d}-0.png"
    if sample.is_file():
        with Image.open(sample) as opened:
            reference = opened.convert("RGB")
    else:
        rendered = render_in_training(session, [prompt])
        if not rendered:
            return None
        reference = rendered[0]
    cfg = session.config
    image = render_from_file(cfg.model.base, cfg.model.base_config, output, prompt, cfg.model.clip_skip,
                             str(session.device), _PRECISION.get(str(session.accelerator.mixed_precision), "fp32"))
    precision = _PRECISION.get(str(session.accelerator.mixed_precision), "fp32")
    result = image_difference(reference, image)
    return result if precision == "fp32" else ParityResult(result.difference, HALF_PRECISION_TOLERANCE)
