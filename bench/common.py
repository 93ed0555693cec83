"""What every benchmark records and how it saves it: the machine a run used, and its results file.

Not a benchmark itself (``bench/report.py`` lists the benchmarks).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import diffusers
import torch


def machine_info() -> dict:
    """The fields that say where a result comes from, for the top level of a results file."""
    return {"machine": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "diffusers": diffusers.__version__}


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def display_path(path) -> str:
    """``path`` as a results file records it: relative to the repository root when inside it (not this machine's
    absolute path), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPOSITORY_ROOT)) if resolved.is_relative_to(REPOSITORY_ROOT) else str(path)


def write_results(path: Path, results: dict) -> None:
    """Write ``results`` as JSON to ``path`` atomically, so a run cut off mid-write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    temporary.replace(path)


def model_process(model_dir: Path) -> str:
    """The forward process an exported ``DiffusionImagePipeline`` directory was trained on (``model_info`` in its
    ``model_index.json``; "vp" when it records none); a ValueError when it is no pipeline directory."""
    index_path = Path(model_dir) / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{model_dir} is not an exported pipeline directory: it has no model_index.json")
    return (json.loads(index_path.read_text()).get("model_info") or {}).get("process", "vp")


def default_sampler(model_dir: Path) -> str:
    """The sampler the app opens a model with (``webui.models.DEFAULT_SAMPLERS``): DDIM on a VP model, else
    DPM-Solver++ 2M; a consistency or MeanFlow model's own sampler."""
    scheduler_config = Path(model_dir) / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_config.read_text()) if scheduler_config.is_file() else {}
    if config.get("consistency_objective"):
        return "consistency"
    if config.get("mean_flow_objective"):
        return "mean-flow"
    return "ddim" if model_process(model_dir) == "vp" else "dpmpp-2m"


def check_positive(parser, args, names: tuple[str, ...]) -> None:
    """``parser.error`` naming the first of the integer options ``names`` that is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
