"""One pipeline for image diffusion models: unconditional or class-conditional, any scheduler, CFG.

Classifier-free guidance (Ho & Salimans 2022; Su part 9) mixes the conditional and unconditional outputs,

    ε̃ = ε_θ(x_t, ∅) + w (ε_θ(x_t, y) − ε_θ(x_t, ∅)),

w = 1 plain conditional sampling, w = 0 unconditional. Every parameterization (ε, x0, v, score, velocity)
is affine in ε with the same coefficients at fixed (x_t, t), so mixing raw model outputs is the same as
mixing ε whatever the model predicts. The unconditional output is the model's answer for the null class
id ``num_class_embeds − 1`` that label dropout trained it on.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

# from_pretrained resolves the project's components (schedulers, the exact model) through imported modules.
import evaluation.exact  # noqa: F401, E402
import schedulers  # noqa: F401, E402

OUTPUT_TYPES = ("pil", "np", "pt", "raw")
MAX_STEPS = 10_000


class GenerationOutput(BaseOutput):
    """``images``: PIL list, (B, H, W, C) array or (B, C, H, W) tensor in [0, 1], or the raw final sample;
    ``nfe``: network evaluations per image (CFG's unconditional pass included)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: int


class DiffusionImagePipeline(DiffusionPipeline):
    """Sample images from a ``UNet2DModel``-like model with any diffusers-compatible scheduler.

    ``model_info`` records how the model was trained (forward process, prediction type, dataset, classes,
    image size, command); it is saved in ``model_index.json`` so tools offer only the samplers that fit.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, model_info: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
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

    def set_attention_backend(self, backend: str, entropy_invariant_n0: int | None = None) -> int:
        """Run the model's attention on ``backend`` ("triton", "sdpa", "xformers", "math"), optionally with the
        entropy-invariant scale log_{n0}(n)/sqrt(d) (``kernels/processor.py``); returns the blocks switched."""
        from kernels.processor import set_attention_backend  # imports triton: only when asked for

        return set_attention_backend(self.unet, backend, entropy_invariant_n0)

    # ---------------------------------------------------------------- the guided model call

    def guided_model_output(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None,
                            guidance_scale: float) -> tuple[torch.Tensor, int]:
        """The model output to step with, and how many network evaluations per image it cost."""
        if class_labels is None:
            return self.unet(sample, timestep).sample, 1
        null = torch.full_like(class_labels, self.null_class_id)
        if guidance_scale == 1.0:
            return self.unet(sample, timestep, class_labels=class_labels).sample, 1
        if guidance_scale == 0.0:
            return self.unet(sample, timestep, class_labels=null).sample, 1
        both = self.unet(torch.cat([sample, sample]), timestep, class_labels=torch.cat([class_labels, null])).sample
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond), 2

    def _class_labels(self, class_labels, batch_size: int) -> torch.Tensor | None:
        if self.null_class_id is None:
            if class_labels is not None:
                raise ValueError("this model is unconditional: it takes no class_labels")
            return None
        if class_labels is None:  # unconditional sampling of a conditional model
            return torch.full((batch_size,), self.null_class_id, device=self.device, dtype=torch.long)
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if len(labels) == 1:
            labels = labels.expand(batch_size)
        if len(labels) != batch_size:
            raise ValueError(f"got {len(labels)} class labels for batch_size {batch_size}")
        if labels.min() < 0 or labels.max() > self.null_class_id:
            raise ValueError(f"class labels must be in [0, {self.num_classes - 1}] "
                             f"(or {self.null_class_id} for none), got {labels.tolist()}")
        return labels.to(self.device)

    def _step_kwargs(self, eta: float | None, generator) -> dict[str, Any]:
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if eta is not None:
            if "eta" not in accepted:
                raise ValueError(f"{type(self.scheduler).__name__} has no η; leave eta unset")
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

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
    ):
        """Generate ``batch_size`` images.

        Args:
            num_inference_steps: scheduler steps (NFE = steps × the scheduler's evaluations per step, ×2 with CFG).
            generator: seeds the initial noise and the sampler's noise; a list gives each image its own.
            class_labels: one label for all images or one per image; None samples unconditionally.
            guidance_scale: classifier-free guidance weight w (1 = conditional, 0 = unconditional).
            eta: the scheduler's η (DDIM family) for this call; None keeps the scheduler's default.
            latents: initial noise x_T to start from instead of drawing it (shape (B, C, H, W)).
            height, width: sample at another size than the model was trained at (a UNet is convolutional;
                the size must divide by its downsampling factor). Default: the trained size.
            output_type: ``"pil"``, ``"np"`` (B, H, W, C) or ``"pt"`` (B, C, H, W), all in [0, 1]; or ``"raw"``,
                the final sample as the model sees data (usually [-1, 1]), unclamped, for metrics.
            callback_on_step_end: ``fn(pipeline, step_index, timestep, {"sample", "pred_original_sample"})``
                after every step; a returned dict with ``"sample"`` replaces the current sample.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= MAX_STEPS:
            raise ValueError(f"num_inference_steps must be an integer in [1, {MAX_STEPS}], got {num_inference_steps!r}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
        if eta is not None and not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        labels = self._class_labels(class_labels, batch_size)
        if labels is None and guidance_scale != 1.0 and self.null_class_id is None:
            raise ValueError("guidance_scale needs a class-conditional model")
        channels, trained_height, trained_width = self.sample_shape
        shape = (batch_size, channels, height or trained_height, width or trained_width)
        if min(shape[2:]) < 1:
            raise ValueError(f"height and width must be positive, got {shape[2:]}")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        step_kwargs = self._step_kwargs(eta, generator)
        sample = latents.to(self.device, self.unet.dtype) * self.scheduler.init_noise_sigma
        nfe = 0

        def model_call(x, t):
            nonlocal nfe
            output, cost = self.guided_model_output(x, t, labels, guidance_scale)
            nfe += cost
            return output

        if hasattr(self.scheduler, "solve"):  # an adaptive solver chooses its own steps and calls the model
            sample = self.scheduler.solve(model_call, sample)
        else:
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                output = model_call(self.scheduler.scale_model_input(sample, t), t)
                step = self.scheduler.step(output, t, sample, **step_kwargs)
                sample = step.prev_sample
                if callback_on_step_end is not None:
                    update = callback_on_step_end(
                        self, i, t, {"sample": sample, "pred_original_sample": step.pred_original_sample})
                    if update and "sample" in update:
                        sample = update["sample"]

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
