"""Every bad input, at handler level, becomes a ``gr.Error`` whose message names the problem (issue 9, item 5).

One table: (handler, changed inputs, expected message). Handlers are the functions the UI's buttons call.
"""

import math

import gradio as gr
import PIL.Image
import pytest

from tests.app_helpers import GENERATE, make_catalog, make_model_root
from webui import compare, evaluate, generate
from webui.training import DATASETS, Runs, trainers


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return make_model_root(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def catalog(roots, single_thread):
    return make_catalog(roots)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("work")
    (base / "images").mkdir()
    (base / "runs" / "done").mkdir(parents=True)
    return Runs(base, base / "runs", data_roots=[base])


DIGIT = PIL.Image.new("L", (32, 32))
VP = next(label for label in trainers() if "(vp-eps)" in label)
TRAIN = {"name": "run-1", "trainer": VP, "dataset_kind": DATASETS[0], "dataset_text": "", "preset": "tiny",
         "steps": 10, "batch": 8, "lr": 1e-3, "checkpoint_every": 5, "sample_every": 0, "max_images": 0, "extra": ""}
AXES = ["sampler", "ddim", "—", "", "—", "", 1, False, 20]  # X/Y/Z axes, images per cell, metrics, samples
BENCH = {"model": "mnist-exact", "samplers": ["ddim"], "steps_text": "2", "guidance_scale": 1.0, "samples": 20,
         "seed": 0}


def call_generate(catalog, runs, changes):
    values = {**GENERATE, **changes}
    list(generate.make_handler(catalog)(*(values[k] for k in generate.INPUTS)))


def call_compare(catalog, runs, changes):
    base = {**GENERATE, **changes.get("base", {})}
    axes = list(AXES)
    for index, value in changes.get("axes", {}).items():
        axes[index] = value
    list(compare.make_handler(catalog)(*(base[k] for k in generate.INPUTS), *axes))


def call_train(catalog, runs, changes):
    values = {**TRAIN, **changes}
    runs.command(*values.values())


def call_benchmark(catalog, runs, changes):
    evaluate.make_benchmark_handler(catalog)(**{**BENCH, **changes})


CASES = [
    # ---- the model: unknown, outside the roots, not a pipeline, unsafe or broken files
    (call_generate, {"model": "missing-model"}, "unknown model 'missing-model'"),
    (call_generate, {"model": ""}, "choose a model"),
    (call_generate, {"model": None}, "choose a model"),
    (call_generate, {"model": "/etc"}, "outside the allowed directories"),
    (call_generate, {"model": "checkpoints/../../etc"}, "outside the allowed directories"),
    (call_generate, {"model": "checkpoints/mnist-judge"}, "no model_index.json"),
    (call_generate, {"model": "checkpoints/nothing-here"}, "does not exist"),
    (call_generate, {"model": "pickled"}, r"refusing unet/diffusion_pytorch_model\.bin: weights must be .safetensors"),
    (call_generate, {"model": "corrupt"}, "could not load the DiffusionImagePipeline"),
    (call_generate, {"model": "badjson"}, "model_index.json is corrupt"),
    (call_generate, {"model": "foreign"}, "unknown pipeline class 'StableDiffusionPipeline'"),
    (call_generate, {"model": "evil-lib"}, "component 'unet' comes from 'os'"),
    # ---- the sampler
    (call_generate, {"sampler": "euler-maruyama-typo"}, "unknown sampler 'euler-maruyama-typo'"),
    (call_generate, {"sampler": None}, "unknown sampler None"),
    (call_generate, {"sampler": "analytic-ddpm"}, "needs eps_second_moment"),
    (call_generate, {"model": "flow-model"}, "cannot drive a model trained on the 'flow' process"),
    # ---- steps
    (call_generate, {"steps": 0}, r"steps must be in \[1, 10000\], got 0"),
    (call_generate, {"steps": -5}, r"steps must be in \[1, 10000\]"),
    (call_generate, {"steps": 10**6}, r"steps must be in \[1, 10000\], got 1e\+06"),
    (call_generate, {"steps": 2.5}, "steps must be a whole number"),
    (call_generate, {"steps": math.nan}, "steps must be a finite number"),
    (call_generate, {"steps": None}, "steps must be a number, got None"),
    (call_generate, {"steps": "ten"}, "steps must be a number, got 'ten'"),
    # ---- σ levels: a chosen grid, for the fixed-grid σ-space samplers only
    (call_generate, {"sampler": "heun", "levels": "2, 20"}, "sigmas must be a strictly descending"),
    (call_generate, {"sampler": "heun", "levels": "ten"}, "σ levels: 'ten' is not a number"),
    (call_generate, {"sampler": "heun", "levels": "1e9, 1"}, "1e\\+09 lies above the model's largest noise level"),
    (call_generate, {"levels": "10, 1"}, "sampler ddim takes no chosen σ levels"),
    (call_generate, {"sampler": "rk45", "levels": "10, 1"}, "sampler rk45 takes no chosen σ levels"),
    (call_generate, {"sampler": "sde-euler-maruyama", "levels": "10, 1"},
     "sde-euler-maruyama needs at least 20 evaluations, these levels give 2"),
    (call_compare, {"base": {"sampler": "heun", "levels": "10, 1"}, "axes": {0: "steps", 1: "2, 4"}},
     "the steps axis needs the σ levels field empty"),
    # ---- η / noise level, guidance
    (call_generate, {"noise": 1.5}, r"η / noise level must be in \[0, 1\]"),
    (call_generate, {"noise": math.nan}, "η / noise level must be a finite number"),
    (call_generate, {"sampler": "noise-level", "noise": -0.1}, r"η / noise level must be in \[0, 1\]"),
    (call_generate, {"guidance_scale": math.nan}, "guidance scale must be a finite number"),
    (call_generate, {"guidance_scale": -math.inf}, "guidance scale must be a finite number"),
    (call_generate, {"guidance_scale": 1e6}, r"guidance scale must be in \[-100, 100\]"),
    (call_generate, {"guidance_mode": "classifier"}, "guidance mode 'classifier' is not one of: none, classifier-free"),
    (call_generate, {"class_name": "none (unconditional)"}, "classifier-free guidance steers towards a class"),
    (call_generate, {"model": "tiny-uncond", "guidance_mode": "classifier-free"}, "guidance mode 'classifier-free'"),
    # ---- class, seed, batch, resolution, backend, previews
    (call_generate, {"class_name": "eleven"}, "class 'eleven' is not one of"),
    (call_generate, {"seed": -1}, r"seed must be in \[0, "),
    (call_generate, {"seed": math.inf}, "seed must be a finite number"),
    (call_generate, {"seed": 1.5}, "seed must be a whole number"),
    (call_generate, {"batch": 0}, r"batch size must be in \[1, 64\]"),
    (call_generate, {"batch": 10**4}, r"batch size must be in \[1, 64\]"),
    (call_generate, {"model": "mnist-vp", "batch": 64, "resolution": 256}, "batch size × resolution is too large"),
    (call_generate, {"model": "mnist-vp", "resolution": 30}, "resolution must be a multiple of 4"),
    (call_generate, {"resolution": 64}, "samples only at its trained size 32×32"),
    (call_generate, {"resolution": 10**5}, r"resolution must be in \[0, 512\]"),
    (call_generate, {"backend": "cuda-magic"}, "attention backend 'cuda-magic' is not one of"),
    (call_generate, {"preview_every": -1}, r"preview every must be in \[0, 10000\]"),
    # ---- img2img: the image, its strength, samplers that cannot start from one
    (call_generate, {"image": DIGIT, "strength": 0}, r"strength must be a number in \(0, 1\], got 0"),
    (call_generate, {"image": DIGIT, "strength": 1.5}, r"strength must be a number in \(0, 1\], got 1.5"),
    (call_generate, {"image": DIGIT, "strength": None}, r"strength must be a number in \(0, 1\], got None"),
    (call_generate, {"image": DIGIT, "strength": 0.1}, "strength 0.1 of 4 steps runs no step"),
    (call_generate, {"image": PIL.Image.new("L", (28, 28))},
     r"image must be \(C, H, W\) = \(1, 32, 32\) like the samples, got \(1, 1, 28, 28\)"),
    (call_generate, {"image": "digit.png"}, "image must be an uploaded picture, got str"),
    (call_generate, {"image": DIGIT, "sampler": "rk45"}, r"chooses its own steps \(solve\(\)\)"),
    (call_generate, {"image": DIGIT, "model": "mnist-pfgmpp", "sampler": "pfgmpp-heun", "guidance_mode": "none"},
     r"draws its own prior \(sample_prior\)"),
    (call_generate, {"image": DIGIT, "model": "mnist-gan-qp", "guidance_mode": "none"}, "cannot start from an image"),
    (call_compare, {"base": {"image": PIL.Image.new("L", (8, 8))}}, r"image must be \(C, H, W\)"),

    # ---- Compare: axes, ranges, cells
    (call_compare, {"axes": {0: "—"}}, "choose at least one axis"),
    (call_compare, {"axes": {4: "sampler", 5: "heun"}}, "Z axis: sampler is already an axis"),
    (call_compare, {"axes": {0: "prompt"}}, "X axis: unknown axis 'prompt'"),
    (call_compare, {"axes": {0: "steps", 1: "1-100(1)"}}, "gives 100 values; at most 16"),
    (call_compare, {"axes": {0: "steps", 1: "a-b"}}, r"X axis \(steps\): 'a-b' is not a number"),
    (call_compare, {"axes": {0: "steps", 1: "0, 5"}}, r"X axis \(steps\) must be in \[1, 10000\], got 0"),
    (call_compare, {"axes": {0: "steps", 1: "1-16(1)", 2: "seed", 3: "1-8(1)"}}, "128 cells; at most 64"),
    (call_compare, {"axes": {1: "ddim, nope"}}, "cell \\(sampler nope\\): unknown sampler 'nope'"),
    (call_compare, {"axes": {0: "model", 1: "mnist-exact, ../etc"}}, r"cell \(model ../etc\): model path .* outside"),
    (call_compare, {"axes": {1: " , "}}, r"X axis \(sampler\): give at least one value"),
    (call_compare, {"axes": {6: 0}}, r"images per cell must be in \[1, 16\]"),
    (call_compare, {"axes": {7: True, 8: 5}}, r"metric samples must be in \[20, 2000\]"),
    (call_compare, {"base": {"model": "tiny-uncond", "guidance_mode": "none", "class_name": "none (unconditional)"},
                    "axes": {7: True}}, "the MNIST judge cannot score it"),
    # ---- Train: names, numbers, data paths, options the trainer's parser rejects
    (call_train, {"name": "../evil"}, "run name '../evil' must be"),
    (call_train, {"name": ""}, "run name '' must be"),
    (call_train, {"trainer": "diffusion GAN 9000"}, "trainer 'diffusion GAN 9000' is not one of"),
    (call_train, {"steps": 0}, r"steps must be in \[1, 1e\+06\]"),
    (call_train, {"lr": 0}, r"learning rate must be in \[1e-08, 1\]"),
    (call_train, {"lr": math.nan}, "learning rate must be a finite number"),
    (call_train, {"batch": -1}, r"batch size must be in \[1, 4096\]"),
    (call_train, {"dataset_kind": "imagenet"}, "dataset must be one of"),
    (call_train, {"dataset_kind": DATASETS[1], "dataset_text": "/etc"}, "image folder '/etc' is outside"),
    (call_train, {"dataset_kind": DATASETS[1], "dataset_text": ""}, "image folder must be a path"),
    (call_train, {"dataset_kind": DATASETS[2], "dataset_text": "bad name!!"}, "datasets name 'bad name!!' must look"),
    (call_train, {"extra": "--no-such-flag 3"}, "unrecognized arguments: --no-such-flag 3"),
    (call_train, {"extra": "--seed 'unterminated"}, "extra options: No closing quotation"),
    (call_train, {"extra": "--ema-decay 2"}, r"--ema-decay must be in \[0, 1\)"),
    (call_train, {"preset": "gigantic"}, "argument --model: invalid choice: 'gigantic'"),
    # ---- Evaluate
    (call_benchmark, {"model": "tiny-uncond"}, "the MNIST judge cannot score it"),
    (call_benchmark, {"samplers": []}, "choose at least one sampler"),
    (call_benchmark, {"samples": 5}, r"samples must be in \[20, 2000\]"),
    (call_benchmark, {"steps_text": ""}, "steps: give at least one value"),
    (call_benchmark, {"samplers": ["ddim", "analytic-ddim"]}, "sampler analytic-ddim does not fit mnist-exact"),
]


@pytest.mark.parametrize("call, changes, message", CASES, ids=[f"{i}-{c[0].__name__[5:]}" for i, c in
                                                               enumerate(CASES)])
def test_bad_input_becomes_a_clear_error(catalog, runs, call, changes, message):
    with pytest.raises(gr.Error, match=message):
        call(catalog, runs, changes)


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


def test_run_control_refuses_what_it_cannot_do(runs):
    with pytest.raises(gr.Error, match="run done exists: Resume it, or choose another run name"):
        runs.start("done", "train.diffusion", [])
    with pytest.raises(gr.Error, match="run done is not running"):
        runs.stop("done")
    with pytest.raises(gr.Error, match="run done was not started from this app"):
        runs.resume("done")
