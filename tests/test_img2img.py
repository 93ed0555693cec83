"""img2img and SDEdit in ``DiffusionImagePipeline`` (issue 18, item 3): diffusers' recipe (of n steps run the
last ⌊n·s⌋ from ``add_noise(x0, ε, timesteps[:1])``), on every sampler that can noise an image, and a clear
ValueError for every one that cannot and for every bad argument."""

import diffusers
import PIL.Image
import pytest
import torch

from pipelines.diffusion import check_noises_images, img2img_steps
from pipelines.loading import load_pipeline
from schedulers.registry import SAMPLERS
from tests.app_helpers import CHECKPOINTS

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 10


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline(CHECKPOINTS / "mnist-exact")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def digits(pipe):
    """Two sevens from the exact model: the images to start from."""
    pipe.set_sampler("ddim")
    return pipe(batch_size=2, num_inference_steps=20, class_labels=7, generator=torch.Generator().manual_seed(5),
                output_type="raw").images


def run(pipe, seed=0, class_labels=7, steps=STEPS, **kwargs):
    return pipe(batch_size=2, num_inference_steps=steps, class_labels=class_labels,
                generator=torch.Generator().manual_seed(seed), output_type="raw", **kwargs)


def rms(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt())


def fits_mnist_exact(name):
    spec = SAMPLERS[name]
    return "vp" in spec.processes and not spec.requires


NOISABLE = []
for _name, _spec in SAMPLERS.items():
    try:
        check_noises_images(_spec.scheduler_class)
        NOISABLE.append(_name)
    except ValueError:
        pass


def test_diffusers_get_timesteps():
    assert [img2img_steps(10, s) for s in (1.0, 0.8, 0.55, 0.1)] == [10, 8, 5, 1]
    assert img2img_steps(1000, 0.001) == 1


def test_the_ddpm_and_ddim_family_can_noise_images():
    assert {"ddim", "ddim-eta1", "ddim-beta", "ddpm", "ddpm-large"} <= set(NOISABLE)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_strength_one_is_plain_generation_from_the_same_noise(pipe, digits, sampler):
    pipe.set_sampler(sampler)
    plain = run(pipe)
    blank = run(pipe, image=torch.zeros(1, 1, 32, 32), strength=1.0)
    assert blank.nfe == plain.nfe == STEPS
    # x_T = ᾱ_T·0 + β̄_T ε with β̄_T = 1 − O(1e-5): the same start up to float rounding
    torch.testing.assert_close(blank.images, plain.images, atol=1e-3, rtol=0)
    # a real image enters x_T with weight ᾱ_T ≈ 0.006: nearly the same samples, far nearer than another seed's
    seven = run(pipe, image=digits, strength=1.0)
    assert rms(seven.images, plain.images) < 0.2 * rms(run(pipe, seed=1).images, plain.images)


@pytest.mark.parametrize("sampler", ["ddim", "ddim-eta1", "ddpm"])
def test_small_strength_stays_close_to_the_input(pipe, digits, sampler):
    """Deterministic DDIM is img2img; the stochastic samplers (η = 1, DDPM) make it SDEdit."""
    pipe.set_sampler(sampler)
    distance = {s: rms(run(pipe, image=digits, strength=s, class_labels=3).images, digits) for s in (0.1, 0.5, 1.0)}
    assert distance[0.1] < 0.5 * distance[1.0]
    assert distance[0.1] < distance[0.5] < distance[1.0]


def test_fewer_steps_run_and_nfe_counts_them(pipe, digits):
    pipe.set_sampler("ddim")
    assert run(pipe, image=digits, strength=0.5).nfe == 5
    assert run(pipe, image=digits, strength=0.5, guidance_scale=2.0).nfe == 10  # classifier-free guidance: ×2
    steps = []
    run(pipe, image=digits[:1], strength=0.3, callback_on_step_end=lambda p, i, t, x: steps.append(int(t)))
    assert steps == pipe.scheduler.timesteps[-3:].tolist()


def test_a_hand_written_loop_gives_the_same_images(pipe, digits):
    """The pipeline is diffusers' recipe, here with DDPM (its noise drawn after the start's)."""
    pipe.set_sampler("ddpm")
    out = run(pipe, image=digits, strength=0.4).images
    scheduler, generator = pipe.scheduler, torch.Generator().manual_seed(0)
    scheduler.set_timesteps(STEPS)
    timesteps = scheduler.timesteps[STEPS - 4:]
    noise = torch.randn(digits.shape, generator=generator, dtype=pipe.unet.dtype)
    sample = scheduler.add_noise(digits, noise, timesteps[:1].repeat(2))
    labels = torch.full((2,), 7)
    for t in timesteps:
        sample = scheduler.step(pipe.unet(sample, t, class_labels=labels).sample, t, sample,
                                generator=generator).prev_sample
    torch.testing.assert_close(out, sample)


