"""Tune tab: fit a sampler's σ grid (and dpmpp-2m's mean-value table) to one model at one NFE, and save it there.

``schedulers.tuning.tune_sampler`` on the chosen model's own network, under the model's lock, in the compute lane
like a generation; its progress (candidate grids tried, the best RMS error against the tight solution so far)
feeds the progress bar, and Stop ends it at the next candidate with nothing written. The result is saved into
``MODEL_DIR/tuned/SAMPLER-nfeN/`` (``SAMPLER-nfeN-free/`` for a free end; ``save_tuned``: atomically) and
offered as ``tuned:SAMPLER-nfeN`` next to the stock samplers in Generate, Compare and Evaluate; the Generate tab's
sampler list refreshes when it shows the same model. A conditional model is tuned at guidance 1, over its classes
in turn (as ``python -m schedulers.tune``).
"""

from pathlib import Path

import gradio as gr
import torch

import schedulers
from schedulers.tuning import FINALS, TUNABLE, TuningStopped, save_tuned, tune_sampler, tuned_name
from webui import models
from webui.generate import stop as stop_session
from webui.sampling import MAX_SEED, STOP
from webui.validation import choice, number

MAX_NFE = 50
MAX_TUNING_SAMPLES = 512


def tunable(loaded: models.LoadedModel) -> list[str]:
    """The tunable samplers that can drive this model; none for a one-shot model."""
    if loaded.scheduler_config is None:
        return []
    process = models.process(loaded.pipe)
    return [name for name in TUNABLE if schedulers.get_sampler(name).available_for(process, loaded.scheduler_config)]


def model_folder(loaded: models.LoadedModel, model: str) -> Path:
    """The pipeline directory a tuned scheduler is written into; gr.Error for a model that has none to tune."""
    if loaded.scheduler_config is None:
        raise gr.Error(f"{model} generates in one network evaluation (a GAN or VAE): it has no sampler to tune")
    folder = Path(loaded.key)
    if not folder.is_dir():
        raise gr.Error(f"{model} is not a local model directory; tuning writes into one (download it first)")
    return folder


def make_handler(catalog: models.ModelCatalog):
    def tune(model, sampler, nfe, samples, seed, generate_model=None, final="zero", request: gr.Request = None,
             progress=gr.Progress()):  # noqa: B008  (gradio injects the bar)
        """Outputs: the result's Markdown, the Generate tab's sampler list. ``final``: where the run ends
        (``tune_sampler``'s: "zero", a final denoise, or "free", a tuned σ_end)."""
        loaded = catalog.load(model)
        folder = model_folder(loaded, model)
        sampler = choice("sampler", sampler, tunable(loaded))
        nfe = number("NFE", nfe, 2, MAX_NFE, integer=True)
        samples = number("tuning samples", samples, 2, MAX_TUNING_SAMPLES, integer=True)
        seed = number("seed", seed, 0, MAX_SEED, integer=True)
        final = choice("end", final, FINALS)
        classes = models.num_classes(loaded.pipe)
        labels = None if not classes else torch.arange(2 * samples) % classes

        def report(done, total, best):
            progress((done, total), desc=f"grid {done} of at most {total} · best RMS {best:.4f}")

        flag = STOP.begin(request)
        try:
            with loaded.lock:
                tuning = tune_sampler(loaded.pipe.unet, loaded.scheduler_config, sampler=sampler, nfe=nfe,
                                      sample_shape=models.sample_shape(loaded.pipe), class_labels=labels,
                                      samples=samples, seed=seed, final=final,
                                      model_process=models.process(loaded.pipe),
                                      progress=report, should_stop=flag.is_set)
        except ValueError as error:  # an NFE below the sampler's minimum or one it cannot spend exactly
            raise gr.Error(str(error)) from None
        except TuningStopped as stopped:
            gr.Warning(f"{stopped}; nothing written")
            return f"Stopped: {stopped}. Nothing was written.", gr.update()
        finally:
            flag.set()
        target = save_tuned(folder, tuning)
        choice_name = models.TUNED + tuned_name(sampler, nfe, tuning.final)
        result = (f"**{choice_name}** saved in `{target}`: RMS error against the tight solution "
                  f"{tuning.rmse:.4f} (the stock grid at the same NFE: {tuning.stock_rmse:.4f}), "
                  f"{tuning.evaluations} evaluations per start, {tuning.seconds:.0f} s. Choose it in Generate, "
                  "Compare or Evaluate.")
        if final != tuning.final:
            result += (f" It ends at 0: a free end is for solvers of one evaluation per step, and {sampler} "
                       "spends two.")
        same_model = generate_model is not None and catalog.resolve(generate_model) == loaded.key
        return result, gr.update(choices=models.samplers(loaded)) if same_model else gr.update()

    return tune


def build(catalog: models.ModelCatalog, generate_widgets: dict) -> None:
    default = catalog.default()
    offered = tunable(catalog.load(default))
    gr.Markdown("### Tune a sampler for a model\nThe σ grid (and, for dpmpp-2m, its mean-value table) is fitted to "
                "the model's own trajectories at one NFE, with no data: the sampler's end is brought closest to a "
                "tight solution from the same noise. The tuned sampler is saved in the model's folder and offered "
                "as `tuned:SAMPLER-nfeN` in Generate, Compare and Evaluate.")
    with gr.Row():
        model = gr.Dropdown(list(catalog.listed()), value=default, label="model", allow_custom_value=True)
        sampler = gr.Dropdown(offered, value="dpmpp-2m" if "dpmpp-2m" in offered else None, label="sampler",
                              allow_custom_value=True)
        nfe = gr.Number(5, precision=0, label="NFE", minimum=2, maximum=MAX_NFE)
        samples = gr.Number(64, precision=0, label="tuning samples (as many more validate)", minimum=2,
                            maximum=MAX_TUNING_SAMPLES)
        seed = gr.Number(0, precision=0, label="seed", minimum=0)
        final = gr.Radio([("denoise to 0", "zero"), ("free σ_end", "free")], value="zero", label="end",
                         info="free: the run stops at a tuned σ_end, no final denoise (data with thin spread)")
    with gr.Row():
        start = gr.Button("Tune", variant="primary")
        stop = gr.Button("Stop", variant="stop")
    result = gr.Markdown()
    model.change(lambda name: gr.update(choices=tunable(catalog.load(name))), model, sampler, api_name=False)
    start.click(make_handler(catalog), [model, sampler, nfe, samples, seed, generate_widgets["model"], final],
                [result, generate_widgets["sampler"]], api_name="tune", concurrency_id="compute")
    stop.click(stop_session, None, None, queue=False, api_name=False)
