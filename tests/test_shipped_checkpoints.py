"""The shipped checkpoints keep the repository's rules: safetensors weights only, a README with the command that
made each one, and all of ``checkpoints/`` under 40 MB."""

from pathlib import Path

import pytest

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
SHIPPED = sorted(path for path in CHECKPOINTS.iterdir() if path.is_dir())
BUDGET_BYTES = 40 * 10**6
UNSAFE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle"}  # pickles: never shipped, never loaded


def test_all_of_checkpoints_is_under_40_mb():
    total = sum(path.stat().st_size for path in CHECKPOINTS.rglob("*") if path.is_file())
    assert total < BUDGET_BYTES, f"checkpoints/ holds {total / 1e6:.1f} MB, over the 40 MB budget"


@pytest.mark.parametrize("directory", SHIPPED, ids=[path.name for path in SHIPPED])
def test_each_checkpoint_has_safetensors_weights_and_a_readme_with_its_command(directory):
    files = [path for path in directory.rglob("*") if path.is_file()]
    assert any(path.suffix == ".safetensors" for path in files), "no safetensors weights"
    assert not [path.name for path in files if path.suffix in UNSAFE_SUFFIXES]
    readme = directory / "README.md"
    assert readme.is_file(), "no README.md"
    assert "python -m " in readme.read_text(), "its README names no command that made it"
