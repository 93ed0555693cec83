"""Training speed: our trainer (``train.diffusion``) against a minimal diffusers-example loop, same UNet and batch.

Rows, all on the MNIST train split with the same UNet (``--model``, class-conditional, from ``models.unet``), batch
and optimizer (AdamW, warm-up + cosine learning rate, gradient clipping at 1):

* ``ours``: ``train.diffusion.train`` itself, run in this process with a fresh run directory, ``--objective vp-eps``,
  checkpoints and sample grids pushed past the end (``--checkpoint-every`` above ``--steps``, ``--sample-every 0``).
  Its step times come from its own per-step log call (``MetricsLog.log``), wrapped here to record when it runs:
  step k's time is the gap between the log calls of steps k − 1 and k, which holds everything the loop does.
* ``minimal + EMA`` and ``minimal``: the loop of diffusers' examples/unconditional_image_generation/
  train_unconditional.py (the DDPM objective of Ho et al. 2020, Algorithm 1): a shuffled ``DataLoader``, ε and
  t ~ U{0, …, 999} drawn from the global generator, ``DDPMScheduler.add_noise``, MSE on ε, backward, clip, AdamW
  and learning-rate step, and optionally ``EMAModel.step`` (the example's ``--use_ema``). It passes the true class
  labels, so the UNet computes the same function as ours (the example's model is unconditional).

What our step does beyond the minimal loop (the difference the ratio measures): ε, t and label dropout from a
generator seeded per step (``derived_seed``: numpy's SeedSequence) so runs resume and scale out exactly; the global
batch's index list recomputed from seeded per-epoch permutations (``GlobalBatchOrder``); accelerate's ``accumulate``
context, ``backward`` and a ``gather`` of the per-sample losses; the objective's ``observe`` (a no-op for uniform t);
the loss's ``.item()``; one ``metrics.jsonl`` line (the file opened and closed every step) and three TensorBoard
scalars (``accelerator.log``); the tqdm bar; the SIGTERM flag check; and the EMA. No mixed precision on a CPU.
The ``of which logging`` column is the CPU time spent inside ``MetricsLog.log``.

Timing. The machine may be shared, so the rows run interleaved: ``--repeats`` rounds, each running every row once in
a rotated order; each run trains ``--warmup-steps`` untimed steps, then ``--steps`` timed ones. Every step records
this process's CPU time (``time.process_time``; with one torch thread it leaves out the time other jobs hold the
core) and its wall time. The table gives the median CPU time of a step over all timed steps of a row, steps per
CPU-second = 1/median, and the ratios to ``minimal + EMA``: per round, a run's median step time over the baseline
run's of the same round, and the median of those over rounds, for CPU and for wall time.

    python bench/training_speed.py [--model tiny] [--batch-size 32] [--steps 20] [--warmup-steps 3] [--repeats 3]

prints the table and writes bench/results/training_speed.json with the machine and its load average.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train.diffusion as trainer  # noqa: E402
from bench.common import check_positive, machine_info, write_results  # noqa: E402
from data import load_dataset  # noqa: E402
from models.unet import UNET_CONFIGS, build_unet  # noqa: E402
from train.run import MetricsLog  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "minimal + EMA"
ROWS = ("ours", BASELINE, "minimal")
SEED = 0
LR, WARMUP, EMA_DECAY, GRAD_CLIP = 2e-4, 200, 0.999, 1.0  # train.diffusion's defaults


def clocks() -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds)."""
    return time.process_time(), time.perf_counter()


