"""Training recipes (``train.recipes``, ``--recipe``), min-SNR-γ weighting, snapshots and CPU-time accounting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.training_recipes import parse_args as parse_study_args
from pipelines import DiffusionImagePipeline
from schedulers.process import VPSchedule, make_betas, to_x0_and_epsilon
from schedulers.processes.vp import min_snr_weight
from train.diffusion import build_parser, check_args, with_recipe
from train.objectives import make_objective
from train.recipes import RECIPES, recipe_flags
from train.run import SNAPSHOT_DIR, MetricsLog

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--image-size", "16", "--max-train-images", "32", "--batch-size", "4", "--warmup", "1",
        "--sample-every", "0", "--seed", "3"]


def train(output_dir: Path, *extra: str) -> None:
    command = [sys.executable, "-m", "train.diffusion", *TINY, "--output-dir", str(output_dir), *extra]
    result = subprocess.run(command, cwd=REPO, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                                                    "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def logged(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# -------------------------------------------------------------------------------------------------- min-SNR-γ


def test_min_snr_weights_are_min_snr_gamma_in_x0_terms_for_every_parameterization():
    """Weighted loss of any prediction = min(SNR, γ) ‖x0 − x̂0‖² (Hang et al. 2023, eq. 10), whatever the network
    predicts: checked against the x̂0 each parameterization's output decodes to."""
    schedule = VPSchedule(make_betas("linear", 1000, 1e-4, 0.02))
    t = torch.tensor([0, 40, 300, 700, 999])
    alpha, beta = (c.double() for c in schedule.coefficients(t))
    x0, eps = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randn(5, 1, 4, 4, dtype=torch.float64)
    x = alpha.view(-1, 1, 1, 1) * x0 + beta.view(-1, 1, 1, 1) * eps
    snr = (alpha / beta) ** 2
    for prediction_type, target in (("epsilon", eps), ("v_prediction", alpha.view(-1, 1, 1, 1) * eps
                                                        - beta.view(-1, 1, 1, 1) * x0), ("sample", x0)):
        output = target + 0.1 * torch.randn_like(target)
        x0_hat, _ = to_x0_and_epsilon(prediction_type, output, x, alpha, beta)
        weight = min_snr_weight(alpha, beta, prediction_type, 5.0)
        weighted = weight * (output - target).pow(2).flatten(1).sum(1)
        assert torch.allclose(weighted, snr.clamp(max=5.0) * (x0_hat - x0).pow(2).flatten(1).sum(1), rtol=1e-9)
    with pytest.raises(ValueError, match="min-SNR"):
        min_snr_weight(alpha, beta, "velocity", 5.0)


def test_the_vp_objective_weights_by_min_snr_only_when_asked():
    x0, labels, generator = torch.zeros(6, 1, 8, 8), torch.arange(6), torch.Generator().manual_seed(0)
    plain = make_objective("vp-v", null_class_id=10).sample(x0, labels, generator)
    assert torch.equal(plain.loss_weight, torch.ones(6))
    objective = make_objective("vp-v", null_class_id=10, snr_gamma=5.0)
    batch = objective.sample(x0, labels, torch.Generator().manual_seed(0))
    alpha, beta = objective.schedule.coefficients(batch.model_kwargs["timestep"])
    snr = (alpha / beta).double() ** 2
    assert torch.allclose(batch.loss_weight.double(), snr.clamp(max=5) / (snr + 1), rtol=1e-6)
    assert objective.model_info()["snr_gamma"] == 5.0
    with pytest.raises(ValueError, match="snr_gamma"):
        make_objective("vp-eps", snr_gamma=0.0)


# -------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_is_a_valid_set_of_training_flags(recipe):
    args = build_parser().parse_args(["--steps", "10", "--output-dir", "x", *recipe_flags(recipe)])
    check_args(args)
    assert args.objective == RECIPES[recipe]["objective"]


def test_a_recipe_expands_in_place_and_later_flags_win():
    argv = with_recipe(["--steps", "9", "--recipe", "v-min-snr", "--lr", "1e-3", "--output-dir", "x"])
    args = build_parser().parse_args(argv)
    assert (args.objective, args.snr_gamma, args.lr, args.steps) == ("vp-v", 5.0, 1e-3, 9)
    inline = with_recipe(["--recipe=edm", "--steps", "1", "--output-dir", "x"])
    assert build_parser().parse_args(inline).objective == "edm"


def test_an_unknown_recipe_is_a_usage_error_naming_it(capsys):
    from train.diffusion import main

    with pytest.raises(SystemExit):
        main(["--recipe", "nope", "--steps", "1", "--output-dir", "x"])
    assert "unknown training recipe 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "value"), [("--ema-power", "0"), ("--adam-beta1", "1"), ("--weight-decay", "-1"),
                                               ("--export-every", "-1"), ("--snr-gamma", "-5")])
def test_out_of_range_recipe_options_raise_naming_them(option, value):
    args = build_parser().parse_args(["--steps", "10", "--output-dir", "x", option, value])
    if option == "--snr-gamma":  # checked where the objective is built
        with pytest.raises(ValueError, match="snr_gamma"):
            make_objective("vp-eps", snr_gamma=args.snr_gamma)
        return
    with pytest.raises(ValueError, match=option):
        check_args(args)


def test_the_study_names_a_bad_recipe_or_budget(capsys):
    for argv, message in ((["--recipes", "eps", "nope"], "unknown training recipe 'nope'"),
                          (["--cpu-minutes", "0"], "--cpu-minutes must be positive"),
                          (["--samples", "15"], "multiple of the 10 digits")):
        with pytest.raises(SystemExit):
            parse_study_args(argv)
        assert message in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- run directory


def test_snapshots_load_and_cpu_seconds_add_up_over_a_resume(tmp_path):
    run = tmp_path / "run"
    train(run, "--recipe", "v-min-snr", "--steps", "2", "--checkpoint-every", "2", "--export-every", "2")
    train(run, "--recipe", "v-min-snr", "--steps", "4", "--checkpoint-every", "2", "--export-every", "2",
          "--resume", "latest")
    assert sorted(p.name for p in (run / SNAPSHOT_DIR).iterdir()) == ["step-2", "step-4"]
    snapshot = DiffusionImagePipeline.from_pretrained(run / SNAPSHOT_DIR / "step-2")
    assert snapshot.config.model_info["steps"] == 2 and snapshot.config.model_info["snr_gamma"] == 5.0
    assert [row["step"] for row in logged(run)] == [1, 2, 3, 4]


def test_a_resumed_metrics_log_counts_cpu_seconds_on_from_its_checkpoint(tmp_path):
    rows = [{"step": 1, "cpu_seconds": 1.5}, {"step": 2, "cpu_seconds": 3.0}, {"step": 3, "cpu_seconds": 4.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    log = MetricsLog(SimpleNamespace(is_main_process=True), tmp_path, resumed_step=2)
    assert log.cpu_seconds_before == 3.0 and [row["step"] for row in logged(tmp_path)] == [1, 2]
