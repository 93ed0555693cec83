"""Fused attention in Triton: FlashAttention-2 forward and backward, with an optional entropy-invariant scale.

``fused_attention(q, k, v)`` computes ``softmax(scale · q kᵀ) v`` for q of shape (batch, heads, len_q, head_dim)
and k, v of shape (batch, heads, len_k, head_dim) without ever holding the len_q × len_k score matrix:

* Forward (Dao 2023, FlashAttention-2, Algorithm 1): each program owns ``BLOCK_M`` query rows and streams the keys
  in ``BLOCK_N`` tiles, keeping a running max ``m`` and running sum ``l`` of the softmax (the "online softmax",
  Milakov & Gimelshein 2018) and rescaling its fp32 accumulator whenever ``m`` grows. It saves the row
  log-sum-exp ``m + log l`` for the backward pass.
* Backward (FlashAttention-2, Algorithm 2, split into two kernels so that no program needs atomics): with
  ``P = exp(S − lse)`` recomputed from the saved log-sum-exp and ``Δ = rowsum(dO ∘ O)`` from a small preprocess
  kernel, ``dS = P ∘ (dO vᵀ − Δ)``. One kernel owns a key tile and loops over query tiles to accumulate
  ``dV = Pᵀ dO`` and ``dK = scale · dSᵀ Q``; the other owns a query tile and loops over key tiles for
  ``dQ = scale · dS K``.

Numerics: scores, softmax statistics and accumulators are fp32 for every input dtype; the softmax runs in base 2
with ``log2 e`` folded into the scale (``exp(s·x − m) = exp2(s·log2e·x − m₂)``: one explicit fused multiply-add,
whatever Triton's default FP fusion, and the hardware ``ex2``).
fp32 inputs use IEEE fp32 matrix products (not tf32), so the fp32 path is as exact as the PyTorch reference.

Shapes: any lengths (the last, partial tile of a loop is the only masked one; interior tiles load unmasked), len_q
≠ len_k (cross-attention), any strides (the processor passes transposed views without copying), head_dim 1–256
(a head_dim that is not a power of two is padded to one inside the kernel by masked loads, never in memory).
batch × heads × query tiles form a one-dimensional grid, query tiles of one head adjacent so that they share
that head's keys and values in L2.

The entropy-invariant scale (Su 2021, "从熵不变性看Attention的Scale操作", kexue.fm/archives/8823; production
form in bert4keras) multiplies the logits by ``log_{n0}(max(n, 16))`` for n keys: ``attention_scale`` below.

Block sizes are autotuned on the GPU (keyed on batch, heads, both lengths and head_dim); ``TileSizes`` fixes
them instead, which is what the tests do under Triton's interpreter (``TRITON_INTERPRET=1`` set before this
module is imported: ``triton.jit`` reads it when the kernels are defined).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2_E = math.log2(math.e)
# Su's clamp: "very short sequences do worse when scaled", so n counts as at least 16 keys.
ENTROPY_INVARIANT_MIN_LENGTH = 16


def entropy_invariant_multiplier(
    key_length: int, entropy_invariant_n0: int, min_length: int = ENTROPY_INVARIANT_MIN_LENGTH
) -> float:
    """``log_{n0}(max(n, min_length))``: the factor on the logits that keeps attention entropy at its n0 value.

    Su 2021 (kexue.fm/archives/8823, eq. for Attention-E; JL view in archives/9588): the entropy of
    ``softmax(λ q·k)`` grows like ``log n``, so λ ∝ ``log n`` keeps it constant; calibrated to be exactly 1 at
    the training length n0. bert4keras computes ``log(max(n, 16)) / log(512)``, i.e. n0 = 512 and the clamp.
    """
    if key_length < 1:
        raise ValueError(f"key_length must be positive, got {key_length}")
    if entropy_invariant_n0 < 2:
        raise ValueError(f"entropy_invariant_n0 is a training length (the base of a logarithm), at least 2; "
                         f"got {entropy_invariant_n0}")
    return math.log(max(key_length, min_length)) / math.log(entropy_invariant_n0)


def attention_scale(
    head_dim: int,
    key_length: int,
    entropy_invariant_n0: int | None = None,
    min_length: int = ENTROPY_INVARIANT_MIN_LENGTH,
) -> float:
    """The factor on ``q·k``: ``1/sqrt(d)`` (Vaswani et al. 2017, eq. 1), or ``log_{n0}(max(n, 16))/sqrt(d)``.

    With ``entropy_invariant_n0`` None this is the standard scale; otherwise n = ``key_length`` and the
    multiplier is ``entropy_invariant_multiplier``. At n = n0 the multiplier is exactly 1.0, so the scale is
    bit-identical to the standard one.
    """
    if head_dim < 1:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    scale = head_dim**-0.5
    if entropy_invariant_n0 is None:
        return scale
    return scale * entropy_invariant_multiplier(key_length, entropy_invariant_n0, min_length)


@dataclass(frozen=True)
class TileSizes:
    """Fixed tiles instead of autotuning: ``block_m`` query rows × ``block_n`` key rows per step (powers of two,
    at least 16 for the GPU's matrix instructions). Every kernel uses them: the forward and dQ kernels own
    ``block_m`` queries and loop over ``block_n`` keys; the dK/dV kernel owns ``block_n`` keys and loops over
    ``block_m`` queries."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# ---------------------------------------------------------------------------------------------------------------
# Autotuning. Candidates are (own tile, loop tile, warps, stages) per head-dim class: a program keeps its "own"
# rows (queries in the forward and dQ kernels, keys in dK/dV) and streams the "loop" rows. Each list holds the
# configs that compile for sm_90 with no register spills (or the fewest, where all spill, as at head_dim 256)
# under both Triton 3.6 (the GPU image's) and 3.9 (ours), read off ptxas -v through Triton's offline compiler;
# docs/attention.md has the numbers. Starting point: FlashAttention-2's Triton tutorial on H100 (128-row tiles,
# 8 warps, 3 stages).


@dataclass(frozen=True)
class _Candidates:
    own: str  # the meta-parameter naming the kept tile, "BLOCK_M" or "BLOCK_N"
    own_length: str  # the kernel argument that tile divides, "len_q" or "len_k"
    loop: str
    loop_length: str
    by_head_dim: dict[int, tuple[tuple[int, int, int, int], ...]]  # BLOCK_D at most → candidates


_FORWARD = _Candidates("BLOCK_M", "len_q", "BLOCK_N", "len_k", {
    64: ((128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4), (32, 32, 4, 3),
         (16, 32, 2, 3)),
    128: ((128, 128, 8, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4), (16, 32, 2, 3)),
    256: ((64, 32, 8, 2), (64, 32, 4, 4), (32, 32, 4, 3)),
})
_DKDV = _Candidates("BLOCK_N", "len_k", "BLOCK_M", "len_q", {
    64: ((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (32, 32, 4, 3), (16, 32, 2, 3)),
    128: ((64, 64, 8, 3), (64, 32, 8, 3), (64, 16, 8, 3), (32, 32, 8, 3)),
    256: ((64, 32, 8, 2), (64, 16, 8, 2)),
})
_DQ = _Candidates("BLOCK_M", "len_q", "BLOCK_N", "len_k", {
    64: ((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 3), (16, 32, 2, 3)),
    128: ((128, 32, 8, 3), (128, 16, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 3)),
    256: ((64, 32, 8, 2),),
})
# Hopper's wgmma multiplies 64-row tiles per warpgroup; Triton falls back to the older mma.sync below that.
_WGMMA_ROWS = 64
# Two waves of an H100 / H200's 132 SMs: a grid at least this large keeps every SM busy with 64-row tiles.
_FILLED_GRID = 2 * 132


def _config_key(config: triton.Config, candidates: _Candidates) -> tuple[int, int, int, int]:
    return (config.kwargs[candidates.own], config.kwargs[candidates.loop], config.num_warps, config.num_stages)


def _configs(candidates: _Candidates) -> list[triton.Config]:
    unique = dict.fromkeys(c for listed in candidates.by_head_dim.values() for c in listed)
    return [triton.Config({candidates.own: own, candidates.loop: loop}, num_warps=warps, num_stages=stages)
            for own, loop, warps, stages in unique]


def _pruner(candidates: _Candidates):
    """Keep this head dim's candidates whose tiles are no longer than the (power-of-two-rounded) sequences they
    tile, and sub-64-row own tiles only where 64-row tiles could not fill the GPU (short sequences, small grids).
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        head_dim_class = min(d for d in candidates.by_head_dim if d >= args["BLOCK_D"])
        listed = [c for c in configs if _config_key(c, candidates) in candidates.by_head_dim[head_dim_class]]
        own_length, loop_length = args[candidates.own_length], args[candidates.loop_length]
        small_grid = args["batch"] * args["heads"] * triton.cdiv(own_length, _WGMMA_ROWS) < _FILLED_GRID

        def fits(config):
            own, loop = config.kwargs[candidates.own], config.kwargs[candidates.loop]
            return (own <= max(16, triton.next_power_of_2(own_length))
                    and loop <= max(16, triton.next_power_of_2(loop_length))
                    and (own >= _WGMMA_ROWS or own_length < _WGMMA_ROWS or small_grid))

        return [c for c in listed if fits(c)] or [min(listed, key=lambda c: c.kwargs[candidates.own])]

    return prune


def _tuning_bench(kernel_call, quantiles):
    # Triton's default (25 ms warm-up, 100 ms timing per config) times every new shape for seconds; a shorter
    # window picks the same winner when configs differ by more than a few percent, which is what matters here.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _autotuned(candidates: _Candidates):
    return triton.autotune(
        configs=_configs(candidates),
        key=["batch", "heads", "len_q", "len_k", "HEAD_DIM"],
        prune_configs_by={"early_config_prune": _pruner(candidates)},
        do_bench=_tuning_bench,
    )


# ---------------------------------------------------------------------------------------------------------------
# Tile loads and stores. Every mask is compile-time optional: interior tiles and power-of-two head dims load
# without one.


@triton.jit
def _load_tile(base, rows, row_stride, cols, col_stride, n_rows,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    ptrs = base + rows[:, None] * row_stride + cols[None, :] * col_stride
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_tile(base, value, rows, row_stride, cols, col_stride, n_rows,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None] * row_stride + cols[None, :] * col_stride
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, value.to(base.dtype.element_ty), mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, value.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _load_row_stat(base, rows, n_rows, fill, MASK_ROWS: tl.constexpr):
    if MASK_ROWS:
        stat = tl.load(base + rows, mask=rows < n_rows, other=fill)
    else:
        stat = tl.load(base + rows)
    return stat


@triton.jit
def _head_offset(pid_head, heads, stride_z, stride_h):
    # int64: batch × heads × length × head_dim passes 2³¹ elements at UNet sizes (512 × 8 × 4096 × 128).
    return (pid_head // heads).to(tl.int64) * stride_z + (pid_head % heads).to(tl.int64) * stride_h


# ---------------------------------------------------------------------------------------------------------------
# Forward.


@triton.jit
def _forward_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_n, offs_d, stride_kn, stride_kd,
                  stride_vn, stride_vd, len_k, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KEYS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax (FlashAttention-2, Algorithm 1, lines 8–10), in base 2."""
    key_rows = start_n + offs_n
    k = _load_tile(k_base, key_rows, stride_kn, offs_d, stride_kd, len_k, HEAD_DIM, BLOCK_D, MASK_KEYS)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASK_KEYS:
        qk = tl.where(key_rows[None, :] < len_k, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(tl.fma(qk, qk_scale, -m_new[:, None]))
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_base, key_rows, stride_vn, offs_d, stride_vd, len_k, HEAD_DIM, BLOCK_D, MASK_KEYS)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@_autotuned(_FORWARD)
@triton.jit
def _forward_kernel(Q, K, V, O, LSE,
                    stride_qz, stride_qh, stride_qm, stride_qd,
                    stride_kz, stride_kh, stride_kn, stride_kd,
                    stride_vz, stride_vh, stride_vn, stride_vd,
                    stride_oz, stride_oh, stride_om, stride_od,
                    batch, heads, len_q, len_k, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    query_tiles = tl.cdiv(len_q, BLOCK_M)
    pid_head = tl.program_id(0) // query_tiles
    offs_m = (tl.program_id(0) % query_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + _head_offset(pid_head, heads, stride_kz, stride_kh)
    v_base = V + _head_offset(pid_head, heads, stride_vz, stride_vh)

    q = _load_tile(Q + _head_offset(pid_head, heads, stride_qz, stride_qh), offs_m, stride_qm, offs_d, stride_qd,
                   len_q, HEAD_DIM, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_keys = (len_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_keys, BLOCK_N):
        acc, l_i, m_i = _forward_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_n, offs_d,
                                      stride_kn, stride_kd, stride_vn, stride_vd, len_k, qk_scale,
                                      HEAD_DIM, BLOCK_D, False, DOT_PRECISION)
    if full_keys < len_k:
        acc, l_i, m_i = _forward_step(acc, l_i, m_i, q, k_base, v_base, full_keys, offs_n, offs_d,
                                      stride_kn, stride_kd, stride_vn, stride_vd, len_k, qk_scale,
                                      HEAD_DIM, BLOCK_D, True, DOT_PRECISION)

    _store_tile(O + _head_offset(pid_head, heads, stride_oz, stride_oh), acc / l_i[:, None], offs_m, stride_om,
                offs_d, stride_od, len_q, HEAD_DIM, BLOCK_D)
    tl.store(LSE + pid_head.to(tl.int64) * len_q + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < len_q)


# ---------------------------------------------------------------------------------------------------------------
# Backward.


@triton.jit
def _delta_kernel(O, DO, DELTA,
                  stride_oz, stride_oh, stride_om, stride_od,
                  stride_dz, stride_dh, stride_dm, stride_dd,
                  heads, len_q,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Δ = rowsum(dO ∘ O) (FlashAttention-2, Algorithm 2, line 4): the softmax Jacobian's correction term."""
    query_tiles = tl.cdiv(len_q, BLOCK_M)
    pid_head = tl.program_id(0) // query_tiles
    offs_m = (tl.program_id(0) % query_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + _head_offset(pid_head, heads, stride_oz, stride_oh), offs_m, stride_om, offs_d, stride_od,
                   len_q, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + _head_offset(pid_head, heads, stride_dz, stride_dh), offs_m, stride_dm, offs_d,
                    stride_dd, len_q, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_head.to(tl.int64) * len_q + offs_m, delta, mask=offs_m < len_q)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_m, offs_d,
               stride_qm, stride_qd, stride_dm, stride_dd, len_q, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_QUERIES: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One query tile's contribution to this key tile's dV = Pᵀ dO and dK ∝ dSᵀ Q, in transposed form."""
    query_rows = start_m + offs_m
    q = _load_tile(q_base, query_rows, stride_qm, offs_d, stride_qd, len_q, HEAD_DIM, BLOCK_D, MASK_QUERIES)
    do = _load_tile(do_base, query_rows, stride_dm, offs_d, stride_dd, len_q, HEAD_DIM, BLOCK_D, MASK_QUERIES)
    # A padded query row gets lse = +inf, hence P = 0: it adds nothing to dV or dK.
    lse = _load_row_stat(lse_base, query_rows, len_q, float("inf"), MASK_QUERIES)
    delta = _load_row_stat(delta_base, query_rows, len_q, 0.0, MASK_QUERIES)
    p_t = tl.math.exp2(tl.fma(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), qk_scale, -lse[None, :]))
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@_autotuned(_DKDV)
@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                 stride_qz, stride_qh, stride_qm, stride_qd,
                 stride_kz, stride_kh, stride_kn, stride_kd,
                 stride_vz, stride_vh, stride_vn, stride_vd,
                 stride_dz, stride_dh, stride_dm, stride_dd,
                 stride_dkz, stride_dkh, stride_dkn, stride_dkd,
                 stride_dvz, stride_dvh, stride_dvn, stride_dvd,
                 batch, heads, len_q, len_k, qk_scale, scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    key_tiles = tl.cdiv(len_k, BLOCK_N)
    pid_head = tl.program_id(0) // key_tiles
    offs_n = (tl.program_id(0) % key_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + _head_offset(pid_head, heads, stride_qz, stride_qh)
    do_base = DO + _head_offset(pid_head, heads, stride_dz, stride_dh)
    lse_base = LSE + pid_head.to(tl.int64) * len_q
    delta_base = DELTA + pid_head.to(tl.int64) * len_q

    # Padded key rows are zeros; their dK, dV rows are computed but never stored, and rows do not mix.
    k = _load_tile(K + _head_offset(pid_head, heads, stride_kz, stride_kh), offs_n, stride_kn, offs_d, stride_kd,
                   len_k, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + _head_offset(pid_head, heads, stride_vz, stride_vh), offs_n, stride_vn, offs_d, stride_vd,
                   len_k, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    full_queries = (len_q // BLOCK_M) * BLOCK_M
    for start_m in range(0, full_queries, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_m, offs_d,
                            stride_qm, stride_qd, stride_dm, stride_dd, len_q, qk_scale,
                            HEAD_DIM, BLOCK_D, False, DOT_PRECISION)
    if full_queries < len_q:
        dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, full_queries, offs_m, offs_d,
                            stride_qm, stride_qd, stride_dm, stride_dd, len_q, qk_scale,
                            HEAD_DIM, BLOCK_D, True, DOT_PRECISION)

    _store_tile(DK + _head_offset(pid_head, heads, stride_dkz, stride_dkh), dk * scale, offs_n, stride_dkn,
                offs_d, stride_dkd, len_k, HEAD_DIM, BLOCK_D)
    _store_tile(DV + _head_offset(pid_head, heads, stride_dvz, stride_dvh), dv, offs_n, stride_dvn,
                offs_d, stride_dvd, len_k, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_base, v_base, start_n, offs_n, offs_d,
             stride_kn, stride_kd, stride_vn, stride_vd, len_k, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KEYS: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """One key tile's contribution to this query tile's dQ ∝ dS K."""
    key_rows = start_n + offs_n
    k = _load_tile(k_base, key_rows, stride_kn, offs_d, stride_kd, len_k, HEAD_DIM, BLOCK_D, MASK_KEYS)
    v = _load_tile(v_base, key_rows, stride_vn, offs_d, stride_vd, len_k, HEAD_DIM, BLOCK_D, MASK_KEYS)
    p = tl.math.exp2(tl.fma(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale, -lse[:, None]))
    if MASK_KEYS:
        # A padded key scores 0, not −inf: P must be zeroed explicitly (exp2(−lse) can even overflow).
        p = tl.where(key_rows[None, :] < len_k, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@_autotuned(_DQ)
@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
               stride_qz, stride_qh, stride_qm, stride_qd,
               stride_kz, stride_kh, stride_kn, stride_kd,
               stride_vz, stride_vh, stride_vn, stride_vd,
               stride_dz, stride_dh, stride_dm, stride_dd,
               stride_dqz, stride_dqh, stride_dqm, stride_dqd,
               batch, heads, len_q, len_k, qk_scale, scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    query_tiles = tl.cdiv(len_q, BLOCK_M)
    pid_head = tl.program_id(0) // query_tiles
    offs_m = (tl.program_id(0) % query_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + _head_offset(pid_head, heads, stride_kz, stride_kh)
    v_base = V + _head_offset(pid_head, heads, stride_vz, stride_vh)

    q = _load_tile(Q + _head_offset(pid_head, heads, stride_qz, stride_qh), offs_m, stride_qm, offs_d, stride_qd,
                   len_q, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + _head_offset(pid_head, heads, stride_dz, stride_dh), offs_m, stride_dm, offs_d,
                    stride_dd, len_q, HEAD_DIM, BLOCK_D, True)
    lse = _load_row_stat(LSE + pid_head.to(tl.int64) * len_q, offs_m, len_q, 0.0, True)
    delta = _load_row_stat(DELTA + pid_head.to(tl.int64) * len_q, offs_m, len_q, 0.0, True)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_keys = (len_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_keys, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, start_n, offs_n, offs_d,
                      stride_kn, stride_kd, stride_vn, stride_vd, len_k, qk_scale,
                      HEAD_DIM, BLOCK_D, False, DOT_PRECISION)
    if full_keys < len_k:
        dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, full_keys, offs_n, offs_d,
                      stride_kn, stride_kd, stride_vn, stride_vd, len_k, qk_scale,
                      HEAD_DIM, BLOCK_D, True, DOT_PRECISION)

    _store_tile(DQ + _head_offset(pid_head, heads, stride_dqz, stride_dqh), dq * scale, offs_m, stride_dqm,
                offs_d, stride_dqd, len_q, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------------------------------------
# Host side.

# Δ is one pass over O and dO: memory-bound, no tuning needed.
_DELTA_BLOCK_M = 64
# When the kernels were defined by the interpreter, they run on CPU tensors (numpy underneath).
_INTERPRETED = triton.knobs.runtime.interpret


def _new_buffer(like: torch.Tensor, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None):
    """Every kernel output, uninitialized: the kernels write each element (the tests poison this with NaN).

    Without ``shape`` the buffer takes ``like``'s shape and strides, so an output for a transposed view is a
    transposed view too and the caller's transpose back is free."""
    if shape is None:
        return torch.empty_like(like, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def _launch(kernel, tiles: TileSizes | None, owned_rows: str, length: int, batch_heads: int, *args, **constexprs):
    """Launch on a 1-D grid of (batch × heads) × tiles of ``length``; autotuned unless ``tiles`` is given."""

    def grid(meta):
        return (triton.cdiv(length, meta[owned_rows]) * batch_heads,)

    if tiles is None:
        kernel[grid](*args, **constexprs)
    else:
        kernel.fn[grid](*args, **constexprs, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                        num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _strides(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.stride())


def _kernel_constants(q: torch.Tensor) -> dict:
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        # tf32 would cost fp32 inputs three decimal digits; fp32 callers asked for fp32.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _forward(q, k, v, scale: float, tiles: TileSizes | None):
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    o = _new_buffer(q)
    lse = _new_buffer(q, (batch, heads, len_q), torch.float32)
    _launch(_forward_kernel, tiles, "BLOCK_M", len_q, batch * heads,
            q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            batch, heads, len_q, len_k, scale * LOG2_E, **_kernel_constants(q))
    return o, lse


def _backward(do, q, k, v, o, lse, scale: float, tiles: TileSizes | None):
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    constants = _kernel_constants(q)
    delta = _new_buffer(q, (batch, heads, len_q), torch.float32)
    _delta_kernel[(triton.cdiv(len_q, _DELTA_BLOCK_M) * batch * heads,)](
        o, do, delta, *_strides(o), *_strides(do), heads, len_q,
        HEAD_DIM=constants["HEAD_DIM"], BLOCK_D=constants["BLOCK_D"], BLOCK_M=_DELTA_BLOCK_M)
    dq, dk, dv = _new_buffer(q), _new_buffer(k), _new_buffer(v)
    shared = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    sizes = (batch, heads, len_q, len_k, scale * LOG2_E, scale)
    _launch(_dkdv_kernel, tiles, "BLOCK_N", len_k, batch * heads,
            q, k, v, do, lse, delta, dk, dv, *shared, *_strides(dk), *_strides(dv), *sizes, **constants)
    _launch(_dq_kernel, tiles, "BLOCK_M", len_q, batch * heads,
            q, k, v, do, lse, delta, dq, *shared, *_strides(dq), *sizes, **constants)
    return dq, dk, dv


class FusedAttentionFunction(torch.autograd.Function):
    """Autograd for the kernels: saves q, k, v, the output and the row log-sum-exp, never the attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, tiles: TileSizes | None):
        o, lse = _forward(q, k, v, scale, tiles)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.tiles = scale, tiles
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.scale, ctx.tiles)
        return dq, dk, dv, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError(f"q, k, v must be (batch, heads, seq, head_dim); got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[3] != k.shape[3]:
        raise ValueError(f"q (B, H, Lq, D), k and v (B, H, Lk, D) must agree in B, H and D; got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must share one dtype out of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}; got {q.shape[3]}")
    if 0 in q.shape or 0 in k.shape:
        raise ValueError(f"empty attention: shapes {tuple(q.shape)}, {tuple(k.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"fused_attention runs on CUDA tensors (got {q.device}); on CPU only under Triton's "
                         "interpreter, with TRITON_INTERPRET=1 set before kernels.attention is imported")


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    entropy_invariant_n0: int | None = None,
    *,
    tiles: TileSizes | None = None,
) -> torch.Tensor:
    """``softmax(scale · q kᵀ) v`` on the fused Triton kernels, differentiable in q, k and v.

    q: (batch, heads, len_q, head_dim); k, v: (batch, heads, len_k, head_dim); fp16, bf16 or fp32, any strides.
    ``scale`` defaults to ``attention_scale(head_dim, len_k, entropy_invariant_n0)``: 1/sqrt(head_dim), or the
    entropy-invariant ``log_{n0}(max(len_k, 16))/sqrt(head_dim)``. Pass one of ``scale`` and
    ``entropy_invariant_n0``, not both. ``tiles`` fixes the block sizes instead of autotuning them.
    Returns a tensor shaped and strided like q.
    """
    if scale is not None and entropy_invariant_n0 is not None:
        raise ValueError("pass either scale or entropy_invariant_n0 (which sets the scale), not both")
    _check_inputs(q, k, v)
    if scale is None:
        scale = attention_scale(q.shape[3], k.shape[2], entropy_invariant_n0)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return FusedAttentionFunction.apply(q, k, v, float(scale), tiles)
