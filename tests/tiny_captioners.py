"""Tiny captioning models built in code: a WD14-format ONNX tagger and a random BLIP captioner.

The tagger's graph is ``sigmoid(mean_bgr / 255 @ W + b)``: its probabilities follow the
picture's mean colour in a way a test can compute by hand (so it checks the BGR order, the white
padding and the thresholds), and ``selected_tags.csv`` has the published layout (4 ratings,
general tags, characters; header ``tag_id,name,category,count``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


# (name, category, weights on mean (B, G, R) in [0, 1], bias): p = sigmoid(w . bgr + bias)
def _logit(p: float) -> float:
    return math.log(p / (1 - p))


TAGS: list[tuple[str, int, tuple[float, float, float], float]] = [
    ("general", 9, (0, 0, 0), _logit(0.10)),
    ("sensitive", 9, (0, 0, 0), _logit(0.70)),
    ("questionable", 9, (0, 0, 0), _logit(0.15)),
    ("explicit", 9, (0, 0, 0), _logit(0.05)),
    ("1girl", 0, (0, 0, 0), _logit(0.90)),
    ("blue_hair", 0, (10, 0, 0), -5.0),  # blue pictures: p = sigmoid(10 * B - 5)
    ("red_background", 0, (0, 0, 10), -5.0),  # red (or white-padded) pictures
    ("smile", 0, (0, 0, 0), _logit(0.40)),
    ("^_^", 0, (0, 0, 0), _logit(0.50)),
    ("simple_background", 0, (0, 0, 0), _logit(0.30)),
    ("hatsune_miku", 4, (0, 0, 0), _logit(0.92)),
    ("kagamine_rin", 4, (0, 0, 0), _logit(0.50)),
]
INPUT_SIZE = 32


def expected_probabilities(bgr_mean: tuple[float, float, float]) -> dict[str, float]:
    """What the tiny tagger outputs for a picture whose padded square has this mean colour (0-1)."""
    return {name: 1 / (1 + math.exp(-(np.dot(w, bgr_mean) + b))) for name, _, w, b in TAGS}


def write_tiny_tagger(folder: Path, *, size: int = INPUT_SIZE) -> Path:
    """``model.onnx`` + ``selected_tags.csv`` in ``folder``; returns ``folder``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([w for _, _, w, _ in TAGS], dtype=np.float32).T  # [3, T]
    bias = np.array([b for *_, b in TAGS], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Div", ["mean", "scale"], ["bgr"]),
        helper.make_node("MatMul", ["bgr", "weights"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny-wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(TAGS)])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias"),
         numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{cat},{1000 - i}" for i, (name, cat, _, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


BLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "picture", "of", "red", "blue", "cat",
              "dog", "girl", "sitting", "on", "the", "grass", "smiling", "with", "hat"]


def write_tiny_blip(folder: Path, *, seed: int = 0) -> Path:
    """A random BLIP captioner (32 px, one layer each) saved with its processor; returns ``folder``."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipProcessor,
    )
    from transformers.models.blip.image_processing_blip import BlipImageProcessor

    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(BLIP_WORDS)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    config = BlipConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(BLIP_WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=16, max_position_embeddings=64,
                         bos_token_id=BLIP_WORDS.index("[DEC]"), pad_token_id=0, sep_token_id=3),
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder
