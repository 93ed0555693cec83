"""Attention kernels for the workbench's UNets.

``kernels.attention``: fused FlashAttention-2 forward/backward in Triton and the (entropy-invariant) attention
scale. ``kernels.processor``: the diffusers attention processor that selects a backend
(``set_attention_backend``); import it from there, since it needs diffusers, which the GPU benchmark machine
lacks. docs/attention.md has the overview.
"""

from kernels.attention import TileSizes, attention_scale, entropy_invariant_multiplier, fused_attention

__all__ = ["TileSizes", "attention_scale", "entropy_invariant_multiplier", "fused_attention"]
