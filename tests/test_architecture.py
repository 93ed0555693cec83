"""The layer rules of docs/architecture.md, kept by import-linter's contracts in pyproject.toml.

``lint-imports`` sees every import, function-level ones included, so a back-import (a package importing one
above it) or a cycle between the modules of a package fails this test, and with it CI.
"""

import subprocess
import sys
from pathlib import Path

from importlinter.application.use_cases import read_user_options
from importlinter.configuration import configure

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
OUTSIDE_THE_LAYERS = {"tests"}  # like app.py, bench/ and notebooks/: they may import any package


def contract_options() -> tuple[dict, list[dict]]:
    configure()
    options = read_user_options(config_filename=str(ROOT / "pyproject.toml"))
    return options.session_options, options.contracts_options


def test_the_imports_keep_the_contracts():
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"lint-imports failed:\n{done.stdout}\n{done.stderr}"


def test_every_package_has_a_layer():
    session, contracts = contract_options()
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")} - OUTSIDE_THE_LAYERS
    assert set(session["root_packages"]) == packages
    (layers,) = (contract["layers"] for contract in contracts if contract["type"] == "layers")
    assert {package.strip() for layer in layers for package in layer.split("|")} == packages
    (acyclic,) = (contract for contract in contracts if contract["type"] == "acyclic_siblings")
    assert set(acyclic["ancestors"]) == packages
