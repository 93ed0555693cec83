"""Training step cost: what makes a CPU training step of the MNIST denoiser cheaper, side by side in one run: the
"small" UNet at 32×32 against "mnist28" at 28×28, channels-last memory format, a second torch thread, and
torch.compile; with the cost of a batch-250 forward (no grad) per row, what sampling and evaluation pay.

One training step: a batch of ``--batch-size`` MNIST images (the first ones of the train split, at the row's size:
32×32 is MNIST padded, 28×28 native) noised at t ~ U{0, …, 999} with fresh ε (``DDPMScheduler.add_noise``), the
class-conditional UNet's forward (``models.unet.build_unet(config, size, 1, 10)``), MSE on ε, backward, an AdamW
step and ``zero_grad``. One inference call: the UNet's forward under ``torch.no_grad`` on ``--inference-batch`` (250)
noised images, one sampler step's network cost. Rows (``--models A:SIZE B:SIZE`` picks the two models; the first is
the baseline, the second gets the thread and compile rows):

* ``small 32×32``: the 3.0M-parameter UNet the shipped checkpoints use, the baseline;
* ``mnist28 28×28``: the 1.1M-parameter 3-level UNet of ``models/unet.py`` at MNIST's native size;
* ``…, channels-last``: each of those with ``model.to(memory_format=torch.channels_last)`` and channels-last inputs;
* ``mnist28 28×28, 2 threads``: ``torch.set_num_threads(2)`` for that row only (every other row runs on one).
  With two threads the process's CPU time counts both, so this row is read by its wall time: the ``speed-up``
  column is, per round, the one-thread row's median wall time per step over this row's, median over rounds. The
  machine is shared: other jobs hold the cores, so this figure is an upper bound of what a second core gives a
  training run here (a wall-time ratio, and the other jobs may leave the second core idler in one round than
  another); the alternative use of a second core is two one-thread runs side by side (e.g. two seeds or
  recipes), which costs each run nothing of its own per-step CPU time.
* ``mnist28 28×28, torch.compile``: ``torch.compile(model)`` (default inductor backend, C++ kernels built with gcc,
  ``compile_threads = 1``, a fresh inductor cache so the compile is cold). Compiling happens in the first training
  step and again in the first no-grad batch-250 forward (a new batch size and grad mode); those calls are timed
  apart (``compile`` columns: the first call's CPU time, this process's plus the compiler subprocesses' (gcc),
  and its wall time) and the steady-state steps after the warm-up are timed like every other row. A compile that
  fails is caught and its error recorded in the row; ``--no-compile`` leaves the row out.

Timing. The machine may be shared, so every row's model, optimizer and batch are built once, then ``--repeats``
rounds each run every row once in a rotated order: ``--warmup-steps`` untimed steps, ``--steps`` timed ones, then
``--inference-calls`` timed forwards (round 1 first runs one untimed forward per row). Each call records this
process's CPU time (``time.process_time``, with one torch thread: it leaves out the time other jobs hold the core)
and its wall time. A row's time is the median over all its timed calls; its ratio to the baseline is, per round,
its median over the baseline's median of the same round, then the median over rounds, so a load that moved every
row of a round alike cancels.

    python bench/training_step_cost.py [--batch-size 64] [--steps 6] [--warmup-steps 2] [--repeats 2]
        [--inference-batch 250] [--models small:32 mnist28:28] [--no-compile]

prints the table and writes bench/results/training_step_cost.json with the machine and its load average.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import check_positive, machine_info, write_results  # noqa: E402
from data import load_dataset  # noqa: E402
from models.unet import UNET_CONFIGS, build_unet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
LR = 2e-4  # train.diffusion's default
NUM_CLASSES = 10


@dataclass(frozen=True)
class Row:
    model: str
    image_size: int
    channels_last: bool = False
    threads: int = 1
    compiled: bool = False

    @property
    def name(self) -> str:
        name = f"{self.model} {self.image_size}×{self.image_size}"
        if self.channels_last:
            name += ", channels-last"
        if self.threads != 1:
            name += f", {self.threads} threads"
        if self.compiled:
            name += ", torch.compile"
        return name


def model_spec(text: str) -> tuple[str, int]:
    """``NAME:SIZE`` (an entry of ``UNET_CONFIGS`` and an image size) for ``--models``."""
    name, _, size = text.partition(":")
    if name not in UNET_CONFIGS or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME:SIZE with NAME one of {', '.join(UNET_CONFIGS)} and a "
                                         f"positive SIZE, got {text!r}")
    return name, int(size)


def rows_for(models: list[tuple[str, int]], compile_row: bool) -> list[Row]:
    (base, base_size), (other, other_size) = models
    rows = [Row(base, base_size), Row(other, other_size), Row(base, base_size, channels_last=True),
            Row(other, other_size, channels_last=True), Row(other, other_size, threads=2)]
    if compile_row:
        rows.append(Row(other, other_size, compiled=True))
    return rows


def clocks() -> tuple[float, float, float]:
    """(CPU seconds of this process, CPU seconds of its finished subprocesses, wall seconds)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime, time.perf_counter()


