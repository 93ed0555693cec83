"""One command for every benchmark's tables and plots: docs/benchmarks.md from the results in bench/results/.

    python bench/report.py                  # render docs/benchmarks.md from the JSON files (seconds, no sampling)
    python bench/report.py --run            # first re-run every benchmark script, one after another, then render
    python bench/report.py --run --quick    # smoke: every script at a tiny size, into NAME-quick.json, and the
                                            # page into bench/results/benchmarks-quick.md; committed files untouched

Every script in bench/ defines ``markdown(results: dict) -> str``, the body of its section: a Markdown table and,
when it writes a plot, an image link relative to docs/. ``BENCHMARKS`` lists each script with the commands that
reproduce its committed JSON; the page gives each one a section with the first paragraph of the script's
docstring (what it measures), the machine its results come from, those commands and the script's ``markdown``.
A script whose JSON is missing gets a line saying how to produce it; a listed script that does not exist yet
gets no section. ``--run`` skips the scripts that need a CUDA GPU when none is available (they keep their
committed JSON) and goes on past a failing script, exiting with status 1 after rendering.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
QUICK_PAGE = RESULTS / "benchmarks-quick.md"


@dataclass(frozen=True)
class Benchmark:
    """A script ``bench/NAME.py``, the commands (argument lists, run in order) that reproduce its committed
    ``results`` JSON (``NAME.json``, or ``NAME-VARIANT.json`` for a second run of the same script on other
    settings), and tiny ones for ``--quick`` that write ``NAME-quick.json`` (None: it cannot run small without
    overwriting its committed results, ``quick_skip`` says why)."""

    name: str
    commands: tuple[tuple[str, ...], ...] = ((),)
    variant: str = ""
    quick: tuple[tuple[str, ...], ...] | None = (("--quick",),)
    quick_skip: str = ""
    needs_cuda: bool = False
    note: str = ""

    @property
    def script(self) -> Path:
        return BENCH / f"{self.name}.py"

    @property
    def results(self) -> Path:
        return RESULTS / (f"{self.name}-{self.variant}.json" if self.variant else f"{self.name}.json")

    @property
    def quick_results(self) -> Path:
        return RESULTS / f"{self.name}-quick.json"


BENCHMARKS = (
    Benchmark("samplers", commands=(("--search",), ())),
    Benchmark("quality_vs_nfe"),
    Benchmark("quality_vs_nfe", variant="flow", quick=None, quick_skip="the first quality_vs_nfe entry smoke-tests "
              "the script", commands=(("--model", "checkpoints/mnist-flow", "--samples", "200", "--nfe", "10", "20",
                                       "--samplers", "euler-ancestral", "dpmpp-2m", "--reference-steps", "1000",
                                       "--out", "bench/results/quality_vs_nfe-flow.json"),)),
    Benchmark("tuning", commands=(("--samples", "500", "--reference-steps", "100"),)),
    Benchmark("tuning", variant="vp", quick=None, quick_skip="the first tuning entry smoke-tests the script",
              commands=(("--model", "checkpoints/mnist-vp", "--skip-mixtures", "--samples", "500",
                         "--reference-steps", "100", "--out", "bench/results/tuning-vp.json"),)),
    Benchmark("clipping", commands=tuple(
        ("--models", f"checkpoints/{model}", "--samples", "300", "--guidance", "1", "2", "3", "--out",
         f"bench/results/clipping-{name}.json") for model, name in (("mnist-flow", "flow"), ("mnist-vp", "vp")))
        + (("--merge", "bench/results/clipping-flow.json", "bench/results/clipping-vp.json"),)),
    Benchmark("guidance", commands=(
        ("--samples", "1000", "--steps", "25", "--scales", "0", "1", "2", "3", "4", "6", "8", "--modes",
         "classifier-free", "--name", "guidance-cfg"),
        ("--samples", "1000", "--steps", "25", "--scales", "1", "2", "4", "8", "16", "32", "64", "--modes",
         "classifier", "--name", "guidance-classifier"),
        ("--merge", "bench/results/guidance-cfg.json", "bench/results/guidance-classifier.json")),
        quick=(("--samples", "20", "--steps", "2", "--scales", "1", "--modes", "classifier-free",
                "--name", "guidance-quick"),)),
    Benchmark("models", quick=(("--samples", "20", "--steps", "2", "--cfg-steps", "--out",
                                "bench/results/models-quick.json"),)),
    Benchmark("few_step", commands=(("--samples", "1000"),),
              quick=(("--samples", "20", "--steps", "1", "--guidance", "1", "--teacher-nfe", "4", "--out",
                      "bench/results/few_step-quick.json"),)),
    Benchmark("resolution", commands=(("--per-class", "20", "--steps", "25"),), quick=None,
              quick_skip="it has no output option, so a small run would overwrite its committed results"),
    Benchmark("attention", quick=(("--dtypes", "float16", "--time-budget", "30", "--skip-unet", "--out",
                                   "bench/results/attention-quick.json"),), needs_cuda=True,
              note="Needs a CUDA GPU: `report.py --run` on a machine without one keeps the committed JSON "
                   "(bench/README.md says how to run it on a lent H100; `--smoke` checks correctness on a CPU)."),
    Benchmark("sampling_speed", quick=(("--steps", "2", "--repeats", "1", "--out",
                                        "bench/results/sampling_speed-quick.json"),)),
    Benchmark("training_speed",
              quick=(("--steps", "2", "--warmup-steps", "1", "--repeats", "1", "--out",
                      "bench/results/training_speed-quick.json"),)),
    Benchmark("training_step_cost",
              quick=(("--models", "tiny:16", "tiny:8", "--no-compile", "--steps", "1", "--warmup-steps", "1",
                      "--repeats", "1", "--batch-size", "8", "--inference-batch", "16", "--out",
                      "bench/results/training_step_cost-quick.json"),)),
    Benchmark("training_recipes",
              commands=(("--cpu-minutes", "24", "--points", "3", "--samples", "200"),),
              quick=(("--recipes", "eps", "flow-logit-normal", "--cpu-minutes", "0.05", "--points", "2", "--samples",
                      "10", "--runs-dir", "runs/training-recipes-quick", "--output",
                      "bench/results/training_recipes-quick.json"),)),
)

HEADER = """# Benchmarks

