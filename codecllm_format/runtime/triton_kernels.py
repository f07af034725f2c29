"""Fused int8-weight x bf16/fp16-activation matmul in Triton; the dequantized weight never exists.

Same function as kernels.int8_linear_reference for layout "linear":
W[r, c] = float32(q[r, c]) * scale[r], y = x @ W^T + bias, q of shape (out, in). Because the scale
belongs to an output row, the kernels accumulate sum_c x[c] * q[r, c] in float32 and multiply by
scale[r] once at the end (the same function; the rounding differs from dequantize-then-matmul by
far less than bf16's own rounding of the output). With int8_group scales (2-D, [out, ceil(in /
G)], G a power of two; constexpr GROUP = G) the scale varies along K, so both kernels multiply
each loaded weight tile by its scales inside the K loop (dequantize in registers) instead.

Two paths:
- GEMV (M <= GEMV_MAX_M rows of activations, decode): CUDA-core multiply-add. Each program owns
  BLOCK_N output rows and streams their int8 weight along K (a warp reads 256 contiguous bytes of
  each row per load, every thread keeps BLOCK_N independent 8-byte loads in flight); the
  accumulator stays elementwise in registers and is reduced once at the end; split-K over a
  float32 workspace (then a small reduce kernel) when there are too few row blocks to fill the GPU.
- GEMM (more rows, prefill): tiled tl.dot; the int8 tile is converted to the activation dtype in
  registers; the scale is applied to the accumulator at the end. SWAP_AB computes the transposed
  tile (weight rows as the MMA's M side) which suits small M; autotune picks.

Launching: Triton's own launch path costs more host time than the GEMV takes on the GPU at decode
shapes, so LinearPlan (one per CompressedLinear) caches every dispatch decision per weight and
activation layout and replays the CompiledKernel the normal path launched, through its low-level
launcher, after proving the replay bit-identical once (see "Launch fast path" below).

On the GPU both kernels are autotuned per shape (triton.autotune: the first call of each shape
compiles and times a few configs; set CODECLLM_TRITON_AUTOTUNE=0 to use the default config only). Under TRITON_INTERPRET=1 (CPU, CI) they run untuned with the given or default config;
there the bf16 tl.dot of Triton's interpreter is wrong (it multiplies the raw uint16 storage), so
for bf16 the interpreter-only flag DOT_F32 upcasts the dot's operands to float32 (exact: products
of bf16 values are exact in float32); fp16 runs the GPU code path unchanged.
"""

from __future__ import annotations

import operator
import os
import weakref

import torch
import triton
import triton.language as tl

from ..quant import group_size_for

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
AUTOTUNE = os.environ.get("CODECLLM_TRITON_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")

GEMV_MAX_M = 8  # rows of activations up to which the GEMV path runs (decode)
DTYPES = (torch.bfloat16, torch.float16)
_MAX_SPLIT_K = 16
_POISON_WORKSPACE = False  # tests: fill the split-K workspace with NaN so unwritten partials show


# ---------------------------------------------------------------------------------------------
# GEMV: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] + bias[n], for a few rows m.
#
# Register layout: every thread holds 8 consecutive K elements (8 bytes of int8, 16 bytes of bf16)
# of every [m, n] of the tile; the 32 lanes and the warps lie along K (BLOCK_K = 256 * num_warps),
# so the weight tile [1, BN, BK] and the activation tile [BM, 1, BK] get the same layout (no
# shared-memory conversion), the accumulator [BM, BN, BK] is elementwise, and the one reduction
# across lanes and warps happens after the K loop. The max_contiguous hint caps the vector width
# at 8 elements so that the int8 and the bf16 tiles agree.


