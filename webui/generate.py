"""Generate tab: one model, one sampler, a batch of images with live x̂0 previews, Stop, PNGs with their settings;
optionally from an uploaded image at a strength (img2img, SDEdit with a stochastic sampler).

The sampler runs in a worker thread; the handler is a generator that forwards its step events to the page
(progress bar, a preview every few steps). Stop sets the session's flag, and the next step callback raises
``Stopped``: the computation itself ends, not only the page's wait for it.
"""

import queue
import secrets
import threading

import gradio as gr

import schedulers
from pipelines.diffusion import IMG2IMG_STRENGTH
from schedulers.registry import MAX_STEPS
from webui import models
from webui.sampling import (
    LEVELS_FIELD,
    MAX_BATCH,
    NOISE_FIELD,
    STOP,
    Job,
    Stopped,
    output_dir,
    parse_job,
    run_job,
    save_png,
    tensor_grid,
    tile,
)
from webui.validation import number

MAX_RANDOM_SEED = 2**31 - 1


def stream(catalog: models.ModelCatalog, job: Job, preview_every: int, flag: threading.Event, progress=None):
    """Run ``job`` in a thread; yield ``("preview", step, image)`` every ``preview_every`` steps and finally
    ``("done", result)`` or ``("stopped", step)``. Closing the generator stops the thread's sampling."""
    events: queue.Queue = queue.Queue()

    def on_step(i, x0):
        if flag.is_set():
            raise Stopped(i)
        preview = preview_every and x0 is not None and (i + 1) % preview_every == 0
        events.put(("step", i, tensor_grid(x0) if preview else None))

    def work():
        try:
            events.put(("done", run_job(catalog, job, on_step)))
        except Exception as error:  # handed to the generator, which re-raises it in the request's thread
            events.put(("error", error))

    threading.Thread(target=work, daemon=True, name="sampling").start()
    try:
        while True:
            kind, *payload = events.get()
            if kind == "step":
                step, image = payload
                if progress is not None:
                    progress((step + 1, job.steps_run), desc="sampling")
                if image is not None:
                    yield "preview", step, image
            elif kind == "error":
                if isinstance(payload[0], Stopped):
                    yield "stopped", payload[0].args[0] + 1
                    return
                raise payload[0]
            else:
                yield "done", payload[0]
                return
    finally:
        flag.set()  # the page went away or the run ended: a still-running sampler stops at its next step


def stop(request: gr.Request):
    """Stop this session's running sampler at its next step."""
    STOP.stop(request)


def settings_text(job: Job, result) -> str:
    if job.sampler is None:
        sampler = "one-shot model"
    elif not models.is_tuned(job.sampler) and schedulers.get_sampler(job.sampler).adaptive:  # the NFE says how many
        sampler = f"**{job.sampler}** (adaptive steps)"
    else:
        sampler = f"**{job.sampler}**, {job.steps} steps"
        if job.levels is not None:
            sampler += f" on σ levels {', '.join(f'{level:g}' for level in job.levels)}"
    if job.image is not None:
        sampler += f" · img2img from the image at strength {job.strength:g} ({job.steps_run} steps run)"
    return f"{sampler} · NFE {result.nfe} per image · {result.seconds:.2f} s · seed {job.seed}"


def make_handler(catalog: models.ModelCatalog):
    def generate(model, sampler, steps, noise, guidance_mode, guidance_scale, reference, class_name, seed,
                 random_seed, batch, resolution, backend, preview_every, image=None, strength=None, levels=None,
                 request: gr.Request = None, progress=gr.Progress()):  # noqa: B008  (gradio injects the bar)
        """Outputs: gallery (PNG paths), preview, info, files to download, the seed used."""
        if random_seed:
            seed = secrets.randbelow(MAX_RANDOM_SEED)
        job = parse_job(catalog, model, sampler, steps, noise, guidance_mode, guidance_scale, class_name, seed,
                        batch, resolution, backend, reference, image, strength, levels)
        every = number("preview every", preview_every, 0, MAX_STEPS, integer=True)
        for kind, *payload in stream(catalog, job, every, STOP.begin(request), progress):
            if kind == "preview":
                step, image = payload
                yield gr.update(), image, f"step {step + 1}/{job.steps_run} · x̂0 preview", gr.update(), job.seed
            elif kind == "stopped":
                yield gr.update(), gr.update(), f"stopped after step {payload[0]} of {job.steps_run}", gr.update(), \
                    job.seed
            else:
                result = payload[0]
                folder = output_dir()
                settings = {**job.settings(), "nfe": result.nfe}
                paths = [str(save_png(image, folder / f"{job.seed}-{i}.png", {**settings, "index": i}))
                         for i, image in enumerate(result.images)]
                grid = tile(result.images)
                grid_path = str(save_png(grid, folder / f"{job.seed}-grid.png", settings))
                yield paths, grid, settings_text(job, result), [grid_path, *paths], job.seed

    return generate


