"""Sampling speed: our pipeline against diffusers' DDPMPipeline / DDIMPipeline and bare UNet calls, same UNet.

Every row draws ``--batch-size`` images in ``--steps`` UNet evaluations of the shipped ``checkpoints/mnist-vp`` UNet
(class-conditional, 3.0M parameters), from the same seed:

* ``bare UNet calls``: the network in a loop with the DDIM (η = 0) update written out, coefficients precomputed:
  x ← ᾱ_prev (x − β̄ ε)/ᾱ + β̄_prev ε (Song et al. 2021, DDIM eq. 12 with σ = 0). The floor any pipeline adds to.
* ``ours, DDIM``: ``pipelines.DiffusionImagePipeline`` with the model's own scheduler (``schedulers.ddim``);
  ``ours, diffusers' DDIM scheduler``: the same pipeline stepping diffusers' ``DDIMScheduler``, which separates the
  pipeline's cost from the scheduler's; ``ours, DDPM``: our pipeline with ``schedulers.ddpm``.
* ``diffusers DDIMPipeline`` / ``diffusers DDPMPipeline``: diffusers' own pipelines and schedulers.

Class labels. diffusers' pipelines call ``unet(x, t)`` and this UNet refuses to run without ``class_labels``, so
every row runs the unconditional branch, the null class (id 10): our pipeline does that itself when called without
``class_labels``, the bare loop passes the null labels, and diffusers' pipelines get the UNet behind ``NullClassUNet``,
a one-line wrapper that adds them. Every row therefore computes the same network function on the same inputs, and
the DDIM rows end on the same images (the ``max |Δ|`` column, against the bare loop; DDPM rows draw noise).

Timing. The machine may be shared, so the rows run interleaved: ``--repeats`` rounds, each timing every row once,
in an order rotated every round, after one untimed warm-up round. Each run records its wall time and this process's
CPU time (``time.process_time``); with one torch thread the CPU time leaves out the time other jobs hold the core,
which moved wall times by ±25% between rounds when this was written. A row's ratio to the bare loop is the median
over rounds of its CPU time over the bare loop's in the same round (the wall-time ratio, formed the same way, is
listed beside it). A second pass runs every row with ``FreeNetwork``, a stand-in that returns its input at no cost:
a row's time there is its own cost outside the network, and that cost over the bare loop's (per round, median), per
step, divided by one real UNet call, is the row's overhead (``overhead`` column), a far steadier number than the
ratio of two long runs. The issue's target: our pipeline ≤ 3% over bare UNet calls on a CPU.

    python bench/sampling_speed.py [--batch-size 8] [--steps 20] [--repeats 7]

prints the table and writes bench/results/sampling_speed.json with the machine and its load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch
from diffusers import DDIMPipeline, DDPMPipeline
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DDPMScheduler as DiffusersDDPM
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import check_positive, machine_info, write_results  # noqa: E402
from pipelines import DiffusionImagePipeline  # noqa: E402
from schedulers import DDPMScheduler  # noqa: E402
from schedulers.process import to_x0_and_epsilon  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
BARE = "bare UNet calls"
SEED = 0


class NullClassUNet(torch.nn.Module):
    """``network`` called as diffusers' unconditional pipelines call a UNet, ``(x, t)``, with the null class added."""

    def __init__(self, network: torch.nn.Module, labels: torch.Tensor):
        super().__init__()
        self.network = network
        self.labels = labels
        self.config = network.config

    dtype = property(lambda self: self.network.dtype)
    device = property(lambda self: self.network.device)

    def forward(self, sample: torch.Tensor, timestep) -> UNet2DOutput:
        return self.network(sample, timestep, class_labels=self.labels)


