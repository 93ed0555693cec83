"""models.unet: the named UNet configs, their sizes, and class conditioning with a null class."""

import pytest
import torch
from diffusers import UNet2DModel

from models.unet import UNET_CONFIGS, build_unet, downsample_factor, null_class_id

# The architecture fields of google/ddpm-cifar10-32's config.json on the HuggingFace hub.
DDPM_CIFAR10_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    time_embedding_type="positional",
)
# 35.7M, as the DDPM paper (Ho et al. 2020, Appendix B) reports for its CIFAR-10 model.
DDPM_CIFAR10_PARAMETERS = 35_746_307


def _parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.fixture(scope="module")
def tiny_conditional():
    torch.manual_seed(0)
    return build_unet("tiny", image_size=32, channels=1, num_classes=10).eval()


@pytest.mark.parametrize("name, channels", [("tiny", 1), ("small", 1), ("cifar", 3)])
def test_each_config_builds(name, channels):
    unet = build_unet(name, image_size=32, channels=channels)
    assert isinstance(unet, UNet2DModel)
    assert (unet.config.sample_size, unet.config.in_channels, unet.config.out_channels) == (32, channels, channels)


def test_tiny_is_under_150k_parameters_and_runs_at_32():
    unet = build_unet("tiny", image_size=32, channels=1)
    assert _parameter_count(unet) < 150_000
    assert 2 <= len(unet.config.block_out_channels) <= 3
    with torch.no_grad():
        out = unet(torch.randn(2, 1, 32, 32), torch.tensor([10, 500])).sample
    assert out.shape == (2, 1, 32, 32)


def test_small_has_one_to_four_million_parameters():
    assert 1_000_000 <= _parameter_count(build_unet("small", image_size=32, channels=1)) <= 4_000_000


def test_cifar_is_the_ddpm_cifar10_architecture():
    ours = build_unet("cifar", image_size=32, channels=3)
    reference = UNet2DModel(**DDPM_CIFAR10_CONFIG)
    assert _parameter_count(ours) == _parameter_count(reference) == DDPM_CIFAR10_PARAMETERS
    # same names and shapes: the hub checkpoint's weights would load into ours.
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_downsample_factors():
    assert {name: downsample_factor(name) for name in UNET_CONFIGS} == {"tiny": 4, "small": 8, "mnist28": 4, "cifar": 8}


def test_image_size_must_divide_by_the_downsample_factor():
    with pytest.raises(ValueError, match="image size 28 is not divisible by 8"):
        build_unet("small", image_size=28, channels=1)
    assert build_unet("tiny", image_size=28, channels=1).config.sample_size == 28


def test_unconditional_unet_has_no_class_embedding():
    unet = build_unet("tiny", image_size=32, channels=1)
    assert unet.class_embedding is None
    assert null_class_id(unet) is None


def test_conditional_unet_has_a_null_class(tiny_conditional):
    assert tiny_conditional.config.num_class_embeds == 11
    assert null_class_id(tiny_conditional) == 10


def test_conditional_outputs_depend_on_the_label_and_accept_the_null_class(tiny_conditional):
    sample = torch.randn(1, 1, 32, 32).repeat(3, 1, 1, 1)
    timesteps = torch.full((3,), 250)
    with torch.no_grad():
        out = tiny_conditional(sample, timesteps, class_labels=torch.tensor([0, 7, 10])).sample
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[0], out[2])


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown UNet config 'huge'.*tiny, small, mnist28, cifar"):
        build_unet("huge", image_size=32, channels=1)
    with pytest.raises(ValueError, match="unknown UNet config"):
        downsample_factor("huge")