@pytest.mark.parametrize("scheduler_class", [diffusers.EulerDiscreteScheduler, diffusers.HeunDiscreteScheduler])
def test_diffusers_own_sigma_space_schedulers_run_it_unchanged(pipe, digits, scheduler_class):
    """The pipeline has no per-family code: a stock σ-space scheduler (``set_begin_index``, ``order`` 2 for Heun,
    ``scale_model_input``) runs img2img as in diffusers' ``StableDiffusionImg2ImgPipeline``."""
    model_scheduler = pipe.scheduler
    pipe.scheduler = scheduler_class.from_config({**model_scheduler.config})
    try:
        out = run(pipe, image=digits, strength=0.3)
        scheduler = scheduler_class.from_config({**model_scheduler.config})
        scheduler.set_timesteps(STEPS)
        t_start = (STEPS - 3) * scheduler.order
        scheduler.set_begin_index(t_start)
        timesteps = scheduler.timesteps[t_start:]
        noise = torch.randn(digits.shape, generator=torch.Generator().manual_seed(0), dtype=pipe.unet.dtype)
        sample = scheduler.add_noise(digits, noise, timesteps[:1].repeat(2))
        labels = torch.full((2,), 7)
        for t in timesteps:
            output = pipe.unet(scheduler.scale_model_input(sample, t), t, class_labels=labels).sample
            sample = scheduler.step(output, t, sample).prev_sample
        assert out.nfe == len(timesteps)
        torch.testing.assert_close(out.images, sample)
        assert rms(out.images, digits) < 0.5 * rms(run(pipe).images, digits)
    finally:
        pipe.scheduler = model_scheduler


@pytest.mark.parametrize("sampler", [name for name in SAMPLERS if fits_mnist_exact(name)])
def test_every_sampler_noises_the_image_or_says_why_not(pipe, digits, sampler):
    """A sampler with add_noise and fixed steps runs img2img close to the input; any other raises one clear
    ValueError (rk45 chooses its own steps)."""
    pipe.set_sampler(sampler)
    steps = max(STEPS, SAMPLERS[sampler].min_steps() or 0)  # the literal Euler–Maruyama entries need more
    if sampler in NOISABLE:
        out = run(pipe, image=digits, strength=0.2, steps=steps)  # (DDPM's fixed_large keeps the least of it)
        # Literal Euler–Maruyama leaves grain whether it starts from noise or from an image (at 10 steps its
        # plain samples sat 0.8 RMS from a digit where DDIM's sit 0.45; issue #17), so it is held to less.
        margin = 0.9 if SAMPLERS[sampler].family == "sde" else 0.75
        assert rms(out.images, digits) < margin * rms(run(pipe, steps=steps).images, digits)
    else:
        with pytest.raises(ValueError, match="cannot (noise an image|start partway from an image)"):
            run(pipe, image=digits, strength=0.2, steps=steps)


@pytest.mark.parametrize("model", ["mnist-pfgmpp", "mnist-udm-blur"])
def test_samplers_with_their_own_prior_refuse_an_image(model):
    pipe = load_pipeline(CHECKPOINTS / model)
    with pytest.raises(ValueError, match=r"draws its own prior \(sample_prior\)"):
        pipe(num_inference_steps=4, image=torch.zeros(1, 32, 32), strength=0.5)


def test_rk45_names_solve():
    with pytest.raises(ValueError, match=r"solve\(\)"):
        check_noises_images(SAMPLERS["rk45"].scheduler_class)


def test_a_pil_image_is_converted_to_the_models_channels(pipe, digits):
    pipe.set_sampler("ddim")
    pixels = ((digits[0, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    rgb = PIL.Image.fromarray(pixels).convert("RGB")
    out = run(pipe, image=rgb, strength=0.2)
    assert rms(out.images[0], digits[0]) < 0.5 * rms(run(pipe).images[0], digits[0])


ZEROS = torch.zeros(1, 32, 32)
BAD = [
    ({"image": ZEROS, "strength": 0.0}, r"strength must be a number in \(0, 1\], got 0.0"),
    ({"image": ZEROS, "strength": -0.5}, r"strength must be a number in \(0, 1\]"),
    ({"image": ZEROS, "strength": 1.5}, r"strength must be a number in \(0, 1\], got 1.5"),
    ({"image": ZEROS, "strength": float("nan")}, r"strength must be a number in \(0, 1\], got nan"),
    ({"image": ZEROS, "strength": "half"}, r"strength must be a number in \(0, 1\], got 'half'"),
    ({"image": ZEROS, "strength": True}, r"strength must be a number in \(0, 1\]"),
    ({"image": ZEROS, "strength": 0.05}, r"strength 0.05 of 10 steps runs no step"),
    ({"image": torch.zeros(1, 16, 16)}, r"image must be \(C, H, W\) = \(1, 32, 32\) .*got \(1, 1, 16, 16\)"),
    ({"image": torch.zeros(3, 32, 32)}, r"image must be \(C, H, W\) = \(1, 32, 32\) .*got \(1, 3, 32, 32\)"),
    ({"image": torch.zeros(3, 1, 32, 32)}, r"image must be .* in a batch of 1 or 2, got \(3, 1, 32, 32\)"),
    ({"image": torch.zeros(32, 32)}, r"image must be \(C, H, W\) = \(1, 32, 32\)"),
    ({"image": PIL.Image.new("L", (28, 28))}, r"image must be \(C, H, W\) = \(1, 32, 32\) .*got \(1, 1, 28, 28\)"),
    ({"image": "seven.png"}, "image must be a PIL image or a tensor"),
    ({"strength": 0.5}, "strength 0.5 applies to an image"),
]


@pytest.mark.parametrize("arguments, message", BAD)
def test_bad_arguments_raise_a_value_error_naming_them(pipe, arguments, message):
    pipe.set_sampler("ddim")
    with pytest.raises(ValueError, match=message):
        run(pipe, **arguments)