@triton.jit
def _int8_to_f32(w, FAST_CVT: tl.constexpr):
    """Exact int8 -> float32. FAST_CVT: (v + 128) goes into the low mantissa bits of 2^23 by one
    bitwise op and 2^23 + 128 is subtracted (integer + float pipes, instead of the quarter-rate
    I2F conversion)."""
    if FAST_CVT:
        u = w.to(tl.uint8, bitcast=True).to(tl.int32)  # zero-extended byte
        return (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        return w.to(tl.float32)


@triton.jit
def _gemv_step(x_ptrs, w_ptrs, s_ptrs, k0, rk, K, acc, MASKED: tl.constexpr, FAST_CVT: tl.constexpr,
               GROUP: tl.constexpr):  # fmt: skip
    """acc[BM, BN, BK] += x[:, None, k0:k0+BK] * w[None, :, k0:k0+BK]; GROUP > 0 (int8_group):
    w is float32(q) * scale[n, k // GROUP], s_ptrs the [1, BN, 1] scale row starts."""
    ks = tl.max_contiguous(tl.multiple_of(k0 + rk, 8), 8)[None, None, :]  # [1, 1, BK]
    if MASKED:
        kmask = ks < K
        w = tl.load(w_ptrs + ks, mask=kmask, other=0)
        xv = tl.load(x_ptrs + ks, mask=kmask, other=0.0)
    else:
        w = tl.load(w_ptrs + ks)
        xv = tl.load(x_ptrs + ks)
    wf = _int8_to_f32(w, FAST_CVT)
    if GROUP > 0:
        if MASKED:
            sv = tl.load(s_ptrs + ks // GROUP, mask=kmask, other=0.0)
        else:
            sv = tl.load(s_ptrs + ks // GROUP)
        wf = wf * sv.to(tl.float32)
    return acc + wf * xv.to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, ws_ptr,
    M, N, K, stride_xm, stride_qn, stride_ym, stride_sn,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FAST_CVT: tl.constexpr = True,
    GROUP: tl.constexpr = 0,
):  # fmt: skip
    # GROUP 0: one scale per row n, applied to the sums; GROUP > 0 (int8_group): scale[n, k // GROUP]
    # (row stride stride_sn) applied to the weights inside the K loop.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows past M / N re-read row M-1 / N-1 (never stored): the loads need no row masks
    rm_c = tl.minimum(rm, M - 1).to(tl.int64)
    rn_c = tl.minimum(rn, N - 1).to(tl.int64)
    x_ptrs = x_ptr + rm_c[:, None, None] * stride_xm  # [BM, 1, 1]
    w_ptrs = q_ptr + rn_c[None, :, None] * stride_qn  # [1, BN, 1]
    s_ptrs = s_ptr + rn_c[None, :, None] * stride_sn  # [1, BN, 1] (GROUP > 0 only)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    k_full = k_lo + tl.maximum(k_hi - k_lo, 0) // BLOCK_K * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_lo, k_full, BLOCK_K):
        acc = _gemv_step(x_ptrs, w_ptrs, s_ptrs, k0, rk, K, acc, False, FAST_CVT, GROUP)
    if k_full < k_hi:  # only the last split can end inside a block
        acc = _gemv_step(x_ptrs, w_ptrs, s_ptrs, k_full, rk, K, acc, True, FAST_CVT, GROUP)
    out = tl.sum(acc, axis=2)  # [BM, BN]
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        if GROUP == 0:
            out = out * tl.load(s_ptr + rn_c)[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn_c).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:  # raw partial sums into the float32 workspace [SPLIT_K, M, N]
        ws_ptrs = ws_ptr + (pid_k * M + rm.to(tl.int64))[:, None] * N + rn[None, :]
        tl.store(ws_ptrs, out, mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, s_ptr, b_ptr, y_ptr, total, N, stride_ym,
                          HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                          ROW_SCALE: tl.constexpr = True):  # fmt: skip
    """y[m, n] = (sum_s ws[s, m, n]) * scale[n] + bias[n], cast to y's dtype; total = M * N.
    ROW_SCALE False (int8_group): the partial sums are already scaled."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    p = ws_ptr + offs
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p, mask=mask, other=0.0)
        p += total
    n = offs % N
    m = offs // N
    if ROW_SCALE:
        acc = acc * tl.load(s_ptr + n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# GEMM: tiled tl.dot, int8 tile converted in registers, scale on the accumulator at the end.


@triton.jit
def _gemm_step(x_ptrs, w_ptrs, s_ptrs, k0, rk, K, stride_xk, acc,
               SWAP_AB: tl.constexpr, DOT_F32: tl.constexpr, MASKED: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
    """acc += one BLOCK_K slice. SWAP_AB: acc[BN, BM] += W[BN, BK] @ X^T[BK, BM] (the weight is
    the MMA's A operand, straight from registers); else acc[BM, BN] += X[BM, BK] @ W^T[BK, BN].
    GROUP > 0 (int8_group): the tile is dequantized, float32(q) * scale[n, k // GROUP], before
    the dot (s_ptrs: the scale row starts, shaped like w_ptrs)."""
    ks = k0 + rk
    if SWAP_AB:
        if MASKED:
            kmask = ks < K
            w = tl.load(w_ptrs + ks[None, :], mask=kmask[None, :], other=0)
            xt = tl.load(x_ptrs + ks[:, None].to(tl.int64) * stride_xk, mask=kmask[:, None], other=0.0)
        else:
            w = tl.load(w_ptrs + ks[None, :])
            xt = tl.load(x_ptrs + ks[:, None].to(tl.int64) * stride_xk)
        w = w.to(tl.float32)
        if GROUP > 0:
            if MASKED:
                sv = tl.load(s_ptrs + (ks // GROUP)[None, :], mask=kmask[None, :], other=0.0)
            else:
                sv = tl.load(s_ptrs + (ks // GROUP)[None, :])
            w = w * sv.to(tl.float32)
        if DOT_F32:
            acc = tl.dot(w, xt.to(tl.float32), acc)
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc)
    else:
        if MASKED:
            kmask = ks < K
            x = tl.load(x_ptrs + ks[None, :].to(tl.int64) * stride_xk, mask=kmask[None, :], other=0.0)
            wt = tl.load(w_ptrs + ks[:, None], mask=kmask[:, None], other=0)
        else:
            x = tl.load(x_ptrs + ks[None, :].to(tl.int64) * stride_xk)
            wt = tl.load(w_ptrs + ks[:, None])
        wt = wt.to(tl.float32)
        if GROUP > 0:
            if MASKED:
                sv = tl.load(s_ptrs + (ks // GROUP)[:, None], mask=kmask[:, None], other=0.0)
            else:
                sv = tl.load(s_ptrs + (ks // GROUP)[:, None])
            wt = wt * sv.to(tl.float32)
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), wt, acc)
        else:
            acc = tl.dot(x, wt.to(x.dtype), acc)
    return acc


@triton.jit
def _gemm_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, ws_ptr,
    M, N, K, stride_xm, stride_xk, stride_qn, stride_ym, M_KEY, stride_sn,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, GROUP: tl.constexpr = 0,
):  # fmt: skip
    # GROUP: as in _gemv_kernel (0: per-row scales on the accumulator; > 0: int8_group scales
    # [N, ceil(K / GROUP)] with row stride stride_sn, applied to each weight tile).
    # M_KEY (M rounded up to a power of two) is only the autotuning key.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_c = tl.minimum(rm, M - 1).to(tl.int64)  # out-of-range rows/cols re-read valid ones, never stored
    rn_c = tl.minimum(rn, N - 1).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    k_full = k_lo + tl.maximum(k_hi - k_lo, 0) // BLOCK_K * BLOCK_K
    if SWAP_AB:
        w_ptrs = q_ptr + rn_c[:, None] * stride_qn  # [BN, 1] (+ ks[None, :])
        s_ptrs = s_ptr + rn_c[:, None] * stride_sn  # [BN, 1] (GROUP > 0 only)
        x_ptrs = x_ptr + rm_c[None, :] * stride_xm  # [1, BM] (+ ks[:, None] * stride_xk)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        x_ptrs = x_ptr + rm_c[:, None] * stride_xm  # [BM, 1]
        w_ptrs = q_ptr + rn_c[None, :] * stride_qn  # [1, BN]
        s_ptrs = s_ptr + rn_c[None, :] * stride_sn  # [1, BN] (GROUP > 0 only)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_full, BLOCK_K):
        acc = _gemm_step(x_ptrs, w_ptrs, s_ptrs, k0, rk, K, stride_xk, acc, SWAP_AB, DOT_F32, False, GROUP)
    if k_full < k_hi:  # only the last split can end inside a block
        acc = _gemm_step(x_ptrs, w_ptrs, s_ptrs, k_full, rk, K, stride_xk, acc, SWAP_AB, DOT_F32, True, GROUP)

    if SWAP_AB:  # acc is [BN, BM]
        mask = (rn[:, None] < N) & (rm[None, :] < M)
        if SPLIT_K == 1:
            if GROUP == 0:
                acc = acc * tl.load(s_ptr + rn_c)[:, None]
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn_c).to(tl.float32)[:, None]
            y_ptrs = y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            ws_ptrs = ws_ptr + (pid_k * M + rm.to(tl.int64))[None, :] * N + rn[:, None]
            tl.store(ws_ptrs, acc, mask=mask)
    else:  # acc is [BM, BN]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if SPLIT_K == 1:
            if GROUP == 0:
                acc = acc * tl.load(s_ptr + rn_c)[None, :]
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn_c).to(tl.float32)[None, :]
            y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            ws_ptrs = ws_ptr + (pid_k * M + rm.to(tl.int64))[:, None] * N + rn[None, :]
            tl.store(ws_ptrs, acc, mask=mask)


# ---------------------------------------------------------------------------------------------
# Configs and autotuning.


def _cfg(num_warps=4, num_stages=3, **kw) -> triton.Config:
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


# GEMV: BLOCK_K = 256 * num_warps (see the layout note above); BLOCK_M * BLOCK_N * 8 accumulator
# registers a thread, so _prune_gemv keeps BLOCK_M * BLOCK_N <= 16.
GEMV_CONFIGS = [
    _cfg(BLOCK_N=8, BLOCK_K=1024, num_warps=4, num_stages=1),
    _cfg(BLOCK_N=16, BLOCK_K=1024, num_warps=4, num_stages=1),
    _cfg(BLOCK_N=4, BLOCK_K=1024, num_warps=4, num_stages=1),
    _cfg(BLOCK_N=2, BLOCK_K=1024, num_warps=4, num_stages=1),
    _cfg(BLOCK_N=1, BLOCK_K=1024, num_warps=4, num_stages=1),
    _cfg(BLOCK_N=8, BLOCK_K=512, num_warps=2, num_stages=1),
    _cfg(BLOCK_N=4, BLOCK_K=512, num_warps=2, num_stages=1),
    _cfg(BLOCK_N=8, BLOCK_K=2048, num_warps=8, num_stages=1),
]

# GEMM: first config = default when not autotuning.
GEMM_CONFIGS = [
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP_AB=False, num_warps=8, num_stages=4),
    _cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, SWAP_AB=False, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP_AB=False, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP_AB=True, num_warps=8, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP_AB=True, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SWAP_AB=True, num_warps=4, num_stages=4),
    # few rows (short prompts, or decode when GEMV_MAX_M is lowered): weight rows fill the MMA's
    # 64-row side, the activation rows are its narrow side
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, SWAP_AB=True, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, SWAP_AB=True, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, SWAP_AB=True, num_warps=4, num_stages=4),
]


def _gemv_default_config(block_m: int) -> triton.Config:
    return _prune_gemv(GEMV_CONFIGS, {"BLOCK_M": block_m})[0]


def _prune_gemv(configs, named_args, **kwargs):
    """Keep configs whose accumulator (BLOCK_M * BLOCK_N * 8 floats a thread) stays <= 128
    registers and that give each program at least 2 row-slots."""
    bm = int(kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1)))
    keep = [c for c in configs if 2 <= bm * c.kwargs["BLOCK_N"] <= 16]
    return keep or [c for c in configs if c.kwargs["BLOCK_N"] == 1][:1] or configs[:1]


def _prune_gemm(configs, named_args, **kwargs):
    """Keep tiles whose BLOCK_M suits M: no 128-row tiles for 16 rows, no 16-row tiles for 4096."""
    m = int(named_args["M_KEY"])
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m) and (m < 256 or c.kwargs["BLOCK_M"] >= 64)]
    return keep or configs[:1]


def _gemm_default_config(m_key: int) -> triton.Config:
    return _prune_gemm(GEMM_CONFIGS, {"M_KEY": m_key})[0]


_gemv_tuned = triton.autotune(
    configs=GEMV_CONFIGS, key=["N", "K", "BLOCK_M", "SPLIT_K"], prune_configs_by={"early_config_prune": _prune_gemv}
)(_gemv_kernel)
_gemm_tuned = triton.autotune(
    configs=GEMM_CONFIGS, key=["M_KEY", "N", "K", "SPLIT_K"], prune_configs_by={"early_config_prune": _prune_gemm}
)(_gemm_kernel)

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: a small number exercises the split-K choice the same way
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _split_k(programs: int, k: int, sms: int, target: float, min_k: int) -> int:
    """Smallest power of two that brings programs * split to target * sms, keeping at least
    min_k columns of K per split (at most _MAX_SPLIT_K)."""
    split = 1
    while programs * split < target * sms and k // (split * 2) >= min_k and split < _MAX_SPLIT_K:
        split *= 2
    return split


def gemv_split_k(m: int, n: int, k: int, sms: int) -> int:
    """Split-K of the GEMV path: enough (n / 8)-row programs for two per multiprocessor."""
    return _split_k(triton.cdiv(n, 8), k, sms, 2.0, 1024)


def gemm_split_k(m: int, n: int, k: int, sms: int) -> int:
    """Split-K of the GEMM path, for few rows only (m <= 64): fill the multiprocessors once with
    about 64-row weight tiles."""
    if m > 64:
        return 1
    return _split_k(triton.cdiv(m, 64) * triton.cdiv(n, 64), k, sms, 1.0, 512)


# ---------------------------------------------------------------------------------------------
# Public entry points.


def unsupported_reason(
    x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> str | None:
    """Why the fused kernels can't compute int8_linear(x, q, scales, bias) (layout "linear"), or
    None when they can. The caller then uses the reference path."""
    if not (x.is_cuda or INTERPRET):
        return "x is not on a CUDA device"
    if x.dtype not in DTYPES:
        return f"x dtype {x.dtype} (needs bfloat16 or float16)"
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return "autograd (the kernels have no backward)"
    if q.dtype != torch.int8 or q.dim() != 2:
        return f"q must be 2-D int8, got {q.dtype} {tuple(q.shape)}"
    n, k = q.shape
    if x.dim() < 1 or x.shape[-1] != k:
        return f"x {tuple(x.shape)} does not end in in_features {k}"
    if n == 0 or k == 0 or x.numel() == 0:
        return "empty tensor"
    if q.device != x.device or scales.device != x.device:
        return "q/scales not on x's device"
    if q.stride(1) != 1 or q.stride(0) < k:
        return "q rows are not contiguous"
    if scales.dim() == 2:  # int8_group: [n, ceil(k / group)], a power-of-two group
        if scales.shape[0] != n or scales.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"group scales {scales.dtype} {tuple(scales.shape)} are not float [{n}, groups]"
        try:
            group_size_for(k, scales.shape[1])
        except ValueError as e:
            return f"group scales {tuple(scales.shape)}: {e}"
    elif scales.shape != (n,):
        return f"scales shape {tuple(scales.shape)} != ({n},)"
    if bias is not None and (bias.shape != (n,) or bias.device != x.device or bias.dtype != x.dtype):
        return "bias shape/device/dtype differs from (out_features,) on x's device in x's dtype"
    return None


def maybe_int8_linear(
    x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """int8_linear_triton(x, q, scales, bias), or None where unsupported_reason gives a reason
    (the caller then takes the reference path). For the dispatch in kernels.py when the caller
    keeps no LinearPlan: the weight's layout is looked up on every call, the rest is cached
    (see LinearPlan)."""
    return _call(_weights_of(q, scales, bias), x, q, scales, bias)


def int8_linear_triton(
    x: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    path: str | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ (float32(q) * scales[:, None])^T + bias, fused (layout "linear").

    Args:
        x: (..., in_features) bfloat16 or float16 activations on a CUDA device (any strides).
        q: (out_features, in_features) int8 weight, rows contiguous.
        scales: (out_features,) scale of each row (converted to float32), or int8_group scales
            (out_features, ceil(in_features / G)) for a power-of-two group size G (float32,
            bfloat16 or float16, read as they are).
        bias: optional (out_features,) bias in x's dtype.
        path: "gemv", "gemm" or None (GEMV for up to GEMV_MAX_M rows of x, else GEMM).
        config: meta-parameters to force instead of autotuning (keys of a GEMV_CONFIGS /
            GEMM_CONFIGS entry, plus optional num_warps, num_stages and, for GEMV, SPLIT_K).
        out: optional contiguous (..., out_features) tensor of x's dtype to write into.

    Returns:
        (..., out_features) in x's dtype (`out` when given).

    Raises:
        ValueError: the inputs are outside what the kernels support (see unsupported_reason).
    """
    why = unsupported_reason(x, q, scales, bias)
    if why is not None:
        raise ValueError(f"int8_linear_triton: {why}")
    return _run(x, q, scales, bias, path, config, out)


def _run(x, q, scales, bias, path, config, out, record=None) -> torch.Tensor:
    n, k = q.shape
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if scales.dim() == 2:  # int8_group scales: read in their own dtype
        s = scales if scales.is_contiguous() else scales.contiguous()
    else:
        s = scales if scales.dtype == torch.float32 and scales.is_contiguous() else scales.float().contiguous()
    b = bias.contiguous() if bias is not None else None
    shape = (*x.shape[:-1], n)
    if out is None:
        y = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(
            f"int8_linear_triton: out must be a contiguous {shape} {x.dtype} tensor on {x.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device} (contiguous={out.is_contiguous()})"
        )
    else:
        y = out
    y2 = y.view(m, n)
    if path is None:
        path = "gemv" if m <= GEMV_MAX_M else "gemm"
    if x.is_cuda and x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            _launch(path, x2, q, s, b, y2, config, record)
    else:
        _launch(path, x2, q, s, b, y2, config, record)
    return y


def _launch(path, x2, q, s, b, y2, config, record=None) -> None:
    """Launch the kernels through Triton's normal path (JITFunction / Autotuner). record: a list
    that receives one _LaunchRecord per launch (what the direct launcher of _Fast replays)."""
    m, k = x2.shape
    n = q.shape[0]
    group = group_size_for(k, s.shape[1]) if s.dim() == 2 else 0  # 0: per-row scales
    stride_sn = s.stride(0) if s.dim() == 2 else 0
    has_bias = b is not None
    b_arg = b if has_bias else s  # any valid pointer; never read without HAS_BIAS
    cfg = dict(config or {})
    split = int(cfg.pop("SPLIT_K", 0))
    if path == "gemv":
        if m > 16:
            raise ValueError(f"int8_linear_triton: the GEMV path takes at most 16 rows of x, got {m}")
        split = split or gemv_split_k(m, n, k, _sm_count(x2.device))
    elif path == "gemm":
        split = split or gemm_split_k(m, n, k, _sm_count(x2.device))
    else:
        raise ValueError(f"int8_linear_triton: path must be 'gemv', 'gemm' or None, got {path!r}")
    ws = y2  # never touched when split == 1
    if split > 1:
        ws = torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
        if _POISON_WORKSPACE:
            ws.fill_(float("nan"))
    tuned = not (cfg or INTERPRET or not AUTOTUNE)

    if path == "gemv":
        block_m = triton.next_power_of_2(m)
        args = (x2, q, s, b_arg, y2, ws, m, n, k, x2.stride(0), q.stride(0), y2.stride(0), stride_sn)
        consts = dict(HAS_BIAS=has_bias, SPLIT_K=split, BLOCK_M=block_m, GROUP=group)

        rec = _LaunchRecord(_gemv_kernel, args, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split))
        if tuned:
            rec.ret = _gemv_tuned[rec.grid](*args, **consts)
        else:
            base = _gemv_default_config(block_m)
            meta = {**base.kwargs, "num_warps": base.num_warps, "num_stages": base.num_stages, **cfg}
            rec.ret = _gemv_kernel[rec.grid](*args, **consts, **meta)
    else:
        m_key = min(triton.next_power_of_2(m), 4096)
        args = (x2, q, s, b_arg, y2, ws, m, n, k, x2.stride(0), x2.stride(1), q.stride(0), y2.stride(0), m_key,
                stride_sn)
        consts = dict(HAS_BIAS=has_bias, DOT_F32=INTERPRET and x2.dtype == torch.bfloat16, SPLIT_K=split, GROUP=group)

        rec = _LaunchRecord(
            _gemm_kernel, args, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)
        )
        if tuned:
            rec.ret = _gemm_tuned[rec.grid](*args, **consts)
        else:
            base = _gemm_default_config(m_key)
            meta = {**base.kwargs, "num_warps": base.num_warps, "num_stages": base.num_stages, **cfg}
            rec.ret = _gemm_kernel[rec.grid](*args, **consts, **meta)
    if record is not None:
        record.append(rec)

    if split > 1:
        block = 1024
        args = (ws, s, b_arg, y2, m * n, n, y2.stride(0))
        rec = _LaunchRecord(_splitk_reduce_kernel, args, lambda meta: (triton.cdiv(m * n, block),))
        rec.ret = _splitk_reduce_kernel[rec.grid](*args, HAS_BIAS=has_bias, SPLIT_K=split, BLOCK=block,
                                                  ROW_SCALE=group == 0)
        if record is not None:
            record.append(rec)


class _LaunchRecord:
    """One launch through Triton's normal path: the JIT function, our positional arguments, the
    grid callable handed to Triton (it keeps the meta-parameters Triton bound, including the
    autotuner's config, and the grid it computed from them) and what the launch returned (the
    CompiledKernel it ran, on the GPU)."""

    __slots__ = ("fn", "args", "_grid_of", "meta", "grid_value", "ret")

    def __init__(self, fn, args, grid_of):
        self.fn = fn
        self.args = args
        self._grid_of = grid_of
        self.meta = None
        self.grid_value = None
        self.ret = None

    def grid(self, meta):
        g = self._grid_of(meta)
        self.meta = meta  # the last call is the real launch (the autotuner's benchmark runs come first)
        self.grid_value = g
        return g


# ---------------------------------------------------------------------------------------------
# Launch fast path.
#
# Triton's launch path (Autotuner.run -> JITFunction.run: argument binding, specialization key,
# kernel-cache lookup, grid callable) plus our own checks cost ~50-80 us of host time a call, more
# than the GEMV takes on the GPU at decode shapes. A LinearPlan (one per CompressedLinear) caches
# what the dispatch decides, per weight (by identity) and per activation layout, and after the first
# call of a layout launches the CompiledKernel that Triton's normal path launched for exactly those
# arguments, through Triton's own low-level launcher (CompiledKernel.run), with the tensors of the
# current call.
#
# Why that is sound: an entry's key holds every property Triton specializes a compiled kernel on
# (the dtypes, each pointer's address mod 16, the exact value of every integer argument), so a call
# with the same key needs the same compiled kernel, grid and constants. The first call of a key runs
# the normal path, then the direct launch into a second output whose every element starts different
# (the bitwise NOT of the first result), and compares the two bit for bit. On a mismatch, or any
# error while building or launching, the direct launch is switched off for the process (one
# logging.debug message) and every call takes the normal path. A call also takes the normal path
# while a Triton launch hook is set (profilers), and a new key met during CUDA-graph capture is not
# built (no synchronization there). Like the normal path, launches run with x's device current.
# Under the interpreter (TRITON_INTERPRET=1, CPU tests) the "direct launch" is the JIT function
# launched with the recorded grid and constants (no autotuner, no grid callable): the same plan,
# key, argument and verification logic, a different last step.

_TENSOR_ROLES = {"x_ptr": 0, "q_ptr": 1, "s_ptr": 2, "b_ptr": 3, "y_ptr": 4, "ws_ptr": 5}
_MAX_ENTRIES = 64  # activation layouts cached per weight layout (new prefill lengths beyond: normal path)
_DIRECT = {"on": True, "why": None}
_WEIGHTS: dict = {}  # weight layout key -> _Weights
STATS = {"builds": 0, "verified": 0, "normal_calls": 0}  # cheap counters (tests, benchmarks)

try:  # where Triton keeps the launch hooks (knobs since 3.4; a HookChain, empty unless a profiler adds one, since 3.5)
    _KNOBS_RT = triton.knobs.runtime
    _KNOBS_RT.launch_enter_hook, _KNOBS_RT.launch_exit_hook  # noqa: B018
except Exception:  # an older Triton: no direct launch
    _KNOBS_RT = None
    _DIRECT.update(on=False, why="triton.knobs.runtime.launch_enter_hook not found")
_HOOK_CHAIN = getattr(getattr(triton, "knobs", None), "HookChain", None)


def _hook_idle(h) -> bool:
    """A launch hook that does nothing: None, or an empty HookChain."""
    return h is None or (h.__class__ is _HOOK_CHAIN and not h.calls)

_STREAM_FN: list = []  # [triton driver's get_current_stream], resolved at the first direct launch


def _current_device() -> int:
    return torch.cuda.current_device()


if hasattr(torch._C, "_cuda_getDevice"):
    _current_device = torch._C._cuda_getDevice  # noqa: F811  (what torch.cuda.current_device returns, without the lazy-init check)


def _disable_direct(why: str) -> None:
    """Switch the direct launch off for the process; every call takes Triton's normal path."""
    if _DIRECT["on"]:
        _DIRECT.update(on=False, why=why)
        import logging

        logging.getLogger("codecllm_format.runtime").debug("int8_linear: direct Triton launch off (%s); normal launch path from now on", why)


def direct_launch_status() -> tuple[bool, str | None]:
    """(whether the direct launch is on, why it was switched off)."""
    return _DIRECT["on"], _DIRECT["why"]


def reset_launch_cache(enable: bool = True) -> None:
    """Forget every cached entry (plans rebuild them on their next call); enable: switch the
    direct launch back on (tests)."""
    _WEIGHTS.clear()
    if enable and _KNOBS_RT is not None:
        _DIRECT.update(on=True, why=None)
    for k in STATS:
        STATS[k] = 0


class _DirectLaunch:
    """One launch, replayed without Triton's dispatch: the CompiledKernel's low-level launcher with
    the recorded grid and constants, and the tensors of the current call."""

    __slots__ = ("pick", "tail", "grid", "run", "function", "packed", "fn")

    def __init__(self, rec: _LaunchRecord):
        names = list(getattr(rec.fn, "arg_names", None) or ())
        if not names:
            raise RuntimeError(f"{rec.fn!r} has no arg_names")
        if rec.meta is None or rec.grid_value is None:
            raise RuntimeError("Triton did not call the grid callable")
        roles, tail = [], []
        for i, name in enumerate(names):
            role = _TENSOR_ROLES.get(name)
            if role is not None:
                if tail or i >= len(rec.args) or not isinstance(rec.args[i], torch.Tensor):
                    raise RuntimeError(f"tensor argument {name} is not among the leading positional arguments")
                roles.append(role)
                continue
            v = rec.args[i] if i < len(rec.args) else rec.meta[name]  # the rest: constexprs as Triton bound them
            if isinstance(v, torch.Tensor) or not (v is None or isinstance(v, (bool, int, float))):
                raise RuntimeError(f"argument {name} = {v!r} is not a plain constant")
            tail.append(v)
        if len(roles) < 2 or any(isinstance(a, torch.Tensor) for a in rec.args[len(roles) :]):
            raise RuntimeError("unexpected argument layout")
        self.pick = operator.itemgetter(*roles)
        self.tail = tuple(tail)
        g = tuple(int(v) for v in rec.grid_value)
        if not 1 <= len(g) <= 3:
            raise RuntimeError(f"grid {g}")
        self.grid = g + (1,) * (3 - len(g))
        self.fn = rec.fn
        self.run = self.function = self.packed = None
        if not INTERPRET:
            kernel = rec.ret
            if kernel is not None and not hasattr(kernel, "packed_metadata") and callable(getattr(kernel, "result", None)):
                kernel = kernel.result()  # async compilation hands out a future
            run = kernel.run  # (a property: loads the module on first access)
            function, packed = kernel.function, kernel.packed_metadata
            if not callable(run) or function is None:
                raise RuntimeError(f"{type(kernel).__name__} has no loaded function")
            self.run, self.function, self.packed = run, function, packed

    def __call__(self, stream, tensors) -> None:
        if self.run is None:  # interpreter
            self.fn[self.grid](*self.pick(tensors), *self.tail)
        else:
            g = self.grid
            # the arguments of JITFunction.run's launch: grid, stream, function, packed metadata,
            # launch metadata and enter/exit hooks (none: active hooks send calls to the normal path)
            self.run(g[0], g[1], g[2], stream, self.function, self.packed, None, None, None, *self.pick(tensors), *self.tail)


class _Fast:
    """Cache entry: the direct launches of one (weight layout, activation layout)."""

    __slots__ = ("launches", "out_shape", "dev", "ws_shape", "calls")

    def __init__(self, x: torch.Tensor, y: torch.Tensor, records: list):
        if not 1 <= len(records) <= 2:
            raise RuntimeError(f"{len(records)} launches recorded")
        self.launches = tuple(_DirectLaunch(r) for r in records)
        ws, y2 = records[0].args[5], records[0].args[4]
        self.ws_shape = None if ws is y2 else tuple(ws.shape)
        if (self.ws_shape is None) != (len(records) == 1):
            raise RuntimeError("split-K workspace and launches disagree")
        if y.dtype != x.dtype or y.device != x.device:
            raise RuntimeError("output dtype/device differ from x's")
        self.out_shape = tuple(y.shape)
        self.dev = x.get_device()
        self.calls = 0
        if self.dev >= 0 and not _STREAM_FN:
            from triton.runtime import driver

            _STREAM_FN.append(driver.active.get_current_stream)

    def _launch(self, x, q, s, b, y) -> torch.Tensor:
        if self.ws_shape is None:
            ws = y
        else:
            ws = x.new_empty(self.ws_shape, dtype=torch.float32)
            if _POISON_WORKSPACE:
                ws.fill_(float("nan"))
        tensors = (x, q, s, s if b is None else b, y, ws)
        stream = _STREAM_FN[0](self.dev) if self.dev >= 0 else None
        for launch in self.launches:
            launch(stream, tensors)
        return y

    def verify(self, x, q, s, b, y_ref: torch.Tensor) -> None:
        """Direct launch into an output that starts as NOT(y_ref); raises unless it equals y_ref
        bit for bit."""
        ref_bits = y_ref.view(torch.int16)
        y = torch.bitwise_not(ref_bits).view(y_ref.dtype)
        self._launch(x, q, s, b, y)
        if not torch.equal(y.view(torch.int16), ref_bits):
            bad = int((y.view(torch.int16) != ref_bits).sum())
            raise RuntimeError(f"direct launch differs from the normal launch in {bad} of {y.numel()} outputs")

    def __call__(self, x, q, s, b):
        rt = _KNOBS_RT
        if _DIRECT["on"] and _hook_idle(rt.launch_enter_hook) and _hook_idle(rt.launch_exit_hook):
            y = x.new_empty(self.out_shape)  # x's dtype and device (half the host time of torch.empty(device=))
            try:
                if self.dev < 0 or _current_device() == self.dev:
                    self._launch(x, q, s, b, y)
                else:  # the module lives on another GPU than the current one (as _run does)
                    with torch.cuda.device(self.dev):
                        self._launch(x, q, s, b, y)
                self.calls += 1
                return y
            except Exception as e:
                _disable_direct(f"direct launch raised {type(e).__name__}: {e}")
        STATS["normal_calls"] += 1
        return _run(x, q, s, b, None, None, None)


class _Normal:
    """Cache entry: supported, but always through Triton's normal path (x needs a copy, scales
    or bias need a conversion, or the direct launch is off)."""

    __slots__ = ()

    def __call__(self, x, q, s, b):
        STATS["normal_calls"] += 1
        return _run(x, q, s, b, None, None, None)


class _Unsupported:
    """Cache entry: the kernels can't take these inputs (the caller uses the reference)."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why

    def __call__(self, x, q, s, b):
        return None


_NORMAL = _Normal()


class _Weights:
    """The entries of one weight layout, shared by every plan and call with that layout."""

    __slots__ = ("key", "entries")

    def __init__(self, key):
        self.key = key
        self.entries: dict = {}


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.dtype, tuple(t.shape), t.stride(), t.get_device(), t.data_ptr() & 15)


def _weights_of(q, s, b) -> _Weights:
    key = (_tensor_key(q), _tensor_key(s), None if b is None else _tensor_key(b))
    w = _WEIGHTS.get(key)
    if w is None:
        w = _WEIGHTS.setdefault(key, _Weights(key))
    return w


def _call(weights: _Weights, x, q, s, b):
    """y, or None where the kernels can't take the inputs."""
    if torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)):
        return None  # autograd: the kernels have no backward
    key = (x.shape, x.stride(), x.dtype, x.get_device(), x.data_ptr() & 15)
    e = weights.entries.get(key)
    if e is None:
        return _build(weights, key, x, q, s, b)
    return e(x, q, s, b)


