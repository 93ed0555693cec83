"""Resolution extrapolation: sample a model at twice its trained size, with and without entropy-invariant attention.

At twice the side every attention block sees 4× the tokens it was trained on, which flattens its softmax (the
entropy grows like log n). The entropy-invariant scale (Su 2021; seed spec §4.1) multiplies the logits by
log(n)/log(n0), n0 the block's training length, which keeps the entropy as trained. Each block gets its own n0,
measured with forward hooks at the training size, so the multiplier is exactly 1 there.

The judge classifies the large samples after 2×2 average pooling to the trained size (``mnist-vp``: 56×56
pooled to 28×28).

    python bench/resolution.py [--model checkpoints/mnist-vp] [--per-class 20] [--steps 50] [--guidance 3]

prints a table, writes bench/results/resolution.json and docs/resolution-extrapolation.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.utils import make_image_grid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import display_path  # noqa: E402
from evaluation.judge import judge_accuracy, load_judge  # noqa: E402
from kernels.processor import FusedAttnProcessor  # noqa: E402
from pipelines import DiffusionImagePipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def training_lengths(pipe: DiffusionImagePipeline) -> dict[Attention, int]:
    """Each attention block's sequence length at the trained size, from one forward pass with hooks."""
    lengths = {}

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        lengths[module] = hidden.shape[2] * hidden.shape[3] if hidden.ndim == 4 else hidden.shape[1]

    blocks = [m for m in pipe.unet.modules() if isinstance(m, Attention)]
    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    c, h, w = pipe.sample_shape
    labels = torch.zeros(1, dtype=torch.long) if pipe.null_class_id is not None else None
    with torch.no_grad():
        pipe.unet(torch.zeros(1, c, h, w), torch.tensor(500), class_labels=labels)
    for handle in handles:
        handle.remove()
    return lengths


def set_attention(pipe: DiffusionImagePipeline, lengths: dict[Attention, int], entropy_invariant: bool):
    for block, n0 in lengths.items():
        block.set_processor(FusedAttnProcessor("sdpa", entropy_invariant_n0=n0 if entropy_invariant else None))


def markdown(results: dict) -> str:
    """The table of the three variants and the sample grids (one row of grids per variant)."""
    lines = [f"{results['per_class']} samples per digit, {results['steps']} steps, guidance {results['guidance']:g}; "
             "samples at twice the trained size are judged after 2×2 average pooling.", "",
             "| variant | judge accuracy | seconds |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['judge_accuracy']:.1%} | {r['seconds']:.0f} |" for r in results["rows"]]
    lines += ["", "![samples per variant, top to bottom as in the table](resolution-extrapolation.png)"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "mnist-vp"))
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pipe = DiffusionImagePipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge()
    lengths = training_lengths(pipe)
    size = pipe.sample_shape[-1]
    labels = torch.arange(pipe.num_classes).repeat_interleave(args.per_class)
    variants = [(f"{size}×{size} (trained)", size, False), (f"{2 * size}×{2 * size} standard", 2 * size, False),
                (f"{2 * size}×{2 * size} entropy-invariant", 2 * size, True)]
    rows, grids = [], []
    print(f"attention blocks: {len(lengths)}, training lengths {sorted(set(lengths.values()))}")
    print(f"{'variant':34s} {'judge acc':>9s} {'s':>7s}")
    for name, side, invariant in variants:
        set_attention(pipe, lengths, invariant)
        start = time.perf_counter()
        images = pipe(batch_size=len(labels), num_inference_steps=args.steps, class_labels=labels,
                      guidance_scale=args.guidance, height=side, width=side,
                      generator=torch.Generator().manual_seed(args.seed), output_type="raw").images.float()
        seconds = time.perf_counter() - start
        judged = F.avg_pool2d(images, side // size) if side != size else images
        accuracy = judge_accuracy(judge, judged.clamp(-1, 1), labels)
        rows.append({"variant": name, "size": side, "entropy_invariant": invariant, "judge_accuracy": accuracy,
                     "seconds": seconds})
        print(f"{name:34s} {accuracy:9.3f} {seconds:7.1f}")
        shown = min(2, args.per_class)  # samples per digit in the figure: columns are digits
        first = torch.stack([images[labels == c][i] for i in range(shown) for c in range(pipe.num_classes)])
        pil = [pipe._image_processor.postprocess(x[None], "pil")[0].resize((64, 64), 0) for x in first]
        grids.append(make_image_grid(pil, rows=shown, cols=pipe.num_classes))

    out = ROOT / "bench" / "results" / "resolution.json"
    out.write_text(json.dumps({"benchmark": "resolution", "machine": platform.platform(),
                               "model": display_path(args.model), "per_class": args.per_class, "steps": args.steps,
                               "guidance": args.guidance, "rows": rows}, indent=1))
    figure = make_image_grid(grids, rows=len(grids), cols=1)
    figure.save(ROOT / "docs" / "resolution-extrapolation.png")
    print(f"wrote {out} and docs/resolution-extrapolation.png (rows: {', '.join(r['variant'] for r in rows)})")


if __name__ == "__main__":
    main()
