"""Input checks shared by every tab: each raises ``gr.Error`` with a message that names the field and the problem.

Gradio hands numbers over as floats (or None when a box is emptied) and strings from dropdowns that a client of
the HTTP API can set to anything, so nothing reaching a handler is trusted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import gradio as gr

from schedulers.registry import check_range

# Values in one request's batch (images × channels × height × width): 64 RGB images at 64×64 is 786k. A CPU
# sampler's memory grows with it (the UNet's activations); above it a request is refused instead of swapping.
MAX_BATCH_VALUES = 1 << 20
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def user_error(check, *args):
    """``check(*args)``, its ValueError turned into the message the page shows."""
    try:
        return check(*args)
    except ValueError as error:
        raise gr.Error(str(error)) from None


def number(name: str, value, low: float, high: float, integer: bool = False) -> float | int:
    """``value`` as a finite number in [low, high] (an int when ``integer``)."""
    return user_error(check_range, name, value, low, high, integer)


def choice(name: str, value, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        shown = ", ".join(map(str, choices[:20])) + (" …" if len(choices) > 20 else "")
        raise gr.Error(f"{name} {value!r} is not one of: {shown}")
    return value


def inside(name: str, value, roots: Iterable[Path]) -> Path:
    """``value`` as an existing path inside one of ``roots`` (after resolving symbolic links and ``..``)."""
    if not isinstance(value, str) or not value.strip():
        raise gr.Error(f"{name} must be a path, got {value!r}")
    if "\x00" in value:
        raise gr.Error(f"{name} contains a NUL character")
    path = Path(value.strip()).expanduser().resolve()
    roots = [Path(root).resolve() for root in roots]
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise gr.Error(f"{name} {value!r} is outside the allowed directories: {', '.join(map(str, roots))}")
    if not path.exists():
        raise gr.Error(f"{name} {value!r} does not exist")
    return path


def batch_memory(batch: int, channels: int, height: int, width: int) -> None:
    """Refuse a batch whose samples hold more than ``MAX_BATCH_VALUES`` values."""
    values = batch * channels * height * width
    if values > MAX_BATCH_VALUES:
        raise gr.Error(f"batch size × resolution is too large: {batch} × {channels}×{height}×{width} = {values:,} "
                       f"values, the cap is {MAX_BATCH_VALUES:,}; lower the batch size or the resolution")


def run_name(value) -> str:
    """A training run's name: it becomes a directory name, so letters, digits, ``_ . -`` only."""
    if not isinstance(value, str) or not RUN_NAME.match(value):
        raise gr.Error(f"run name {value!r} must be 1–64 letters, digits, '_', '.' or '-', starting with a letter "
                       "or digit")
    return value


def parse_values(name: str, text, kind: type, low: float, high: float, limit: int = 16) -> list:
    """An axis of values: ``a, b, c``, or AUTOMATIC1111's ranges ``1-10(3)`` (step 3) and ``1-10[4]`` (4 values)."""
    if not isinstance(text, str) or not text.strip():
        raise gr.Error(f"{name}: give at least one value")
    values = []
    for item in (part.strip() for part in text.split(",")):
        match = re.fullmatch(r"(-?[\d.e+]+)\s*-\s*(-?[\d.e+]+)\s*([(\[])\s*([\d.e+]+)\s*[)\]]", item)
        try:
            numbers = [float(match[i]) for i in (1, 2, 4)] if match else [float(item)]
        except ValueError:
            raise gr.Error(f"{name}: {item!r} is not a number or a range like 1-10(3) or 1-10[4]") from None
        if not match:
            values += numbers
        elif match[3] == "[":
            start, stop, amount = numbers
            count = number(f"{name}: the count in {item!r}", amount, 1, limit, integer=True)
            spread = [start + (stop - start) * i / max(1, count - 1) for i in range(count)]
            values += [round(v) for v in spread] if kind is int else spread
        else:
            start, stop, amount = numbers
            step = number(f"{name}: the step in {item!r}", amount, 1e-9, math.inf)
            count = math.floor((stop - start) / step + 1e-9) + 1
            if count < 1 or count > limit:
                raise gr.Error(f"{name}: {item!r} gives {count} values; at most {limit}")
            values += [start + step * i for i in range(count)]
    if len(values) > limit:
        raise gr.Error(f"{name}: {len(values)} values; at most {limit}")
    checked = [number(name, v, low, high, integer=kind is int) for v in values]
    return list(dict.fromkeys(checked))
