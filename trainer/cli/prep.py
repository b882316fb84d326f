"""``lora-studio caption / tags / reg-images``: dataset preparation from the command line.

``caption DIR`` writes ``.txt`` captions with a WD14 tagger (``--tagger``) or a transformers
captioner (``--captioner``), skipping pictures that have one unless ``--mode append|overwrite``;
``--undo`` takes the last change back. ``tags DIR`` prints the tag frequency table. ``reg-images``
renders class pictures from the base model for ``--reg-data``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trainer.core.errors import StudioError


def register(sub: Any) -> None:
    caption = sub.add_parser("caption", help="Write captions for a folder of pictures with a tagger or captioner.",
                             description="Caption every picture under DIR (sub-folders too). Existing captions are "
                                         "kept unless --mode says otherwise; every change can be undone (--undo).")
    caption.add_argument("dir", help="Folder of pictures (a dataset).")
    model = caption.add_mutually_exclusive_group()
    model.add_argument("--tagger", help="WD14 tagger: folder with model.onnx + selected_tags.csv, or a hub id "
                                        "such as SmilingWolf/wd-vit-tagger-v3.")
    model.add_argument("--captioner", help="transformers image-to-text model: folder or hub id "
                                           "(e.g. Salesforce/blip-image-captioning-large, florence-community/Florence-2-base).")
    model.add_argument("--undo", action="store_true", help="Restore the captions the last caption change replaced.")
    caption.add_argument("--mode", choices=("skip", "append", "overwrite"), default="skip",
                         help="skip pictures that have a caption (default), append new tags to them, or overwrite them.")
    caption.add_argument("--trigger", default="", help="Trigger word put first in every caption written.")
    caption.add_argument("--batch-size", type=int, default=8, help="Pictures per model call (default 8).")
    caption.add_argument("--device", default="auto", help="auto (GPU when there is one), cuda or cpu.")
    tagging = caption.add_argument_group("tagger settings")
    tagging.add_argument("--general-threshold", type=float, default=0.35, help="Keep general tags this likely (0.35).")
    tagging.add_argument("--character-threshold", type=float, default=0.85, help="Keep character tags this likely (0.85).")
    tagging.add_argument("--blacklist", default="", help="Comma-separated tags never written (e.g. 'solo, simple background').")
    tagging.add_argument("--max-tags", type=int, default=0, help="Keep at most N tags, the most confident (0 = all).")
    tagging.add_argument("--rating-tags", action="store_true", help="Also write the rating tag (general, sensitive, ...).")
    tagging.add_argument("--keep-underscores", action="store_true", help="Write long_hair instead of long hair.")
    captioning = caption.add_argument_group("captioner settings")
    captioning.add_argument("--prompt", default="", help="Prompt or task: a start for BLIP ('a picture of'), a Florence-2 "
                                                         "task (<MORE_DETAILED_CAPTION>), an instruction for chat models.")
    captioning.add_argument("--max-new-tokens", type=int, default=75, help="Longest caption in tokens (75).")
    caption.set_defaults(handler=run_caption)

    tags = sub.add_parser("tags", help="Tag frequency table of a dataset's captions.")
    tags.add_argument("dir", help="Folder of pictures with captions.")
    tags.add_argument("--trigger", default="", help="The trigger word (it goes first in every caption).")
    tags.add_argument("--top", type=int, default=40, help="Rows to print (default 40).")
    tags.set_defaults(handler=run_tags)

    reg = sub.add_parser("reg-images", help="Render regularization (class) pictures from the base model.")
    reg.add_argument("--base", required=True, help="Base model: diffusers folder, .safetensors checkpoint or hub id.")
    reg.add_argument("--class-prompt", required=True, help="What the class pictures show, e.g. 'a woman'.")
    reg.add_argument("-n", type=int, default=100, dest="n", help="Number of pictures (default 100).")
    reg.add_argument("--out", required=True, help="Folder for the pictures and their .txt captions (use it as --reg-data).")
    reg.add_argument("--negative", default="", help="Negative prompt.")
    reg.add_argument("--seed", type=int, default=0, help="Seed of the first picture; picture i uses seed + i.")
    reg.add_argument("--steps", type=int, default=25, help="Denoising steps.")
    reg.add_argument("--cfg", type=float, default=7.0, help="Classifier-free guidance scale.")
    reg.add_argument("--width", type=int, default=0, help="Width (default: the model's native size).")
    reg.add_argument("--height", type=int, default=0, help="Height (default: the model's native size).")
    reg.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: cuda when available).")
    reg.set_defaults(handler=run_reg_images)


def open_captioner(args: argparse.Namespace):
    """The tagger or captioner the flags name."""
    from trainer.core.devices import check_device_name

    check_device_name(args.device)  # before any model loads
    if args.tagger:
        from trainer.data.captioning.tagger import (
            TaggerSettings,
            open_tagger,
            parse_tag_list,
        )

        settings = TaggerSettings(general_threshold=args.general_threshold, character_threshold=args.character_threshold,
                                  blacklist=parse_tag_list(args.blacklist), replace_underscores=not args.keep_underscores,
                                  max_tags=args.max_tags, rating_tags=args.rating_tags)
        return open_tagger(args.tagger, settings, device=args.device)
    from trainer.data.captioning.captioner import TransformersCaptioner

    return TransformersCaptioner(args.captioner, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                                 device=args.device)


def run_caption(args: argparse.Namespace) -> int:
    from trainer.cli.console import quiet_libraries
    from trainer.data.captioning.autocaption import caption_folder, undo_last_captioning

    if args.undo:
        print(undo_last_captioning(args.dir))
        return 0
    if not (args.tagger or args.captioner):
        from trainer.data.captioning import captioner, tagger

        raise StudioError("Name a model: --tagger (booru tags) or --captioner (sentences).",
                          hint=f"{tagger.download_help()} Or: {captioner.download_help()}")
    quiet_libraries()
    model = open_captioner(args)
    from tqdm import tqdm

    bar = tqdm(unit="picture", dynamic_ncols=True)

    def progress(p) -> None:
        bar.total = p.total
        bar.update(p.done - bar.n)

    try:
        report = caption_folder(args.dir, model, mode=args.mode, trigger=args.trigger, batch_size=args.batch_size,
                                on_progress=progress)
    finally:
        bar.close()
    print(report.text() + (f" ('lora-studio caption {args.dir} --undo')" if report.undo else ""))
    for image, reason in report.failed:
        print(f"  skipped {image.name}: {reason}")
    return 0


def run_tags(args: argparse.Namespace) -> int:
    from trainer.config.schema import DataConfig
    from trainer.data.scan import scan_dataset
    from trainer.data.tag_stats import tag_table

    if args.top < 1:
        raise StudioError(f"--top {args.top} prints no rows.", hint="Give the number of rows to print, 1 or more (default 40).")
    scan = scan_dataset(DataConfig(data=args.dir, trigger=args.trigger))
    table = tag_table((item.caption for item in scan.items), args.trigger)
    width = max((len(row.tag) for row in table.rows[:args.top]), default=3)
    print(f"{'tag':<{width}}  captions  share  note")
    for row in table.rows[:args.top]:
        print(f"{row.tag:<{width}}  {row.captions:>8}  {row.share:>5.0%}  {table.note(row)}")
    if len(table.rows) > args.top:
        print(f"… {len(table.rows) - args.top} more (--top N)")
    print(table.summary())
    return 0


def run_reg_images(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from trainer.cli.console import quiet_libraries
    from trainer.core.output_paths import check_output_folder
    from trainer.generate.generator import Generator
    from trainer.generate.reg_images import RegImagesRequest, make_reg_images

    request = RegImagesRequest(args.class_prompt, args.n, seed=args.seed, negative_prompt=args.negative,
                               steps=args.steps, cfg_scale=args.cfg, width=args.width, height=args.height)
    check_output_folder(args.out, label="The regularization folder")  # before the model loads
    quiet_libraries()
    generator = Generator.from_base(args.base, device=args.device)
    with tqdm(total=args.n, unit="picture", dynamic_ncols=True) as bar:
        paths = make_reg_images(generator, request, Path(args.out), lambda p: bar.update(p.done - bar.n))
    print(f"{len(paths)} pictures of \"{request.class_prompt}\" in {args.out}: train with --reg-data {args.out}")
    return 0
