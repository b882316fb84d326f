"""``lora-studio grid``: an epoch grid (rows = LoRA files, columns = prompts × weights, same seeds).

``lora-studio grid --base B --lora 'out/zxq-*.safetensors' --prompt 'zxq, portrait' --weights 0.6,0.8,1.0
--out grid.png``. Prompts are kohya lines (``--n --w --h --d --l --s --ss``), given with ``--prompt``
(repeatable) and/or ``--prompt-file``; what a line leaves out comes from the flags below.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any


def register(sub: Any) -> None:
    grid = sub.add_parser("grid", help="One labelled picture comparing LoRA files (epochs) x prompts x weights.")
    grid.add_argument("--base", required=True, help="Base model: diffusers folder, .safetensors checkpoint or hub id.")
    grid.add_argument("--base-config", default="", help="Diffusers config folder for an unusual single-file checkpoint.")
    grid.add_argument("--lora", action="append", required=True, metavar="FILE_OR_GLOB",
                      help="LoRA file or quoted glob ('out/zxq-*.safetensors'); repeatable. One row per file, epochs in order.")
    grid.add_argument("--prompt", action="append", default=[], help="Prompt line in kohya syntax; repeatable. One column each.")
    grid.add_argument("--prompt-file", default=None, help="Text file of prompt lines (kohya syntax, one a line).")
    grid.add_argument("--weights", default="1.0", help="LoRA weights, one column each per prompt: 0.6,0.8,1.0.")
    grid.add_argument("--negative", default="", help="Negative prompt for lines without --n.")
    grid.add_argument("--seed", type=int, default=1234, help="Seed for lines without --d (prompt i uses seed+i).")
    grid.add_argument("--steps", type=int, default=25, help="Denoising steps for lines without --s.")
    grid.add_argument("--cfg", type=float, default=7.0, help="CFG scale for lines without --l.")
    grid.add_argument("--width", type=int, default=0, help="Width for lines without --w (default: the model's size).")
    grid.add_argument("--height", type=int, default=0, help="Height for lines without --h (default: the model's size).")
    grid.add_argument("--sampler", default="DPM++ 2M Karras", help="Sampler for lines without --ss (A1111 names).")
    grid.add_argument("--clip-skip", type=int, default=1, help="2 = A1111's 'clip skip 2'.")
    grid.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto", help="Model precision.")
    grid.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: cuda when available).")
    grid.add_argument("--out", default="grid.png", help="The grid picture (.png).")
    grid.set_defaults(handler=run_grid)


def run_grid(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from trainer.cli.console import quiet_libraries
    from trainer.core.atomic import atomic_path
    from trainer.core.errors import ConfigError
    from trainer.core.output_paths import check_output_file
    from trainer.generate.generator import Generator
    from trainer.generate.grid import grid_files, parse_weights, render_grid
    from trainer.generate.prompt_file import parse_prompt_lines, read_prompt_file
    from trainer.generate.schedulers import parse_sampler

    quiet_libraries()
    files = grid_files(args.lora)
    out = check_output_file(args.out, suffix=".png", label="The grid picture",
                            inputs=[("base model", args.base), *(("LoRA file", path) for path in files)])
    weights = parse_weights(args.weights)
    lines = parse_prompt_lines(args.prompt, "--prompt") + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if not lines:
        raise ConfigError("No prompt given.", hint="Pass --prompt 'zxq, portrait' (repeatable) or --prompt-file FILE.")
    sampler = parse_sampler(args.sampler).label
    generator = Generator.from_base(args.base, base_config=args.base_config, precision=args.precision, device=args.device)
    native = generator.model.native_resolution
    prompts = [line.with_defaults(seed=args.seed + i, width=args.width or native, height=args.height or native,
                                  cfg=args.cfg, steps=args.steps, sampler=sampler)
               for i, line in enumerate(lines)]
    prompts = [p if p.negative else replace(p, negative=args.negative) for p in prompts]
    bar = tqdm(total=len(files) * len(prompts) * len(weights), unit="image", dynamic_ncols=True)

    def progress(event) -> None:
        bar.n = event.done
        bar.set_postfix_str(event.label)
        bar.refresh()

    try:
        grid = render_grid(generator, files, prompts, weights, clip_skip=args.clip_skip, on_progress=progress)
    finally:
        bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        grid.image.save(tmp, format="PNG")
    print(f"wrote {out}: {len(grid.row_labels)} rows x {len(grid.column_labels)} columns")
    return 0
