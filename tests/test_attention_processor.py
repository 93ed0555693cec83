"""kernels.processor: every CPU-capable backend reproduces diffusers' own attention inside a UNet2DModel, and the
entropy-invariant scale is exactly standard attention at n = n0, different elsewhere, and clamped at n ≤ 16."""

import math

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from kernels.processor import ATTENTION_BACKENDS, FusedAttnProcessor, set_attention_backend

CPU_BACKENDS = ("sdpa", "math", "triton")  # "triton" falls back to SDPA off the GPU
FP32_TOLERANCE = 1e-5


def tiny_unet(down_block_types, up_block_types) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=down_block_types, up_block_types=up_block_types, norm_num_groups=4, attention_head_dim=4,
    ).eval()


@pytest.fixture(scope="module")
def unet():
    """Attention at both resolutions: 16×16 (256 tokens, 2 heads) and 8×8 (64 tokens, 4 heads), plus the mid block."""
    return tiny_unet(("AttnDownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "AttnUpBlock2D"))


@pytest.fixture(scope="module")
def unet_attending_at_8x8():
    """Attention only at 8×8: every block attends over exactly 64 keys."""
    return tiny_unet(("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def unet_input():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 16, 16, generator=generator), torch.tensor([10, 700])


@torch.no_grad()
def run(model, unet_input, backend=None, entropy_invariant_n0=None):
    if backend is None:  # diffusers' default processor
        for module in model.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor2_0())
    else:
        set_attention_backend(model, backend, entropy_invariant_n0)
    return model(*unet_input).sample


def test_backends_are_listed():
    assert ATTENTION_BACKENDS == ("triton", "sdpa", "xformers", "math")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_diffusers_default_processor(unet, unet_input, backend):
    reference = run(unet, unet_input)
    assert (run(unet, unet_input, backend) - reference).abs().max() <= FP32_TOLERANCE


def test_every_attention_block_gets_the_processor(unet):
    switched = set_attention_backend(unet, "math")
    processors = [m.processor for m in unet.modules() if isinstance(m, Attention)]
    assert switched == len(processors) == 7  # 2 down, 1 mid, 4 up (two per up block)
    assert all(isinstance(p, FusedAttnProcessor) and p.backend == "math" for p in processors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_entropy_invariant_at_n0_is_standard_attention(unet_attending_at_8x8, unet_input, backend):
    """The multiplier log_{n0}(n) is exactly 1 at n = n0 = 64 keys: bit-identical to the standard scale."""
    standard = run(unet_attending_at_8x8, unet_input, backend)
    assert torch.equal(run(unet_attending_at_8x8, unet_input, backend, entropy_invariant_n0=64), standard)


@pytest.mark.parametrize("n0", [16, 256, 512])
def test_entropy_invariant_elsewhere_changes_the_output(unet_attending_at_8x8, unet_input, n0):
    standard = run(unet_attending_at_8x8, unet_input, "sdpa")
    changed = run(unet_attending_at_8x8, unet_input, "sdpa", entropy_invariant_n0=n0)
    assert (changed - standard).abs().max() > 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_entropy_invariant_agrees_across_backends(unet, unet_input, backend):
    reference = run(unet, unet_input, "math", entropy_invariant_n0=512)
    assert (run(unet, unet_input, backend, entropy_invariant_n0=512) - reference).abs().max() <= FP32_TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# A single Attention block: cross-attention, masks and the short-sequence clamp.


@pytest.fixture(scope="module")
def cross_attention_block():
    torch.manual_seed(2)
    return Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, bias=True).eval()


def _tokens(batch, length, dim, seed):
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _attend(block, processor, hidden, context, mask=None):
    block.set_processor(processor)
    return block(hidden, encoder_hidden_states=context, attention_mask=mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cross_attention_with_mask_matches_diffusers(cross_attention_block, backend):
    hidden, context = _tokens(3, 10, 16, seed=3), _tokens(3, 7, 12, seed=4)
    mask = torch.zeros(3, 1, 7)
    mask[0, :, 5:] = -10000.0  # diffusers' additive mask: drop the last two keys of the first sample
    reference = _attend(cross_attention_block, AttnProcessor2_0(), hidden, context, mask)
    ours = _attend(cross_attention_block, FusedAttnProcessor(backend), hidden, context, mask)
    assert (ours - reference).abs().max() <= FP32_TOLERANCE


@pytest.mark.parametrize("key_length", [1, 9, 16])
def test_short_sequences_use_the_clamped_multiplier(cross_attention_block, key_length):
    """Every n ≤ 16 keys attends with log(16)/log(512) = 4/9 times the standard scale (Su's max(n, 16))."""
    hidden, context = _tokens(2, 5, 16, seed=5), _tokens(2, key_length, 12, seed=6)
    ours = _attend(cross_attention_block, FusedAttnProcessor("math", entropy_invariant_n0=512), hidden, context)

    block = cross_attention_block
    query, key, value = (x.view(2, -1, 2, 8).transpose(1, 2)
                         for x in (block.to_q(hidden), block.to_k(context), block.to_v(context)))
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=(4 / 9) / math.sqrt(8))
    expected = block.to_out[0](expected.transpose(1, 2).reshape(2, -1, 16))
    assert (ours - expected).abs().max() <= FP32_TOLERANCE


def test_gradients_flow_through_the_processor(unet_input):
    model = tiny_unet(("AttnDownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "AttnUpBlock2D")).train()
    grads = {}
    for backend in ("math", "triton"):
        model.zero_grad()
        set_attention_backend(model, backend, entropy_invariant_n0=128)
        model(*unet_input).sample.square().mean().backward()
        grads[backend] = model.down_blocks[0].attentions[0].to_q.weight.grad.clone()
    assert grads["math"].abs().max() > 0
    assert (grads["triton"] - grads["math"]).abs().max() <= FP32_TOLERANCE * max(1.0, grads["math"].abs().max())


# ---------------------------------------------------------------------------------------------------------------
# Choosing a backend.


@pytest.mark.parametrize("name", ["flash", "Triton", "", "xformer"])
def test_unknown_backend_raises_value_error_listing_choices(unet, name):
    with pytest.raises(ValueError, match="triton, sdpa, xformers, math"):
        set_attention_backend(unet, name)


def test_xformers_is_cuda_only_with_a_clear_error(cross_attention_block):
    try:
        processor = FusedAttnProcessor("xformers")
    except ImportError as error:
        assert "xformers" in str(error)  # CPU machines do not install it (requirements-gpu.txt)
        return
    with pytest.raises(ValueError, match="CUDA"):
        _attend(cross_attention_block, processor, _tokens(1, 4, 16, seed=7), _tokens(1, 3, 12, seed=8))


def test_invalid_entropy_invariant_n0_fails_at_set_up(unet):
    with pytest.raises(ValueError, match="entropy_invariant_n0"):
        set_attention_backend(unet, "sdpa", entropy_invariant_n0=1)
