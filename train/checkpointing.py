"""Training checkpoints in a run directory: atomic saves, the last K kept, half-written ones never resumed.

A checkpoint is ``OUTPUT_DIR/checkpoint-STEP/``: what ``accelerator.save_state`` writes (model weights as
safetensors; optimizer, LR schedule, RNG and the registered custom states — EMA, the objective's state — as
accelerate's own torch files), ``training_state.json`` (step, data position) and, written last, the marker
file ``COMPLETE``. Everything is first written to ``checkpoint-STEP.tmp/`` and renamed once the marker is in
place, so a process killed during a save leaves a ``.tmp`` directory, which is never taken for a checkpoint.

Checkpoints are only resumed from the run's own directory: accelerate reads back its optimizer, RNG and custom
states with ``torch.load`` (the custom ones with ``weights_only=False``), which must not see untrusted files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_SUFFIX = ".tmp"
COMPLETE_MARKER = "COMPLETE"
TRAINING_STATE_FILE = "training_state.json"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint directory named ``checkpoint-STEP``, else None (``.tmp`` ones included)."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished checkpoint: a final (renamed) name and the completion marker inside."""
    path = Path(path)
    return checkpoint_step(path) is not None and (path / COMPLETE_MARKER).is_file()


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The finished checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if is_complete(p)), key=checkpoint_step)


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint that ``--resume`` names: ``latest`` (None when the run has none yet) or a path.

    A path must be a finished checkpoint inside ``output_dir``: resuming reads pickled optimizer and RNG states,
    so only the run's own files are trusted.
    """
    output_dir = Path(output_dir)
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if path.resolve().parent != output_dir.resolve():
        raise ValueError(f"--resume {resume}: only checkpoints of this run (directly in {output_dir}) are resumed, "
                         "since their optimizer and RNG states are read with torch.load")
    if not is_complete(path):
        raise ValueError(f"--resume {resume}: not a complete checkpoint (a '{CHECKPOINT_PREFIX}STEP' directory "
                         f"holding the '{COMPLETE_MARKER}' marker)")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, training_state: dict[str, Any],
                    keep: int) -> Path:
    """Save the accelerator's state atomically as ``output_dir/checkpoint-STEP``; keep only the newest ``keep``.

    Every process must call this (each writes its own RNG state); the main process writes the JSON and the
    marker, renames, and prunes.
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    temporary = final.with_name(final.name + TEMPORARY_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # a leftover of a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_synced(temporary / TRAINING_STATE_FILE, json.dumps({"step": step, **training_state}, indent=2))
        _write_synced(temporary / COMPLETE_MARKER, "")
        if final.exists():  # re-saving a step (e.g. after resuming from an older checkpoint)
            shutil.rmtree(final)
        os.replace(temporary, final)
        _prune(Path(output_dir), keep)
    accelerator.wait_for_everyone()
    return final


def read_training_state(path: Path) -> dict[str, Any]:
    """A complete checkpoint's ``training_state.json`` (step, data position, what the run must keep unchanged)."""
    if not is_complete(path):
        raise ValueError(f"{path} is not a complete checkpoint")
    return json.loads((Path(path) / TRAINING_STATE_FILE).read_text())


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore the accelerator's state from a complete checkpoint; returns its ``training_state.json``."""
    state = read_training_state(path)
    accelerator.load_state(str(path))
    return state


def discard_checkpoints_after(output_dir: Path, step: int) -> list[Path]:
    """Delete the finished checkpoints past ``step``: resuming from an older one abandons them, and left in place
    they would count as the newest when the last K are kept."""
    discarded = [path for path in complete_checkpoints(output_dir) if checkpoint_step(path) > step]
    for path in discarded:
        shutil.rmtree(path)
    return discarded


def _prune(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` finished checkpoints, and any half-written ones."""
    for stale in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(stale)
    for leftover in output_dir.glob(f"{CHECKPOINT_PREFIX}*{TEMPORARY_SUFFIX}"):
        shutil.rmtree(leftover, ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    """Write ``text`` and flush it to disk, so the marker never lands before the data it vouches for."""
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
