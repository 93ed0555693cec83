"""The app's handlers: models are discovered and loaded safely, Generate samples with previews, Stop and PNG
metadata, Compare lays out a labelled grid, and the UI builds. Bad inputs: tests/test_app_bad_inputs.py."""

import csv
import json
import sys

import gradio as gr
import numpy as np
import PIL.Image
import pytest

import app
import schedulers
from pipelines.loading import check_pipeline_dir, load_pipeline, pipeline_classes
from tests.app_helpers import EXACT, GENERATE, make_catalog, make_model_root
from webui import compare, evaluate, generate, models
from webui.sampling import STOP, parse_job, run_job


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, single_thread):
    return make_catalog(make_model_root(tmp_path_factory.mktemp("models")))


def run_generate(catalog, **changes):
    """Every update the Generate handler yields, for the default quick settings with ``changes``."""
    values = {**GENERATE, **changes}
    return list(generate.make_handler(catalog)(*(values[k] for k in generate.INPUTS)))


# ------------------------------------------------------------------------------------------------ loading


def test_load_pipeline_picks_the_class_model_index_names():
    assert "DiffusionImagePipeline" in pipeline_classes()
    pipe = load_pipeline(EXACT)
    assert type(pipe).__name__ == "DiffusionImagePipeline" and pipe.num_classes == 10


def test_hub_ids_download_only_json_and_safetensors(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, allow_patterns):  # a local stand-in for the hub
        calls.append((repo_id, allow_patterns))
        return str(EXACT)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    pipe = load_pipeline("someone/mnist-exact")
    assert pipe.num_classes == 10
    assert calls == [("someone/mnist-exact", ["*.json", "*.safetensors", "*.md", "*.txt"])]


def test_checks_report_the_class_and_index(catalog):
    cls, index = check_pipeline_dir(EXACT)
    assert cls.__name__ == index["_class_name"] == "DiffusionImagePipeline"


def test_lists_pipeline_directories_only(catalog):
    listed = catalog.listed()
    assert {"mnist-exact", "mnist-vp", "tiny-uncond"} <= set(listed)
    assert "mnist-judge" not in listed  # a classifier, not a pipeline


def test_a_new_export_appears_without_restarting(catalog, tmp_path):
    roots = make_catalog(tmp_path)
    assert "late" not in roots.listed()
    load_pipeline(EXACT).save_pretrained(tmp_path / "late", safe_serialization=True)
    assert "late" in roots.listed()


def test_typed_paths_inside_the_roots_load(catalog):
    assert catalog.load("checkpoints/mnist-exact").key == str(EXACT.resolve())


# ------------------------------------------------------------------------------------------------ what is offered


def test_offers_only_the_samplers_the_model_can_feed(catalog):
    offered = models.samplers(catalog.load("mnist-exact"))
    assert {"ddpm", "ddim", "heun", "dpmpp-2m", "sde-pc"} <= set(offered)
    assert "analytic-ddpm" not in offered  # it needs the model's E‖ε‖²/d table


def test_discovers_guidance_modes_classes_and_knobs(catalog):
    conditional, unconditional = catalog.load("mnist-exact").pipe, catalog.load("tiny-uncond").pipe
    assert models.guidance_modes(conditional) == ["none", "classifier-free"]
    assert models.guidance_modes(unconditional) == ["none"]
    assert models.class_choices(conditional)[2:] == [str(d) for d in range(10)]
    assert models.class_choices(unconditional) == [models.UNCONDITIONAL]
    assert [models.noise_knob(s) for s in ("ddim", "noise-level", "heun")] == ["eta", "noise_level", None]


def test_a_pipelines_own_guidance_modes_reach_the_call(catalog, monkeypatch):
    """A pipeline that declares guidance modes and takes ``guidance_mode=`` gets it, without UI changes."""
    loaded = catalog.load("tiny-uncond")
    seen = {}
    cls = type(loaded.pipe)

    class Guided(cls):
        guidance_modes = ("none", "similarity")

        def __call__(self, batch_size=1, num_inference_steps=1, generator=None, guidance_mode="none",
                     guidance_scale=1.0, reference_image=None, output_type="pil", callback_on_step_end=None,
                     **ignored):
            seen.update(mode=guidance_mode, scale=guidance_scale, reference=reference_image)
            return super().__call__(batch_size=batch_size, num_inference_steps=num_inference_steps,
                                    generator=generator, output_type=output_type)

    monkeypatch.setattr(loaded.pipe, "__class__", Guided)
    reference = PIL.Image.new("L", (4, 4))
    job = parse_job(catalog, "tiny-uncond", "ddim", 2, 0.0, "similarity", 5.0, models.UNCONDITIONAL, 0, 1, 0,
                    "default", reference)
    run_job(catalog, job)
    assert seen == {"mode": "similarity", "scale": 5.0, "reference": reference}