class FreeNetwork(torch.nn.Module):
    """A stand-in UNet with ``unet``'s config that returns its input: what remains of a run is the pipeline's cost."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.config = unet.config
        self.dtype, self.device = unet.dtype, unet.device

    def forward(self, sample: torch.Tensor, timestep, class_labels=None) -> UNet2DOutput:
        return UNet2DOutput(sample=sample)


def bare_loop(network, ddim: DiffusersDDIM, batch_size: int, steps: int) -> Callable[[], torch.Tensor]:
    """The DDIM (η = 0) sampler as a plain loop: one network call and two fused multiply-adds per step. Every
    prediction type decodes to ε linearly in (output, x) (``schedulers.process.to_x0_and_epsilon``), so the decoding
    folds into the step's two coefficients: ε = c_out · output + c_x · x."""
    ddim.set_timesteps(steps)
    timesteps = ddim.timesteps
    signal = ddim.alphas_cumprod.double().sqrt()
    noise = (1 - ddim.alphas_cumprod.double()).sqrt()
    # each step goes to the next grid timestep, the last one to clean data (ᾱ = 1, β̄ = 0: set_alpha_to_one)
    to_signal = [float(signal[t]) for t in timesteps[1:]] + [1.0]
    to_noise = [float(noise[t]) for t in timesteps[1:]] + [0.0]
    one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    coefficients = []
    for i, t in enumerate(timesteps):
        a, b = signal[t], noise[t]
        c_out = float(to_x0_and_epsilon(ddim.config.prediction_type, one, zero, a, b)[1])
        c_x = float(to_x0_and_epsilon(ddim.config.prediction_type, zero, one, a, b)[1])
        # x' = scale · x + eps_scale · ε: ᾱ_prev/ᾱ · x + (β̄_prev − ᾱ_prev β̄/ᾱ) · ε
        scale, eps_scale = to_signal[i] / float(a), to_noise[i] - to_signal[i] * float(b / a)
        coefficients.append((scale + eps_scale * c_x, eps_scale * c_out))
    labels = torch.full((batch_size,), network.config.num_class_embeds - 1)
    shape = (batch_size, network.config.in_channels, network.config.sample_size, network.config.sample_size)

    @torch.no_grad()
    def run() -> torch.Tensor:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
        for t, (x_scale, out_scale) in zip(timesteps, coefficients):
            out = network(x, t, class_labels=labels).sample
            x = x_scale * x + out_scale * out  # the DDIM step with ε decoded from the output
        return (x / 2 + 0.5).clamp(0, 1)

    return run


