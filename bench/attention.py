"""Attention throughput: our Triton kernels (kernels/attention.py) against PyTorch SDPA's flash, mem-efficient,
cuDNN and math backends, xformers (when importable) and a naive softmax(q kᵀ) v, forward and forward+backward.

    python bench/attention.py                       # on a CUDA GPU: every table, bench/results/attention.json
    python bench/attention.py --out $OUT/attention.json --time-budget 360
    python bench/attention.py --smoke               # no GPU: correctness of tiny shapes through Triton's interpreter

Shapes, in the order they run (a time budget stops the kernel part early, and the JSON lists what it skipped):
``standard`` is FlashAttention's benchmark grid (batch·seq = 16k tokens, hidden 2048, so heads = 2048/head_dim;
published H100 numbers in /work/shared/reference/anchors.md §3.1), ``unet`` the attention of diffusion UNets
(batch 64–512, heads 1–8, head_dim 32–128, 8×8 to 64×64 feature maps = 64 to 4096 tokens), ``workbench`` this
repository's own UNets (head_dim 8, which the kernel pads to 16, and google/ddpm-cifar10-32's one 256-wide head).

FLOPs: forward 4·B·H·Lq·Lk·D (two matrix products); forward+backward 3.5× that (the backward's five products
are 2.5×), FlashAttention's convention. Each time is the median of ``triton.testing.do_bench``, which flushes L2
before every call, so inputs come from HBM as they would between UNet layers. Every row also checks our output
and gradients against SDPA's (‖ours − sdpa‖/‖sdpa‖ and max |ours − sdpa|).

The last part, when diffusers is importable (the GPU image lacks it: carry its wheel, bench/README.md), times a
whole UNet2DModel (the repository's "cifar" architecture at three head sizes) with each attention processor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "attention.json"
DEVICE = "cuda"  # every GPU tensor goes here
# Relative error ‖ours − sdpa‖/‖sdpa‖ above which a row is flagged; SDPA itself rounds at the dtype's precision.
ERROR_BOUNDS = {"float16": 5e-3, "bfloat16": 3e-2, "float32": 1e-4}
FORWARD_BACKWARD_FLOPS = 3.5


@dataclass(frozen=True)
class Shape:
    suite: str
    batch: int
    heads: int
    len_q: int
    head_dim: int
    len_k: int | None = None

    @property
    def keys(self) -> int:
        return self.len_q if self.len_k is None else self.len_k

    def forward_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.len_q * self.keys * self.head_dim

    def label(self) -> str:
        keys = "" if self.len_k is None else f"→{self.len_k}"
        return f"{self.suite:9s} B{self.batch:<4d} H{self.heads:<3d} L{self.len_q}{keys:<6s} D{self.head_dim}"


def _standard(seq: int, head_dim: int) -> Shape:
    return Shape("standard", 16384 // seq, 2048 // head_dim, seq, head_dim)


SHAPES = [
    *(_standard(seq, head_dim) for head_dim in (128, 64) for seq in (1024, 2048, 4096, 8192, 16384)),
    Shape("unet", 512, 8, 64, 32), Shape("unet", 512, 4, 64, 64), Shape("unet", 512, 2, 64, 128),
    Shape("unet", 256, 8, 256, 32), Shape("unet", 256, 4, 256, 64), Shape("unet", 256, 2, 256, 128),
    Shape("unet", 128, 8, 1024, 64), Shape("unet", 64, 4, 1024, 128),
    Shape("unet", 64, 8, 4096, 64), Shape("unet", 64, 1, 4096, 128),
    Shape("unet", 64, 8, 4096, 64, len_k=77),  # cross-attention to a 77-token text context
    Shape("workbench", 128, 8, 64, 8),  # models/unet.py "small": 64 channels at 8×8, default 8-wide heads
    Shape("workbench", 128, 1, 256, 256),  # google/ddpm-cifar10-32: one 256-wide head at 16×16
]
SMOKE_SHAPES = [Shape("smoke", 1, 2, 40, 32), Shape("smoke", 2, 1, 24, 64, len_k=56)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (rewritten after every row)")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="comma-separated torch dtypes")
    parser.add_argument("--time-budget", type=float, default=360.0,
                        help="seconds for the kernel rows; rows not started by then are listed as skipped")
    parser.add_argument("--skip-unet", action="store_true", help="leave out the whole-UNet part")
    parser.add_argument("--smoke", action="store_true", help="CPU: correctness of tiny shapes via the interpreter")
    return parser.parse_args(argv)


def _interpreter_restart(args) -> None:
    """Triton reads TRITON_INTERPRET when it and our kernels are first imported: restart with it set."""
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})


# ---------------------------------------------------------------------------------------------------------------
# Methods: each maps (q, k, v, scale) → softmax(scale · q kᵀ) v, with (batch, heads, seq, head_dim) tensors.


def _methods():
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import fused_attention

    def sdpa_with(backend):
        def attend(q, k, v, scale):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

        return attend

    def naive(q, k, v, scale):
        return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v

    methods = {
        "triton": lambda q, k, v, scale: fused_attention(q, k, v, scale=scale),
        "sdpa-flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
        "sdpa-efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa-cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
        "sdpa-math": sdpa_with(SDPBackend.MATH),
        "naive": naive,
    }
    try:
        import xformers.ops

        def xformers_attention(q, k, v, scale):
            out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                          scale=scale)
            return out.transpose(1, 2)

        methods["xformers"] = xformers_attention
    except ImportError:
        pass
    return methods


# Methods that hold the len_q × len_k matrix (scores, probabilities and, backward, their gradients).
QUADRATIC_METHODS = {"sdpa-math", "naive"}


def _relative_error(ours, reference) -> float:
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


def _max_error(ours, reference) -> float:
    return (ours.float() - reference.float()).abs().max().item()


def _inputs(shape: Shape, dtype, device, seed: int):
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(length):
        x = torch.randn(shape.batch, shape.heads, length, shape.head_dim, generator=generator, device=device)
        return x.to(dtype).requires_grad_()

    q, k, v = draw(shape.len_q), draw(shape.keys), draw(shape.keys)
    grad_out = torch.randn(q.shape, generator=generator, device=device).to(dtype)
    return q, k, v, grad_out


def check_against_sdpa(attend, shape: Shape, dtype, device, tiles=None) -> dict:
    """‖ours − sdpa‖/‖sdpa‖ and max |ours − sdpa| for the output and the three gradients (fresh random data)."""
    import torch
    import torch.nn.functional as F

    from kernels.attention import attention_scale

    q, k, v, grad_out = _inputs(shape, dtype, device, seed=shape.batch * 7919 + shape.len_q)
    scale = attention_scale(shape.head_dim, shape.keys)
    ours = attend(q, k, v, scale)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad_out)
    if device == "cpu":  # the reference in fp32: CPU SDPA in half precision is not what we compare against
        q, k, v, grad_out = (x.detach().float().requires_grad_() for x in (q, k, v, grad_out))
    reference = F.scaled_dot_product_attention(q, k, v, scale=scale)
    reference_grads = torch.autograd.grad(reference, (q, k, v), grad_out)
    errors = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), (ours, *ours_grads), (reference, *reference_grads)):
        errors[name] = {"relative": _relative_error(a, b), "max_abs": _max_error(a, b),
                        "finite": bool(torch.isfinite(a).all())}
    bound = ERROR_BOUNDS[str(dtype).removeprefix("torch.")]
    errors["ok"] = all(e["finite"] and e["relative"] <= bound for e in errors.values())
    return errors


def time_method(attend, shape: Shape, dtype) -> dict:
    """Median forward and forward+backward times (ms) and TFLOP/s, or why the method could not run."""
    import torch
    import triton.testing

    from kernels.attention import attention_scale

    q, k, v, grad_out = _inputs(shape, dtype, DEVICE, seed=1)
    scale = attention_scale(shape.head_dim, shape.keys)

    def forward():
        return attend(q, k, v, scale)

    def forward_backward():
        return torch.autograd.grad(attend(q, k, v, scale), (q, k, v), grad_out)

    result = {}
    try:
        with torch.no_grad():
            forward_ms = triton.testing.do_bench(forward, return_mode="median")
        result.update(fwd_ms=forward_ms, fwd_tflops=shape.forward_flops() / forward_ms * 1e-9)
        backward_ms = triton.testing.do_bench(forward_backward, return_mode="median")
        result.update(fwd_bwd_ms=backward_ms,
                      fwd_bwd_tflops=FORWARD_BACKWARD_FLOPS * shape.forward_flops() / backward_ms * 1e-9)
    except torch.cuda.OutOfMemoryError:
        result["note"] = "out of memory"
    except RuntimeError as error:  # an SDPA backend that does not take this shape or dtype
        result["note"] = str(error).splitlines()[0][:160]
    return result


def _quadratic_bytes(shape: Shape) -> int:
    # scores, probabilities and their two gradients, in fp32 at worst
    return 4 * 4 * shape.batch * shape.heads * shape.len_q * shape.keys


def bench_row(methods: dict, shape: Shape, dtype) -> dict:
    import torch

    row = {**asdict(shape), "len_k": shape.keys, "dtype": str(dtype).removeprefix("torch."),
           "error_vs_sdpa": check_against_sdpa(methods["triton"], shape, dtype, DEVICE), "methods": {}}
    for name, attend in methods.items():
        if name in QUADRATIC_METHODS and _quadratic_bytes(shape) > 0.8 * torch.cuda.mem_get_info()[0]:
            row["methods"][name] = {"note": f"skipped: its n×n matrices need {_quadratic_bytes(shape) / 2**30:.0f} GiB"}
            continue
        row["methods"][name] = time_method(attend, shape, dtype)
        torch.cuda.empty_cache()  # the next method starts from the same free memory
    flash = row["methods"].get("sdpa-flash", {})
    ours = row["methods"]["triton"]
    row["ratio_to_sdpa_flash"] = {
        mode: ours[f"{mode}_tflops"] / flash[f"{mode}_tflops"]
        for mode in ("fwd", "fwd_bwd") if f"{mode}_tflops" in ours and f"{mode}_tflops" in flash
    }
    return row


# ---------------------------------------------------------------------------------------------------------------
# Whole UNet: the repository's "cifar" architecture (35.7M parameters, attention at 16×16 and in the mid block).


UNET_HEAD_DIMS = {"repo default (8)": 8, "4×64 heads": 64, "ddpm-cifar10 (1×256)": None}
UNET_BATCH = 128


def _time_unet(unet, sample, timesteps):
    """The UNet's output, and median ms of an inference forward and of a training step (MSE forward+backward)."""
    import torch
    import triton.testing

    def training_step():
        unet(sample, timesteps).sample.float().square().mean().backward()

    with torch.no_grad():
        out = unet(sample, timesteps).sample
        inference_ms = triton.testing.do_bench(lambda: unet(sample, timesteps), return_mode="median")
    training_ms = triton.testing.do_bench(training_step, return_mode="median")
    unet.zero_grad(set_to_none=True)
    return out, inference_ms, training_ms


