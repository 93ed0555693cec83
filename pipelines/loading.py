"""Load any of the project's pipelines from a directory (or a hub id) without trusting it.

``load_pipeline(path)`` reads ``model_index.json``, picks the ``DiffusionPipeline`` subclass the ``pipelines``
package exports under its ``_class_name`` (so a new pipeline family is loadable as soon as the package exports
it), and loads it with ``use_safetensors=True``. Nothing is ever unpickled: a directory holding a pickled weight
file (``.bin``, ``.pt``, ``.ckpt``, …) is refused with a message naming the file, and components may only come
from the libraries in ``COMPONENT_LIBRARIES``.

Component registration. ``save_pretrained`` stores a component defined outside diffusers under its module path
(``["evaluation.exact", "ExactScoreModel"]``), and diffusers' ``from_pretrained`` resolves such a module only
from ``sys.modules``: it never imports a module a repository names, since importing runs its code. Every
pipeline here derives from ``ComponentImportingPipeline``, whose ``from_pretrained`` first imports the modules
``model_index.json`` names, from ``COMPONENT_LIBRARIES`` only. So no pipeline module imports the packages of the
components it may hold (the exact-score model, the classifier, a scheduler), and this tuple is the one place
that names them.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from diffusers import DiffusionPipeline

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz")
# model_index.json entries are [library, class]; only these libraries (or their submodules) may be imported.
COMPONENT_LIBRARIES = ("diffusers", "transformers", "schedulers", "evaluation", "models", "pipelines")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt"]  # what a hub download fetches: never pickles


def component_modules(index: dict) -> list[str]:
    """The modules the components of ``model_index.json`` (``index``) come from; ValueError for a library outside
    ``COMPONENT_LIBRARIES``. Unset components (``[null, null]``) name none."""
    modules = []
    for name, value in index.items():
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            if value[0].split(".")[0] not in COMPONENT_LIBRARIES:
                raise ValueError(f"component {name!r} comes from {value[0]!r}; only "
                                 f"{', '.join(COMPONENT_LIBRARIES)} are allowed")
            modules.append(value[0])
    return modules


class ComponentImportingPipeline(DiffusionPipeline):
    """A ``DiffusionPipeline`` whose ``from_pretrained`` imports its components' modules (see the module's
    docstring), so that loading needs no import by the caller."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        index = cls.load_config(pretrained_model_name_or_path, **kwargs)  # keeps the hub and subfolder options
        for module in component_modules(index):
            importlib.import_module(module)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


def pipeline_classes() -> dict[str, type[DiffusionPipeline]]:
    """The pipeline classes the ``pipelines`` package exports, by class name."""
    import pipelines

    exported = (getattr(pipelines, name) for name in getattr(pipelines, "__all__", dir(pipelines)))
    return {cls.__name__: cls for cls in exported if isinstance(cls, type) and issubclass(cls, DiffusionPipeline)}


def check_pipeline_dir(path: str | Path) -> tuple[type[DiffusionPipeline], dict]:
    """The pipeline class and ``model_index.json`` of the directory ``path``; ValueError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{path} has no model_index.json: it is not a pipeline directory")
    try:
        index = json.loads(index_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{index_file} is corrupt: {error}") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ValueError(f"{index_file} names no pipeline class (_class_name)")
    classes = pipeline_classes()
    cls = classes.get(index["_class_name"])
    if cls is None:
        raise ValueError(f"{path}: unknown pipeline class {index['_class_name']!r}; this project loads "
                         f"{', '.join(sorted(classes))}")
    try:
        component_modules(index)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    pickled = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(f"{path}: refusing {pickled[0].relative_to(path)}: weights must be .safetensors "
                         "(pickled files can run code when loaded)")
    return cls, index


def resolve(path_or_id: str) -> Path:
    """A local directory as is; a hub id ``owner/name`` that is not a local path is downloaded (JSON and
    safetensors files only) into the Hugging Face cache."""
    local = Path(path_or_id).expanduser()
    if local.exists() or not HUB_ID.match(path_or_id):
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_id, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # offline, unknown repo, gated: all reach the user as one message
        raise ValueError(f"could not download {path_or_id!r} from the hub: {error}") from None


def load_pipeline(path: str | Path) -> DiffusionPipeline:
    """The pipeline stored at ``path`` (a directory or a hub id), as the class its ``model_index.json`` names."""
    directory = resolve(str(path))
    cls, _ = check_pipeline_dir(directory)
    try:
        return cls.from_pretrained(directory, use_safetensors=True)
    except Exception as error:  # a truncated safetensors file, a config that does not fit the weights, …
        raise ValueError(f"could not load the {cls.__name__} at {directory}: {type(error).__name__}: {error}") from None