def model_updates(catalog: models.ModelCatalog, name, steps=models.DEFAULT_STEPS):
    """Widget updates for a newly chosen model: only what it can use is shown, and the steps slider is set for
    its default sampler here, in the same response (a chained sampler event could overwrite a steps value typed
    in the meantime): to the model's recommended steps if it records them (``models.default_steps``), else it
    keeps ``steps``."""
    loaded = catalog.load(name)
    steps = models.default_steps(loaded) or steps
    pipe = loaded.pipe
    offered = models.samplers(loaded)
    sampler = models.default_sampler(offered)
    classes = models.class_choices(pipe)
    modes = models.guidance_modes(pipe)
    iterative = loaded.scheduler_config is not None  # a GAN or VAE samples in one evaluation: no sampler, no steps
    return (gr.update(choices=offered, value=sampler, visible=iterative),
            {**steps_update(catalog, name, sampler, steps), "visible": iterative},
            noise_update(sampler),
            gr.update(choices=modes, value=modes[-1] if len(modes) > 1 else modes[0]),
            gr.update(choices=classes, value=classes[0]),
            gr.update(choices=models.attention_backends(pipe), value=models.DEFAULT_BACKEND),
            models.describe(loaded),
            gr.update(visible=iterative))


def noise_settings(sampler: str | None) -> dict:
    """The noise slider for ``sampler``, from its spec's noise knob: range, default, label; hidden without one."""
    knob = schedulers.get_sampler(sampler).noise_knob if sampler and not models.is_tuned(sampler) else None
    if knob is None:
        return {"visible": False, "label": NOISE_FIELD}
    return {"visible": True, "label": knob.label, "minimum": knob.low, "maximum": knob.high, "value": knob.default}


def noise_update(sampler):
    return gr.update(**noise_settings(sampler))


def steps_update(catalog: models.ModelCatalog, name, sampler, steps):
    """The steps slider for ``sampler`` on model ``name``: it starts at the fewest steps the sampler's spec allows
    (``min_steps``, from its ``min_nfe``) and a value below that rises to it; a one- or few-step sampler (its
    spec's ``opening_steps``: 1 for mean-flow, 2 for consistency) moves it to its own count; a tuned sampler shows
    the steps it was tuned for."""
    if not sampler:
        return gr.update()
    loaded = catalog.load(name)
    if models.is_tuned(sampler):
        return gr.update(minimum=1, value=models.tuned_scheduler(loaded, sampler)[1])
    spec = schedulers.get_sampler(sampler)
    least = spec.min_steps(loaded.scheduler_config) or 1
    return gr.update(minimum=least, value=spec.opening_steps or max(int(steps), least))