def bench_unet(dtype) -> list[dict] | str:
    """Inference forward and training step (forward+backward of an MSE loss) per attention processor."""
    try:
        from diffusers import UNet2DModel
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        from kernels.processor import ATTENTION_BACKENDS, set_attention_backend
        from models.unet import UNET_CONFIGS
    except ImportError as error:
        return f"skipped: {error} (carry a diffusers wheel: bench/README.md)"
    import torch

    rows = []
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    sample = torch.randn(UNET_BATCH, 3, 32, 32, generator=generator, device=DEVICE).to(dtype)
    timesteps = torch.randint(0, 1000, (UNET_BATCH,), generator=generator, device=DEVICE)
    for variant, head_dim in UNET_HEAD_DIMS.items():
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3,
                           **{**UNET_CONFIGS["cifar"], "attention_head_dim": head_dim})
        unet = unet.to(DEVICE, dtype)
        reference = None
        for backend in ("diffusers-default", *ATTENTION_BACKENDS):
            try:
                if backend == "diffusers-default":
                    for module in unet.modules():
                        if isinstance(module, Attention):
                            module.set_processor(AttnProcessor2_0())
                else:
                    set_attention_backend(unet, backend)
            except ImportError as error:
                rows.append({"variant": variant, "backend": backend, "note": str(error)})
                continue
            out, inference_ms, training_ms = _time_unet(unet, sample, timesteps)
            reference = out if reference is None else reference
            rows.append({"variant": variant, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
                         "batch": UNET_BATCH, "inference_ms": inference_ms, "training_step_ms": training_ms,
                         "max_abs_diff_vs_default": _max_error(out, reference)})
        del unet
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Reporting.


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    temporary.replace(path)


