"""The GAN and VAE baselines as diffusers pipelines: one network pass per image (NFE = 1).

``GANPipeline(generator, critic, model_info)``: x = G(z), z ~ N(0, I) (Goodfellow et al. 2014). With an O-GAN
critic (Su 2019, seed_methods.md §4.5) it also encodes, z = E(x), and reconstructs G(N(E(x))).
``VAEPipeline(vae, model_info)``: z from the prior, x = the decoder's per-pixel location (Kingma & Welling 2014);
``encode`` / ``reconstruct`` use the posterior means, ``bits_per_dim`` the negative ELBO.

Both take the arguments of ``DiffusionImagePipeline`` that make sense without a sampler: ``batch_size``,
``generator`` (one, or one per image), ``class_labels`` (one for all or one per image; None draws a uniformly
random class per image for a class-conditional model), ``output_type`` in ``pil`` / ``np`` / ``pt`` / ``raw``
and ``return_dict``, and return ``GenerationOutput(images, nfe=1)``.
``model_info`` records "process" ("gan" or "vae"), dataset, classes, image size and the training command.
"""

from __future__ import annotations

import math

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from models.vae import discretized_logistic_log_likelihood

from .diffusion import OUTPUT_TYPES, GenerationOutput
from .loading import ComponentImportingPipeline

MAX_BATCH = 10_000
OGAN_RECONSTRUCTION_SCALE = 0.9  # Su's O-GAN code shrinks the standardized code before decoding it


class _OnePassPipeline(ComponentImportingPipeline):
    """What the GAN and VAE pipelines share: classes, argument checks, output conversion."""

    network_name: str  # the component whose config holds image_size, channels and num_classes

    def _setup(self, model_info: dict | None) -> None:
        self.register_to_config(model_info=dict(model_info or {}))
        self._image_processor = VaeImageProcessor(do_resize=False)

    @property
    def network(self):
        return getattr(self, self.network_name)

    @property
    def num_classes(self) -> int:
        return self.network.config.num_classes

    @property
    def null_class_id(self) -> None:
        """No classifier-free guidance: there is no null class."""
        return None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.network.config.image_size
        return self.network.config.channels, size, size

    def _check_call(self, batch_size, output_type: str) -> None:
        if not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be a positive integer (at most {MAX_BATCH}), got {batch_size!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    def _class_labels(self, class_labels, batch_size: int, generator=None) -> torch.Tensor | None:
        """Labels on the device: as given (checked), or uniformly random ones for a conditional model."""
        if not self.num_classes:
            if class_labels is not None:
                raise ValueError("this model is unconditional: it takes no class_labels")
            return None
        if class_labels is None:
            first = generator[0] if isinstance(generator, list) else generator
            return torch.randint(self.num_classes, (batch_size,), generator=first).to(self.device)
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if len(labels) == 1:
            labels = labels.expand(batch_size)
        if len(labels) != batch_size:
            raise ValueError(f"got {len(labels)} class labels for batch_size {batch_size}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class labels must be in [0, {self.num_classes - 1}], got {labels.tolist()}")
        return labels.to(self.device)

    def _known_labels(self, class_labels, batch_size: int) -> torch.Tensor | None:
        """The labels of given images: required for a class-conditional model, refused for an unconditional one."""
        if self.num_classes and class_labels is None:
            raise ValueError("this model is class-conditional: pass the images' class_labels")
        return self._class_labels(class_labels, batch_size)

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        shape = self.sample_shape
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != shape:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, shape))}) in [-1, 1], got {got}")
        return images.to(self.device, self.network.dtype)

    def _output(self, sample: torch.Tensor, output_type: str, return_dict: bool):
        images = sample if output_type == "raw" else self._image_processor.postprocess(sample.float(), output_type)
        if not return_dict:
            return images, 1
        return GenerationOutput(images=images, nfe=1)


class GANPipeline(_OnePassPipeline):
    """Samples x = G(z[, y]); ``critic`` (optional) is kept for O-GAN encoding and reconstruction."""

    network_name = "generator"
    _optional_components = ["critic"]

    def __init__(self, generator, critic, model_info: dict | None = None):
        """``critic``: the O-GAN critic (its encoder gives latent codes), or None."""
        super().__init__()
        self.register_modules(generator=generator, critic=critic)
        self._setup(model_info)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 class_labels: int | list[int] | torch.Tensor | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Generate ``batch_size`` images from z ~ N(0, I) (or the given ``latents``, N×latent_dim)."""
        self._check_call(batch_size, output_type)
        labels = self._class_labels(class_labels, batch_size, generator)
        shape = (batch_size, self.generator.config.latent_dim)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.generator.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        sample = self.generator(latents.to(self.device, self.generator.dtype), labels)
        return self._output(sample, output_type, return_dict)

    def _encoder(self):
        if self.critic is None or not self.critic.config.ogan:
            raise ValueError("this GAN has no O-GAN encoder: train it with --ogan to encode and reconstruct")
        return self.critic

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """O-GAN's latent code of images in [-1, 1]: E(x), standardized over its dimensions (Su's N(·))."""
        code = self._encoder().encode(self._check_images(images))
        return (code - code.mean(dim=1, keepdim=True)) / code.std(dim=1, keepdim=True)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, class_labels=None) -> torch.Tensor:
        """G(0.9 · N(E(x))) in [-1, 1], as Su's O-GAN code reconstructs."""
        labels = self._known_labels(class_labels, len(images))
        latents = OGAN_RECONSTRUCTION_SCALE * self.encode(images)
        return self(len(images), class_labels=labels, latents=latents, output_type="raw").images


class VAEPipeline(_OnePassPipeline):
    """Samples the decoder's per-pixel location for latents drawn from the prior (``temperature`` scales them)."""

    network_name = "vae"

    def __init__(self, vae, model_info: dict | None = None):
        super().__init__()
        self.register_modules(vae=vae)
        self._setup(model_info)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 class_labels: int | list[int] | torch.Tensor | None = None, temperature: float = 1.0,
                 output_type: str = "pil", return_dict: bool = True):
        """Generate ``batch_size`` images; ``temperature`` < 1 shrinks the prior draws (sharper, less varied)."""
        self._check_call(batch_size, output_type)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number ≥ 0, got {temperature}")
        labels = self._class_labels(class_labels, batch_size, generator)
        mean, _ = self.vae.sample(batch_size, generator=generator, class_labels=labels, temperature=temperature)
        return self._output(mean.clamp(-1, 1), output_type, return_dict)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, class_labels=None) -> torch.Tensor:
        """The decoder's location at the posterior means of ``images`` ([-1, 1])."""
        images = self._check_images(images)
        labels = self._known_labels(class_labels, len(images))
        return self.vae(images, labels, use_mean=True).mean.clamp(-1, 1)

    @torch.no_grad()
    def bits_per_dim(self, images: torch.Tensor, class_labels=None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """−ELBO/(D ln 2) per image for 8-bit images in [-1, 1]: an upper bound on their discrete NLL in bits/dim
        (discretized-logistic decoder, one posterior draw)."""
        images = self._check_images(images)
        labels = self._known_labels(class_labels, len(images))
        output = self.vae(images, labels, generator=generator)
        elbo = discretized_logistic_log_likelihood(images, output.mean, output.log_scale) - output.kl
        return -elbo / (images[0].numel() * math.log(2))
