"""``lora-studio generate / inspect / resize / merge / bake / extract``: thin clients of generate.py and tools.py.

``trainer.cli.main`` calls ``register(subparsers)``. Flag names are a contract with users' scripts
(issue 3): ``--base --lora FILE:WEIGHT`` (repeatable) ``--prompt --negative --seed --steps --cfg
-n --width --height --scheduler --out``.
"""

from __future__ import annotations

import argparse
from typing import Any

from trainer.generate.schedulers import DEFAULT_SAMPLER


def register(sub: Any) -> None:
    generate = sub.add_parser("generate", help="Make images with a base model and any number of LoRAs.")
    generate.add_argument("--base", required=True, help="Base model: diffusers folder, .safetensors checkpoint or hub id.")
    generate.add_argument("--base-config", default="", help="Diffusers config folder for an unusual single-file checkpoint.")
    _lora_flag(generate, "LoRA file and weight; repeat for several. FILE:TE:UNET weights also work as FILE:W:TE:UNET.")
    generate.add_argument("--prompt", required=True, help="Prompt (A1111 <lora:name:w> tags are ignored; use --lora).")
    generate.add_argument("--negative", default="", help="Negative prompt.")
    generate.add_argument("--seed", type=int, default=-1, help="Seed of the first image (-1 = random); image i uses seed+i.")
    generate.add_argument("--steps", type=int, default=25, help="Denoising steps.")
    generate.add_argument("--cfg", type=float, default=7.0, help="Classifier-free guidance scale.")
    generate.add_argument("-n", type=int, default=1, dest="n", help="Number of images (batch count).")
    generate.add_argument("--width", type=int, default=0, help="Width in pixels (default: the model's native size).")
    generate.add_argument("--height", type=int, default=0, help="Height in pixels (default: the model's native size).")
    generate.add_argument("--scheduler", default=DEFAULT_SAMPLER, help="Sampler as A1111 names it: 'Euler a', 'DPM++ 2M Karras', 'DDIM', 'UniPC', ...")
    generate.add_argument("--out", default="outputs", help="Folder for the PNG files (A1111 infotext inside).")
    generate.add_argument("--compare", action="store_true", help="Also render every seed with the LoRAs off.")
    generate.add_argument("--clip-skip", type=int, default=1, help="2 = A1111's 'clip skip 2'.")
    generate.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto", help="Model precision (auto: fp16 on CUDA, fp32 on CPU).")
    generate.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: cuda when available).")
    generate.set_defaults(handler=run_generate)

    inspect = sub.add_parser("inspect", help="What a LoRA file is: base, rank/alpha, metadata, per-layer strength and spectrum.")
    inspect.add_argument("file", help="LoRA .safetensors file (kohya, diffusers/PEFT or old diffusers style).")
    inspect.add_argument("--plot", default=None, metavar="PNG", help="Also write a plot of norms and singular values.")
    inspect.add_argument("--layers", action="store_true", help="One line per layer.")
    _base_check_flags(inspect)
    inspect.set_defaults(handler=run_inspect)

    resize = sub.add_parser("resize", help="Shrink a LoRA by truncated SVD; reports the energy kept.")
    resize.add_argument("file", help="LoRA .safetensors file.")
    resize.add_argument("--rank", type=int, default=None, help="Target rank (with --energy: the largest rank allowed).")
    resize.add_argument("--energy", type=float, default=None, help="Keep this fraction of each layer's energy (per-layer rank), e.g. 0.95.")
    resize.add_argument("--out", required=True, help="Output .safetensors file.")
    resize.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="Output dtype (default: the input's).")
    _sidecars_flag(resize)
    _base_check_flags(resize)
    resize.set_defaults(handler=run_resize)

    merge = sub.add_parser("merge", help="Combine weighted LoRAs into one file (exact, or SVD to --rank).")
    merge.add_argument("files", nargs="+", metavar="FILE:WEIGHT", help="LoRA files with weights, e.g. a.safetensors:0.7.")
    merge.add_argument("--out", required=True, help="Output .safetensors file.")
    merge.add_argument("--rank", type=int, default=None, help="SVD to this rank (default: exact, ranks add up).")
    merge.add_argument("--energy", type=float, default=None, help="SVD keeping this fraction of each layer's energy.")
    merge.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="Output dtype (default: the inputs').")
    _sidecars_flag(merge)
    _base_check_flags(merge)
    merge.set_defaults(handler=run_merge)

    bake = sub.add_parser("bake", help="Add weighted LoRAs into a base model and save a single-file checkpoint.")
    bake.add_argument("--base", required=True, help="Base model: diffusers folder, .safetensors checkpoint or hub id.")
    bake.add_argument("--base-config", default="", help="Diffusers config folder for an unusual single-file checkpoint.")
    _lora_flag(bake, "LoRA file and weight to bake in; repeat for several.")
    bake.add_argument("--out", required=True, help="Output checkpoint (.safetensors, A1111/ComfyUI single-file layout).")
    bake.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="Checkpoint dtype.")
    bake.set_defaults(handler=run_bake)

    extract = sub.add_parser("extract", help="Make a LoRA from the difference of a fine-tuned checkpoint and its base.")
    extract.add_argument("--base", required=True, help="The original base model.")
    extract.add_argument("--tuned", required=True, help="The fine-tuned model (same architecture).")
    extract.add_argument("--base-config", default="", help="Diffusers config folder for unusual single-file checkpoints.")
    extract.add_argument("--rank", type=int, default=32, help="Rank of the LoRA (with --energy: the largest allowed).")
    extract.add_argument("--energy", type=float, default=None, help="Keep this fraction of each layer's difference (per-layer rank).")
    extract.add_argument("--targets", choices=("cross-attn", "attn", "full"), default="full", help="UNet layers to extract.")
    extract.add_argument("--out", required=True, help="Output .safetensors LoRA file.")
    extract.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="Output dtype.")
    extract.set_defaults(handler=run_extract)