def _cell(value, width=7, digits=0) -> str:
    return f"{value:{width}.{digits}f}" if isinstance(value, float) else f"{'—':>{width}s}"


def print_tables(results: dict) -> None:
    methods = results["methods"]
    for mode, title in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
        print(f"\n{title} TFLOP/s on {results['device']} (ratio: triton / sdpa-flash; err: ‖triton − sdpa‖/‖sdpa‖)")
        print(f"{'shape':38s} {'dtype':8s} " + " ".join(f"{m.removeprefix('sdpa-'):>9s}" for m in methods)
              + "   ratio      err")
        for row in results["rows"]:
            shape = Shape(row["suite"], row["batch"], row["heads"], row["len_q"], row["head_dim"],
                          None if row["len_k"] == row["len_q"] else row["len_k"])
            cells = " ".join(_cell(row["methods"].get(m, {}).get(f"{mode}_tflops"), 9) for m in methods)
            errors = row["error_vs_sdpa"]
            error = max(errors[name]["relative"] for name in ("out", "dq", "dk", "dv"))
            flag = "" if errors["ok"] else "  CHECK FAILED"
            ratio = _cell(row["ratio_to_sdpa_flash"].get(mode), 7, 2)
            print(f"{shape.label():38s} {row['dtype']:8s} {cells} {ratio} {error:8.1e}{flag}")
    if isinstance(results.get("unet"), list):
        print(f"\nwhole UNet (repo 'cifar' architecture, batch {UNET_BATCH}, 32×32): ms per call, max |Δ| vs diffusers "
              "default")
        for row in results["unet"]:
            if "note" in row:
                print(f"  {row['variant']:22s} {row['backend']:18s} {row['note']}")
            else:
                print(f"  {row['variant']:22s} {row['backend']:18s} {row['dtype']:8s} inference "
                      f"{row['inference_ms']:8.2f}  training step {row['training_step_ms']:8.2f}  "
                      f"Δ {row['max_abs_diff_vs_default']:.1e}")
    elif results.get("unet"):
        print(f"\nwhole UNet: {results['unet']}")
    if results.get("skipped"):
        print(f"\nskipped (time budget): {len(results['skipped'])} rows")


