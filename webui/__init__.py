"""The workbench's web UI, one module per tab: ``generate``, ``compare`` (X/Y/Z plot), ``training``, ``evaluate``,
``tune`` (a sampler tuned to a model);
``models`` (what a model offers), ``sampling`` (one checked request and its run), ``quality`` (judge metrics),
``validation`` (every input check). ``app.py`` parses the command line and serves ``build_ui``.
"""

import gradio as gr

from webui import compare, evaluate, generate, training, tune
from webui.models import ModelCatalog

INTRO = """# Diffusion workbench
**Generate** samples a model with any sampler that fits it · **Compare** lays samplers, steps, guidance, η, seeds
and models side by side on one initial noise · **Train** runs a training job in the background · **Evaluate**
measures quality against NFE · **Tune** fits a sampler's steps to a model."""


def build_ui(catalog: ModelCatalog, runs: training.Runs) -> gr.Blocks:
    with gr.Blocks(title="Diffusion workbench") as ui:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                widgets = generate.build(catalog)
            with gr.Tab("Compare", id="compare"):
                compare.build(catalog, widgets)
            with gr.Tab("Train", id="train"):
                training.build(catalog, runs, widgets["model"])
            with gr.Tab("Evaluate", id="evaluate"):
                evaluate.build(catalog)
            with gr.Tab("Tune", id="tune"):
                tune.build(catalog, widgets)
        generate.wire(catalog, widgets)
    return ui