def _build(weights: _Weights, key, x, q, s, b):
    """First call of an activation layout: decide, run the normal path, record and verify the
    direct launch; returns this call's result (None: unsupported)."""
    with torch.no_grad():  # autograd is checked per call
        why = unsupported_reason(x, q, s, b)
    if why is not None:
        weights.entries[key] = _Unsupported(why)
        return None
    if len(weights.entries) >= _MAX_ENTRIES:
        STATS["normal_calls"] += 1
        return _run(x, q, s, b, None, None, None)
    k = q.shape[1]
    x2 = x.reshape(-1, k)
    plain = (
        x2.stride(1) == 1
        and x2.data_ptr() == x.data_ptr()  # a view: the kernels can read x itself
        and (s.dtype == torch.float32 or s.dim() == 2)  # what _run passes on unconverted
        and s.is_contiguous()
        and (b is None or b.is_contiguous())
    )
    if not plain or not _DIRECT["on"]:
        weights.entries[key] = _NORMAL
        return _NORMAL(x, q, s, b)
    dev = x.get_device()
    if dev >= 0 and dev != _current_device():  # as _run does: launch under x's device
        with torch.cuda.device(dev):
            return _build_fast(weights, key, x, q, s, b)
    return _build_fast(weights, key, x, q, s, b)


