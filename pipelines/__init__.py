"""Pipelines: diffusers ``DiffusionPipeline`` subclasses, loadable with ``from_pretrained``."""

from .baselines import GANPipeline, VAEPipeline
from .diffusion import DiffusionImagePipeline, GenerationOutput

__all__ = ["DiffusionImagePipeline", "GANPipeline", "GenerationOutput", "VAEPipeline"]