def markdown(results: dict) -> str:
    """The kernel rows (TFLOP/s of ours and SDPA-flash, their ratio, our worst relative error against SDPA), the
    whole-UNet rows, and what a time budget skipped."""
    timed = any(row["methods"] for row in results["rows"])
    timing = (f"TFLOP/s, {results['timing']}; FLOPs: {results['flops']}" if timed
              else "no timings: a CPU smoke run through Triton's interpreter checks correctness only")
    lines = [f"{results['device']}, {results['date']}; {timing}. Error: the largest ‖triton − sdpa‖/‖sdpa‖ over "
             "the output and the three gradients.", "",
             "| shape | dtype | triton fwd | flash fwd | ratio | triton fwd+bwd | flash fwd+bwd | ratio | error | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        shape = Shape(row["suite"], row["batch"], row["heads"], row["len_q"], row["head_dim"],
                      None if row["len_k"] == row["len_q"] else row["len_k"])
        ours, flash = row["methods"].get("triton", {}), row["methods"].get("sdpa-flash", {})
        cells = []
        for mode in ("fwd", "fwd_bwd"):
            cells += [_markdown_number(ours.get(f"{mode}_tflops"), 1), _markdown_number(flash.get(f"{mode}_tflops"), 1),
                      _markdown_number(row["ratio_to_sdpa_flash"].get(mode), 2)]
        errors = row["error_vs_sdpa"]
        error = max(errors[name]["relative"] for name in ("out", "dq", "dk", "dv"))
        lines.append(f"| {' '.join(shape.label().split())} | {row['dtype']} | " + " | ".join(cells)
                     + f" | {error:.1e} | {'yes' if errors['ok'] else '**no**'} |")
    lines.append("")
    if isinstance(results.get("unet"), list):
        lines += ["Whole UNet (the repository's 'cifar' architecture, 32×32), ms per call:", "",
                  "| variant | backend | dtype | batch | inference | training step | max abs diff vs default |",
                  "|---|---|---|---|---|---|---|"]
        for row in results["unet"]:
            if "note" in row:
                lines.append(f"| {row['variant']} | {row['backend']} | {row['note']} | | | | |")
            else:
                lines.append(f"| {row['variant']} | {row['backend']} | {row['dtype']} | {row['batch']} | "
                             f"{row['inference_ms']:.2f} | {row['training_step_ms']:.2f} | "
                             f"{row['max_abs_diff_vs_default']:.1e} |")
    elif results.get("unet"):
        lines.append(f"Whole UNet: {results['unet']}.")
    if results.get("skipped"):
        lines.append(f"\nNot started within the time budget: {len(results['skipped'])} rows.")
    return "\n".join(lines).rstrip()


