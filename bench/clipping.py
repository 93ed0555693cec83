"""x̂0 clipping and dynamic thresholding against no clipping, on shipped models, with and without guidance.

For each ``--models`` directory, its default sampler (DDIM on a VP model, DPM-Solver++ 2M otherwise; the app's
choice) at ``--steps`` steps draws ``--samples`` class-balanced digits at each ``--guidance`` scale with each rule
of ``train.evaluate_model.X0_CLIPPING``: ``none``, ``clip`` (x̂0 clamped to [−1, 1], Ho et al. 2020) and
``threshold`` (Imagen's dynamic thresholding at the 99.5th percentile, Saharia et al. 2022 §2.3). The samplers
step with the ε̂ the clipped x̂0 implies (``schedulers.clipping``). The same seeds serve every rule, so the rows
differ only by the rule. The MNIST judge scores them: accuracy on the intended digits, feature-FID against the
500 held-out digits, and the share of raw output values outside [−1.1, 1.1] (the data lies in [−1, 1]).

A rule helps where it lowers feature-FID without costing accuracy; ``verdict`` in the JSON says, per model and
guidance scale, which rule is best on feature-FID and by how much it beats ``none``, and the samplers' default
(off) follows from it.

    python bench/clipping.py [--models checkpoints/mnist-flow checkpoints/mnist-vp] [--samples 500]
                             [--steps 20] [--guidance 1 3] [--quick]

prints the table and writes bench/results/clipping.json (rewritten after every row) and clipping.png (feature-FID
per rule, one panel per model). ``--quick`` is a smoke run: 20 samples, 2 steps, one model, into
clipping-quick.json. Models can run as separate processes (``--models checkpoints/mnist-vp --out
bench/results/clipping-vp.json``) and be joined afterwards:

    python bench/clipping.py --merge bench/results/clipping-flow.json bench/results/clipping-vp.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import check_positive, default_sampler, machine_info, write_results  # noqa: E402
from evaluation.judge import DEFAULT_JUDGE_PATH  # noqa: E402
from train.evaluate_model import X0_CLIPPING, evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("checkpoints/mnist-flow", "checkpoints/mnist-vp")
QUICK = {"models": ["checkpoints/mnist-flow"], "samples": 20, "steps": 2, "guidance": [1.0, 3.0]}


def verdicts(rows: list[dict]) -> list[dict]:
    """Per model and guidance scale: the rule with the lowest feature-FID, its FID and accuracy against ``none``."""
    out = []
    for model, guidance in dict.fromkeys((row["model"], row["guidance"]) for row in rows):
        cell = {row["rule"]: row for row in rows if (row["model"], row["guidance"]) == (model, guidance)}
        if "none" not in cell:
            continue
        best = min(cell.values(), key=lambda row: row["feature_fid"])
        out.append({"model": model, "guidance": guidance, "best_rule": best["rule"],
                    "feature_fid_change": best["feature_fid"] - cell["none"]["feature_fid"],
                    "accuracy_change": best["accuracy"] - cell["none"]["accuracy"]})
    return out


def run(args, out: Path) -> dict:
    results = {"benchmark": "clipping", **machine_info(), "samples": args.samples, "steps": args.steps,
               "guidance": args.guidance, "seed": args.seed, "rules": list(X0_CLIPPING), "rows": [], "verdict": []}
    for model in args.models:
        sampler = default_sampler(model)
        for rule in X0_CLIPPING:
            scores = evaluate(Path(model), args.samples, args.steps, args.guidance, args.seed, args.judge, sampler,
                              rule)
            results["real_fid_floor"] = scores["real_fid_floor"]
            for guidance in map(str, args.guidance):
                row = {"model": Path(model).name, "sampler": sampler, "rule": rule, "guidance": float(guidance),
                       "accuracy": scores["accuracy"][guidance], "feature_fid": scores["feature_fid"][guidance],
                       "outside_range": scores["outside_range"][guidance],
                       "seconds": scores["sampling_seconds"][guidance]}
                results["rows"].append(row)
                print(f"{row['model']:>12s} {sampler:>9s} {rule:>9s} guidance {row['guidance']:3g}: accuracy "
                      f"{row['accuracy']:.1%}, feature-FID {row['feature_fid']:6.2f}, outside ±1.1 "
                      f"{row['outside_range']:.2%}", flush=True)
            results["verdict"] = verdicts(results["rows"])
            write_results(out, results)
    return results


def merge(paths: list[Path]) -> dict:
    """One results dict from runs on different models with the same settings (samples, steps, guidance, seed)."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    settings = ("samples", "steps", "guidance", "seed", "rules")
    for path, other in zip(paths[1:], runs[1:]):
        differing = [key for key in settings if other[key] != runs[0][key]]
        if differing:
            raise ValueError(f"{path} was run with other {', '.join(differing)} than {paths[0]}: only runs with the "
                             f"same settings merge")
    merged = {**runs[0], "rows": [row for run in runs for row in run["rows"]], "merged_from": [str(p) for p in paths]}
    merged["verdict"] = verdicts(merged["rows"])
    return merged