def step_times(marks: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(CPU, wall) durations between consecutive clock readings."""
    return [(later[0] - earlier[0], later[1] - earlier[1]) for earlier, later in zip(marks, marks[1:])]


def ours(model: str, batch_size: int, steps: int, warmup_steps: int) -> tuple[list[tuple[float, float]], list[float]]:
    """Timed (CPU, wall) step durations of ``train.diffusion``, and the CPU time each step spent in its log call."""
    marks, logging = [], []
    original = MetricsLog.log

    def timed_log(self, step, values):
        started = time.process_time()
        original(self, step, values)
        marks.append(clocks())
        logging.append(marks[-1][0] - started)

    total = warmup_steps + steps
    with tempfile.TemporaryDirectory() as run_dir:
        argv = ["--dataset", "mnist", "--objective", "vp-eps", "--model", model, "--batch-size", str(batch_size),
                "--steps", str(total), "--lr", str(LR), "--warmup", str(WARMUP), "--ema-decay", str(EMA_DECAY),
                "--grad-clip", str(GRAD_CLIP), "--seed", str(SEED), "--checkpoint-every", str(total + 1),
                "--sample-every", "0", "--output-dir", run_dir, "--cpu"]
        MetricsLog.log = timed_log
        try:
            trainer.train(trainer.build_parser().parse_args(argv), argv)
        finally:
            MetricsLog.log = original
    return step_times(marks)[warmup_steps - 1:], logging[warmup_steps:]


def minimal(model: str, batch_size: int, steps: int, warmup_steps: int, ema: bool) -> list[tuple[float, float]]:
    """Timed (CPU, wall) step durations of the diffusers-example loop."""
    dataset = load_dataset("mnist", image_size=32, split="train")
    torch.manual_seed(SEED)
    unet = build_unet(model, 32, dataset.channels, dataset.num_classes).train()
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR)
    lr_schedule = get_scheduler("cosine", optimizer, num_warmup_steps=WARMUP, num_training_steps=warmup_steps + steps)
    averaged = EMAModel(unet.parameters(), decay=EMA_DECAY) if ema else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    batches = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch
    marks = [clocks()]
    for _ in range(warmup_steps + steps):
        x0, labels = next(batches)
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),))
        prediction = unet(noise_scheduler.add_noise(x0, noise, timesteps), timesteps, class_labels=labels).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), GRAD_CLIP)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad()
        if averaged is not None:
            averaged.step(unet.parameters())
        loss.item()  # the example logs the loss every step
        marks.append(clocks())
    return step_times(marks)[warmup_steps:]


def run(model: str, batch_size: int, steps: int, warmup_steps: int, repeats: int) -> dict:
    load_start = os.getloadavg()
    times = {name: [] for name in ROWS}
    logging = []
    for round_index in range(repeats):
        shift = round_index % len(ROWS)
        for name in ROWS[shift:] + ROWS[:shift]:
            if name == "ours":
                durations, logged = ours(model, batch_size, steps, warmup_steps)
                logging += logged
            else:
                durations = minimal(model, batch_size, steps, warmup_steps, ema=name == BASELINE)
            times[name].append(durations)
            cpu, wall = (1000 * median(t[clock] for t in durations) for clock in (0, 1))
            print(f"round {round_index + 1}/{repeats} {name:14s} median step {cpu:.1f} ms CPU, {wall:.1f} ms wall",
                  flush=True)

    def run_medians(name: str, clock: int) -> list[float]:
        """The median step time of each of the row's runs, round by round, on clock 0 (CPU) or 1 (wall)."""
        return [median(t[clock] for t in run_times) for run_times in times[name]]

    def ratio(name: str, clock: int) -> float:
        return median(row / base for row, base in zip(run_medians(name, clock), run_medians(BASELINE, clock)))

    rows = []
    for name in ROWS:
        step_cpu = median(t[0] for run_times in times[name] for t in run_times)
        rows.append({"name": name, "step_cpu_seconds_median": step_cpu, "steps_per_cpu_second": 1 / step_cpu,
                     "ratio_to_minimal_ema": ratio(name, 0), "wall_ratio_to_minimal_ema": ratio(name, 1),
                     "run_cpu_medians": run_medians(name, 0), "run_wall_medians": run_medians(name, 1),
                     "logging_cpu_seconds_median": median(logging) if name == "ours" else None})
    return {"benchmark": "training_speed", **machine_info(),
            "load_average_start": load_start, "load_average_end": os.getloadavg(),
            "note": "rows interleaved (rotated order); ratios are medians over rounds of same-round ratios; the "
                    "machine may run other jobs: see load averages",
            "model": model, "parameters": sum(p.numel() for p in build_unet(model, 32, 1, 10).parameters()),
            "batch_size": batch_size, "steps": steps, "warmup_steps": warmup_steps, "repeats": repeats, "rows": rows}


def markdown(results: dict) -> str:
    """The table (median step time, steps/s, ratio to the minimal loop with EMA) and the settings, as Markdown."""
    lines = [
        f"`{results['model']}` UNet ({results['parameters'] / 1e6:.2f}M parameters), batch {results['batch_size']}, "
        f"{results['steps']} timed steps after {results['warmup_steps']} untimed, {results['repeats']} interleaved "
        f"rounds (medians); {results['threads']} torch thread(s) on "
        f"{results['processor'] or results['machine']}, load average {results['load_average_start'][0]:.1f} at the "
        "start.",
        "",
        "| row | CPU time per step | steps per CPU-second | CPU time vs minimal + EMA | wall time vs minimal + EMA "
        "| CPU time spread over rounds | of which logging |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        logging = ("—" if row["logging_cpu_seconds_median"] is None
                   else f"{1000 * row['logging_cpu_seconds_median']:.2f} ms")
        spread = max(row["run_cpu_medians"]) / min(row["run_cpu_medians"]) - 1
        lines.append(f"| {row['name']} | {1000 * row['step_cpu_seconds_median']:.1f} ms | "
                     f"{row['steps_per_cpu_second']:.2f} | {row['ratio_to_minimal_ema']:.3f} | "
                     f"{row['wall_ratio_to_minimal_ema']:.3f} | {spread:.0%} | {logging} |")
    lines += ["", "Spread: max/min − 1 of a row's run medians over rounds, what the shared machine's load did to "
              "them; the same-round ratios cancel what moved every row alike, not the rest."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/training_speed.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=list(UNET_CONFIGS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--out", type=Path, default=RESULTS / "training_speed.json")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("batch_size", "steps", "warmup_steps", "repeats"))
    results = run(args.model, args.batch_size, args.steps, args.warmup_steps, args.repeats)
    print()
    print(markdown(results))
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
