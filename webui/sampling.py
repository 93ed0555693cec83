"""One generation request: checked settings (``Job``), the sampling run, Stop, and images with their settings.

``parse_job`` turns the raw widget values into a ``Job`` or raises ``gr.Error`` naming the bad field; the
Generate, Compare and Evaluate tabs all go through it, so every check holds everywhere. The sampler's checks
(whether it fits the model, its knob's range, the step limit) are its spec's, their ``ValueError`` shown as the
message. ``run_job`` samples under the model's lock, calling ``on_step(i, x̂0)`` after each step (live previews,
progress, Stop).
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import torch
from diffusers.utils import make_image_grid

import schedulers
from pipelines.diffusion import MAX_GUIDANCE, check_noises_images, image_tensor, img2img_steps
from schedulers.registry import MAX_STEPS
from schedulers.sigma_base import SigmaSpaceScheduler
from webui import models
from webui.validation import batch_memory, choice, number, parse_values, user_error

NOISE_FIELD = "η / noise level"  # the one widget (and Compare axis) for whichever noise knob the sampler has
LEVELS_FIELD = "σ levels"  # a chosen σ grid: a few-step model's intermediate levels, or any fixed-grid solver's grid
MAX_LEVELS = 100
MAX_BATCH = 64
MAX_SEED = 2**63 - 1
MAX_RESOLUTION = 512
GRID_SIDE = 512  # pixels: small images are scaled up (nearest neighbour) so a grid is readable


class Stopped(Exception):
    """Raised from the step callback when the user pressed Stop."""


@dataclass(frozen=True)
class Job:
    model: str
    sampler: str | None
    steps: int
    noise: float | None  # the value of the sampler's noise knob (η or the noise level λ), when it has one
    guidance_mode: str
    guidance_scale: float
    class_name: str
    seed: int
    batch: int
    resolution: int  # 0: the size the model was trained at
    backend: str
    reference: PIL.Image.Image | None = field(default=None, compare=False)
    image: PIL.Image.Image | None = field(default=None, compare=False)  # img2img's input (SDEdit)
    strength: float | None = None  # img2img's strength, with an image only
    levels: tuple[float, ...] | None = None  # a chosen σ grid (descending), which sets the steps; None: the sampler's

    def settings(self) -> dict:
        """What reproduces the images (PNG metadata, CSV rows), besides the uploaded images themselves."""
        return {k: v for k, v in asdict(self).items() if k not in ("reference", "image")}

    @property
    def steps_run(self) -> int:
        """The steps that run: all of them, or img2img's last ⌊steps·strength⌋."""
        return self.steps if self.image is None else img2img_steps(self.steps, self.strength)


@dataclass
class Result:
    images: list[PIL.Image.Image]
    nfe: int
    seconds: float


