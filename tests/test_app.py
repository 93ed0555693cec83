"""The app's handlers: it finds the shipped models, generates a grid, and turns bad input into gr.Error."""

import math

import gradio as gr
import pytest

import app


@pytest.fixture(scope="module")
def models():
    return app.find_models([app.DEFAULT_MODELS])


def test_finds_the_shipped_reference_model(models):
    assert "mnist-exact" in models
    assert app.class_choices(app.load_pipeline(str(models["mnist-exact"])))[2:] == [str(d) for d in range(10)]


def test_generates_a_labelled_grid(models):
    grid, info = app.generate(models, "mnist-exact", "ddim", 4, 7, app.EVERY_CLASS, 2.0, 0.0, 6)
    assert grid.size[0] >= 3 * 32 and grid.size[1] >= 2 * 32
    assert "NFE 8 per image" in info and "seed 7" in info


@pytest.mark.parametrize("args, message", [
    (("missing-model", "ddim", 4, 0, app.UNCONDITIONAL, 1.0, 0.0, 2), "unknown model"),
    (("mnist-exact", "euler-maruyama-typo", 4, 0, app.UNCONDITIONAL, 1.0, 0.0, 2), "unknown sampler"),
    (("mnist-exact", "ddim", 0, 0, app.UNCONDITIONAL, 1.0, 0.0, 2), "steps must be in"),
    (("mnist-exact", "ddim", 10**6, 0, app.UNCONDITIONAL, 1.0, 0.0, 2), "steps must be in"),
    (("mnist-exact", "ddim", 4, 0, app.UNCONDITIONAL, 1.0, 0.0, 10**4), "batch size"),
    (("mnist-exact", "ddim", 4, 0, "3", math.nan, 0.0, 2), "guidance scale must be a finite number"),
    (("mnist-exact", "ddim", 4, math.inf, "3", 1.0, 0.0, 2), "seed must be a finite number"),
    (("mnist-exact", "ddim", 4, 0, "eleven", 1.0, 0.0, 2), "class 'eleven'"),
    (("mnist-exact", "analytic-ddpm", 4, 0, "3", 1.0, 0.0, 2), "needs eps_second_moment"),
])
def test_bad_input_becomes_a_clear_error(models, args, message):
    with pytest.raises(gr.Error, match=message):
        app.generate(models, *args)


def test_offers_only_the_samplers_the_model_can_feed(models):
    offered = app.model_samplers(app.load_pipeline(str(models["mnist-exact"])))
    assert {"ddpm", "ddim", "heun", "dpmpp-2m", "sde-pc"} <= set(offered)
    assert "analytic-ddpm" not in offered  # it needs the model's E‖ε‖²/d table


def test_the_ui_builds_without_launching(models):
    assert isinstance(app.build_ui(models), gr.Blocks)
