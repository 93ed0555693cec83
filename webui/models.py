"""The models the app offers, and what each one can do, read from the pipeline itself.

``ModelCatalog`` lists every pipeline directory (one holding a ``model_index.json``) under its roots, rescanning
on every call so a model exported by a training run appears without restarting the app. A model can also be
typed in: a path inside the roots, or a hub id. Loaded pipelines are cached (least recently used first out);
each carries a lock, because its network (attention processors) and scheduler are shared state.

Everything the UI offers for a model is discovered, never listed by hand: samplers from the scheduler registry
(``schedulers.samplers_for`` the process the model records) and the model's own tuned ones
(``MODEL_DIR/tuned/``, ``schedulers.tuning``; offered as ``tuned:NAME``), guidance modes from
``pipe.guidance_modes``, the η / noise-level knob from the sampler's spec (its range, default and label), the
keyword arguments from the pipeline's ``__call__``.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from diffusers import DiffusionPipeline

import schedulers
from pipelines import loading
from schedulers.tuning import load_tuned, tuned_schedulers
from webui.validation import inside

DEFAULT_MODEL = "mnist-flow"  # the best shipped model (checkpoints/mnist-flow/README.md)
# The Generate tab's starting steps and guidance scale: on mnist-flow, dpmpp-2m at 20 steps and guidance 1 gives the
# lowest feature-FID (1.08) at the real digits' judge accuracy (97.7%, real 98.6%) for one network call per step;
# guidance 1.5 / 2 / 3 reach 100% but at feature-FID 4.8 / 8.1 / 11.5 (300 samples; checkpoints/mnist-flow/README.md)
DEFAULT_STEPS, DEFAULT_GUIDANCE = 20, 1.0
UNCONDITIONAL = "none (unconditional)"
EVERY_CLASS = "every class in turn"
DEFAULT_BACKEND = "default"
CLASS_GUIDED = ("classifier-free", "classifier")  # guidance modes that steer towards a class
NEEDS_REFERENCE = ("similarity",)  # guidance modes that steer towards a reference image


@dataclass
class LoadedModel:
    """A cached pipeline, the lock that serialises its use, and its scheduler config as shipped (requests swap
    the scheduler; samplers are always built from the original config, e.g. Analytic-DPM's table)."""

    key: str
    pipe: DiffusionPipeline
    lock: threading.Lock
    scheduler_config: dict | None


class ModelCatalog:
    def __init__(self, roots: list[Path], base: Path, cache_size: int = 4):
        self.roots = list(dict.fromkeys(Path(root).resolve() for root in roots))
        self.base = base  # relative typed paths are read from here (the repository)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def listed(self) -> dict[str, Path]:
        """Pipeline directories under the roots by display name (``root/name`` when two roots share a name)."""
        found: dict[str, Path] = {}
        for root in self.roots:
            for index in sorted(root.glob("*/model_index.json")):
                name = index.parent.name
                found[f"{root.name}/{name}" if name in found else name] = index.parent
        return found

    def default(self) -> str:
        names = list(self.listed())
        if not names:
            raise gr.Error("no pipeline directories found; train one (Train tab) or start with --models DIR")
        return DEFAULT_MODEL if DEFAULT_MODEL in names else names[0]

    def resolve(self, text) -> str:
        """A listed name, a typed path inside the roots, or a hub id → a directory path or the hub id."""
        if not isinstance(text, str) or not text.strip():
            raise gr.Error("choose a model")
        text = text.strip()
        listed = self.listed()
        if text in listed:
            return str(listed[text])
        local = Path(text).expanduser()
        local = local if local.is_absolute() else self.base / local
        # "checkpoints/typo" is a path that does not exist, not a hub id to download
        looks_local = local.exists() or (self.base / text.split("/")[0]).exists()
        if looks_local or not loading.HUB_ID.match(text):
            if not local.exists() and "/" not in text and "\\" not in text:
                raise gr.Error(f"unknown model {text!r}; listed: {', '.join(listed)}")
            return str(inside("model path", str(local), self.roots))
        return text

    def load(self, text) -> LoadedModel:
        key = self.resolve(text)
        index = Path(key) / "model_index.json"
        stamp = index.stat().st_mtime_ns if index.exists() else None  # a re-exported model is reloaded
        with self._lock:
            if (key, stamp) in self._cache:
                self._cache.move_to_end((key, stamp))
                return self._cache[(key, stamp)]
        try:
            pipe = loading.load_pipeline(key)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        pipe.set_progress_bar_config(disable=True)
        scheduler = getattr(pipe, "scheduler", None)
        loaded = LoadedModel(key, pipe, threading.Lock(), None if scheduler is None else dict(scheduler.config))
        with self._lock:
            self._cache[(key, stamp)] = loaded
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return loaded


# ------------------------------------------------------------------------------------------ what a model offers


def model_info(pipe) -> dict:
    return dict(getattr(pipe.config, "model_info", None) or {})


def process(pipe) -> str:
    return model_info(pipe).get("process", "vp")


def samplers(loaded: LoadedModel) -> list[str]:
    """The registered samplers that can drive this model, then its tuned ones; none for a one-shot model (GAN,
    VAE)."""
    if loaded.scheduler_config is None:
        return []
    return [*schedulers.samplers_for(process(loaded.pipe), loaded.scheduler_config), *tuned_choices(loaded)]


TUNED = "tuned:"  # a tuned scheduler's choice: tuned:dpmpp-2m-nfe5 is MODEL_DIR/tuned/dpmpp-2m-nfe5
# the first the model offers is the default: a MeanFlow model's own jump (offered to those only), DDIM on VP
# models, else 2M; a consistency model offers its sampler alone
DEFAULT_SAMPLERS = ("mean-flow", "ddim", "dpmpp-2m")


def is_tuned(sampler) -> bool:
    return isinstance(sampler, str) and sampler.startswith(TUNED)


def tuned_choices(loaded: LoadedModel) -> list[str]:
    """``tuned:NAME`` for each scheduler tuned for this model (a local pipeline directory)."""
    folder = Path(loaded.key)
    return [TUNED + name for name in tuned_schedulers(folder)] if folder.is_dir() else []


def tuned_scheduler(loaded: LoadedModel, sampler: str):
    """(scheduler, steps, registry entry) of the tuned choice ``sampler``; gr.Error when it is gone or was tuned
    for other weights."""
    name = sampler.removeprefix(TUNED)
    try:
        scheduler, steps = load_tuned(loaded.key, name)
    except (ValueError, OSError) as error:
        raise gr.Error(str(error)) from None
    return scheduler, steps, tuned_schedulers(loaded.key)[name]["entry"]


def default_sampler(choices: list[str]) -> str | None:
    return next((name for name in DEFAULT_SAMPLERS if name in choices), choices[0] if choices else None)


def num_classes(pipe) -> int:
    return int(getattr(pipe, "num_classes", None) or model_info(pipe).get("num_classes") or 0)


def class_choices(pipe) -> list[str]:
    count = num_classes(pipe)
    names = model_info(pipe).get("class_names") or [str(i) for i in range(count)]
    return [EVERY_CLASS, UNCONDITIONAL, *names] if count else [UNCONDITIONAL]


def guidance_modes(pipe) -> list[str]:
    """The pipeline's own list when it has one; otherwise what ``guidance_scale`` gives: classifier-free guidance
    for a class-conditional model."""
    modes = getattr(pipe, "guidance_modes", None)
    if modes:
        return list(modes)
    return ["none", "classifier-free"] if num_classes(pipe) else ["none"]


def noise_knob(sampler: str | None) -> str | None:
    """The name of the stochasticity knob the sampler's spec declares: ``eta`` (a ``step`` argument, DDIM family),
    ``noise_level`` (a config value, the reverse-SDE family: 0 is the ODE, 1 the reverse SDE), or None."""
    knob = None if sampler is None or is_tuned(sampler) else schedulers.get_sampler(sampler).noise_knob
    return None if knob is None else knob.name


def default_steps(loaded: LoadedModel) -> int | None:
    """The step count a model recommends for its default sampler, ``model_info["default_steps"]`` (e.g. 10 for
    ``mnist-udm-blur``, whose cold-diffusion rule loses accuracy with more steps: its README's sweep); None when the
    model records none, and the steps slider keeps its value."""
    steps = model_info(loaded.pipe).get("default_steps")
    return None if steps is None else int(steps)


def sample_shape(pipe) -> tuple[int, int, int]:
    if hasattr(pipe, "sample_shape"):
        return tuple(pipe.sample_shape)
    info = model_info(pipe)
    size = int(info.get("image_size", 32))
    return int(info.get("channels", 1)), size, size


def size_multiple(pipe) -> int | None:
    """What a resolution must divide by (a UNet halves it at each level but the last); None: fixed size."""
    unet = getattr(pipe, "unet", None)
    blocks = getattr(getattr(unet, "config", None), "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else None


def attention_backends(pipe) -> list[str]:
    if not hasattr(pipe, "set_attention_backend"):
        return [DEFAULT_BACKEND]
    from kernels.processor import ATTENTION_BACKENDS

    return [DEFAULT_BACKEND, *ATTENTION_BACKENDS]


def set_attention_backend(pipe, backend: str) -> None:
    """Put every attention block on ``backend``; ``default`` restores diffusers' own processor."""
    if backend != DEFAULT_BACKEND:
        pipe.set_attention_backend(backend)
        return
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0())


def call_parameters(pipe) -> set[str] | None:
    """The keyword arguments the pipeline's ``__call__`` accepts (None: any, it takes ``**kwargs``)."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def describe(loaded: LoadedModel) -> str:
    """One Markdown line about the model: how it was trained."""
    info = model_info(loaded.pipe)
    channels, height, width = sample_shape(loaded.pipe)
    parts = [f"**{info.get('process', 'vp')}**", info.get("objective"), info.get("dataset"),
             f"{channels}×{height}×{width}", f"{num_classes(loaded.pipe)} classes" if num_classes(loaded.pipe) else
             "unconditional", f"{info['steps']} training steps" if "steps" in info else None]
    command = info.get("training_command") or info.get("command")
    return " · ".join(str(p) for p in parts if p) + (f"\n\n`{command}`" if command else "")
