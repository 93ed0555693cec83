"""Pipelines: diffusers ``DiffusionPipeline`` subclasses, loadable with ``from_pretrained``."""

from .diffusion import DiffusionImagePipeline, GenerationOutput

__all__ = ["DiffusionImagePipeline", "GenerationOutput"]
