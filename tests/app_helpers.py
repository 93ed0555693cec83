"""Model folders for the app's tests: the shipped models plus small broken and odd ones in a temporary root."""

import json
import shutil
from pathlib import Path

import torch

from evaluation.exact import ExactScoreModel, GaussianMixture
from pipelines import DiffusionImagePipeline
from schedulers import DDIMScheduler
from webui.models import ModelCatalog

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
EXACT = CHECKPOINTS / "mnist-exact"


def _copy_exact(root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(EXACT, target)
    return target


def _edit_index(folder: Path, **changes) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))


def make_model_root(root: Path) -> Path:
    """``root`` filled with: ``tiny-uncond`` (an unconditional exact model, 1×4×4), ``pickled`` (a .bin beside
    the weights), ``corrupt`` (truncated safetensors), ``badjson``, ``foreign`` (a pipeline class we do not
    have), ``evil-lib`` (a component from ``os``), ``flow-model`` (records the flow process)."""
    root.mkdir(parents=True, exist_ok=True)
    mixture = GaussianMixture.random((1, 4, 4), 3, rank=2, seed=0)
    pipe = DiffusionImagePipeline(ExactScoreModel.from_mixture(mixture), DDIMScheduler(),
                                  {"process": "vp", "dataset": "toy", "image_size": 4, "channels": 1})
    pipe.save_pretrained(root / "tiny-uncond", safe_serialization=True)
    pickled = _copy_exact(root, "pickled")
    torch.save({"weights": torch.zeros(1)}, pickled / "unet" / "diffusion_pytorch_model.bin")
    corrupt = _copy_exact(root, "corrupt")
    weights = corrupt / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (_copy_exact(root, "badjson") / "model_index.json").write_text("{ not json")
    _edit_index(_copy_exact(root, "foreign"), _class_name="StableDiffusionPipeline")
    _edit_index(_copy_exact(root, "evil-lib"), unet=["os", "system"])
    flow = _copy_exact(root, "flow-model")
    index = json.loads((flow / "model_index.json").read_text())
    index["model_info"]["process"] = "flow"
    (flow / "model_index.json").write_text(json.dumps(index))
    return root


def make_catalog(root: Path) -> ModelCatalog:
    return ModelCatalog([CHECKPOINTS, root], base=ROOT)


# The Generate tab's inputs, in order (webui.generate.INPUTS), with quick settings on the exact model.
GENERATE = {"model": "mnist-exact", "sampler": "ddim", "steps": 4, "noise": 0.0, "guidance_mode": "classifier-free",
            "guidance_scale": 2.0, "reference": None, "class_name": "every class in turn", "seed": 7,
            "random_seed": False, "batch": 4, "resolution": 0, "backend": "default", "preview_every": 0,
            "image": None, "strength": 0.8, "levels": ""}