# ------------------------------------------------------------------------------------------------ Generate


def test_generates_pngs_that_carry_their_settings(catalog):
    gallery, grid, info, files, seed = run_generate(catalog)[-1]
    assert len(gallery) == 4 and len(files) == 5 and seed == 7
    assert "NFE 8 per image" in info and "seed 7" in info  # 4 DDIM steps × 2 (classifier-free guidance)
    settings = json.loads(PIL.Image.open(gallery[1]).text["parameters"])
    assert settings["index"] == 1 and settings["sampler"] == "ddim" and settings["seed"] == 7
    assert settings["class_name"] == "every class in turn" and settings["nfe"] == 8
    assert grid.size[0] >= 2 * 32


def test_the_same_seed_gives_the_same_images_and_random_shows_its_seed(catalog):
    first = run_generate(catalog, batch=2)[-1][0]
    second = run_generate(catalog, batch=2)[-1][0]
    assert all((PIL.Image.open(a).tobytes() == PIL.Image.open(b).tobytes()) for a, b in zip(first, second))
    *_, info, _, seed = run_generate(catalog, batch=1, random_seed=True)[-1]
    assert f"seed {seed}" in info
    assert json.loads(PIL.Image.open(run_generate(catalog, batch=1, seed=seed)[-1][0][0]).text["parameters"])[
        "seed"] == seed


def test_live_previews_every_n_steps(catalog):
    updates = run_generate(catalog, steps=10, preview_every=3)
    previews = [u for u in updates if str(u[2]).startswith("step")]
    assert [u[2].split()[1] for u in previews] == ["3/10", "6/10", "9/10"]
    assert isinstance(previews[0][1], PIL.Image.Image)


def test_stop_really_stops_the_sampler(catalog):
    handler = generate.make_handler(catalog)
    values = {**GENERATE, "model": "mnist-vp", "steps": 1000, "batch": 1, "preview_every": 1, "class_name": "3"}
    updates = handler(*(values[k] for k in generate.INPUTS))
    next(updates)  # the first preview: sampling has started
    STOP.stop(None)  # what the Stop button does for this (request-less) session
    rest = list(updates)
    message = rest[-1][2]
    assert message.startswith("stopped after step")
    assert int(message.split()[3]) < 1000


def test_img2img_starts_from_the_uploaded_image(catalog):
    """An upload and a strength: fewer steps run (NFE), the samples stay near the image, the PNGs record it."""
    *_, (gallery, _, _, _, _) = run_generate(catalog, batch=1, class_name="7", guidance_mode="none")
    digit = PIL.Image.open(gallery[0])
    pixels = np.asarray(digit, dtype=float)
    *_, (paths, _, info, _, _) = run_generate(catalog, batch=2, class_name="7", guidance_mode="none", steps=10, seed=8,
                                              image=digit.convert("RGB"), strength=0.2)
    assert "img2img from the image at strength 0.2 (2 steps run)" in info and "NFE 2 per image" in info
    settings = json.loads(PIL.Image.open(paths[0]).text["parameters"])
    assert settings["strength"] == 0.2 and "image" not in settings
    near = [np.abs(np.asarray(PIL.Image.open(path), dtype=float) - pixels).mean() for path in paths]
    *_, (plain, _, _, _, _) = run_generate(catalog, batch=2, class_name="7", guidance_mode="none", steps=10, seed=8)
    far = [np.abs(np.asarray(PIL.Image.open(path), dtype=float) - pixels).mean() for path in plain]
    assert max(near) < 0.5 * min(far), (near, far)
    *_, (_, _, info, _, _) = run_generate(catalog, batch=1, strength=0.2)  # no image: the slider plays no part
    assert "img2img" not in info and "NFE 8 per image" in info


def test_noise_level_and_eta_change_the_samples(catalog):
    a = run_generate(catalog, sampler="noise-level", noise=0.0, batch=1)[-1][0][0]
    b = run_generate(catalog, sampler="noise-level", noise=1.0, batch=1)[-1][0][0]
    assert PIL.Image.open(a).tobytes() != PIL.Image.open(b).tobytes()