def elapsed(start: tuple[float, float, float]) -> tuple[float, float, float]:
    return tuple(now - then for now, then in zip(clocks(), start))


class Runner:
    """One row's model, optimizer and fixed batches; ``step`` and ``infer`` each time one call."""

    def __init__(self, row: Row, images: torch.Tensor, labels: torch.Tensor, batch_size: int, inference_batch: int):
        torch.manual_seed(SEED)
        self.row = row
        self.unet = build_unet(row.model, row.image_size, 1, NUM_CLASSES).train()
        self.parameters = sum(p.numel() for p in self.unet.parameters())
        memory_format = torch.channels_last if row.channels_last else torch.contiguous_format
        self.unet = self.unet.to(memory_format=memory_format)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=LR)
        self.network = torch.compile(self.unet) if row.compiled else self.unet
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.generator = torch.Generator().manual_seed(SEED)

        def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.arange(size) % len(images)
            return images[index].contiguous(memory_format=memory_format), labels[index]

        self.train_batch = batch(batch_size)
        x0, inference_labels = batch(inference_batch)
        noise = torch.randn(x0.shape, generator=self.generator)
        t = torch.randint(0, 1000, (len(x0),), generator=self.generator)
        self.inference_inputs = (self.noise_scheduler.add_noise(x0, noise, t).contiguous(memory_format=memory_format),
                                 t, inference_labels)

    def step(self) -> tuple[float, float, float]:
        start = clocks()
        x0, labels = self.train_batch
        noise = torch.randn(x0.shape, generator=self.generator).contiguous(
            memory_format=torch.channels_last if self.row.channels_last else torch.contiguous_format)
        t = torch.randint(0, 1000, (len(x0),), generator=self.generator)
        prediction = self.network(self.noise_scheduler.add_noise(x0, noise, t), t, class_labels=labels).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return elapsed(start)

    def infer(self) -> tuple[float, float, float]:
        start = clocks()
        with torch.no_grad():
            self.network(*self.inference_inputs[:2], class_labels=self.inference_inputs[2])
        return elapsed(start)


