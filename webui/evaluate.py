"""Evaluate tab: quality against NFE for a model's samplers, and the exact-score sampler benchmark.

* **Samplers on a model**: every chosen sampler at every chosen step count draws N digits (every class in turn)
  and the MNIST judge scores them (``webui.quality``: feature-FID against the held-out digits, accuracy).
  A plot of both against NFE, the table, and a CSV.
* **Exact-score benchmark**: ``bench/samplers.py --quick`` in a subprocess (the samplers on a 64-d Gaussian
  mixture whose score is exact, against diffusers' own), its output streamed, then its plot and table.
"""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import gradio as gr
import matplotlib
import pandas

from schedulers.registry import MAX_STEPS
from webui import models, quality
from webui.generate import stop as stop_session
from webui.sampling import STOP, Stopped, output_dir, parse_job
from webui.validation import number, parse_values

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "samplers.py"
BENCH_RESULTS = ROOT / "bench" / "results"
MAX_SAMPLERS = 12
RESULT_ROW = re.compile(r"^\S+\s+\d+\s+-?[\d.]+")  # "sampler  NFE  sw2_gap …": one finished row of the table


def plot(rows: list[dict]):
    figure, (fid_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(9, 3.5))
    frame = pandas.DataFrame(rows)
    for sampler, group in frame.groupby("sampler", sort=False):
        group = group.sort_values("nfe")
        fid_axes.plot(group["nfe"], group["feature_fid"], marker="o", label=sampler)
        accuracy_axes.plot(group["nfe"], group["judge_accuracy"], marker="o", label=sampler)
    fid_axes.set(xscale="log", xlabel="NFE per image", ylabel="feature-FID (lower is better)")
    accuracy_axes.set(xscale="log", xlabel="NFE per image", ylabel="judge accuracy", ylim=(0, 1.02))
    fid_axes.legend(fontsize=7)
    figure.tight_layout()
    plt.close(figure)
    return figure


def make_benchmark_handler(catalog: models.ModelCatalog):
    def benchmark(model, samplers, steps_text, guidance_scale, samples, seed, request: gr.Request = None,
                  progress=gr.Progress()):  # noqa: B008  (gradio injects the bar)
        """Outputs: plot, table, CSV file."""
        loaded = catalog.load(model)
        if not quality.judge_fits(loaded.pipe):
            raise gr.Error(f"{model} {quality.NOT_JUDGED}")
        if not isinstance(samplers, list) or not samplers:
            raise gr.Error("choose at least one sampler")
        if len(samplers) > MAX_SAMPLERS:
            raise gr.Error(f"{len(samplers)} samplers; at most {MAX_SAMPLERS}")
        steps = parse_values("steps", steps_text, int, 1, MAX_STEPS, limit=8)
        samples = number("samples", samples, 20, quality.MAX_SAMPLES, integer=True)
        mode = "classifier-free" if "classifier-free" in models.guidance_modes(loaded.pipe) else "none"
        jobs = [parse_job(catalog, model, sampler, n, None, mode, guidance_scale, models.EVERY_CLASS, seed, 1, 0,
                          models.DEFAULT_BACKEND) for sampler in samplers for n in steps]  # noise: the default
        jobs = list(dict.fromkeys(jobs))  # a tuned sampler runs its own steps: once, whatever the step counts
        flag = STOP.begin(request)

        def on_step(i, x0):
            if flag.is_set():
                raise Stopped(i)

        rows = []
        try:
            for index, job in enumerate(jobs):
                progress((index, len(jobs)), desc=f"{job.sampler}, {job.steps} steps")
                rows.append({"sampler": job.sampler, "steps": job.steps, **quality.score(catalog, job, samples,
                                                                                           on_step)})
        except Stopped:
            gr.Warning(f"stopped after {len(rows)} of {len(jobs)} settings")
        finally:
            flag.set()
        if not rows:
            return None, None, None
        path = output_dir() / "benchmark.csv"
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return plot(rows), pandas.DataFrame(rows), str(path)

    return benchmark


def stream_command(argv: list[str], cwd: Path):
    """Run ``argv``, yielding its output lines as they come; a closed generator terminates the process."""
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        for line in process.stdout:
            yield line.rstrip("\n")
        if process.wait() != 0:
            raise gr.Error(f"{Path(argv[1]).name} failed (exit code {process.returncode})")
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait()


def exact_benchmark(samples, progress=gr.Progress()):  # noqa: B008  (gradio injects the bar)
    """Outputs: log, plot PNG, table."""
    samples = number("samples", samples, 50, 20000, integer=True)
    lines = []
    expected = 4  # --quick: 4 samplers at NFE 10
    for line in stream_command([sys.executable, str(BENCH), "--quick", "--samples", str(samples)], ROOT):
        lines.append(line)
        done = sum(1 for text in lines if RESULT_ROW.match(text))
        progress((min(done, expected), expected), desc="exact-score benchmark")
        yield "\n".join(lines[-40:]), gr.update(), gr.update()
    result = json.loads((BENCH_RESULTS / "samplers-quick.json").read_text())
    table = pandas.DataFrame([row for row in result["rows"] if "error" not in row])
    yield "\n".join(lines[-40:]), str(BENCH_RESULTS / "samplers-quick.png"), table


def build(catalog: models.ModelCatalog) -> None:
    default = catalog.default()
    offered = models.samplers(catalog.load(default))
    gr.Markdown("### Samplers on a model\nEach sampler at each step count draws N digits, every class in turn; the "
                "MNIST judge scores them (feature-FID against the 500 held-out digits, accuracy on the intended "
                "digit).")
    with gr.Row():
        model = gr.Dropdown(list(catalog.listed()), value=default, label="model", allow_custom_value=True)
        steps = gr.Textbox("5, 10, 25", label="steps (a, b, c or 5-25(5))")
        guidance = gr.Number(1.0, label="guidance scale")
        samples = gr.Number(100, precision=0, label="samples per point", minimum=20)
        seed = gr.Number(0, precision=0, label="seed", minimum=0)
    samplers = gr.CheckboxGroup(offered, value=[s for s in ("ddim", "dpmpp-2m") if s in offered], label="samplers")
    with gr.Row():
        run = gr.Button("Run benchmark", variant="primary")
        stop = gr.Button("Stop", variant="stop")
    figure = gr.Plot(label="quality vs NFE")
    table = gr.Dataframe(label="numbers", interactive=False)
    csv_file = gr.File(label="download CSV")
    model.change(lambda name: gr.update(choices=models.samplers(catalog.load(name)), value=[]), model, samplers,
                 api_name=False)
    run.click(make_benchmark_handler(catalog), [model, samplers, steps, guidance, samples, seed],
              [figure, table, csv_file], api_name="benchmark", concurrency_id="compute")
    stop.click(stop_session, None, None, queue=False, api_name=False)

    gr.Markdown("### Exact-score benchmark\n`bench/samplers.py --quick`: samplers driven by the exact score of a "
                "64-d Gaussian mixture, against diffusers' own, at NFE 10 (the full run: `python bench/samplers.py`).")
    with gr.Row():
        bench_samples = gr.Number(500, precision=0, label="samples", minimum=50)
        bench_run = gr.Button("Run exact-score benchmark")
    bench_log = gr.Textbox(label="output", lines=10, max_lines=10, autoscroll=True)
    with gr.Row():
        bench_plot = gr.Image(label="NLL gap vs NFE", type="filepath")
        bench_table = gr.Dataframe(label="rows", interactive=False)
    bench_run.click(exact_benchmark, bench_samples, [bench_log, bench_plot, bench_table], api_name="exact_benchmark",
                    concurrency_id="compute")
