"""Compare tab: AUTOMATIC1111's X/Y/Z plot over the Generate tab's settings.

Up to three axes among sampler, steps, guidance scale, η / noise level, seed and model; every cell is one
``Job`` that differs from the base settings only in its axis values. A cell's seed fixes its initial noise and
the sampler's noise (``torch.Generator().manual_seed(seed)`` draws x_T first), so along every axis but seed all
cells start from the same x_T. Each cell is labelled with its NFE and seconds and, optionally, the judge's
feature-FID and accuracy on N extra samples (``webui.quality``). The grid PNG and a CSV of the numbers export.
"""

import csv
import itertools

import gradio as gr
import pandas
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from pipelines.diffusion import MAX_GUIDANCE
from schedulers.registry import KNOBS, MAX_STEPS, NOISE_KNOBS
from webui import models, quality
from webui.generate import INPUTS
from webui.generate import stop as stop_session
from webui.sampling import LEVELS_FIELD, MAX_SEED, STOP, Job, Stopped, output_dir, parse_job, run_job, save_png, tile
from webui.validation import number, parse_values

NO_AXIS = "—"
# axis name → (Job field, value type, bounds for numbers); a cell's own checks then hold each value to its sampler's
NOISE_RANGE = (min(KNOBS[name].low for name in NOISE_KNOBS), max(KNOBS[name].high for name in NOISE_KNOBS))
AXES = {
    "sampler": ("sampler", str, None),
    "steps": ("steps", int, (1, MAX_STEPS)),
    "guidance scale": ("guidance_scale", float, (-MAX_GUIDANCE, MAX_GUIDANCE)),
    "η / noise level": ("noise", float, NOISE_RANGE),
    "seed": ("seed", int, (0, MAX_SEED)),
    "model": ("model", str, None),
}
MAX_CELLS = 64
MAX_PER_AXIS = 16
CELL_SIDE = 160
FONT = PIL.ImageFont.load_default(size=13)


def parse_axes(axes: list[tuple]) -> list[tuple[str, list]]:
    """[(axis name, values)] for the axes in use (type not "—"), checked; at least one, no axis twice."""
    used = []
    for position, (name, text) in zip("XYZ", axes):
        if name in (None, "", NO_AXIS):
            continue
        if name not in AXES:
            raise gr.Error(f"{position} axis: unknown axis {name!r}; choose one of {', '.join(AXES)}")
        if name in [n for n, _ in used]:
            raise gr.Error(f"{position} axis: {name} is already an axis")
        _, kind, bounds = AXES[name]
        if kind is str:
            values = [v.strip() for v in (text or "").split(",") if v.strip()] if isinstance(text, str) else []
            if not values:
                raise gr.Error(f"{position} axis ({name}): give at least one value, separated by commas")
            if len(values) > MAX_PER_AXIS:
                raise gr.Error(f"{position} axis ({name}): {len(values)} values; at most {MAX_PER_AXIS}")
            values = list(dict.fromkeys(values))
        else:
            values = parse_values(f"{position} axis ({name})", text, kind, *bounds, limit=MAX_PER_AXIS)
        used.append((name, values))
    if not used:
        raise gr.Error("choose at least one axis")
    cells = 1
    for _, values in used:
        cells *= len(values)
    if cells > MAX_CELLS:
        raise gr.Error(f"{cells} cells; at most {MAX_CELLS} (fewer values per axis)")
    return used


def cell_jobs(catalog: models.ModelCatalog, base: dict, axes: list[tuple[str, list]], images_per_cell: int):
    """Every cell's (axis values, Job), Z-major then Y then X; all checked before anything is sampled."""
    jobs = []
    for values in itertools.product(*(values for _, values in reversed(axes))):
        values = values[::-1]  # X varies fastest
        settings = {**base, "batch": images_per_cell}
        settings.update({AXES[name][0]: value for (name, _), value in zip(axes, values)})
        try:
            jobs.append((values, parse_job(catalog, **settings)))
        except gr.Error as error:
            cell = ", ".join(f"{name} {value}" for (name, _), value in zip(axes, values))
            raise gr.Error(f"cell ({cell}): {error.message}") from None
    return jobs