def load_images(image_size: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images (and labels) of MNIST's train split at ``image_size``."""
    dataset = load_dataset("mnist", image_size=image_size, split="train")
    images, labels = dataset.tensors()
    return images[:count], labels[:count]


def run(models: list[tuple[str, int]], batch_size: int, inference_batch: int, steps: int, warmup_steps: int,
        inference_calls: int, repeats: int, compile_row: bool) -> dict:
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    rows = rows_for(models, compile_row)
    data = {size: load_images(size, max(batch_size, inference_batch)) for size in {row.image_size for row in rows}}
    runners, errors, compile_times = {}, {}, {}
    for row in rows:
        runners[row] = Runner(row, *data[row.image_size], batch_size, inference_batch)
    steps_of = {row: [] for row in rows}  # per round: list of (cpu, children, wall)
    infers_of = {row: [] for row in rows}
    cache = tempfile.TemporaryDirectory(prefix="inductor-")
    previous_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name  # a cold compile, not one served from an earlier run's cache
    import torch._inductor.config as inductor_config
    previous_threads = inductor_config.compile_threads
    inductor_config.compile_threads = 1  # compile in this process and its gcc calls: one core, counted
    try:
        for round_index in range(repeats):
            shift = round_index % len(rows)
            for row in rows[shift:] + rows[:shift]:
                if row in errors:
                    continue
                runner = runners[row]
                torch.set_num_threads(row.threads)
                try:
                    for warmup in range(warmup_steps):
                        spent = runner.step()
                        if round_index == 0 and warmup == 0 and row.compiled:
                            compile_times["step"] = spent
                    timed = [runner.step() for _ in range(steps)]
                    if round_index == 0:
                        spent = runner.infer()
                        if row.compiled:
                            compile_times["inference"] = spent
                    inferred = [runner.infer() for _ in range(inference_calls)]
                except Exception as error:  # a failing torch.compile is a result, not a crash
                    if not row.compiled:
                        raise
                    errors[row] = f"{type(error).__name__}: {error}".strip()[:2000]
                    print(f"round {round_index + 1}/{repeats} {row.name:34s} failed: {errors[row][:300]}", flush=True)
                    continue
                finally:
                    torch.set_num_threads(1)
                steps_of[row].append(timed)
                infers_of[row].append(inferred)
                print(f"round {round_index + 1}/{repeats} {row.name:34s} step "
                      f"{1000 * median(t[0] for t in timed):7.1f} ms CPU "
                      f"{1000 * median(t[2] for t in timed):7.1f} ms wall; inference "
                      f"{1000 * median(t[0] for t in inferred):7.1f} ms CPU", flush=True)
    finally:
        inductor_config.compile_threads = previous_threads
        if previous_cache is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous_cache
        cache.cleanup()

    baseline, one_thread = rows[0], Row(*models[1])

    def run_medians(times: dict, row: Row, clock: int) -> list[float]:
        """The row's median per call in each round, on clock 0 (CPU) or 2 (wall)."""
        return [median(t[clock] for t in calls) for calls in times[row]]

    def ratio(times: dict, row: Row, over: Row, clock: int) -> float:
        return median(a / b for a, b in zip(run_medians(times, row, clock), run_medians(times, over, clock)))

    results_rows = []
    for row in rows:
        entry = {"name": row.name, "model": row.model, "image_size": row.image_size,
                 "channels_last": row.channels_last, "threads": row.threads, "compiled": row.compiled,
                 "parameters": runners[row].parameters, "error": errors.get(row)}
        if row in errors:
            results_rows.append(entry)
            continue
        for key, times in (("step", steps_of), ("inference", infers_of)):
            entry[f"{key}_cpu_seconds_median"] = median(t[0] for calls in times[row] for t in calls)
            entry[f"{key}_wall_seconds_median"] = median(t[2] for calls in times[row] for t in calls)
            entry[f"{key}_ratio_to_baseline"] = ratio(times, row, baseline, 0)
            entry[f"{key}_wall_ratio_to_baseline"] = ratio(times, row, baseline, 2)
            entry[f"{key}_run_cpu_medians"] = run_medians(times, row, 0)
            entry[f"{key}_run_wall_medians"] = run_medians(times, row, 2)
            entry[f"{key}_thread_speedup"] = (ratio(times, one_thread, row, 2) if row.threads != 1 else None)
        results_rows.append(entry)
    for entry, row in zip(results_rows, rows):
        entry["compile"] = None
        if row.compiled:
            entry["compile"] = {f"first_{key}_{clock}_seconds": (None if key not in compile_times else
                                                                 compile_times[key][index] if clock != "cpu" else
                                                                 compile_times[key][0] + compile_times[key][1])
                                for key in ("step", "inference")
                                for clock, index in (("cpu", 0), ("wall", 2))}
    return {"benchmark": "training_step_cost", **machine_info(),
            "load_average_start": load_start, "load_average_end": os.getloadavg(),
            "note": "rows interleaved (rotated order); ratios are medians over rounds of same-round ratios; CPU time "
                    "with 1 torch thread except the 2-thread row (read its wall time); the machine may run other "
                    "jobs: see load averages",
            "batch_size": batch_size, "inference_batch": inference_batch, "steps": steps,
            "warmup_steps": warmup_steps, "inference_calls": inference_calls, "repeats": repeats,
            "baseline": baseline.name, "rows": results_rows}


def markdown(results: dict) -> str:
    """The table (per-step and per-forward CPU time, ratios to the baseline, threads and compile notes)."""
    lines = [
        f"Training step: batch {results['batch_size']}, forward + MSE + backward + AdamW, {results['steps']} timed "
        f"steps after {results['warmup_steps']} untimed per round; inference: one no-grad forward of "
        f"{results['inference_batch']} images, {results['inference_calls']} timed per round; "
        f"{results['repeats']} interleaved rounds (medians); 1 torch thread unless the row says 2, on "
        f"{results['processor'] or results['machine']}, load average {results['load_average_start'][0]:.1f} at the "
        f"start. Ratios: to `{results['baseline']}`, per round, median over rounds.",
        "",
        "| row | parameters | CPU ms / step | wall ms / step | step CPU vs baseline | CPU ms / inference "
        "| inference CPU vs baseline | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        if row.get("error"):
            error = " ".join(row["error"].split())[:200].replace("|", "\\|")
            lines.append(f"| {row['name']} | {row['parameters'] / 1e6:.2f}M | — | — | — | — | — | failed: {error} |")
            continue
        notes = []
        if row["step_thread_speedup"] is not None:
            notes.append(f"wall speed-up vs 1 thread: step {row['step_thread_speedup']:.2f}×, inference "
                         f"{row['inference_thread_speedup']:.2f}×; CPU time counts both threads")
        if row.get("compile"):
            compile_info = row["compile"]
            parts = [f"first {key} {compile_info[f'first_{key}_cpu_seconds']:.0f} s CPU "
                     f"({compile_info[f'first_{key}_wall_seconds']:.0f} s wall)"
                     for key in ("step", "inference") if compile_info[f"first_{key}_cpu_seconds"] is not None]
            notes.append("compile: " + ", ".join(parts))
        lines.append(f"| {row['name']} | {row['parameters'] / 1e6:.2f}M | "
                     f"{1000 * row['step_cpu_seconds_median']:.0f} | {1000 * row['step_wall_seconds_median']:.0f} | "
                     f"{row['step_ratio_to_baseline']:.2f} | "
                     f"{1000 * row['inference_cpu_seconds_median']:.0f} | {row['inference_ratio_to_baseline']:.2f} | "
                     f"{'; '.join(notes) or '—'} |")
    lines += ["", "Compile: the first training step and the first batch-size inference forward of the compiled "
              "model, which compile (CPU time includes the compiler's gcc subprocesses, cold cache); its other "
              "columns are steady state after warm-up. The 2-thread row shares the machine with other jobs, so "
              "its speed-up is an upper bound of what a second core gives one run; two 1-thread runs side by "
              "side is the alternative."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/training_step_cost.py", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--inference-batch", type=int, default=250, help="images per no-grad forward")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per row and round")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per row and round")
    parser.add_argument("--inference-calls", type=int, default=1, help="timed forwards per row and round")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--models", type=model_spec, nargs=2, default=[("small", 32), ("mnist28", 28)],
                        metavar="NAME:SIZE", help="the baseline UNet and the one that gets the thread and compile "
                        "rows, each with its image size (default small:32 mnist28:28)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    parser.add_argument("--out", type=Path, default=RESULTS / "training_step_cost.json")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("batch_size", "inference_batch", "steps", "warmup_steps", "inference_calls",
                                  "repeats"))
    if args.models[0] == args.models[1]:
        parser.error("--models needs two different NAME:SIZE entries")
    results = run(args.models, args.batch_size, args.inference_batch, args.steps, args.warmup_steps,
                  args.inference_calls, args.repeats, not args.no_compile)
    print()
    print(markdown(results))
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