def runners(model: DiffusionImagePipeline, network: torch.nn.Module, batch_size: int,
            steps: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Each row's sampling run, as a call that returns the images (B×C×H×W in [0, 1])."""
    config = model.scheduler.config
    ours = {
        "ours, DDIM": DiffusionImagePipeline(network, model.scheduler),
        "ours, diffusers' DDIM scheduler": DiffusionImagePipeline(network, DiffusersDDIM.from_config(config)),
        "ours, DDPM": DiffusionImagePipeline(network, DDPMScheduler.from_config(config)),
    }
    labels = torch.full((batch_size,), network.config.num_class_embeds - 1)
    theirs = {
        "diffusers DDIMPipeline": DDIMPipeline(NullClassUNet(network, labels), DiffusersDDIM.from_config(config)),
        "diffusers DDPMPipeline": DDPMPipeline(NullClassUNet(network, labels), DiffusersDDPM.from_config(config)),
    }
    for pipeline in (*ours.values(), *theirs.values()):
        pipeline.set_progress_bar_config(disable=True)
    rows = {BARE: bare_loop(network, DiffusersDDIM.from_config(config), batch_size, steps)}
    for name, pipeline in {**ours, **theirs}.items():
        rows[name] = (lambda p: lambda: p(batch_size=batch_size, num_inference_steps=steps, output_type="pt",
                                          generator=torch.Generator().manual_seed(SEED)).images)(pipeline)
    return rows


def interleaved_times(rows: dict[str, Callable[[], torch.Tensor]], repeats: int) -> tuple[dict, dict, dict]:
    """CPU seconds and wall seconds of every run per row (one warm-up round untimed; the order rotates each round),
    and the images of each row's last run."""
    names = list(rows)
    images = {name: rows[name]() for name in names}  # warm-up
    cpu, wall = {name: [] for name in names}, {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            images[name] = rows[name]()
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
    return cpu, wall, images


def run(model_dir: Path, batch_size: int, steps: int, repeats: int) -> dict:
    model = DiffusionImagePipeline.from_pretrained(model_dir)
    unet = model.unet.eval()
    load_start = os.getloadavg()
    cpu, wall, images = interleaved_times(runners(model, unet, batch_size, steps), repeats)
    free_cpu, _, _ = interleaved_times(runners(model, FreeNetwork(unet), batch_size, steps), repeats)
    bare_free = median(free_cpu[BARE])
    unet_call = (median(cpu[BARE]) - bare_free) / steps  # one real UNet call: the bare loop over the free network
    rows = []
    for name, seconds in cpu.items():
        own = median(row - bare for row, bare in zip(free_cpu[name], free_cpu[BARE])) / steps
        rows.append({
            "name": name, "cpu_seconds": seconds, "wall_seconds": wall[name], "cpu_seconds_median": median(seconds),
            "images_per_cpu_second": batch_size / median(seconds),
            "ratio_to_bare": median(row / bare for row, bare in zip(seconds, cpu[BARE])),
            "wall_ratio_to_bare": median(row / bare for row, bare in zip(wall[name], wall[BARE])),
            "free_network_cpu_seconds": free_cpu[name], "overhead_seconds_per_step": own,
            "overhead_percent": 100 * own / unet_call,
            "max_abs_difference_to_bare": (float((images[name] - images[BARE]).abs().max())
                                           if "DDPM" not in name else None),
        })
    return {"benchmark": "sampling_speed", **machine_info(),
            "load_average_start": load_start, "load_average_end": os.getloadavg(),
            "note": "rows interleaved (rotated order); ratios are medians over rounds of same-round CPU-time "
                    "ratios; the machine may run other jobs: see load averages",
            "model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
            "batch_size": batch_size, "steps": steps, "repeats": repeats, "unet_seconds_per_call": unet_call,
            "bare_free_seconds_per_step": bare_free / steps, "rows": rows}


def markdown(results: dict) -> str:
    """The table (medians, ratios to the bare loop, per-step overhead) and the settings, as a Markdown section body."""
    lines = [
        f"`{results['model']}` UNet, batch {results['batch_size']}, {results['steps']} steps, "
        f"{results['repeats']} interleaved rounds (medians over rounds); {results['threads']} torch thread(s) on "
        f"{results['processor'] or results['machine']}, load average {results['load_average_start'][0]:.1f} at the "
        f"start. One UNet call: {1000 * results['unet_seconds_per_call']:.0f} ms of CPU.",
        "",
        "| row | images per CPU-second | CPU time vs bare | wall time vs bare | CPU time spread over rounds "
        "| overhead per step | overhead vs one UNet call | max abs diff to bare |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        difference = "—" if row["max_abs_difference_to_bare"] is None else f"{row['max_abs_difference_to_bare']:.1e}"
        spread = max(row["cpu_seconds"]) / min(row["cpu_seconds"]) - 1
        lines.append(f"| {row['name']} | {row['images_per_cpu_second']:.2f} | {row['ratio_to_bare']:.3f} | "
                     f"{row['wall_ratio_to_bare']:.3f} | {spread:.0%} | "
                     f"{1e6 * row['overhead_seconds_per_step']:+.0f} µs | {row['overhead_percent']:+.2f}% | "
                     f"{difference} |")
    lines += ["", "Overhead: a row's CPU time per step with a free stand-in network, minus the bare loop's "
              f"({1e6 * results['bare_free_seconds_per_step']:.0f} µs), over one real UNet call. Spread: max/min − 1 "
              "of a row's CPU times over rounds, what the shared machine's load did to them; the same-round ratios "
              "cancel what moved every row alike, not the rest, so only the overhead columns resolve a few percent."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/sampling_speed.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "checkpoints/mnist-vp")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds (after one warm-up round)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sampling_speed.json")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("batch_size", "steps", "repeats"))
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()  # our schedulers' extra config keys, unknown to diffusers' own
    results = run(args.model, args.batch_size, args.steps, args.repeats)
    print(markdown(results))
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
