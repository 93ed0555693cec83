"""train.evaluate_model: x̂0 clipping on the exported or a registered sampler, and what it does to a real model's
raw output under strong guidance; bench/quality_vs_nfe.py and bench/clipping.py read the model's process."""

import json
from pathlib import Path

import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from evaluation.sampling import sample_images
from pipelines import DiffusionImagePipeline
from tests.bench_helpers import load_bench_script
from train.evaluate_model import RANGE_LIMIT, use_x0_clipping

ROOT = Path(__file__).resolve().parents[1]
FLOW = ROOT / "checkpoints" / "mnist-flow"
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def flow_pipeline():
    pipeline = DiffusionImagePipeline.from_pretrained(FLOW)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("sampler", [None, "dpmpp-2m"])
def test_x0_clipping_reaches_the_scheduler(flow_pipeline, sampler):
    use_x0_clipping(flow_pipeline, "threshold", sampler)
    assert flow_pipeline.scheduler.config.thresholding
    use_x0_clipping(flow_pipeline, "clip", sampler)
    assert flow_pipeline.scheduler.config.clip_sample and flow_pipeline.scheduler.config.clip_sample_range == 1.0


def test_clipping_keeps_a_guided_few_step_sample_in_range(flow_pipeline):
    """Two dpmpp-2m steps at guidance 3 overshoot the data's range; with x̂0 clipped, the output stays in it."""
    def outside(rule):
        use_x0_clipping(flow_pipeline, rule, "dpmpp-2m")
        raw = sample_images(flow_pipeline, class_labels=[0, 3, 7, 9], seed=0, num_inference_steps=2,
                            guidance_scale=3.0, clamp=False)
        return float((raw.abs() > RANGE_LIMIT).float().mean())

    assert outside("none") > 0.05
    assert outside("clip") == 0.0


def test_bad_clipping_requests_name_the_problem(flow_pipeline):
    with pytest.raises(ValueError, match="unknown x̂0 clipping rule 'clamp'"):
        use_x0_clipping(flow_pipeline, "clamp", None)
    flow_pipeline.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler has no x̂0 clipping"):
        use_x0_clipping(flow_pipeline, "clip", None)


def test_benchmarks_pick_samplers_by_the_models_process(tmp_path):
    from bench.common import default_sampler, model_process

    quality = load_bench_script("quality_vs_nfe")
    assert model_process(FLOW) == "flow" and model_process(ROOT / "checkpoints" / "mnist-vp") == "vp"
    assert default_sampler(FLOW) == "dpmpp-2m" and default_sampler(ROOT / "checkpoints/mnist-vp") == "ddim"
    quality.benchmarked_spec("euler-ancestral", "flow")
    with pytest.raises(ValueError, match="must drive a flow model"):
        quality.benchmarked_spec("ddpm", "flow")
    with pytest.raises(ValueError, match="'pfgmpp' model; this benchmark covers vp, flow"):
        quality.covered_process(ROOT / "checkpoints" / "mnist-pfgmpp")
    with pytest.raises(ValueError, match="no model_index.json"):
        default_sampler(tmp_path)


def test_clipping_verdict_picks_the_lowest_fid_per_cell():
    clipping = load_bench_script("clipping")
    rows = [{"model": "m", "guidance": g, "rule": rule, "feature_fid": fid, "accuracy": 0.9}
            for g, rule, fid in [(1, "none", 2.0), (1, "clip", 2.5), (3, "none", 9.0), (3, "clip", 6.0)]]
    assert clipping.verdicts(rows) == [
        {"model": "m", "guidance": 1, "best_rule": "none", "feature_fid_change": 0.0, "accuracy_change": 0.0},
        {"model": "m", "guidance": 3, "best_rule": "clip", "feature_fid_change": -3.0, "accuracy_change": 0.0}]


def test_clipping_runs_on_separate_models_merge_and_mismatched_settings_do_not(tmp_path):
    clipping = load_bench_script("clipping")
    settings = {"samples": 300, "steps": 20, "guidance": [1.0], "seed": 0, "rules": ["none", "clip"]}
    paths = []
    for model, fids in [("a", (2.0, 1.5)), ("b", (3.0, 4.0))]:
        rows = [{"model": model, "guidance": 1.0, "rule": rule, "feature_fid": fid, "accuracy": 0.9}
                for rule, fid in zip(settings["rules"], fids)]
        paths.append(tmp_path / f"{model}.json")
        paths[-1].write_text(json.dumps({**settings, "rows": rows, "verdict": []}))
    merged = clipping.merge(paths)
    assert [row["model"] for row in merged["rows"]] == ["a", "a", "b", "b"]
    assert [(v["model"], v["best_rule"]) for v in merged["verdict"]] == [("a", "clip"), ("b", "none")]
    paths[1].write_text(json.dumps({**settings, "steps": 25, "rows": [], "verdict": []}))
    with pytest.raises(ValueError, match="b.json was run with other steps"):
        clipping.merge(paths)
