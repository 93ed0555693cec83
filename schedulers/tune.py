"""Tune a sampler for a model directory and save it there (issue #17):

    python -m schedulers.tune checkpoints/mnist-vp --sampler dpmpp-2m --nfe 5

writes ``checkpoints/mnist-vp/tuned/dpmpp-2m-nfe5/`` (``dpmpp-2m-nfe5-free/`` with ``--final free``): a scheduler
config and ``tuning.json`` (the grid, the table, the error against the tight solution next to the stock grid's,
and the weights' fingerprint), which the app lists next to the stock samplers. A conditional model is tuned over
its classes in turn, at guidance 1. Stopped with Ctrl-C or SIGTERM, it writes nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .tuning import FINALS, TUNABLE, TuningStopped, save_tuned, tune_sampler


def load_denoiser(model_dir: Path):
    """(network, scheduler config, model info) of a pipeline directory whose ``unet`` is a diffusers model, loaded
    from safetensors only."""
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{model_dir} is not a pipeline directory (no model_index.json)")
    index = json.loads(index_path.read_text())
    library, class_name = (index.get("unet") or [None, None])[:2]
    if library != "diffusers" or class_name is None:
        raise ValueError(f"{model_dir}'s denoiser is {library}.{class_name}; tuning loads diffusers models only")
    network = getattr(importlib.import_module("diffusers"), class_name).from_pretrained(
        model_dir / "unet", use_safetensors=True)
    scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    return network.eval(), scheduler_config, dict(index.get("model_info") or {})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m schedulers.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="a pipeline directory (model_index.json, unet/, scheduler/)")
    parser.add_argument("--sampler", default="dpmpp-2m", choices=TUNABLE)
    parser.add_argument("--nfe", type=int, default=5, help="network evaluations per sample (default 5)")
    parser.add_argument("--samples", type=int, default=64, help="noise starts to tune on (as many more validate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-runs", type=int, default=None, help="candidate grids to try (default 40 per point)")
    parser.add_argument("--final", choices=FINALS, default="zero",
                        help="zero: end with a denoise (default); free: tune where the run ends, σ_end > 0 "
                             "(schedulers.tuning's docstring says when it helps)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        network, scheduler_config, info = load_denoiser(args.model_dir)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = network.config.sample_size
    shape = (network.config.in_channels, *((size, size) if isinstance(size, int) else size))
    classes = int(info.get("num_classes") or 0)
    labels = None if not classes else torch.arange(2 * args.samples) % classes
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    bar = tqdm(desc=f"tuning {args.sampler} at NFE {args.nfe}", unit="grid")

    def progress(done, total, best):
        bar.total = total
        bar.update(done - bar.n)
        bar.set_postfix(best_rmse=f"{best:.4f}")

    try:
        tuning = tune_sampler(network, scheduler_config, sampler=args.sampler, nfe=args.nfe, sample_shape=shape,
                              class_labels=labels, samples=args.samples, seed=args.seed, max_runs=args.max_runs,
                              final=args.final,
                              model_process=info.get("process", "vp"), progress=progress,
                              should_stop=lambda: bool(stopping))
    except (TuningStopped, KeyboardInterrupt) as stopped:
        print(f"\nstopped: {stopped or 'interrupted'}; nothing written", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    target = save_tuned(args.model_dir, tuning)
    print(f"{target}: RMS error against the tight solution {tuning.rmse:.4f} (stock grid {tuning.stock_rmse:.4f}), "
          f"{tuning.evaluations} evaluations per sample, {tuning.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
