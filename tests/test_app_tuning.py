"""The app's Tune tab and its tuned samplers in Generate, Compare and Evaluate (issue #17, part 2), on a small
class-conditional exact-score model in a temporary model folder."""

import threading

import gradio as gr
import pytest

from evaluation.exact import ExactScoreModel, GaussianMixture
from pipelines import DiffusionImagePipeline
from schedulers import DDIMScheduler
from schedulers.tuning import tuned_schedulers
from webui import compare, models, tune
from webui.models import LoadedModel, ModelCatalog
from webui.sampling import STOP, parse_job, run_job

from .app_helpers import CHECKPOINTS

pytestmark = pytest.mark.usefixtures("single_thread")

TUNED = "tuned:dpmpp-2m-nfe4"
SETTINGS = {"noise": None, "guidance_mode": "classifier-free", "guidance_scale": 1.0,
            "class_name": "every class in turn", "seed": 0, "batch": 3, "resolution": 0, "backend": "default"}


@pytest.fixture
def catalog(tmp_path):
    mixture = GaussianMixture.random((1, 4, 4), 6, rank=2, num_classes=3, seed=1)
    pipe = DiffusionImagePipeline(ExactScoreModel.from_mixture(mixture), DDIMScheduler(),
                                  {"process": "vp", "num_classes": 3, "image_size": 4, "channels": 1})
    pipe.save_pretrained(tmp_path / "models" / "small", safe_serialization=True)
    return ModelCatalog([tmp_path / "models", CHECKPOINTS], base=tmp_path)


def run_tune(catalog, model="small", sampler="dpmpp-2m", nfe=4, samples=4, **options):
    return tune.make_handler(catalog)(model, sampler, nfe, samples, 0, "small", **options)


def test_a_tune_saves_the_sampler_and_every_tab_offers_it(catalog):
    text, update = run_tune(catalog)
    assert TUNED in text and "saved in" in text
    loaded = catalog.load("small")
    assert set(tuned_schedulers(loaded.key)) == {"dpmpp-2m-nfe4"}
    assert TUNED in update["choices"] and TUNED in models.samplers(loaded)  # Generate's list, refreshed; Evaluate's
    assert "dpmpp-2m" in models.samplers(loaded)  # next to the stock ones
    job = parse_job(catalog, "small", TUNED, 25, **SETTINGS)  # the steps widget says 25: the tuned grid runs 4
    assert job.steps == 4 and job.noise is None
    result = run_job(catalog, job)
    assert result.nfe == 4 and len(result.images) == 3
    axes = compare.parse_axes([("sampler", f"ddim, {TUNED}"), (compare.NO_AXIS, ""), (compare.NO_AXIS, "")])
    jobs = compare.cell_jobs(catalog, {"model": "small", "steps": 10, **SETTINGS}, axes, 1)
    assert [(job.sampler, job.steps) for _, job in jobs] == [("ddim", 10), (TUNED, 4)]


def test_a_free_end_tune_is_offered_next_to_the_final_zero_one(catalog):
    run_tune(catalog)
    text, _ = run_tune(catalog, final="free")
    assert "tuned:dpmpp-2m-nfe4-free" in text
    loaded = catalog.load("small")
    assert {TUNED, "tuned:dpmpp-2m-nfe4-free"} <= set(models.samplers(loaded))
    job = parse_job(catalog, "small", "tuned:dpmpp-2m-nfe4-free", 25, **SETTINGS)
    assert job.steps == 4 and run_job(catalog, job).nfe == 4


def test_a_free_end_asked_of_a_two_evaluation_solver_says_it_ends_at_0(catalog):
    with pytest.warns(UserWarning, match="one evaluation per step"):
        text, _ = run_tune(catalog, sampler="heun", nfe=5, final="free")
    assert "tuned:heun-nfe5 " in text.replace("**", " ") and "It ends at 0" in text
    assert set(tuned_schedulers(catalog.load("small").key)) == {"heun-nfe5"}


def test_a_tuned_sampler_of_changed_weights_is_refused(catalog):
    run_tune(catalog)
    weights = next((catalog.base / "models" / "small" / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")
    with pytest.raises(gr.Error, match="tuned for other weights"):
        parse_job(catalog, "small", TUNED, 4, **SETTINGS)


def test_stop_ends_a_tune_and_writes_nothing(catalog):
    text, update = run_tune(catalog, progress=lambda *_, **__: STOP.stop(None))  # Stop after the first grid
    assert text.startswith("Stopped") and "Nothing was written" in text and update == gr.update()
    assert tuned_schedulers(catalog.base / "models" / "small") == {}


@pytest.mark.parametrize("request_options, message", [
    ({"sampler": "ddim"}, "sampler 'ddim' is not one of"),
    ({"nfe": 1}, "NFE"),
    ({"sampler": "heun", "nfe": 4}, "heun cannot spend exactly 4 evaluations"),
    ({"samples": 1}, "tuning samples"),
    ({"model": "mnist-gan-qp"}, "no sampler to tune"),
    ({"final": "sigma_min"}, "end 'sigma_min' is not one of: zero, free"),
])
def test_bad_tune_requests_name_the_problem(catalog, request_options, message):
    with pytest.raises(gr.Error, match=message):
        run_tune(catalog, **request_options)
    assert tuned_schedulers(catalog.base / "models" / "small") == {}


def test_a_hub_model_cannot_be_tuned_in_place(catalog):
    loaded = catalog.load("small")
    hub = LoadedModel("someone/model", loaded.pipe, threading.Lock(), loaded.scheduler_config)
    with pytest.raises(gr.Error, match="not a local model directory"):
        tune.model_folder(hub, "someone/model")


def test_the_tune_tab_offers_the_tunable_samplers_that_fit(catalog):
    offered = tune.tunable(catalog.load("small"))
    assert "dpmpp-2m" in offered and "euler" in offered and "ddim" not in offered
    assert tune.tunable(catalog.load("mnist-gan-qp")) == []