def _markdown_number(value, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else "—"


def _header(device: str) -> dict:
    import torch
    import triton

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"benchmark": "attention", "device": device, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "date": now,
            "flops": "forward 4·B·H·Lq·Lk·D; forward+backward 3.5× forward (FlashAttention convention)",
            "timing": "median of triton.testing.do_bench (L2 flushed before every call)"}


def run_smoke(args) -> int:
    """CPU: our kernels through Triton's interpreter (fixed 16-row tiles) against SDPA in fp32. No timings."""
    import torch

    from kernels.attention import TileSizes, fused_attention

    def attend(q, k, v, scale):
        return fused_attention(q, k, v, scale=scale, tiles=TileSizes(16, 16))

    results = {**_header("cpu (smoke)"), "methods": ["triton"], "rows": [], "unet": "not run in --smoke"}
    for dtype in (torch.float32, torch.float16):
        for shape in SMOKE_SHAPES:
            errors = check_against_sdpa(attend, shape, dtype, "cpu")
            results["rows"].append({**asdict(shape), "len_k": shape.keys, "dtype": str(dtype).removeprefix("torch."),
                                    "error_vs_sdpa": errors, "methods": {}, "ratio_to_sdpa_flash": {}})
    write_json(args.out, results)
    print_tables(results)
    print(f"\nwrote {args.out}")
    return 0 if all(row["error_vs_sdpa"]["ok"] for row in results["rows"]) else 1


def run_gpu(args) -> int:
    import torch

    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    methods = _methods()
    results = {**_header(torch.cuda.get_device_name()), "methods": list(methods), "rows": [], "skipped": []}
    started = time.perf_counter()
    for shape in SHAPES:
        for dtype in dtypes:
            if time.perf_counter() - started > args.time_budget:
                results["skipped"].append({**asdict(shape), "dtype": str(dtype)})
                continue
            row = bench_row(methods, shape, dtype)
            results["rows"].append(row)
            ours = row["methods"]["triton"]
            print(f"{shape.label()} {row['dtype']:8s} triton fwd {_cell(ours.get('fwd_tflops'), 5)} "
                  f"fwd+bwd {_cell(ours.get('fwd_bwd_tflops'), 5)} TFLOP/s  ×flash {row['ratio_to_sdpa_flash']}  "
                  f"ok={row['error_vs_sdpa']['ok']}  [{time.perf_counter() - started:.0f}s]", flush=True)
            write_json(args.out, results)
    if not args.skip_unet:
        results["unet"] = [r for dtype in dtypes[:1] for r in _as_list(bench_unet(dtype))]
    write_json(args.out, results)
    print_tables(results)
    print(f"\nwrote {args.out}")
    return 0 if all(row["error_vs_sdpa"]["ok"] for row in results["rows"]) else 1


def _as_list(unet_result) -> list:
    return unet_result if isinstance(unet_result, list) else [{"variant": "—", "backend": "—", "note": unet_result}]


def main(argv=None) -> int:
    args = parse_args(argv)
    _interpreter_restart(args)
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    if args.smoke:
        return run_smoke(args)
    if not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA GPU (none found). For the CPU correctness pass through Triton's "
              "interpreter run: python bench/attention.py --smoke", file=sys.stderr)
        return 2
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
