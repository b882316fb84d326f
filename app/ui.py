"""The page: four tabs in the order an artist works, and the links between them.

``build_app`` only lays out and wires; each tab's module holds its handlers. ``launch`` starts the
server the safe way for a local tool: 127.0.0.1 unless asked otherwise, no share link, no
analytics, the project folder (and nothing else) served to the page.
"""

from __future__ import annotations

import os

import gradio as gr

from app.bundled import asset_path
from app.errors import user_errors
from app.studio import Studio
from app.tab_dataset import build_dataset_tab
from app.tab_generate import build_generate_tab, open_in_generate
from app.tab_tools import build_tools_tab
from app.tab_train import build_train_tab

TITLE = "LoRA Studio"


def offline_environment() -> None:
    """Before gradio or huggingface_hub do anything: no analytics, no telemetry."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def theme() -> gr.themes.Theme:
    # System fonts only: the default theme would fetch web fonts from a CDN.
    system = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Soft(primary_hue="orange", font=system, font_mono=mono)


def build_app(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\nTrain a LoRA on your own pictures, then use it: "
                    "**1** pictures and captions → **2** train → **3** generate → **4** tools. "
                    f"Everything stays in `{studio.projects.root}`.", elem_id="app-header")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("1 · Dataset", id="dataset", elem_id="tab-dataset"):
                dataset = build_dataset_tab(studio, demo)
            with gr.Tab("2 · Train", id="train", elem_id="tab-train") as train_item:
                train = build_train_tab(studio, demo)
            with gr.Tab("3 · Generate", id="generate", elem_id="tab-generate"):
                generate = build_generate_tab(studio, demo)
            with gr.Tab("4 · Tools", id="tools", elem_id="tab-tools") as tools_item:
                tools = build_tools_tab(studio)

        # The dataset being edited is the one to train; its trigger word is the run's.
        train_item.select(lambda edited, current: pick_dataset(studio, edited, current), [dataset.name, train.dataset],
                          train.dataset, api_name=False)
        dataset.trigger.change(lambda word: word, dataset.trigger, train.trigger, api_name=False)
        for refresh in (tools_item.select, demo.load):  # runs finished or files uploaded meanwhile
            refresh(lambda: tools.refreshed(studio), None, [*tools.pickers, tools.base], api_name=False)
        train.open_in_generate.click(
            user_errors(open_in_generate),
            [train.output_path, train.output_base, generate.loras, generate.slots_version],
            [generate.loras, generate.slots_version, generate.base], api_name="open_in_generate",
        ).success(lambda: gr.Tabs(selected="generate"), None, tabs, api_name=False)
    return demo


def pick_dataset(studio: Studio, edited: str | None, current: str | None) -> dict:
    """The Train tab's dataset list, showing the dataset being edited when it exists."""
    names = studio.projects.list_datasets()
    value = edited if edited in names else current if current in names else (names[0] if names else None)
    return gr.update(choices=names, value=value)


def launch(studio: Studio, *, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
           open_browser: bool = False, block: bool = True, quiet: bool = False) -> tuple[gr.Blocks, str]:
    """Build and serve the app; returns (blocks, local URL). ``block=False`` returns at once (tests)."""
    offline_environment()
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(
        server_name=host, server_port=port, share=False, inbrowser=open_browser, auth=auth,
        prevent_thread_lock=True, allowed_paths=[str(studio.projects.root)], show_error=False, quiet=quiet,
        ssr_mode=False, pwa=False, mcp_server=False, footer_links=["api", "settings"],
        theme=theme(), css_paths=[asset_path("style.css")], favicon_path=asset_path("favicon.png"),
        js=asset_path("spreadsheet_typing.js").read_text(encoding="utf-8"),
    )
    if block:
        try:
            demo.block_thread()
        finally:
            studio.close()
    return demo, url