This page is generated by `python bench/report.py` from the JSON files in `bench/results/`: do not edit it by
hand. `python bench/report.py --run` re-runs every benchmark first (hours on a CPU) and then renders it;
[bench/README.md](../bench/README.md) describes the scripts. Each section says what its script measures, the
machine its results come from and the commands that produced them."""


def load_script(benchmark: Benchmark) -> ModuleType:
    """Import ``bench/NAME.py`` as a module (its ``main`` does not run) and check it has ``markdown``."""
    spec = importlib.util.spec_from_file_location(f"bench_{benchmark.name}", benchmark.script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is imported
    spec.loader.exec_module(module)
    if not callable(getattr(module, "markdown", None)):
        raise AttributeError(f"{benchmark.script.relative_to(ROOT)} has no markdown(results) function; every "
                             "benchmark script defines one (bench/README.md)")
    return module


def available() -> list[Benchmark]:
    """The listed benchmarks whose script exists."""
    return [benchmark for benchmark in BENCHMARKS if benchmark.script.is_file()]


def machine(results: dict) -> str:
    """The machine a results file records, from whichever of the scripts' keys it has."""
    parts = [results.get("device") or results.get("machine") or "not recorded"]
    if results.get("processor"):
        parts.append(results["processor"])
    if "threads" in results:
        parts.append(f"{results['threads']} torch thread(s)")
    parts += [f"{key} {results[key]}" for key in ("torch", "cuda") if results.get(key)]
    if results.get("date"):
        parts.append(results["date"])
    return ", ".join(str(part) for part in parts)


def command_line(benchmark: Benchmark, arguments: tuple[str, ...]) -> str:
    return " ".join(("python", f"bench/{benchmark.name}.py", *arguments))


def section(benchmark: Benchmark, results_path: Path) -> str:
    module = load_script(benchmark)
    what = " ".join(module.__doc__.strip().split("\n\n")[0].split())
    commands = "; ".join(f"`{command_line(benchmark, arguments)}`" for arguments in benchmark.commands)
    title = f"`bench/{benchmark.name}.py`" + (f", {benchmark.variant}" if benchmark.variant else "")
    lines = [f"## {title}", "", what, ""]
    if benchmark.note:
        lines += [benchmark.note, ""]
    if not results_path.is_file():
        lines.append(f"No results yet: run {commands} (or `python bench/report.py --run`), which writes "
                     f"`bench/results/{results_path.name}`.")
        return "\n".join(lines)
    results = json.loads(results_path.read_text())
    lines += [f"Machine: {machine(results)}. `report.py --run` runs {commands}.", "",
              module.markdown(results).strip()]
    return "\n".join(lines)


def render(quick: bool = False) -> str:
    """The page: the committed results, or with ``quick`` each ``NAME-quick.json`` where one exists."""
    sections = []
    for benchmark in available():
        small = quick and benchmark.quick is not None and benchmark.quick_results.is_file()
        path = benchmark.quick_results if small else benchmark.results
        sections.append(section(benchmark, path))
    return "\n\n".join([HEADER, *sections]) + "\n"


def run_all(quick: bool) -> list[str]:
    """Run every available benchmark's commands (``quick``: its tiny ones) as subprocesses, one at a time; the
    names of those that failed."""
    import torch

    failed = []
    for benchmark in available():
        commands = benchmark.quick if quick else benchmark.commands
        if benchmark.needs_cuda and not torch.cuda.is_available():
            print(f"skipping bench/{benchmark.name}.py: it needs a CUDA GPU and none is available; the page keeps "
                  f"its committed results", flush=True)
            continue
        if commands is None:
            print(f"skipping bench/{benchmark.name}.py in --quick: {benchmark.quick_skip}", flush=True)
            continue
        for arguments in commands:
            print(f"\n=== {command_line(benchmark, arguments)}", flush=True)
            if subprocess.run([sys.executable, str(benchmark.script), *arguments], cwd=ROOT).returncode != 0:
                failed.append(benchmark.name)
                break
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/report.py", description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="re-run every benchmark script before rendering")
    parser.add_argument("--quick", action="store_true", help="with --run: tiny runs into NAME-quick.json, and the "
                        f"page into {QUICK_PAGE.relative_to(ROOT)}")
    parser.add_argument("--out", type=Path, default=None, help=f"the page (default {PAGE.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if args.quick and not args.run:
        parser.error("--quick goes with --run (rendering alone takes seconds)")
    failed = run_all(args.quick) if args.run else []
    out = args.out or (QUICK_PAGE if args.quick else PAGE)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(quick=args.quick))
    print(f"wrote {out}")
    if failed:
        print(f"failed: {', '.join(failed)} (their sections show their previous results)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