def run_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from trainer.cli.console import quiet_libraries
    from trainer.core.output_paths import check_output_folder
    from trainer.generate.generator import Generator
    from trainer.generate.requests import GenerationRequest, parse_lora_arg, save_images

    quiet_libraries()
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, steps=args.steps, cfg_scale=args.cfg,
        width=args.width, height=args.height, scheduler=args.scheduler, batch_count=args.n,
        loras=tuple(parse_lora_arg(text) for text in args.lora), compare_without_loras=args.compare,
        clip_skip=args.clip_skip)
    check_output_folder(args.out, label="The image folder")  # before the model loads
    generator = Generator.from_base(args.base, base_config=args.base_config, precision=args.precision,
                                    device=args.device)
    for note in generator.prepare(request):
        print(f"warning: {note}")
    total = request.batch_count * request.steps * (2 if request.compare_without_loras and request.loras else 1)
    with tqdm(total=total, unit="step", dynamic_ncols=True) as bar:
        images = generator.generate(request, on_progress=lambda p: bar.update(1))
    for path in save_images(images, args.out):
        print(path)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from trainer.tools.inspect import inspect_lora

    report = inspect_lora(args.file, plot=args.plot, base=args.base, base_config=args.base_config)
    print(report.text(per_layer=args.layers))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def run_resize(args: argparse.Namespace) -> int:
    from trainer.tools.resize import resize_lora

    print(resize_lora(args.file, args.out, rank=args.rank, energy=args.energy, dtype=args.dtype,
                      sidecars=args.sidecars, base=args.base, base_config=args.base_config).text())
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from trainer.generate.requests import parse_lora_arg
    from trainer.tools.resize import merge_loras

    specs = [parse_lora_arg(text) for text in args.files]
    report = merge_loras([(spec.path, spec.weight) for spec in specs], args.out, rank=args.rank, energy=args.energy,
                         dtype=args.dtype, sidecars=args.sidecars, base=args.base, base_config=args.base_config)
    print(report.text())
    return 0


def run_bake(args: argparse.Namespace) -> int:
    from trainer.cli.console import quiet_libraries
    from trainer.generate.requests import parse_lora_arg
    from trainer.tools.bake import bake_loras

    quiet_libraries()
    specs = [parse_lora_arg(text) for text in args.lora]
    print(bake_loras(args.base, specs, args.out, base_config=args.base_config, dtype=args.dtype).text())
    return 0


def _lora_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--lora", action="append", default=[], metavar="FILE:WEIGHT", help=help_text)


def _base_check_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default=None, help="Check the file against this base model (family and every "
                        "layer's width; read from its configs, no weights loaded).")
    parser.add_argument("--base-config", default="", help="Diffusers config folder for an unusual single-file --base.")


def _sidecars_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-sidecars", dest="sidecars", action="store_false",
                        help="Do not write the A1111/Forge card files (name.json, name.preview.png) next to --out.")


def run_extract(args: argparse.Namespace) -> int:
    from trainer.cli.console import quiet_libraries
    from trainer.tools.extract import extract_lora

    quiet_libraries()
    print(extract_lora(args.base, args.tuned, args.out, rank=args.rank, energy=args.energy, targets=args.targets,
                       base_config=args.base_config, dtype=args.dtype).text())
    return 0
