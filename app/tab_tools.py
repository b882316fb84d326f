"""Tools tab: inspect, resize, merge and bake LoRA files (thin wrappers over ``trainer.tools``)."""

from __future__ import annotations

import gradio as gr

from app.studio import Studio


def build_tools_tab(studio: Studio) -> None:
    gr.Markdown("Inspect, resize, merge and bake LoRA files.", elem_id="tools-intro")