def build(catalog: models.ModelCatalog) -> dict:
    """The Generate tab's widgets; the Compare tab takes them as its base settings."""
    default = catalog.default()
    loaded = catalog.load(default)
    offered = models.samplers(loaded)
    classes = models.class_choices(loaded.pipe)
    modes = models.guidance_modes(loaded.pipe)
    w = {}
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Row():
                w["model"] = gr.Dropdown(list(catalog.listed()), value=default, label="model", allow_custom_value=True,
                                         info="a listed model, a path under the model folders, or a hub id",
                                         scale=4)
                w["refresh"] = gr.Button("↻", scale=0, min_width=40)
            w["about"] = gr.Markdown(models.describe(loaded))
            # the model-dependent choices take any value (an API call may name another model's): parse_job checks
            w["sampler"] = gr.Dropdown(offered, value=models.default_sampler(offered), label="sampler",
                                       info="only the samplers that can drive this model", allow_custom_value=True)
            w["steps"] = gr.Slider(1, MAX_STEPS, value=models.DEFAULT_STEPS, step=1, label="steps")
            w["levels"] = gr.Textbox(label=f"{LEVELS_FIELD} (optional; sets the steps)", max_lines=1,
                                     placeholder="e.g. 80, 2: the noise levels to visit, descending",
                                     info="a few-step model's intermediate levels, or any fixed-grid solver's σ grid "
                                          "(a flow model's σ = t / (1 − t)); empty: the sampler's own grid")
            w["noise"] = gr.Slider(step=0.05, **noise_settings(models.default_sampler(offered)))
            with gr.Row():
                w["guidance_mode"] = gr.Dropdown(modes, value=modes[-1], label="guidance", allow_custom_value=True)
                w["guidance_scale"] = gr.Slider(0.0, 20.0, value=models.DEFAULT_GUIDANCE, step=0.5,
                                                     label="guidance scale")
            w["reference"] = gr.Image(label="reference image (similarity guidance)", type="pil", visible=False)
            w["class_name"] = gr.Dropdown(classes, value=classes[0], label="class", allow_custom_value=True)
            with gr.Accordion("img2img / SDEdit", open=False):
                w["image"] = gr.Image(label="start from this image (the model's size; empty: from noise)", type="pil")
                w["strength"] = gr.Slider(0.05, 1.0, value=IMG2IMG_STRENGTH, step=0.05, label="strength",
                                          info="how far the image is noised: the last steps × strength run; "
                                               "a stochastic sampler makes this SDEdit")
            with gr.Row():
                w["seed"] = gr.Number(value=0, precision=0, label="seed", minimum=0)
                w["random_seed"] = gr.Checkbox(value=False, label="random seed (shows the one used)")
            w["batch"] = gr.Slider(1, MAX_BATCH, value=16, step=1, label="batch size")
            with gr.Accordion("more", open=False):
                w["resolution"] = gr.Number(value=0, precision=0, label="resolution (0: as trained)", minimum=0)
                w["backend"] = gr.Dropdown(models.attention_backends(loaded.pipe), value=models.DEFAULT_BACKEND,
                                           label="attention backend", allow_custom_value=True)
                w["preview_every"] = gr.Slider(0, 50, value=5, step=1, label="live preview every N steps (0: off)")
            with gr.Row():
                w["run"] = gr.Button("Generate", variant="primary", elem_id="generate-run")
                w["stop"] = gr.Button("Stop", variant="stop")
        with gr.Column(scale=2):
            w["preview"] = gr.Image(label="live preview (x̂0) / grid", type="pil", format="png")
            w["info"] = gr.Markdown(elem_id="generate-info")
            w["gallery"] = gr.Gallery(label="samples", columns=8, height=300, format="png")
            w["files"] = gr.File(label="download (PNG with the settings in its metadata)", file_count="multiple")
    return w


def wire(catalog: models.ModelCatalog, w: dict) -> None:
    w["model"].change(lambda name, steps: model_updates(catalog, name, steps), [w["model"], w["steps"]],
                      [w["sampler"], w["steps"], w["noise"], w["guidance_mode"], w["class_name"], w["backend"],
                       w["about"], w["levels"]], api_name="select_model")
    w["refresh"].click(lambda: gr.update(choices=list(catalog.listed())), None, w["model"], api_name=False)
    # .input: the user's own choice only; a model change sets the sampler, noise and steps itself
    w["sampler"].input(lambda name, sampler, steps: (noise_update(sampler),
                                                     steps_update(catalog, name, sampler, steps)),
                       [w["model"], w["sampler"], w["steps"]], [w["noise"], w["steps"]], api_name=False)
    w["guidance_mode"].change(lambda mode: gr.update(visible=mode in models.NEEDS_REFERENCE), w["guidance_mode"],
                              w["reference"], api_name=False)
    inputs = [w[k] for k in INPUTS]
    w["run"].click(make_handler(catalog), inputs, [w["gallery"], w["preview"], w["info"], w["files"], w["seed"]],
                   api_name="generate", concurrency_id="compute")
    w["stop"].click(stop, None, None, queue=False, api_name="stop")


INPUTS = ("model", "sampler", "steps", "noise", "guidance_mode", "guidance_scale", "reference", "class_name", "seed",
          "random_seed", "batch", "resolution", "backend", "preview_every", "image", "strength", "levels")