def test_unconditional_model_and_default_backend(catalog):
    *_, info, _, _ = run_generate(catalog, model="tiny-uncond", guidance_mode="none",
                                  class_name=models.UNCONDITIONAL)[-1]
    assert "NFE 4 per image" in info


def test_model_change_updates_the_widgets(catalog):
    sampler, steps, noise, mode, classes, backend, about, levels = generate.model_updates(catalog, "tiny-uncond", 7)
    assert sampler["value"] == "ddim" and "analytic-ddpm" not in sampler["choices"] and levels["visible"] is True
    # the steps slider is set for the new sampler in the same response: no chained sampler event can reset it
    assert steps == {**generate.steps_update(catalog, "tiny-uncond", "ddim", 7), "visible": True}
    assert steps["value"] == 7
    assert classes["choices"] == [models.UNCONDITIONAL] and mode["choices"] == ["none"]
    assert "toy" in about


def test_a_model_that_records_its_steps_sets_the_slider(catalog):
    # mnist-udm-blur's cold-diffusion rule is best at 10 steps (its README's sweep): model_info["default_steps"]
    assert models.default_steps(catalog.load("mnist-udm-blur")) == 10
    _, steps, *_ = generate.model_updates(catalog, "mnist-udm-blur", 25)
    assert steps["value"] == 10
    assert models.default_steps(catalog.load("tiny-uncond")) is None


def test_the_steps_slider_starts_at_the_samplers_fewest_steps(catalog):
    least = schedulers.get_sampler("sde-euler-maruyama").min_steps()
    assert least > 4  # a reference discretization that needs many steps (its spec's min_nfe)
    update = generate.steps_update(catalog, "tiny-uncond", "sde-euler-maruyama", 4)
    assert update["minimum"] == least and update["value"] == least
    assert generate.steps_update(catalog, "tiny-uncond", "sde-euler-maruyama", least + 3)["value"] == least + 3
    assert generate.steps_update(catalog, "tiny-uncond", "ddim", 4) == {"__type__": "update", "minimum": 1, "value": 4}
    # the one- and few-step samplers open at their own counts
    assert generate.steps_update(catalog, "tiny-uncond", "mean-flow", 20)["value"] == 1
    assert generate.steps_update(catalog, "tiny-uncond", "consistency", 20)["value"] == 2


def test_chosen_sigma_levels_are_the_samplers_grid_and_set_the_steps(catalog):
    """The σ levels field replaces the sampler's grid (its ``tuned_sigmas``, a final 0 appended): three levels are
    three Euler steps, whatever the slider says; empty, the sampler's own grid of the slider's steps."""
    *_, (_, _, info, _, _) = run_generate(catalog, sampler="euler", steps=25, levels="20, 2, 0.5")
    assert "**euler**, 3 steps on σ levels 20, 2, 0.5 · NFE 6 per image" in info  # guidance doubles it
    scheduler = catalog.load("mnist-exact").pipe.scheduler
    assert scheduler.sigmas.tolist() == pytest.approx([20, 2, 0.5, 0])
    settings = {k: GENERATE[k] for k in generate.INPUTS if k not in ("random_seed", "preview_every")}
    job = parse_job(catalog, **{**settings, "sampler": "euler", "steps": 6, "levels": " "})
    assert job.levels is None and job.steps == 6
    run_job(catalog, job)
    assert len(catalog.load("mnist-exact").pipe.scheduler.sigmas) == 7


# ------------------------------------------------------------------------------------------------ Compare


def test_compare_grid_shares_the_initial_noise_along_an_axis(catalog):
    handler = compare.make_handler(catalog)
    base = {**GENERATE, "batch": 1}
    *_, (grid, table, files) = handler(*(base[k] for k in generate.INPUTS), "guidance scale", "1, 1", "—", "",
                                      "—", "", 2, False, 20)
    # "1, 1" is one value (duplicates dropped); same seed → one cell
    assert len(table) == 1
    *_, (grid, table, files) = handler(*(base[k] for k in generate.INPUTS), "sampler", "ddim, ddim-eta1",
                                      "steps", "2-4(2)", "seed", "3, 4", 2, False, 20)
    assert len(table) == 8 and list(table.columns[:3]) == ["sampler", "steps", "seed"]
    assert table["nfe"].tolist() == [4, 4, 8, 8] * 2  # CFG doubles every step
    assert grid.size[1] > 2 * grid.size[0] / 2  # two Z blocks stacked
    with open(files[1]) as file:
        rows = list(csv.DictReader(file))
    assert [r["sampler"] for r in rows[:2]] == ["ddim", "ddim-eta1"] and rows[-1]["seed"] == "4"
    assert json.loads(PIL.Image.open(files[0]).text["parameters"])["axes"]["seed"] == [3, 4]


