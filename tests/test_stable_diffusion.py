"""Our samplers in diffusers' ``StableDiffusionPipeline``: tiny random components built from configs, offline.

The components follow diffusers' own fast pipeline tests (tests/pipelines/stable_diffusion/test_stable_diffusion.py,
``get_dummy_components``): a tiny ``UNet2DConditionModel``, ``AutoencoderKL`` and CLIP text encoder. Their
tokenizer is downloaded; ours is a CLIP BPE tokenizer written here from a 54-entry vocabulary (the two special
tokens and a–z, each also as a word end ``</w>``) and no merges. Every registered sampler that drives the VP
process in a fixed-step loop is swapped in with ``spec.create(pipe.scheduler.config)`` and must give what the
diffusers protocol gives by hand: encode the prompt, scale the initial noise by ``init_noise_sigma``, then per
timestep ``scale_model_input``, the UNet, classifier-free guidance and ``step``; decode with the VAE.
"""

import json

import diffusers
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import schedulers

from .conftest import model_supplies, seeded, step_defaults

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT, GUIDANCE, STEPS, SIZE = "a squirrel eating a burger", 3.0, 3, 16  # 16 px: 8×8 latents (VAE factor 2)
# The scheduler of diffusers' dummy components (steps_offset 1, which the pipeline would otherwise patch in).
SD_SCHEDULER = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1)
FIXED_STEP_VP = [name for name, spec in schedulers.SAMPLERS.items() if spec.drives("vp") and not spec.adaptive]


def tiny_clip_tokenizer(directory) -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab.update({token: i + 2 for i, token in enumerate([*letters, *(c + "</w>" for c in letters)])})
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    """diffusers' dummy Stable Diffusion components (its fast tests' configs), with our offline tokenizer."""
    tokenizer = tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=5, vocab_size=len(tokenizer)))
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                             scheduler=SD_SCHEDULER, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_noise() -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=seeded(1))


@torch.no_grad()
def by_hand(pipe, scheduler, latents, generator, **step_kwargs) -> torch.Tensor:
    """The diffusers protocol, written out: images in [0, 1] from ``latents`` (unit-variance noise)."""
    def embed(texts):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    text = torch.cat([embed([""]), embed([PROMPT])])  # unconditional first, as the pipeline chunks them
    scheduler.set_timesteps(STEPS)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = pipe.unet(model_input, t, encoder_hidden_states=text).sample.chunk(2)
        noise_pred = uncond + GUIDANCE * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, generator=generator, **step_kwargs).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)


def run_pipeline(pipe, **kwargs) -> torch.Tensor:
    return pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                latents=initial_noise(), generator=seeded(2), output_type="pt", **kwargs).images


def test_the_hand_written_loop_is_the_pipeline_for_diffusers_scheduler(sd_pipe):
    """The control: diffusers' own DDIM and Euler give the same images through the pipeline and by hand."""
    for scheduler_class in (diffusers.DDIMScheduler, diffusers.EulerDiscreteScheduler):
        sd_pipe.scheduler = scheduler_class.from_config(SD_SCHEDULER.config)
        piped = run_pipeline(sd_pipe)
        assert torch.allclose(piped, by_hand(sd_pipe, sd_pipe.scheduler, initial_noise(), seeded(2)), atol=1e-5)


@pytest.mark.parametrize("name", FIXED_STEP_VP)
def test_every_vp_sampler_runs_in_stable_diffusion_as_by_hand(sd_pipe, name):
    spec = schedulers.get_sampler(name)
    sd_pipe.scheduler = spec.create({**SD_SCHEDULER.config, **model_supplies(STEPS)})
    assert type(sd_pipe.scheduler) is spec.scheduler_class
    step_kwargs = step_defaults(spec)  # the pipeline passes its eta to step
    piped = run_pipeline(sd_pipe, **step_kwargs)
    assert piped.shape == (1, 3, SIZE, SIZE) and torch.isfinite(piped).all()
    expected = by_hand(sd_pipe, sd_pipe.scheduler, initial_noise(), seeded(2), **step_kwargs)
    assert torch.allclose(piped, expected, atol=1e-5)
    if "eta" in step_kwargs:  # without eta= the pipeline passes its own, 0, not the sampler's
        assert torch.allclose(run_pipeline(sd_pipe), by_hand(sd_pipe, sd_pipe.scheduler, initial_noise(), seeded(2),
                                                             eta=0.0), atol=1e-5)


def test_from_config_swaps_a_sampler_in_as_the_readme_shows(sd_pipe):
    """README's tour: ``ProbabilityFlowScheduler.from_config(pipe.scheduler.config, solver=…)`` is the registry's
    sampler of that solver, and changes the images (the pipeline really steps with it)."""
    sd_pipe.scheduler = SD_SCHEDULER
    stock = run_pipeline(sd_pipe)
    sd_pipe.scheduler = schedulers.ProbabilityFlowScheduler.from_config(sd_pipe.scheduler.config, solver="dpmpp-2m",
                                                                        sigma_schedule="log_snr")
    ours = run_pipeline(sd_pipe)
    sd_pipe.scheduler = schedulers.get_sampler("dpmpp-2m").create(SD_SCHEDULER.config)
    assert torch.equal(ours, run_pipeline(sd_pipe))
    assert not torch.allclose(ours, stock, atol=1e-3)


def test_an_adaptive_sampler_in_the_pipeline_names_solve(sd_pipe):
    sd_pipe.scheduler = schedulers.get_sampler("rk45").create(SD_SCHEDULER.config)
    with pytest.raises(ValueError, match=r"solve\(model_call, x\)"):
        run_pipeline(sd_pipe)
