"""A stand-in trainer for the Train tab's process tests: logs a loss line every 50 ms, writes a sample grid, and
exports a pipeline directory (a copy of mnist-exact) when it reaches --steps. It records the argv it got."""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import PIL.Image

EXACT = Path(__file__).resolve().parents[1] / "checkpoints" / "mnist-exact"

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--output-dir", type=Path, required=True)
parser.add_argument("--export", type=Path, required=True)
parser.add_argument("--resume", default=None)
args = parser.parse_args()
args.output_dir.mkdir(parents=True, exist_ok=True)
with open(args.output_dir / "argv.jsonl", "a") as file:
    file.write(json.dumps(sys.argv[1:]) + "\n")
metrics = args.output_dir / "metrics.jsonl"
start = len(metrics.read_text().splitlines()) if args.resume and metrics.exists() else 0
(args.output_dir / "samples").mkdir(exist_ok=True)
PIL.Image.new("L", (8, 8), 128).save(args.output_dir / "samples" / "step-1.png")
for step in range(start + 1, args.steps + 1):
    with open(metrics, "a") as file:
        file.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    print(f"step {step}", flush=True)
    time.sleep(0.05)
shutil.copytree(EXACT, args.export)
print("exported", flush=True)