def draw_grid(axes, cells: list[tuple[tuple, PIL.Image.Image, str]]) -> PIL.Image.Image:
    """The labelled grid: X across, Y down, one block per Z value; each cell captioned with its numbers."""
    names = [name for name, _ in axes] + [None, None]
    xs, ys, zs = ([v for v in values] for _, values in axes + [(None, [None])] * (3 - len(axes)))
    width = max(image.width for _, image, _ in cells)
    height = max(image.height for _, image, _ in cells)
    lines = max(caption.count("\n") + 1 for _, _, caption in cells)
    cell_w, cell_h = max(width, 140) + 8, height + 16 * lines + 8

    def label(axis, value):
        return "" if value is None else f"{axis}: {value}"

    left = 12 + max([int(FONT.getlength(label(names[1], y))) for y in ys] + [0])
    block_h = 22 + len(ys) * cell_h
    top = 22 if names[2] else 0
    canvas = PIL.Image.new("RGB", (left + len(xs) * cell_w, len(zs) * (block_h + top)), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for index, (_, image, caption) in enumerate(cells):
        x, y, z = index % len(xs), index // len(xs) % len(ys), index // (len(xs) * len(ys))
        y0 = z * (block_h + top)
        if x == 0 and y == 0 and names[2]:
            draw.text((4, y0 + 4), label(names[2], zs[z]), fill="black", font=FONT)
        if y == 0:
            draw.text((left + x * cell_w + 4, y0 + top + 4), label(names[0], xs[x]), fill="black", font=FONT)
        if x == 0:
            draw.text((4, y0 + top + 22 + y * cell_h + height // 2), label(names[1], ys[y]), fill="black", font=FONT)
        cx, cy = left + x * cell_w + 4, y0 + top + 22 + y * cell_h
        canvas.paste(image.convert("RGB"), (cx, cy))
        draw.multiline_text((cx, cy + height + 2), caption, fill="dimgray", font=FONT, spacing=3)
    return canvas


def make_handler(catalog: models.ModelCatalog):
    def compare(*values, request: gr.Request = None, progress=gr.Progress()):  # noqa: B008  (gradio injects the bar)
        """Inputs: the Generate tab's settings, then X/Y/Z (axis, values) pairs, images per cell, metrics, N.
        Outputs: grid, table rows, files (grid PNG, CSV)."""
        base = dict(zip(INPUTS, values[: len(INPUTS)]))
        x_axis, x_values, y_axis, y_values, z_axis, z_values, per_cell, metrics, samples = values[len(INPUTS):]
        for unused in ("random_seed", "preview_every"):
            base.pop(unused)
        axes = parse_axes([(x_axis, x_values), (y_axis, y_values), (z_axis, z_values)])
        if "steps" in dict(axes) and isinstance(base.get("levels"), str) and base["levels"].strip():
            raise gr.Error(f"the steps axis needs the {LEVELS_FIELD} field empty: chosen levels set the steps")
        per_cell = number("images per cell", per_cell, 1, 16, integer=True)
        if metrics:
            samples = number("metric samples", samples, 20, quality.MAX_SAMPLES, integer=True)
        jobs = cell_jobs(catalog, base, axes, per_cell)
        flag = STOP.begin(request)

        def on_step(i, x0):
            if flag.is_set():
                raise Stopped(i)

        cells, rows = [], []
        try:
            for index, (axis_values, job) in enumerate(jobs):
                progress((index, len(jobs)), desc=f"cell {index + 1} of {len(jobs)}")
                result = run_job(catalog, job, on_step)
                row = {name: value for (name, _), value in zip(axes, axis_values)}
                row.update(nfe=result.nfe, seconds=round(result.seconds, 3))
                caption = f"NFE {result.nfe} · {result.seconds:.2f} s"
                if metrics:
                    scores = quality.score(catalog, job, samples, on_step)
                    row.update(feature_fid=scores["feature_fid"], judge_accuracy=scores["judge_accuracy"])
                    caption += f"\nFID {row['feature_fid']:.2f} · acc {row['judge_accuracy']:.0%}"
                rows.append(row)
                cells.append((axis_values, tile(result.images, CELL_SIDE), caption))
                yield draw_grid(axes, cells), table(rows), gr.update()
        except Stopped:
            yield (draw_grid(axes, cells) if cells else None), table(rows), gr.update()
            return
        finally:
            flag.set()
        grid = draw_grid(axes, cells)
        yield grid, table(rows), export(grid, rows, jobs, axes)

    return compare


def table(rows: list[dict]) -> pandas.DataFrame:
    return pandas.DataFrame(rows)


def export(grid: PIL.Image.Image, rows: list[dict], jobs: list[tuple[tuple, Job]], axes) -> list[str]:
    folder = output_dir()
    base = jobs[0][1].settings()
    grid_path = save_png(grid, folder / "compare.png", {"base": base, "axes": dict(axes), "cells": rows})
    with open(folder / "compare.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return [str(grid_path), str(folder / "compare.csv")]


def build(catalog: models.ModelCatalog, generate_widgets: dict) -> None:
    gr.Markdown("Base settings come from the **Generate** tab; each axis overrides one of them. Values: "
                "`a, b, c`, or ranges `5-25(5)` (step 5), `0-1[5]` (5 values). One seed, hence one initial "
                "noise, per cell.")
    axis_inputs = []
    defaults = [("sampler", "ddim, dpmpp-2m"), ("steps", "5, 20"), (NO_AXIS, "")]
    with gr.Row():
        for position, (axis, text) in zip("XYZ", defaults):
            with gr.Column():
                axis_inputs.append(gr.Dropdown([NO_AXIS, *AXES], value=axis, label=f"{position} axis"))
                axis_inputs.append(gr.Textbox(text, label=f"{position} values"))
    with gr.Row():
        per_cell = gr.Slider(1, 16, value=4, step=1, label="images per cell")
        metrics = gr.Checkbox(False, label="feature-FID and judge accuracy (MNIST models)")
        samples = gr.Number(100, precision=0, label="extra samples per cell for the metrics", minimum=20)
    with gr.Row():
        run = gr.Button("Compare", variant="primary", elem_id="compare-run")
        stop = gr.Button("Stop", variant="stop")
    grid = gr.Image(label="grid", type="pil", format="png", elem_id="compare-grid")
    numbers = gr.Dataframe(label="numbers", interactive=False, wrap=True, elem_id="compare-table")
    files = gr.File(label="download: grid PNG, CSV", file_count="multiple", elem_id="compare-files")
    inputs = [generate_widgets[k] for k in INPUTS] + axis_inputs + [per_cell, metrics, samples]
    run.click(make_handler(catalog), inputs, [grid, numbers, files], api_name="compare", concurrency_id="compute")
    stop.click(stop_session, None, None, queue=False, api_name=False)
