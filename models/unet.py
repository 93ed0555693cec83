"""Named ``diffusers.UNet2DModel`` architectures for the denoiser, and the one function that builds them.

``UNET_CONFIGS`` holds the architecture only; ``build_unet`` adds what the data decides (image size, channels,
number of classes). A class-conditional UNet embeds ``num_classes + 1`` ids: the extra id ``num_classes`` is the
null class, the "no label" input that classifier-free guidance (Ho & Salimans 2022, §3.2) trains on by dropping
labels and samples with as the unconditional branch.
"""

from __future__ import annotations

from diffusers import UNet2DModel

from data import check_image_size

UNET_CONFIGS: dict[str, dict] = {
    # for tests: ~111k parameters, three levels (factor 4), attention at 16×16.
    "tiny": dict(
        block_out_channels=(8, 16, 24),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ),
    # MNIST at 32×32 on a CPU: ~3.0M parameters, four levels (factor 8), attention at 8×8.
    "small": dict(
        block_out_channels=(32, 64, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        # 8 groups keep 4+ channels per group at every width; 32 groups on 32 channels would be instance norm.
        norm_num_groups=8,
    ),
    # MNIST at its native 28×28 on a CPU: ~1.1M parameters, three levels (28 → 14 → 7), attention at 7×7. A step
    # costs ~0.57× the "small" UNet's at 32×32 (bench/training_step_cost.py).
    "mnist28": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
    # google/ddpm-cifar10-32, the DDPM CIFAR-10 model (Ho et al. 2020, Appendix B): 35.7M parameters. The
    # embedding and padding settings match its config.json, so its weights load into this architecture.
    "cifar": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        attention_head_dim=None,  # one 256-wide head, as google/ddpm-cifar10-32 (diffusers' default 8 gives 32)
    ),
}


def downsample_factor(config_name: str) -> int:
    """How much the UNet shrinks its input: every level but the last halves the resolution."""
    return 2 ** (len(_config(config_name)["down_block_types"]) - 1)


def build_unet(config_name: str, image_size: int, channels: int, num_classes: int = 0,
               model_class: type[UNet2DModel] = UNet2DModel) -> UNet2DModel:
    """A fresh UNet of the named architecture; class-conditional (plus a null class) when ``num_classes`` > 0;
    ``model_class`` is ``UNet2DModel`` or a subclass with the same config (``MeanFlowUNet2DModel``)."""
    config = _config(config_name)
    check_image_size(image_size, downsample_factor(config_name))
    if channels < 1:
        raise ValueError(f"a UNet needs at least one image channel, got {channels}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be 0 (unconditional) or positive, got {num_classes}")
    return model_class(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        num_class_embeds=num_classes + 1 if num_classes else None,
        **config,
    )


def null_class_id(unet: UNet2DModel) -> int | None:
    """The class id meaning "no class" (the last embedding), or None for an unconditional UNet."""
    num_class_embeds = unet.config.num_class_embeds
    return None if num_class_embeds is None else num_class_embeds - 1


def _config(config_name: str) -> dict:
    if config_name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet config {config_name!r}; known configs: {', '.join(UNET_CONFIGS)}")
    return UNET_CONFIGS[config_name]
