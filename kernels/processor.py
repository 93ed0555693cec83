"""A diffusers attention processor with a choice of attention kernels and the optional entropy-invariant scale.

``set_attention_backend(unet, "triton")`` installs ``FusedAttnProcessor`` on every ``Attention`` block of a
diffusers model (``UNet2DModel``'s ``AttnDownBlock2D`` / ``AttnUpBlock2D`` / mid block). The processor does
exactly what diffusers' default ``AttnProcessor2_0`` does around the attention itself (spatial and group norm,
4-D ↔ token layout, q/k/v projections, attention masks, output projection, residual connection,
``rescale_output_factor``) and only swaps the ``softmax(scale · q kᵀ) v`` in the middle:

=========  =====================================================================================================
backend    attention
=========  =====================================================================================================
triton     ``kernels.attention.fused_attention`` (our FlashAttention-2 kernels) for CUDA tensors without a mask;
           ``torch.nn.functional.scaled_dot_product_attention`` otherwise (CPU, a mask, float64, head_dim > 256)
sdpa       ``torch.nn.functional.scaled_dot_product_attention``: PyTorch picks flash / mem-efficient / math
xformers   ``xformers.ops.memory_efficient_attention`` (CUDA only; xformers is an optional GPU dependency)
math       ``softmax(q kᵀ · scale + mask) v`` spelled out in PyTorch, softmax in fp32: the readable reference
=========  =====================================================================================================

Every backend uses ``kernels.attention.attention_scale``: 1/sqrt(head_dim), or with ``entropy_invariant_n0`` the
entropy-invariant ``log_{n0}(max(n, 16))/sqrt(head_dim)`` of Su 2021 (kexue.fm/archives/8823) with n the number
of keys (with a mask too: n is the key length, not the count of unmasked keys).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from kernels.attention import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    attention_scale,
    entropy_invariant_multiplier,
    fused_attention,
)


def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _math(q, k, v, mask, scale):
    # Scores and softmax in fp32 (diffusers' upcast_attention + upcast_softmax): fp16 logits overflow and lose
    # the small weights.
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def _triton(q, k, v, mask, scale):
    # The kernel runs on GPUs, without a mask input, for fp16/bf16/fp32 and head_dim ≤ 256; anything else takes
    # PyTorch's fused kernel.
    if q.is_cuda and mask is None and q.dtype in SUPPORTED_DTYPES and q.shape[-1] <= MAX_HEAD_DIM:
        return fused_attention(q, k, v, scale=scale)
    return _sdpa(q, k, v, mask, scale)


def _import_xformers_ops():
    try:
        import xformers.ops
    except ImportError as error:
        raise ImportError("the 'xformers' attention backend needs xformers (GPU machines: "
                          "pip install -r requirements-gpu.txt)") from error
    return xformers.ops


def _xformers(q, k, v, mask, scale):
    if not q.is_cuda:
        raise ValueError(f"the 'xformers' attention backend runs on CUDA tensors only; got {q.device}. "
                         "Use 'sdpa' or 'triton' (which falls back to sdpa off the GPU).")
    # xformers wants (batch, seq, heads, head_dim) and a bias of the full (batch, heads, len_q, len_k) shape.
    bias = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).to(q.dtype)
    out = _import_xformers_ops().memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale)
    return out.transpose(1, 2)


_ATTEND = {"triton": _triton, "sdpa": _sdpa, "xformers": _xformers, "math": _math}
ATTENTION_BACKENDS: tuple[str, ...] = tuple(_ATTEND)


class FusedAttnProcessor:
    """Drop-in for diffusers' ``AttnProcessor2_0`` with a selectable attention kernel (module docstring)."""

    def __init__(self, backend: str = "triton", entropy_invariant_n0: int | None = None):
        if backend not in _ATTEND:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        if backend == "xformers":
            _import_xformers_ops()  # fail at set-up, not at the first forward pass
        if entropy_invariant_n0 is not None:
            entropy_invariant_multiplier(1, entropy_invariant_n0)  # validates n0 now, not mid-forward
        self.backend = backend
        self.entropy_invariant_n0 = entropy_invariant_n0

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Same steps and order as diffusers 0.42 AttnProcessor2_0.__call__.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, key_length, _ = context.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if not math.isclose(attn.scale, head_dim**-0.5):
            # AttnProcessor2_0 silently uses 1/sqrt(head_dim) here; we would rather say so.
            raise ValueError(f"FusedAttnProcessor scales by 1/sqrt(head_dim) = {head_dim**-0.5:g}, but this "
                             f"Attention block asks for scale {attn.scale:g} (scale_qk=False?)")
        scale = attention_scale(head_dim, key.shape[2], self.entropy_invariant_n0)
        hidden_states = _ATTEND[self.backend](query, key, value, attention_mask, scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_attention_backend(model: torch.nn.Module, backend: str, entropy_invariant_n0: int | None = None) -> int:
    """Run every attention block of a diffusers model (e.g. ``UNet2DModel``) on ``backend``, one of
    ``ATTENTION_BACKENDS``, optionally with the entropy-invariant scale calibrated at ``entropy_invariant_n0`` keys.

    Returns the number of ``Attention`` blocks switched. ``UNet2DModel`` has no ``set_attn_processor`` (diffusers
    0.42 gives it only to the conditional UNets), so this walks the modules and calls each block's
    ``set_processor``. Raises ValueError for an unknown backend, ImportError for 'xformers' without xformers.
    """
    processor = FusedAttnProcessor(backend, entropy_invariant_n0)
    blocks = [module for module in model.modules() if isinstance(module, Attention)]
    for block in blocks:
        block.set_processor(processor)
    return len(blocks)
