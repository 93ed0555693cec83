"""``python -m evaluation.analytic_table MODEL_DIR``: the E‖ε_θ‖²/d table of a saved pipeline, saved beside it as an
Analytic-DPM scheduler that the ``analytic-*`` samplers accept."""

import pytest
import torch

import schedulers
from evaluation import analytic_table
from evaluation.exact import ExactScoreModel, GaussianMixture
from pipelines import DiffusionImagePipeline

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_command_saves_a_scheduler_with_the_table(tmp_path, capsys):
    mixture = GaussianMixture.random((1, 8, 8), 2, rank=2, seed=0)
    pipe = DiffusionImagePipeline(ExactScoreModel.from_mixture(mixture), schedulers.DDIMScheduler(),
                                  model_info={"process": "vp", "dataset": "mnist"})
    pipe.save_pretrained(tmp_path)
    analytic_table.main([str(tmp_path), "--timesteps", "3", "--batch-size", "4"])
    assert "scheduler_analytic" in capsys.readouterr().out
    saved = schedulers.DDIMScheduler.from_pretrained(tmp_path / "scheduler_analytic")
    table = saved.config.eps_second_moment
    assert len(table) == 1000 and all(torch.isfinite(torch.tensor(table)))
    assert schedulers.get_sampler("analytic-ddpm").create(saved.config).config.eps_second_moment == table
