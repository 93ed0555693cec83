"""The workbench's web UI: pick a model and a sampler, generate a grid.

``python app.py`` serves http://127.0.0.1:7860 with every pipeline directory under ``checkpoints/`` (and
``--models DIR``). The UI only calls the packages: models are ``DiffusionImagePipeline`` directories, samplers
come from the scheduler registry, filtered by the forward process the model records in ``model_info``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from functools import lru_cache
from pathlib import Path

import gradio as gr
import torch
from diffusers.utils import make_image_grid

import schedulers
from pipelines import DiffusionImagePipeline

ROOT = Path(__file__).resolve().parent
DEFAULT_MODELS = ROOT / "checkpoints"
MAX_STEPS = 1000
MAX_BATCH = 64
UNCONDITIONAL = "none (unconditional)"
EVERY_CLASS = "every class in turn"
GRID_SIDE = 512  # pixels: small images are scaled up (nearest neighbour) so the grid is readable


def find_models(roots: list[Path]) -> dict[str, Path]:
    """Pipeline directories (those holding a ``model_index.json``) under ``roots``, by display name."""
    found = {}
    for root in roots:
        for index in sorted(root.glob("*/model_index.json")):
            found[index.parent.name] = index.parent
    return found


@lru_cache(maxsize=4)
def load_pipeline(path: str) -> DiffusionImagePipeline:
    try:
        pipe = DiffusionImagePipeline.from_pretrained(path)
    except Exception as error:  # a corrupt or foreign directory: say so in the UI, keep the app up
        raise gr.Error(f"could not load the model at {path}: {error}") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_process(pipe: DiffusionImagePipeline) -> str:
    return pipe.config.model_info.get("process", "vp")


def model_samplers(pipe: DiffusionImagePipeline) -> list[str]:
    return schedulers.samplers_for(model_process(pipe), pipe.scheduler.config)


def class_choices(pipe: DiffusionImagePipeline) -> list[str]:
    names = pipe.config.model_info.get("class_names") or [str(i) for i in range(pipe.num_classes)]
    return [EVERY_CLASS, UNCONDITIONAL, *names] if pipe.num_classes else [UNCONDITIONAL]


def generate(models: dict[str, Path], model_name: str, sampler: str, steps: float, seed: float, class_name: str,
             guidance: float, eta: float, batch: float):
    """Sample a grid; every bad input becomes a ``gr.Error`` that names it."""
    if model_name not in models:
        raise gr.Error(f"unknown model {model_name!r}")
    if sampler not in schedulers.SAMPLERS:
        raise gr.Error(f"unknown sampler {sampler!r}")
    for name, value in [("steps", steps), ("seed", seed), ("guidance scale", guidance), ("η", eta),
                        ("batch size", batch)]:
        if value is None or not math.isfinite(value):
            raise gr.Error(f"{name} must be a finite number")
    if not 1 <= steps <= MAX_STEPS or not 1 <= batch <= MAX_BATCH:
        raise gr.Error(f"steps must be in [1, {MAX_STEPS}] and batch size in [1, {MAX_BATCH}]")
    pipe = load_pipeline(str(models[model_name]))
    spec = schedulers.get_sampler(sampler)
    if not spec.drives(model_process(pipe)):
        raise gr.Error(f"{sampler} cannot drive a model trained on the {model_process(pipe)!r} process")
    try:
        pipe.scheduler = spec.create(pipe.scheduler.config)
    except ValueError as error:
        raise gr.Error(str(error)) from error
    choices = class_choices(pipe)
    if class_name not in choices:
        raise gr.Error(f"class {class_name!r} is not one of {choices}")
    if class_name == UNCONDITIONAL:
        labels = None
    elif class_name == EVERY_CLASS:
        labels = torch.arange(int(batch)) % pipe.num_classes
    else:
        labels = choices.index(class_name) - 2
    accepts_eta = "eta" in inspect.signature(spec.scheduler_class.step).parameters
    start = time.perf_counter()
    try:
        out = pipe(batch_size=int(batch), num_inference_steps=int(steps), generator=torch.Generator().manual_seed(
            int(seed)), class_labels=labels, guidance_scale=float(guidance) if labels is not None else 1.0,
            eta=float(eta) if accepts_eta else None)
    except ValueError as error:
        raise gr.Error(str(error)) from error
    seconds = time.perf_counter() - start
    rows = max(1, int(math.sqrt(len(out.images))))
    while len(out.images) % rows:
        rows -= 1
    grid = make_image_grid(out.images, rows=rows, cols=len(out.images) // rows)
    scale = max(1, GRID_SIDE // max(grid.size))
    grid = grid.resize((grid.width * scale, grid.height * scale), resample=0)
    return grid, f"**{sampler}**, {int(steps)} steps · NFE {out.nfe} per image · {seconds:.2f} s · seed {int(seed)}"


def build_ui(models: dict[str, Path]) -> gr.Blocks:
    if not models:
        raise SystemExit("no pipeline directories found; train one (see README) or pass --models DIR")
    names = list(models)
    default = "mnist-vp" if "mnist-vp" in models else names[0]
    first = load_pipeline(str(models[default]))
    with gr.Blocks(title="Diffusion workbench") as ui:
        gr.Markdown("# Diffusion workbench\nPick a model and a sampler; the grid shares one seed.")
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(names, value=default, label="model")
                sampler = gr.Dropdown(model_samplers(first), value="ddim", label="sampler")
                steps = gr.Slider(1, MAX_STEPS, value=50, step=1, label="steps")
                eta = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="η (DDIM family)")
                class_name = gr.Dropdown(class_choices(first), value=class_choices(first)[0], label="class")
                guidance = gr.Slider(0.0, 8.0, value=3.0, step=0.5, label="guidance scale (classifier-free)")
                seed = gr.Number(value=0, precision=0, label="seed")
                batch = gr.Slider(1, MAX_BATCH, value=20, step=1, label="batch size")
                run = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                image = gr.Image(label="samples", type="pil")
                info = gr.Markdown()

        def on_model(name):
            pipe = load_pipeline(str(models[name]))
            choices = class_choices(pipe)
            return (gr.update(choices=model_samplers(pipe), value="ddim"),
                    gr.update(choices=choices, value=choices[0]))

        model.change(on_model, model, [sampler, class_name], api_name="select_model")
        run.click(lambda *a: generate(models, *a), [model, sampler, steps, seed, class_name, guidance, eta, batch],
                  [image, info], concurrency_limit=1, api_name="generate")
    return ui


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve the diffusion workbench UI.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--models", type=Path, action="append", default=[], help="more pipeline directories")
    args = parser.parse_args(argv)
    ui = build_ui(find_models([DEFAULT_MODELS, *args.models]))
    ui.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=False)


if __name__ == "__main__":
    main()