def parse_levels(text, spec: schedulers.SamplerSpec, scheduler_config: dict) -> tuple[tuple[float, ...], int] | None:
    """The σ levels field (``80, 2``: descending noise levels, a final 0 optional) as (levels, the steps they make)
    for ``spec`` on a model with ``scheduler_config``; None when it is empty. The levels become the scheduler's
    ``tuned_sigmas``: the intermediate levels of multistep consistency sampling or of MeanFlow's jumps (for a flow
    model σ = t / (1 − t)), or the grid of any fixed-grid σ-space solver."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not issubclass(spec.scheduler_class, SigmaSpaceScheduler) or spec.adaptive:
        raise gr.Error(f"sampler {spec.name} takes no chosen {LEVELS_FIELD} (only the σ-space samplers with a fixed "
                       f"grid do); clear the field")
    values = parse_values(LEVELS_FIELD, text, float, 0, math.inf, limit=MAX_LEVELS)
    scheduler = user_error(lambda: spec.create(scheduler_config, tuned_sigmas=values))
    high = scheduler.sigma_range()[1]
    if values[0] > high * (1 + 1e-6):
        raise gr.Error(f"{LEVELS_FIELD}: {values[0]:g} lies above the model's largest noise level σ_max = {high:g}")
    if len(scheduler.timesteps) < spec.min_nfe:  # the grid laid out at construction is the chosen one
        raise gr.Error(f"{LEVELS_FIELD}: {spec.name} needs at least {spec.min_nfe} evaluations, these levels give "
                       f"{len(scheduler.timesteps)}")
    return tuple(values), scheduler.default_inference_steps()


def parse_job(catalog: models.ModelCatalog, model, sampler, steps, noise, guidance_mode, guidance_scale, class_name,
              seed, batch, resolution, backend, reference=None, image=None, strength=None, levels=None) -> Job:
    """Check every setting against the model; ``gr.Error`` names the first bad one. With an ``image``, img2img
    from it at ``strength`` (the pipeline's checks: the sampler can noise an image, the strength, the size). With
    ``levels`` (the σ levels field), the sampler runs that grid, and its length sets the steps."""
    loaded = catalog.load(model)
    pipe = loaded.pipe
    if loaded.scheduler_config is not None:
        if not isinstance(sampler, str):
            raise gr.Error(f"unknown sampler {sampler!r}")
        if models.is_tuned(sampler):  # tuned for these weights (checked), at the steps it runs, with no knob
            _, steps, entry = models.tuned_scheduler(loaded, sampler)
            spec, knob = schedulers.get_sampler(entry), None
            if isinstance(levels, str) and levels.strip():
                raise gr.Error(f"{sampler} runs the grid it was tuned on; clear the {LEVELS_FIELD}")
            levels = None
        else:
            spec = user_error(schedulers.get_sampler, sampler)
            user_error(spec.check_fits, models.process(pipe), loaded.scheduler_config, model)
            knob = spec.noise_knob
            levels = parse_levels(levels, spec, loaded.scheduler_config)
            if levels is None:
                steps = number("steps", steps, 1, MAX_STEPS, integer=True)
            else:
                levels, steps = levels
        if knob is None:
            noise = None
        elif noise is None:  # left unset (the Evaluate tab): the sampler's own default
            noise = knob.default
        else:
            noise = user_error(knob.check, noise, NOISE_FIELD)
    else:
        sampler, steps, noise, levels = None, 1, None, None  # one network evaluation: a GAN or a VAE decoder
    guidance_mode = choice("guidance mode", guidance_mode, models.guidance_modes(pipe))
    guidance_scale = number("guidance scale", guidance_scale, -MAX_GUIDANCE, MAX_GUIDANCE)
    class_name = choice("class", class_name, models.class_choices(pipe))
    if guidance_mode in models.CLASS_GUIDED and class_name == models.UNCONDITIONAL:
        raise gr.Error(f"{guidance_mode} guidance steers towards a class: choose a class or guidance mode 'none'")
    if guidance_mode in models.NEEDS_REFERENCE and reference is None:
        raise gr.Error(f"{guidance_mode} guidance needs a reference image")
    seed = number("seed", seed, 0, MAX_SEED, integer=True)
    batch = number("batch size", batch, 1, MAX_BATCH, integer=True)
    resolution = number("resolution", 0 if resolution is None else resolution, 0, MAX_RESOLUTION, integer=True)
    channels, height, width = models.sample_shape(pipe)
    if resolution and resolution != height:
        multiple = models.size_multiple(pipe)
        if multiple is None:
            raise gr.Error(f"{model} samples only at its trained size {height}×{width} (resolution 0)")
        if resolution % multiple:
            raise gr.Error(f"resolution must be a multiple of {multiple} for this UNet, got {resolution}")
        height = width = resolution
    batch_memory(batch, channels, height, width)
    backend = choice("attention backend", backend, models.attention_backends(pipe))
    if isinstance(reference, np.ndarray):
        reference = PIL.Image.fromarray(reference)
    if image is None:
        strength = None  # the slider only matters with an image
    else:
        image = PIL.Image.fromarray(image) if isinstance(image, np.ndarray) else image
        if not isinstance(image, PIL.Image.Image):
            raise gr.Error(f"image must be an uploaded picture, got {type(image).__name__}")
        accepted = models.call_parameters(pipe)
        if sampler is None or (accepted is not None and "image" not in accepted):
            raise gr.Error(f"{model} cannot start from an image (no img2img); clear the image")
        user_error(check_noises_images, spec.scheduler_class)
        user_error(img2img_steps, steps, strength)
        strength = float(strength)
        user_error(image_tensor, "image", image, (channels, height, width))
    return Job(model, sampler, steps, noise, guidance_mode, guidance_scale, class_name, seed, batch, resolution,
               backend, reference, image, strength, levels)


def _call_arguments(job: Job, loaded: models.LoadedModel, on_step, step_knobs: dict) -> dict:
    pipe = loaded.pipe
    choices = models.class_choices(pipe)
    if job.class_name == models.UNCONDITIONAL:
        labels = None
    elif job.class_name == models.EVERY_CLASS:
        labels = torch.arange(job.batch) % models.num_classes(pipe)
    else:
        labels = choices.index(job.class_name) - 2
    accepted = models.call_parameters(pipe)
    kwargs = {"batch_size": job.batch, "num_inference_steps": job.steps, "class_labels": labels,
              "generator": torch.Generator().manual_seed(job.seed), "output_type": "pil", **step_knobs}
    if job.resolution:
        kwargs.update(height=job.resolution, width=job.resolution)
    if accepted is None or "guidance_mode" in accepted:
        kwargs.update(guidance_mode=job.guidance_mode,
                      guidance_scale=1.0 if job.guidance_mode == "none" else job.guidance_scale)
        if job.guidance_mode in models.NEEDS_REFERENCE:
            kwargs["reference_image"] = job.reference
    else:  # a pipeline with classifier-free guidance only, through guidance_scale (1: plain conditional)
        kwargs["guidance_scale"] = job.guidance_scale if job.guidance_mode == "classifier-free" else 1.0
    if job.image is not None:
        kwargs.update(image=job.image, strength=job.strength)

    def callback(pipeline, i, t, tensors):
        on_step(i, tensors.get("pred_original_sample"))
        return {}

    kwargs["callback_on_step_end"] = callback if on_step else None
    return kwargs if accepted is None else {k: v for k, v in kwargs.items() if k in accepted}


def run_job(catalog: models.ModelCatalog, job: Job, on_step=None) -> Result:
    """Sample ``job``. ``on_step(i, x̂0)`` runs after every step; raising ``Stopped`` from it ends the run."""
    loaded = catalog.load(job.model)
    pipe = loaded.pipe
    with loaded.lock:
        try:
            step_knobs = {}
            if models.is_tuned(job.sampler):
                pipe.scheduler = models.tuned_scheduler(loaded, job.sampler)[0]
            elif job.sampler is not None:
                knob = models.noise_knob(job.sampler)
                step_knobs = pipe.set_sampler(job.sampler, {} if knob is None else {knob: job.noise},
                                              loaded.scheduler_config)
                if job.levels is not None:
                    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                                      tuned_sigmas=list(job.levels))
            models.set_attention_backend(pipe, job.backend)
            start = time.perf_counter()
            out = pipe(**_call_arguments(job, loaded, on_step, step_knobs))
            seconds = time.perf_counter() - start
        except (Stopped, gr.Error):
            raise
        except (ValueError, ImportError) as error:
            raise gr.Error(f"{job.model}: {error}") from None
        except Exception as error:  # a failed request reports itself; the app and other requests go on
            raise gr.Error(f"generation failed ({type(error).__name__}): {error}") from None
    images = out.images if hasattr(out, "images") else out[0]
    nfe = getattr(out, "nfe", None) or (1 if job.sampler is None else math.nan)
    return Result(list(images), nfe, seconds)


def tensor_grid(x0: torch.Tensor) -> PIL.Image.Image:
    """A preview grid of x̂0 (B, C, H, W) in the data range [-1, 1]."""
    pixels = ((x0.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = [PIL.Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
    return tile(images)


def tile(images: list[PIL.Image.Image], side: int = GRID_SIDE) -> PIL.Image.Image:
    """Images in a near-square grid, scaled up by a whole factor towards ``side`` pixels."""
    rows = max(1, int(math.sqrt(len(images))))
    while len(images) % rows:
        rows -= 1
    grid = make_image_grid(images, rows=rows, cols=len(images) // rows)
    scale = max(1, side // max(grid.size))
    return grid.resize((grid.width * scale, grid.height * scale), resample=PIL.Image.NEAREST)


def save_png(image: PIL.Image.Image, path: Path, settings: dict) -> Path:
    """``image`` as a PNG carrying ``settings`` as JSON in its ``parameters`` text chunk (AUTOMATIC1111's key)."""
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(settings))
    image.save(path, pnginfo=info)
    return path


def output_dir() -> Path:
    """A fresh directory for one request's files (under the system temp dir, which gradio serves)."""
    return Path(tempfile.mkdtemp(prefix="workbench-"))


class StopFlags:
    """One Stop flag per browser session (``gr.Request.session_hash``); API calls without one share ``local``."""

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(request) -> str:
        return getattr(request, "session_hash", None) or "local"

    def begin(self, request) -> threading.Event:
        with self._lock:
            flag = self._flags[self.key(request)] = threading.Event()
        return flag

    def stop(self, request) -> None:
        with self._lock:
            flag = self._flags.get(self.key(request))
        if flag is not None:
            flag.set()


STOP = StopFlags()
