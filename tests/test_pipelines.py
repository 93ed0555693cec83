"""The image pipeline: diffusers interoperability both ways, reproducibility, CFG, outputs, callbacks, errors."""

import math
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import schedulers
from evaluation.distances import sliced_wasserstein
from evaluation.exact import ExactScoreModel
from pipelines import DiffusionImagePipeline

from .conftest import make_pipeline, model_supplies, seeded, step_defaults

pytestmark = pytest.mark.usefixtures("single_thread")
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"

@pytest.fixture(scope="module")
def conditional_unet():
    """A tiny real class-conditional UNet (3 classes + the null class), untrained."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, num_class_embeds=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("scheduler_class", [diffusers.DDPMScheduler, diffusers.DDIMScheduler,
                                             diffusers.EulerDiscreteScheduler, diffusers.DPMSolverMultistepScheduler])
def test_diffusers_schedulers_run_in_our_pipeline(mixture, scheduler_class):
    pipe = make_pipeline(mixture, scheduler_class(clip_sample=False) if "clip_sample" in
                         scheduler_class.__init__.__code__.co_varnames else scheduler_class())
    x = pipe(batch_size=2000, num_inference_steps=50, generator=seeded(0), output_type="raw").images
    assert sliced_wasserstein(x, mixture.sample(2000, seeded(1))) <= 0.07  # measured 0.03–0.05


@pytest.mark.parametrize("ours, theirs, kwargs", [
    (schedulers.DDPMScheduler, diffusers.DDPMPipeline, {}),
    (schedulers.DDIMScheduler, diffusers.DDIMPipeline, {"eta": 0.0}),
])
def test_our_schedulers_drop_into_diffusers_pipelines(mixture, ours, theirs, kwargs):
    model = ExactScoreModel.from_mixture(mixture)
    their_pipe = theirs(unet=model, scheduler=ours(clip_sample=False))
    their_pipe.scheduler = ours(clip_sample=False)  # DDIMPipeline.__init__ rebuilt diffusers' own DDIMScheduler
    assert type(their_pipe.scheduler) is ours
    their_pipe.set_progress_bar_config(disable=True)
    their_images = their_pipe(batch_size=4, num_inference_steps=20, generator=seeded(0), output_type="np",
                              **kwargs).images
    our_images = make_pipeline(mixture, ours(clip_sample=False))(
        batch_size=4, num_inference_steps=20, generator=seeded(0), output_type="np", **kwargs).images
    assert np.abs(their_images - our_images).max() <= 1e-6


def test_readme_tour_ddim_in_ddpm_pipeline():
    """README's tour: the shipped exact MNIST model and DDIM η = 1 from its config in diffusers' ``DDPMPipeline``,
    which passes no class labels (the model's mixture over all digits) — the same images as our pipeline's."""
    model = DiffusionImagePipeline.from_pretrained(CHECKPOINTS / "mnist-exact")
    scheduler = schedulers.DDIMScheduler.from_config(model.scheduler.config, eta=1.0)
    theirs = diffusers.DDPMPipeline(unet=model.unet, scheduler=scheduler)
    theirs.set_progress_bar_config(disable=True)
    images = theirs(batch_size=2, num_inference_steps=5, generator=seeded(0), output_type="np").images
    model.scheduler = scheduler
    model.set_progress_bar_config(disable=True)
    ours = model(batch_size=2, num_inference_steps=5, generator=seeded(0), output_type="np").images
    assert images.shape == (2, 32, 32, 1) and np.abs(images - ours).max() <= 1e-5


# README, "Which diffusers pipelines take which samplers": diffusers' DDPMPipeline and DDIMPipeline start from unit
# noise and never call scale_model_input, so they take the samplers that need neither (DDIMPipeline: DDIM's class,
# with its own η); the σ-space samplers need them (Stable Diffusion's loop, tests/test_stable_diffusion.py).
VP_FIXED_STEP = [name for name, spec in schedulers.SAMPLERS.items() if spec.drives("vp") and not spec.adaptive]
UNIT_NOISE = ["ddim", "ddim-eta1", "ddim-beta", "analytic-ddpm", "analytic-ddim", "ddpm", "ddpm-large"]
MODEL_SUPPLIES = model_supplies(20)


@pytest.mark.parametrize("theirs, name", [(diffusers.DDPMPipeline, name) for name in UNIT_NOISE] + [
    (diffusers.DDIMPipeline, name) for name in UNIT_NOISE
    if schedulers.get_sampler(name).scheduler_class is schedulers.DDIMScheduler])
def test_unit_noise_samplers_run_in_diffusers_unconditional_pipelines(mixture, theirs, name):
    spec = schedulers.get_sampler(name)
    step_kwargs = step_defaults(spec)
    pass_eta = step_kwargs if theirs is diffusers.DDIMPipeline else {}  # DDPMPipeline passes none: the config's η
    their_pipe = theirs(unet=ExactScoreModel.from_mixture(mixture), scheduler=spec.create(MODEL_SUPPLIES))
    their_pipe.scheduler = spec.create(MODEL_SUPPLIES)  # as above: DDIMPipeline.__init__ rebuilds diffusers' own
    their_pipe.set_progress_bar_config(disable=True)
    their_images = their_pipe(batch_size=4, num_inference_steps=20, generator=seeded(0), output_type="np",
                              **pass_eta).images
    our_images = make_pipeline(mixture, spec.create(MODEL_SUPPLIES))(
        batch_size=4, num_inference_steps=20, generator=seeded(0), output_type="np", **step_kwargs).images
    assert np.abs(their_images - our_images).max() <= 1e-6


@pytest.mark.parametrize("name", VP_FIXED_STEP)
def test_only_the_unit_noise_samplers_skip_noise_scaling(name):
    scheduler = schedulers.get_sampler(name).create(MODEL_SUPPLIES)
    scheduler.set_timesteps(20)
    x = torch.randn(1, 1, 4, 4, generator=seeded(0))
    unscaled = torch.equal(scheduler.scale_model_input(x, scheduler.timesteps[0]), x)
    assert (scheduler.init_noise_sigma == 1 and unscaled) == (name in UNIT_NOISE)


def test_diffusers_unconditional_pipelines_pass_no_class_labels(conditional_unet):
    for theirs in (diffusers.DDPMPipeline, diffusers.DDIMPipeline):
        pipe = theirs(unet=conditional_unet, scheduler=schedulers.DDIMScheduler())
        pipe.set_progress_bar_config(disable=True)
        with pytest.raises(ValueError, match="class_labels should be provided"):
            pipe(batch_size=1, num_inference_steps=2)


@pytest.mark.parametrize("use_exact_model", [True, False])
def test_save_and_load_give_identical_samples(tmp_path, class_mixture, conditional_unet, use_exact_model):
    unet = ExactScoreModel.from_mixture(class_mixture) if use_exact_model else conditional_unet
    pipe = DiffusionImagePipeline(unet, schedulers.DDIMScheduler(eta=0.5), model_info={"process": "vp", "classes": 3})
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=3, num_inference_steps=12, class_labels=[0, 1, 2], guidance_scale=2.0,
                  output_type="pt")
    before = pipe(generator=seeded(7), **kwargs).images
    pipe.save_pretrained(tmp_path)
    assert list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.bin"))
    loaded = DiffusionImagePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.model_info == {"process": "vp", "classes": 3}
    assert type(loaded.scheduler) is schedulers.DDIMScheduler and loaded.scheduler.config.eta == 0.5
    assert torch.equal(loaded(generator=seeded(7), **kwargs).images, before)


def test_seeds_reproduce_and_differ(mixture):
    pipe = make_pipeline(mixture, schedulers.DDPMScheduler(clip_sample=False))
    a, b, c = (pipe(batch_size=4, num_inference_steps=10, generator=seeded(s), output_type="raw").images
               for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    per_image = [seeded(1), seeded(2)]  # a list of generators gives each image its own stream
    first = pipe(batch_size=2, num_inference_steps=10, generator=per_image, output_type="raw").images
    alone = pipe(batch_size=1, num_inference_steps=10, generator=[seeded(1)], output_type="raw").images
    assert torch.allclose(first[:1], alone, atol=1e-6)


def test_guidance_scale_mixes_conditional_and_unconditional(class_mixture):
    pipe = make_pipeline(class_mixture, schedulers.DDIMScheduler(clip_sample=False))
    x, labels = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    null = torch.full_like(labels, pipe.null_class_id)
    cond, uncond = pipe.unet(x, 400, labels).sample, pipe.unet(x, 400, null).sample
    for w, cost in [(1.0, 1), (0.0, 1), (3.0, 2), (-0.5, 2)]:
        out, nfe = pipe.guided_model_output(x, 400, labels, w)
        assert torch.allclose(out, uncond + w * (cond - uncond), atol=1e-6) and nfe == cost


def test_guidance_scale_one_is_conditional_and_zero_unconditional(class_mixture):
    pipe = make_pipeline(class_mixture, schedulers.DDIMScheduler(clip_sample=False))
    def run(**kwargs):
        return pipe(batch_size=6, num_inference_steps=20, generator=seeded(3), output_type="raw", **kwargs)

    conditional = run(class_labels=1, guidance_scale=1.0)
    assert conditional.nfe == 20
    assert torch.equal(conditional.images, run(class_labels=[1] * 6).images)
    unconditional = run(class_labels=1, guidance_scale=0.0)
    assert torch.equal(unconditional.images, run().images)
    assert torch.equal(unconditional.images, run(class_labels=pipe.null_class_id).images)
    guided = run(class_labels=1, guidance_scale=4.0)
    assert guided.nfe == 40 and not torch.allclose(guided.images, conditional.images)


def test_output_types(conditional_unet):
    pipe = DiffusionImagePipeline(conditional_unet, schedulers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    def run(output_type, **kwargs):
        return pipe(batch_size=2, num_inference_steps=3, generator=seeded(0), class_labels=1,
                    output_type=output_type, **kwargs)

    pil = run("pil").images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8) and pil[0].mode == "L"
    arr = run("np").images
    assert arr.shape == (2, 8, 8, 1) and arr.min() >= 0 and arr.max() <= 1
    assert np.array_equal(np.asarray(pil[0]), (arr[0, :, :, 0] * 255).round().astype(np.uint8))
    pt = run("pt").images
    assert pt.shape == (2, 1, 8, 8) and torch.allclose(pt.permute(0, 2, 3, 1), torch.from_numpy(arr), atol=1e-6)
    raw = run("raw").images
    assert torch.allclose((raw / 2 + 0.5).clamp(0, 1), pt, atol=1e-6)
    images, nfe = run("pt", return_dict=False)
    assert nfe == 3 and torch.equal(images, pt)


def test_callback_sees_every_step_and_can_replace_the_sample(mixture):
    pipe = make_pipeline(mixture, schedulers.DDIMScheduler(clip_sample=False))
    seen = []

    def record(pipeline, i, t, tensors):
        seen.append((i, int(t), tensors["sample"].shape, tensors["pred_original_sample"].shape))

    pipe(batch_size=2, num_inference_steps=5, generator=seeded(0), callback_on_step_end=record)
    assert [s[0] for s in seen] == list(range(5))
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert all(s[2] == s[3] == (2, 1, 4, 4) for s in seen)
    zeros = pipe(batch_size=2, num_inference_steps=5, output_type="raw",
                 callback_on_step_end=lambda p, i, t, d: {"sample": torch.zeros_like(d["sample"])}).images
    assert torch.equal(zeros, torch.zeros(2, 1, 4, 4))


BAD_CALLS = [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=10**6), "num_inference_steps"),
    (dict(guidance_scale=math.nan, class_labels=0), "guidance_scale"),
    (dict(guidance_scale=math.inf, class_labels=0), "guidance_scale"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(class_labels=3 + 1), "class labels"),
    (dict(class_labels=-1), "class labels"),
    (dict(class_labels=[0, 1, 2]), "class labels for batch_size"),
    (dict(eta=1.5), "eta"),
    (dict(latents=torch.zeros(2, 1, 5, 5)), "latents"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CALLS)
def test_invalid_arguments_raise_clear_errors(class_mixture, kwargs, message):
    pipe = make_pipeline(class_mixture, schedulers.DDIMScheduler())
    with pytest.raises(ValueError, match=message):
        pipe(**{"batch_size": 2, "num_inference_steps": 2, **kwargs})


def test_model_and_scheduler_mismatches_raise_clear_errors(mixture):
    unconditional = make_pipeline(mixture, schedulers.DDPMScheduler())
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(class_labels=0, num_inference_steps=2)
    with pytest.raises(ValueError, match="class-conditional"):
        unconditional(guidance_scale=3.0, num_inference_steps=2)
    with pytest.raises(ValueError, match="has no η"):
        unconditional(eta=0.5, num_inference_steps=2)
    with pytest.raises(ValueError, match="inversion"):
        unconditional.invert(torch.zeros(1, 1, 4, 4), 2)


def test_attention_backends_switch_and_agree(class_mixture):
    """A UNet with attention blocks gives the same samples on every CPU-capable backend."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    pipe = DiffusionImagePipeline(unet, schedulers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    default = pipe(batch_size=2, num_inference_steps=3, generator=seeded(0), output_type="raw").images
    for backend in ("math", "sdpa", "triton"):  # triton falls back to SDPA on CPU
        assert pipe.set_attention_backend(backend) == 4  # 1 down, 1 mid, 2 up (layers_per_block + 1)
        out = pipe(batch_size=2, num_inference_steps=3, generator=seeded(0), output_type="raw").images
        assert torch.allclose(out, default, atol=1e-5)
    with pytest.raises(ValueError, match="triton"):
        pipe.set_attention_backend("flash-please")


def test_samples_at_another_size(conditional_unet):
    pipe = DiffusionImagePipeline(conditional_unet, schedulers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, class_labels=1, height=16, width=24, output_type="pt").images
    assert images.shape == (2, 1, 16, 24)
    with pytest.raises(ValueError, match="height and width"):
        pipe(batch_size=1, num_inference_steps=2, height=-8)
