"""One pipeline for image diffusion models: unconditional or class-conditional, any scheduler, any guidance.

Classifier-free guidance (Ho & Salimans 2022; Su part 9) mixes the conditional and unconditional outputs,

    ε̃ = ε_θ(x_t, ∅) + w (ε_θ(x_t, y) − ε_θ(x_t, ∅)),

w = 1 plain conditional sampling, w = 0 unconditional. Every parameterization (ε, x0, v, score, velocity)
is affine in ε with the same coefficients at fixed (x_t, t), so mixing raw model outputs is the same as
mixing ε whatever the model predicts. The unconditional output is the model's answer for the null class
id ``num_class_embeds − 1`` that label dropout trained it on. Classifier, clean-classifier and similarity
guidance rewrite the output through ε̃ = ε − β̄ γ ∇ log p(y | x_t) (``guidance.py``).

Image-to-image (``image``, ``strength`` s ∈ (0, 1]) is diffusers' ``StableDiffusionImg2ImgPipeline`` recipe: of n
steps run the last ⌊n·s⌋, starting from the input noised to the first of them, x_t = ``scheduler.add_noise(x0, ε,
t)``. With a stochastic sampler this is SDEdit (Meng et al. 2022, "SDEdit: guided image synthesis and editing
with stochastic differential equations"): the noise washes out the input's detail below the noise level at t, and
the reverse SDE fills it back in from the model, so small s keeps the image and s = 1 is plain generation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from schedulers.process import PREDICTION_TYPES
from schedulers.processes import sigma_process
from schedulers.registry import MAX_STEPS, check_range, get_sampler, step_knobs

from .guidance import CLASSIFIER_MODES, Guidance, classifier_guided_output
from .loading import ComponentImportingPipeline

OUTPUT_TYPES = ("pil", "np", "pt", "raw")
IMG2IMG_STRENGTH = 0.8  # the default strength with an image (diffusers' StableDiffusionImg2ImgPipeline's)
MAX_GUIDANCE = 100.0  # |guidance_scale| of one request; the UI reads it


def check_noises_images(scheduler) -> None:
    """ValueError unless ``scheduler`` (a scheduler or its class) can start from a noised image (img2img, SDEdit).

    That takes diffusers' ``add_noise`` (x_t from x0 and Gaussian noise at a timestep of the grid) and a
    fixed-step loop that can start partway down its grid. A scheduler that draws its own non-Gaussian prior
    (``sample_prior``: PFGM++'s heavy tails, UDM's degraded image) or chooses its own steps (``solve``) has neither.
    """
    name = scheduler.__name__ if isinstance(scheduler, type) else type(scheduler).__name__
    if hasattr(scheduler, "solve"):
        raise ValueError(f"{name} chooses its own steps (solve()), so it cannot start partway from an image; "
                         "use a fixed-step sampler for img2img")
    if hasattr(scheduler, "sample_prior"):
        raise ValueError(f"{name} draws its own prior (sample_prior), not Gaussian noise, so it cannot noise an "
                         "image for img2img")
    if not hasattr(scheduler, "add_noise"):
        raise ValueError(f"{name} has no add_noise, so it cannot noise an image for img2img")


def image_tensor(name: str, image, shape: tuple[int, int, int], batch_size: int | None = None):
    """``image`` (PIL, converted to the model's channels, or a (C, H, W) / (B, C, H, W) tensor in [-1, 1]) as a
    float (B, C, H, W) tensor; ValueError naming ``name`` unless its (C, H, W) is ``shape`` and, when
    ``batch_size`` is given, its B is 1 or ``batch_size``."""
    if isinstance(image, PIL.Image.Image):
        if shape[0] not in (1, 3):
            raise ValueError(f"{name}: a PIL image has 1 or 3 channels; this model takes {shape[0]}, so pass a tensor")
        image = image.convert("L" if shape[0] == 1 else "RGB")
        array = np.asarray(image, dtype=np.float32).reshape(image.height, image.width, shape[0])
        image = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1
    try:
        tensor = torch.as_tensor(image, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a PIL image or a tensor in [-1, 1], got {type(image).__name__}") from None
    tensor = tensor[None] if tensor.ndim == 3 else tensor
    batch_ok = batch_size is None or len(tensor) in (1, batch_size)
    if tensor.ndim != 4 or tuple(tensor.shape[1:]) != tuple(shape) or not batch_ok:
        batches = "" if batch_size is None else f" in a batch of 1 or {batch_size}"
        raise ValueError(f"{name} must be (C, H, W) = {tuple(shape)} like the samples{batches}, "
                         f"got {tuple(tensor.shape)}")
    return tensor


def img2img_steps(num_inference_steps: int, strength) -> int:
    """diffusers' ``get_timesteps``: of ``num_inference_steps`` steps img2img runs the last
    ⌊steps·strength⌋. ValueError for a strength outside (0, 1] or one that leaves no step."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    if init_timestep < 1:
        raise ValueError(f"strength {strength} of {num_inference_steps} steps runs no step; raise the strength "
                         "or the steps")
    return init_timestep


def _per_image_labels(class_labels, batch_size: int) -> torch.Tensor:
    """One label for all images, or one per image, as a (batch_size,) long tensor."""
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    labels = labels.expand(batch_size) if len(labels) == 1 else labels
    if len(labels) != batch_size:
        raise ValueError(f"got {len(labels)} class labels for batch_size {batch_size}")
    return labels


class GenerationOutput(BaseOutput):
    """``images``: PIL list, (B, H, W, C) array or (B, C, H, W) tensor in [0, 1], or the raw final sample;
    ``nfe``: network evaluations per image (CFG's unconditional pass included)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: int


class DiffusionImagePipeline(ComponentImportingPipeline):
    """Sample images from a ``UNet2DModel``-like model with any diffusers-compatible scheduler.

    ``model_info`` records how the model was trained (forward process, prediction type, dataset, classes,
    image size, command); it is saved in ``model_index.json`` so tools offer only the samplers that fit.
    """

    model_cpu_offload_seq = "unet"
    _optional_components = ["classifier"]

    def __init__(self, unet, scheduler, model_info: dict | None = None, classifier=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)
        self.register_to_config(model_info=dict(model_info or {}))
        self._image_processor = VaeImageProcessor(do_resize=False)

    # ---------------------------------------------------------------- what the model is

    @property
    def null_class_id(self) -> int | None:
        """The class id that means "no class" (classifier-free guidance's ∅), or None if unconditional."""
        n = getattr(self.unet.config, "num_class_embeds", None)
        return None if n is None else n - 1

    @property
    def num_classes(self) -> int:
        return 0 if self.null_class_id is None else self.null_class_id

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return self.unet.config.in_channels, h, w

    @property
    def guidance_modes(self) -> list[str]:
        """The ``guidance_mode`` values this pipeline can run with its own components ("classifier-x0" also
        works when a clean classifier is passed to the call)."""
        modes = ["none"]
        if self.null_class_id is not None:
            modes.append("classifier-free")
        if (self.classifier is not None and hasattr(self.classifier, "features")
                and self.scheduler.config.prediction_type in PREDICTION_TYPES):
            modes += ["classifier", "similarity"]
        return modes

    def set_attention_backend(self, backend: str, entropy_invariant_n0: int | None = None) -> int:
        """Run the model's attention on ``backend`` ("triton", "sdpa", "xformers", "math"), optionally with the
        entropy-invariant scale log_{n0}(n)/sqrt(d) (``kernels/processor.py``); returns the blocks switched."""
        from kernels.processor import set_attention_backend  # imports triton: only when asked for

        return set_attention_backend(self.unet, backend, entropy_invariant_n0)

    # ---------------------------------------------------------------- the guided model call

    def _network(self, timestep, labels: torch.Tensor | None):
        """x ↦ the model's output at ``timestep`` for ``labels`` (None: an unconditional model)."""
        inputs = self.model_inputs(timestep)
        if labels is None:
            return lambda x: self.unet(x, timestep, **inputs).sample
        return lambda x: self.unet(x, timestep, class_labels=labels, **inputs).sample

    def model_inputs(self, timestep) -> dict[str, Any]:
        """The network's inputs besides (x, t, class) that the scheduler asks for at ``timestep`` (MeanFlow: the
        interval t − r to the next level, ``schedulers.mean_flow``); none for every other sampler."""
        inputs = getattr(self.scheduler, "model_inputs", None)
        return {} if inputs is None else inputs(timestep)

    def model_adapter(self):
        """How the model's inputs relate to σ-space (its ``schedulers.processes`` σ-space map), from its scheduler."""
        return sigma_process(self.scheduler.config)

    def guided_model_output(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None,
                            guidance: Guidance | float) -> tuple[torch.Tensor, int]:
        """The model output to step with, and how many network evaluations per image it cost.

        ``class_labels``: the requested classes (None for an unconditional request); ``guidance``: a ``Guidance``
        or, for classifier-free guidance, just its scale.
        """
        if not isinstance(guidance, Guidance):
            guidance = Guidance("classifier-free" if class_labels is not None else "none", float(guidance))
        null = None if self.null_class_id is None else torch.full((len(sample),), self.null_class_id,
                                                                   device=sample.device, dtype=torch.long)
        needs_adapter = guidance.mode in CLASSIFIER_MODES or guidance.interval is not None
        if needs_adapter and guidance.model_adapter is None:
            guidance.model_adapter = self.model_adapter()
        active = guidance.mode != "none" and guidance.active_at(guidance.model_adapter, timestep)
        if guidance.mode in CLASSIFIER_MODES:  # the classifier holds the condition; the model runs unconditioned
            if not active:
                return self._network(timestep, null)(sample), 1
            output = classifier_guided_output(self._network(timestep, null), self.scheduler.config.prediction_type,
                                              guidance, sample, timestep, class_labels)
            return output, 1
        conditioned = class_labels if class_labels is not None and self.null_class_id is not None else null
        if not active or guidance.scale == 1.0 or conditioned is None:
            return self._network(timestep, conditioned)(sample), 1
        if guidance.scale == 0.0:
            return self._network(timestep, null)(sample), 1
        both = self._network(timestep, torch.cat([conditioned, null]))(torch.cat([sample, sample]))
        cond, uncond = both.chunk(2)
        return uncond + guidance.scale * (cond - uncond), 2

    def _class_labels(self, class_labels, batch_size: int) -> torch.Tensor | None:
        if self.null_class_id is None:
            if class_labels is not None:
                raise ValueError("this model is unconditional: it takes no class_labels")
            return None
        if class_labels is None:  # unconditional sampling of a conditional model
            return torch.full((batch_size,), self.null_class_id, device=self.device, dtype=torch.long)
        labels = _per_image_labels(class_labels, batch_size)
        if labels.min() < 0 or labels.max() > self.null_class_id:
            raise ValueError(f"class labels must be in [0, {self.num_classes - 1}] "
                             f"(or {self.null_class_id} for none), got {labels.tolist()}")
        return labels.to(self.device)

    def _classifier_labels(self, class_labels, batch_size: int, classifier) -> torch.Tensor:
        """The classifier's target class per image, for the classifier guidance modes."""
        if class_labels is None:
            raise ValueError("classifier guidance needs class_labels: the classes to steer toward")
        labels = _per_image_labels(class_labels, batch_size)
        num_classes = getattr(getattr(classifier, "config", None), "num_classes", None)
        if labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes):
            allowed = "non-negative" if num_classes is None else f"in [0, {num_classes - 1}]"
            raise ValueError(f"class labels must be {allowed} for this classifier, got {labels.tolist()}")
        return labels.to(self.device)

    def _reference_features(self, reference_image, classifier) -> torch.Tensor:
        """E(y_ref, 0): the noisy classifier's features of the clean reference image."""
        if reference_image is None:
            raise ValueError("similarity guidance needs a reference_image")
        reference = image_tensor("reference_image", reference_image, self.sample_shape)
        with torch.no_grad():
            return classifier.features(reference.to(self.device, next(classifier.parameters()).dtype), 0)

    def set_sampler(self, name: str, knobs: dict[str, Any] | None = None,
                    model_scheduler_config: dict | None = None) -> dict[str, Any]:
        """Swap in the registered sampler ``name`` with a request's ``knobs`` ({knob: value}, None: its default),
        checked against its spec: that it fits the model, and each knob's range (the ValueError names what does
        not fit). Returns the ``step`` knobs (``eta``) to pass to the call; the config knobs build the scheduler.

        ``model_scheduler_config``: the scheduler config the model shipped with (default: the current one's), from
        which the sampler inherits the training process and any table it requires.
        """
        spec = get_sampler(name)
        config = dict(self.scheduler.config) if model_scheduler_config is None else model_scheduler_config
        spec.check_fits(self.config.model_info.get("process", "vp"), config)
        overrides, step = spec.settings(knobs)
        self.scheduler = spec.create(config, **overrides)
        self._fewest_steps = (self.scheduler, spec.name, spec.min_steps(config) or 1)
        return step

    def _min_steps(self) -> tuple[int, str]:
        """(the fewest steps, why): the registry entry's ``min_steps`` while the scheduler ``set_sampler`` built is
        in place, else 1."""
        scheduler, name, steps = getattr(self, "_fewest_steps", (None, "", 1))
        if scheduler is not self.scheduler or steps == 1:
            return 1, ""
        return steps, f" ({name} needs at least {get_sampler(name).min_nfe} evaluations)"

    def _step_kwargs(self, eta: float | None, generator) -> dict[str, Any]:
        """``step``'s keyword arguments: ``eta`` checked against the scheduler's declared step knobs, and the
        generator where ``step`` draws noise (diffusers' own ``prepare_extra_step_kwargs`` convention)."""
        kwargs = {}
        if eta is not None:
            knob = step_knobs(self.scheduler).get("eta")
            if knob is None:
                raise ValueError(f"{type(self.scheduler).__name__} has no η; leave eta unset")
            kwargs["eta"] = knob.check(eta)
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            kwargs["generator"] = generator
        return kwargs

    def _initial_sample(self, shape, latents, generator, labels) -> torch.Tensor:
        """x_T: the scheduler's own prior (``sample_prior``, e.g. PFGM++'s heavy-tailed one, UDM's degraded
        image, given the class ``labels`` where its law depends on the class) when it has one and no ``latents``
        are given, else Gaussian noise × ``init_noise_sigma``."""
        if latents is None and hasattr(self.scheduler, "sample_prior"):
            return self.scheduler.sample_prior(shape, generator=generator, device=self.device, dtype=self.unet.dtype,
                                               class_labels=labels)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        # diffusers' flow-matching schedulers (FlowMatchEulerDiscreteScheduler …) have no init_noise_sigma and no
        # scale_model_input: their prior is unit noise and the network's input is x_t itself (as in SD3's pipeline)
        return latents.to(self.device, self.unet.dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def _guidance_and_labels(self, mode, scale, interval, classifier, class_labels, batch_size, reference_image):
        """The call's ``Guidance`` and the class labels the network (or, in the classifier modes, the
        classifier) is given; ValueError for a request the model cannot serve."""
        if mode is None:
            mode = "classifier-free" if class_labels is not None and self.null_class_id is not None else "none"
        guidance = Guidance(mode, float(scale), interval, classifier if classifier is not None else self.classifier)
        if guidance.mode in CLASSIFIER_MODES:
            if self.scheduler.config.prediction_type not in PREDICTION_TYPES:
                raise ValueError(f"classifier guidance rewrites ε, so it needs a model predicting one of "
                                 f"{PREDICTION_TYPES}; this one predicts {self.scheduler.config.prediction_type!r}")
            if guidance.mode == "similarity":  # the reference image is the condition; class_labels play no part
                guidance.reference_features = self._reference_features(reference_image, guidance.classifier)
                return guidance, None
            return guidance, self._classifier_labels(class_labels, batch_size, guidance.classifier)
        labels = self._class_labels(class_labels, batch_size)
        if guidance.mode == "classifier-free" and self.null_class_id is None:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        if labels is None and scale != 1.0:
            raise ValueError("guidance_scale needs a class-conditional model or a classifier guidance_mode")
        return guidance, labels

    def _batch_shape(self, batch_size: int, height: int | None, width: int | None, latents) -> tuple[int, ...]:
        """(B, C, H, W) of the samples: the trained size unless ``height``/``width`` say otherwise."""
        channels, trained_height, trained_width = self.sample_shape
        shape = (batch_size, channels, height or trained_height, width or trained_width)
        if min(shape[2:]) < 1:
            raise ValueError(f"height and width must be positive, got {shape[2:]}")
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return shape

    def _noised_image(self, image: torch.Tensor, t_start: int, shape, latents, generator):
        """img2img's start: the grid's timesteps from ``t_start`` on, and the image noised to the first of them,
        ``scheduler.add_noise(x0, ε, timesteps[:1])`` (ε: ``latents``, or drawn like plain generation's x_T)."""
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start)
        timesteps = self.scheduler.timesteps[t_start:]
        noise = latents if latents is not None else randn_tensor(shape, generator=generator, device=self.device,
                                                                 dtype=self.unet.dtype)
        x0 = image.to(self.device, self.unet.dtype).expand(shape)
        sample = self.scheduler.add_noise(x0, noise.to(self.device, self.unet.dtype), timesteps[:1].repeat(shape[0]))
        return timesteps, sample

    def _step_loop(self, model_call, sample: torch.Tensor, timesteps, step_kwargs: dict,
                   callback_on_step_end) -> torch.Tensor:
        """diffusers' loop: one model call and one ``scheduler.step`` per timestep, the callback after each."""
        scale_input = getattr(self.scheduler, "scale_model_input", lambda sample, t: sample)  # flow matching: none
        for i, t in enumerate(self.progress_bar(timesteps)):
            output = model_call(scale_input(sample, t), t)
            step = self.scheduler.step(output, t, sample, **step_kwargs)
            sample = step.prev_sample
            if callback_on_step_end is not None:
                x0 = getattr(step, "pred_original_sample", None)  # flow matching's step output has none
                update = callback_on_step_end(self, i, t, {"sample": sample, "pred_original_sample": x0})
                if update and "sample" in update:
                    sample = update["sample"]
        return sample

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        eta: float | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict | None] | None = None,
        guidance_mode: str | None = None,
        guidance_interval: tuple[float, float] | None = None,
        classifier: torch.nn.Module | None = None,
        reference_image: torch.Tensor | PIL.Image.Image | None = None,
        image: torch.Tensor | PIL.Image.Image | None = None,
        strength: float | None = None,
    ):
        """Generate ``batch_size`` images.

        Args:
            num_inference_steps: scheduler steps, at most ``MAX_STEPS`` (NFE: one network evaluation per entry of
                the scheduler's ``timesteps``, ``SamplerSpec.nfe``; ×2 with classifier-free guidance).
            generator: seeds the initial noise and the sampler's noise; a list gives each image its own.
            class_labels: one label for all images or one per image; None samples unconditionally.
            guidance_scale: the guidance weight, |w| ≤ ``MAX_GUIDANCE``: w of classifier-free guidance (1 =
                conditional, 0 = unconditional), γ of the classifier modes (0 = unguided).
            eta: the scheduler's η (DDIM family, a declared ``step`` knob) for this call; None keeps its default.
            latents: initial noise x_T to start from instead of drawing it (shape (B, C, H, W)).
            height, width: sample at another size than the model was trained at (a UNet is convolutional;
                the size must divide by its downsampling factor). Default: the trained size.
            output_type: ``"pil"``, ``"np"`` (B, H, W, C) or ``"pt"`` (B, C, H, W), all in [0, 1]; or ``"raw"``,
                the final sample as the model sees data (usually [-1, 1]), unclamped, for metrics.
            callback_on_step_end: ``fn(pipeline, step_index, timestep, {"sample", "pred_original_sample"})``
                after every step; a returned dict with ``"sample"`` replaces the current sample.
            guidance_mode: one of ``guidance.GUIDANCE_MODES``; default "classifier-free" when class labels are given
                to a class-conditional model, else "none". The classifier modes take ``class_labels`` as the
                classifier's targets and run the model unconditionally.
            guidance_interval: (σ_lo, σ_hi): guide only at noise levels in this range (default: everywhere).
            classifier: the classifier for the classifier modes (default: the pipeline's ``classifier``); a clean
                classifier of images for "classifier-x0".
            reference_image: the image similarity guidance steers toward ((C, H, W) or (1, C, H, W) in [-1, 1], or PIL).
            image: img2img's input ((C, H, W) or (B, C, H, W) tensor in [-1, 1], B = 1 or ``batch_size``; or PIL,
                converted to the model's channels), of the samples' size. With a stochastic sampler this is SDEdit
                (Meng et al. 2022). Needs a scheduler with ``add_noise`` and fixed steps (``check_noises_images``).
                ``latents`` are then the noise ε that ``add_noise`` mixes in.
            strength: s ∈ (0, 1], how far down the grid the image is noised: the last ⌊n·s⌋ of the n steps run
                (so NFE falls with it); 1 starts from (nearly) pure noise. Default ``IMG2IMG_STRENGTH`` with an
                image; without one only 1 (plain generation).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        fewest, why = self._min_steps()
        try:
            num_inference_steps = check_range("num_inference_steps", num_inference_steps, fewest, MAX_STEPS,
                                              integer=True)
        except ValueError as error:
            raise ValueError(f"{error}{why}") from None
        guidance_scale = check_range("guidance_scale", guidance_scale, -MAX_GUIDANCE, MAX_GUIDANCE)
        step_kwargs = self._step_kwargs(eta, generator)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        guidance, labels = self._guidance_and_labels(guidance_mode, guidance_scale, guidance_interval, classifier,
                                                     class_labels, batch_size, reference_image)
        shape = self._batch_shape(batch_size, height, width, latents)
        if image is None:
            if strength is not None and strength != 1.0:
                raise ValueError(f"strength {strength!r} applies to an image; pass image, or leave strength unset")
        else:
            check_noises_images(self.scheduler)
            image = image_tensor("image", image, shape[1:], batch_size)
            run = img2img_steps(num_inference_steps, IMG2IMG_STRENGTH if strength is None else strength)
            t_start = (num_inference_steps - run) * self.scheduler.order  # the first evaluation it runs

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        if image is None:
            timesteps, sample = self.scheduler.timesteps, self._initial_sample(shape, latents, generator, labels)
        else:
            timesteps, sample = self._noised_image(image, t_start, shape, latents, generator)
        nfe = 0

        def model_call(x, t):
            nonlocal nfe
            output, cost = self.guided_model_output(x, t, labels, guidance)
            nfe += cost
            return output

        if hasattr(self.scheduler, "solve"):  # an adaptive solver chooses its own steps and calls the model
            sample = self.scheduler.solve(model_call, sample)
        else:
            sample = self._step_loop(model_call, sample, timesteps, step_kwargs, callback_on_step_end)

        images = sample if output_type == "raw" else self._image_processor.postprocess(sample.float(), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nfe
        return GenerationOutput(images=images, nfe=nfe)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, num_inference_steps: int = 50, class_labels=None,
               guidance_scale: float = 1.0) -> torch.Tensor:
        """DDIM inversion (η = 0): the x_T that the deterministic sampler maps back to ``images`` ([-1, 1])."""
        if not hasattr(self.scheduler, "inversion_step"):
            raise ValueError(f"{type(self.scheduler).__name__} has no inversion; use a DDIM scheduler")
        labels = self._class_labels(class_labels, len(images))
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        sample = images.to(self.device, self.unet.dtype)
        for model_t, to_t in self.progress_bar(self.scheduler.inversion_timesteps()):
            output, _ = self.guided_model_output(sample, model_t, labels, guidance_scale)
            sample = self.scheduler.inversion_step(output, model_t, to_t, sample)
        return sample
