"""bench/training_step_cost.py end to end at a toy size: tiny UNets at 16×16 and 8×8, one step, no compile row;
the JSON has every row with positive times, and the baseline's ratios are exactly 1."""

import json

import torch

from tests.bench_helpers import load_bench_script


def test_main_writes_every_row_with_positive_costs(tmp_path):
    bench = load_bench_script("training_step_cost")
    out = tmp_path / "training_step_cost.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--models", "tiny:16", "tiny:8", "--no-compile", "--steps", "1", "--warmup-steps", "1",
                    "--repeats", "1", "--batch-size", "4", "--inference-batch", "8", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == ["tiny 16×16", "tiny 8×8", "tiny 16×16, channels-last", "tiny 8×8, channels-last",
                     "tiny 8×8, 2 threads"]
    assert results["baseline"] == "tiny 16×16" and results["threads"] == 1
    for row in results["rows"]:
        assert row["error"] is None and row["parameters"] > 0, row
        for key in ("step", "inference"):
            for field in ("cpu_seconds_median", "wall_seconds_median", "ratio_to_baseline", "wall_ratio_to_baseline"):
                assert row[f"{key}_{field}"] > 0, (row["name"], key, field)
    baseline = results["rows"][0]
    for key in ("step_ratio_to_baseline", "step_wall_ratio_to_baseline", "inference_ratio_to_baseline",
                "inference_wall_ratio_to_baseline"):
        assert baseline[key] == 1
    two_threads = results["rows"][-1]
    assert two_threads["threads"] == 2
    assert two_threads["step_thread_speedup"] > 0 and two_threads["inference_thread_speedup"] > 0
    assert all(row["step_thread_speedup"] is None for row in results["rows"][:-1])
    table = [line for line in bench.markdown(results).splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(names)


def test_a_failed_compile_is_recorded_not_raised(tmp_path, monkeypatch):
    """The compile row catches its error and records it; the other rows still run."""
    bench = load_bench_script("training_step_cost")

    def broken_compile(model, *args, **kwargs):
        def call(*call_args, **call_kwargs):
            raise RuntimeError("inductor exploded")
        return call

    monkeypatch.setattr(bench.torch, "compile", broken_compile)
    out = tmp_path / "training_step_cost.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--models", "tiny:16", "tiny:8", "--steps", "1", "--warmup-steps", "1", "--repeats", "1",
                    "--batch-size", "4", "--inference-batch", "8", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert rows[-1]["name"] == "tiny 8×8, torch.compile"
    assert rows[-1]["error"] == "RuntimeError: inductor exploded"
    assert all(row["error"] is None for row in rows[:-1])
    assert "failed: RuntimeError: inductor exploded" in bench.markdown(json.loads(out.read_text()))
