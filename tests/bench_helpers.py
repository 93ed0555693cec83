"""Importing a ``bench/`` script in a test: the scripts are not a package, so they load from their path."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_bench_script(name: str) -> ModuleType:
    """``bench/NAME.py`` as the module ``bench_NAME`` (its ``main`` does not run)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is imported
    spec.loader.exec_module(module)
    return module