def _build_fast(weights: _Weights, key, x, q, s, b):
    """_build's last step, with x's device current."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        STATS["normal_calls"] += 1
        return _run(x, q, s, b, None, None, None)  # not stored (no synchronization in a capture)
    STATS["builds"] += 1
    records: list = []
    y = _run(x, q, s, b, None, None, None, records)
    try:
        entry = _Fast(x, y, records)
        entry.verify(x, q, s, b, y)
    except Exception as e:
        _disable_direct(f"{type(e).__name__}: {e}")
        weights.entries[key] = _NORMAL
        return y
    STATS["verified"] += 1
    weights.entries[key] = entry
    return y


class LinearPlan:
    """The dispatch cache of one module's int8_linear calls (CompressedLinear keeps one).

    Remembers the last BINDINGS sets of weight tensors it saw (q and scales by weak reference,
    the bias by identity, address and dtype: a streaming provider cycles a group through its
    slot buffers, one binding per slot) and their layout's entries; a call with the same weights
    costs identity checks, one dict lookup on the activation's layout and the launch. Calls
    return None where the kernels can't take the inputs (the caller then uses the reference).
    Copies and pickles of a plan start empty.
    """

    BINDINGS = 4  # weight sets remembered: streaming slots up to this many never re-bind

    __slots__ = ("_w", "_prev", "binds", "__weakref__")

    def __init__(self):
        self._w = None  # (weakref(q), weakref(scales), bias, bias address, bias dtype, _Weights)
        self._prev = ()  # the bindings before, most recent first
        self.binds = 0

    def __call__(self, x, q, scales, bias=None):
        w = self._w
        if (
            w is None
            or w[0]() is not q
            or w[1]() is not scales
            or w[2] is not bias
            or (bias is not None and (bias.data_ptr() != w[3] or bias.dtype is not w[4]))
        ):
            w = self._rebind(q, scales, bias)
        # _call, inlined (this is the per-layer decode path)
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return None
        key = (x.shape, x.stride(), x.dtype, x.get_device(), x.data_ptr() & 15)
        e = w[5].entries.get(key)
        if e is None:
            return _build(w[5], key, x, q, scales, bias)
        return e(x, q, scales, bias)

    def _rebind(self, q, scales, bias):
        older = self._prev
        for i, p in enumerate(older):
            if (
                p[0]() is q
                and p[1]() is scales
                and p[2] is bias
                and (bias is None or (bias.data_ptr() == p[3] and bias.dtype is p[4]))
            ):
                self._prev = (self._w,) + older[:i] + older[i + 1 :]
                self._w = p
                return p
        w = (
            weakref.ref(q),
            weakref.ref(scales),
            bias,
            0 if bias is None else bias.data_ptr(),
            None if bias is None else bias.dtype,
            _weights_of(q, scales, bias),
        )
        if self._w is not None:
            older = ((self._w,) + older)[: self.BINDINGS - 1]
        self._prev, self._w = older, w
        self.binds += 1
        return w

    def entry(self, x: torch.Tensor):
        """The cache entry the last-bound weights use for x's layout (tests, benchmarks)."""
        if self._w is None:
            return None
        return self._w[5].entries.get((x.shape, x.stride(), x.dtype, x.get_device(), x.data_ptr() & 15))

    def __deepcopy__(self, memo):
        return LinearPlan()

    def __reduce__(self):
        return (LinearPlan, ())


def best_configs() -> dict:
    """The autotuner's chosen config per key so far (for benchmark reports)."""
    out = {}
    for name, tuned in (("gemv", _gemv_tuned), ("gemm", _gemm_tuned)):
        out[name] = {str(key): str(cfg) for key, cfg in getattr(tuned, "cache", {}).items()}
    return out