def markdown(results: dict) -> str:
    lines = [f"{results['samples']} samples ({results['samples'] // 10} per digit) per row, {results['steps']} steps, "
             f"seed {results['seed']}, the same noise for every rule; feature-FID against the 500 held-out digits "
             f"(floor {results.get('real_fid_floor', float('nan')):.2f}).", "",
             "| model | sampler | guidance | rule | judge accuracy | feature-FID | raw values outside ±1.1 |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| `{row['model']}` | `{row['sampler']}` | {row['guidance']:g} | {row['rule']} | "
                     f"{row['accuracy']:.1%} | {row['feature_fid']:.2f} | {row['outside_range']:.2%} |")
    if results["verdict"]:
        lines += ["", "Best rule on feature-FID per model and guidance scale (change against `none`):", ""]
        lines += [f"- `{v['model']}`, guidance {v['guidance']:g}: **{v['best_rule']}** (feature-FID "
                  f"{v['feature_fid_change']:+.2f}, accuracy {v['accuracy_change']:+.1%})" for v in results["verdict"]]
    lines += ["", "![feature-FID per x̂0 clipping rule](../bench/results/clipping.png)"]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in results["rows"]))
    figure, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    width = 0.8 / len(results["rules"])
    for axis, model in zip(axes[0], models):
        for i, rule in enumerate(results["rules"]):
            rows = [row for row in results["rows"] if row["model"] == model and row["rule"] == rule]
            axis.bar([j + i * width for j in range(len(rows))], [row["feature_fid"] for row in rows], width,
                     label=rule)
        axis.set_xticks([j + width * (len(results["rules"]) - 1) / 2 for j in range(len(results["guidance"]))],
                        [f"guidance {g:g}" for g in results["guidance"]])
        axis.axhline(results["real_fid_floor"], color="grey", linestyle=":", label="real vs real (floor)")
        axis.set(title=f"{model} ({rows[0]['sampler']}, {results['steps']} steps)", ylabel="feature-FID")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/clipping.py", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="exported class-conditional models")
    parser.add_argument("--samples", type=int, default=500, help="samples per row, equal per digit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", type=Path, default=ROOT / DEFAULT_JUDGE_PATH)
    parser.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(
        f"{key} {value}" for key, value in QUICK.items()))
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default bench/results/clipping.json, -quick.json with --quick)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="join these results files (runs on other models) into --out instead of sampling")
    args = parser.parse_args(argv)
    out = args.out or RESULTS / ("clipping-quick.json" if args.quick else "clipping.json")
    if args.merge:
        try:
            results = merge(args.merge)
        except (ValueError, OSError, KeyError) as error:
            parser.error(f"cannot merge: {error}")
        write_results(out, results)
        plot(results, out.with_suffix(".png"))
        print(markdown(results))
        return
    if args.quick:
        vars(args).update(QUICK)
    check_positive(parser, args, ("samples", "steps"))
    try:
        for model in args.models:
            default_sampler(model)
    except ValueError as error:
        parser.error(str(error))
    diffusers_logging.disable_progress_bar()
    try:
        results = run(args, out)
    except ValueError as error:
        parser.error(str(error))
    print()
    print(markdown(results))
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