def test_compare_cells_start_from_the_same_noise():
    """ddim (η = 0) and ddim-eta1 at one step both land on x̂0 of the same x_T: equal images."""
    catalog = make_catalog(EXACT.parent)
    jobs = compare.cell_jobs(catalog, {**{k: GENERATE[k] for k in generate.INPUTS if k not in (
        "random_seed", "preview_every")}}, [("sampler", ["ddim", "ddim-eta1"])], 2)
    one_step = [run_job(catalog, job.__class__(**{**job.settings(), "steps": 1})) for _, job in jobs]
    assert [i.tobytes() for i in one_step[0].images] == [i.tobytes() for i in one_step[1].images]


def test_compare_metrics_score_each_cell(catalog):
    handler = compare.make_handler(catalog)
    base = {**GENERATE, "batch": 1}
    *_, (grid, table, files) = handler(*(base[k] for k in generate.INPUTS), "steps", "2, 8", "—", "", "—", "", 1,
                                      True, 20)
    assert table["judge_accuracy"].between(0, 1).all() and (table["feature_fid"] >= 0).all()
    assert table["feature_fid"].iloc[1] < table["feature_fid"].iloc[0]  # 8 DDIM steps beat 2


# ------------------------------------------------------------------------------------------------ the app


def test_the_ui_builds_without_launching(tmp_path):
    ui = app.make_app([tmp_path])
    assert isinstance(ui, gr.Blocks)
    names = {d.get("api_name") for d in ui.config["dependencies"]}
    assert {"generate", "compare", "train_start", "train_stop", "benchmark", "exact_benchmark"} <= names


def test_command_line_defaults_and_bad_folders(monkeypatch, tmp_path):
    started = {}
    monkeypatch.setattr(app, "launch", lambda ui, host, port: started.update(host=host, port=port))
    app.main([])
    assert started == {"host": "127.0.0.1", "port": 7860}
    app.main(["--models", str(tmp_path), "--port", "7999", "--host", "0.0.0.0"])
    assert started == {"host": "0.0.0.0", "port": 7999}
    with pytest.raises(SystemExit):
        app.main(["--models", str(tmp_path / "missing")])


def test_one_shot_models_hide_sampler_and_steps(tmp_path):
    """A GAN samples in one network evaluation: no sampler, no steps, NFE 1."""
    from models.gan import Generator
    from pipelines import GANPipeline

    GANPipeline(Generator(latent_dim=8, base_channels=8, num_classes=10), None,
                {"process": "gan", "dataset": "mnist", "num_classes": 10}).save_pretrained(
        tmp_path / "gan", safe_serialization=True)
    catalog = make_catalog(tmp_path)
    sampler, steps, *_, levels = generate.model_updates(catalog, "gan")
    assert sampler["visible"] is False and steps["visible"] is False and levels["visible"] is False
    *_, info, _, _ = run_generate(catalog, model="gan", sampler="not-used", guidance_mode="none", class_name="3")[-1]
    assert info.startswith("one-shot model · NFE 1 per image")


# ------------------------------------------------------------------------------------------------ Evaluate


def test_sampler_benchmark_on_a_model(catalog):
    figure, table, csv_path = evaluate.make_benchmark_handler(catalog)("mnist-exact", ["ddim", "heun"], "2, 6", 1.0,
                                                                       20, 0)
    assert table[["sampler", "steps", "nfe"]].values.tolist() == [["ddim", 2, 2], ["ddim", 6, 6], ["heun", 2, 3],
                                                                   ["heun", 6, 11]]
    assert table["judge_accuracy"].between(0, 1).all() and len(figure.axes) == 2
    with open(csv_path) as file:
        assert next(csv.reader(file))[:3] == ["sampler", "steps", "feature_fid"]


def test_benchmark_output_streams_line_by_line(tmp_path):
    lines = list(evaluate.stream_command([sys.executable, "-c", "print('a'); print('b')"], tmp_path))
    assert lines == ["a", "b"]
    with pytest.raises(gr.Error, match="failed \\(exit code 3\\)"):
        list(evaluate.stream_command([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path))
    assert evaluate.RESULT_ROW.match("ddim" + " " * 38 + "10   0.0123     1.20   0.0100   0.05")
    assert not evaluate.RESULT_ROW.match("sliced-W2 floor (true vs true, 500 samples): 0.0100")
