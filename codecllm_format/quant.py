"""Quantization primitives: pure functions on torch tensors, no I/O.

int8_row: symmetric per-row absmax. For a 2-D weight W (rows x cols),
    scale[r] = max_c |W[r, c]| / 127          (float32)
    q[r, c]  = round_half_even(W[r, c] / scale[r])   in [-127, 127]   (int8)
    W'[r, c] = float32(q[r, c]) * scale[r], then cast to the logical dtype.
A row of zeros gets scale 0 and q 0. For nn.Linear (out_features x in_features) a row is
an output channel; for an embedding table a row is a token.

int8_group: the same per group of `group_size` consecutive columns of a row (the last group of a
row partial when cols is not a multiple), the scale rounded to bfloat16 before q is computed
(spec/FORMAT.md 10.4): scale[r, g] = bfloat16(max |W[r, group g]| / 127).
"""

from __future__ import annotations

import torch

QMAX = 127
ROW_BLOCK_BYTES = 1024 * 1024
"""On a CPU, rows are quantized in blocks of about this many float32 bytes through one reused
buffer that stays in cache: 10-20x faster than 32 MiB temporaries, which page-fault on every
fresh allocation (benchmarks/RESULTS.md, "Conversion (issue 2)")."""
DEVICE_ROW_BLOCK_BYTES = 32 * 1024 * 1024
"""Block size on other devices (GPU), where fewer, larger kernel launches are faster."""
_F32_TINY = torch.finfo(torch.float32).tiny


class NonFiniteError(ValueError):
    """The tensor holds NaN or infinity, which int8 cannot represent."""


def quantize_int8_rows(weight: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float tensor to int8 with one float32 scale per row.

    Args:
        weight: 2-D float tensor (any float dtype), on any device.
        out: optional int8 tensor of the same shape to write into.

    Returns:
        (q, scales): int8 tensor of weight's shape, float32 tensor of shape (rows,).

    Raises:
        NonFiniteError: weight holds NaN or +-inf.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8_rows needs a 2-D float tensor, got {weight.dim()}-D {weight.dtype}")
    rows, cols = weight.shape
    q = out if out is not None else torch.empty((rows, cols), dtype=torch.int8, device=weight.device)
    scales = torch.empty(rows, dtype=torch.float32, device=weight.device)
    block_bytes = ROW_BLOCK_BYTES if weight.device.type == "cpu" else DEVICE_ROW_BLOCK_BYTES
    step = max(1, block_bytes // max(1, cols * 4))
    # float32 working copies, reused for every block; `weight` itself is never modified
    buf = torch.empty((min(step, rows), cols), dtype=torch.float32, device=weight.device)
    for r0 in range(0, rows, step):
        src = weight[r0 : r0 + step]
        k = src.shape[0]
        block = buf[:k]
        block.copy_(src)
        # max(amax, -amin) == amax(abs) without writing |block|; both propagate NaN, and
        # +-inf show up too: one check on the row maxima suffices
        absmax = torch.maximum(block.amax(dim=1), block.amin(dim=1).neg_()) if cols else block.new_zeros(k)
        if not torch.isfinite(absmax).all():
            raise NonFiniteError("tensor holds NaN or infinity")
        s = absmax / QMAX
        scales[r0 : r0 + k] = s
        safe = torch.where(s > 0, s, torch.ones_like(s))
        block.div_(safe[:, None]).round_()
        if bool((s < _F32_TINY).any()):
            # a subnormal scale is rounded coarsely and |w / s| can pass 127.5; a normal one
            # is within 2^-24 of absmax / 127, so |w / s| rounds to at most 127
            block.clamp_(-QMAX, QMAX)
        q[r0 : r0 + k].copy_(block)
    return q, scales


def dequantize_int8_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_int8_rows: float32(q) * scale[row], cast to `dtype`."""
    if q.dim() != 2 or scales.shape != (q.shape[0],):
        raise ValueError(f"dequantize_int8_rows: q {tuple(q.shape)} and scales {tuple(scales.shape)} disagree")
    return (q.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; inf when exact)."""
    ref = reference.to(torch.float64)
    noise = (ref - approx.to(torch.float64)).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


# --- int8_group: one scale per group of `group_size` consecutive columns of a row --------

GROUP_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Scale dtypes quantize_int8_groups can round its scales to (the file format stores one)."""


def group_count(cols: int, group_size: int) -> int:
    """Number of column groups of a row: ceil(cols / group_size); the last may be partial."""
    return -(-cols // group_size)


def group_size_for(cols: int, groups: int) -> int:
    """The power-of-two group size that cuts `cols` columns into `groups` groups (the INT8_GROUP
    group sizes are powers of two, so the scales' shape determines it). With one group every
    group size >= cols gives the same values; the smallest power of two >= cols is returned.

    Raises:
        ValueError: no power of two gives that many groups.
    """
    if groups < 1 or cols < 1:
        raise ValueError(f"{groups} groups of {cols} columns")
    g = 1 << max(0, (-(-cols // groups) - 1).bit_length())  # smallest power of two >= ceil(cols / groups)
    if group_count(cols, g) != groups:
        raise ValueError(f"no power-of-two group size cuts {cols} columns into {groups} groups")
    return g


def quantize_int8_groups(
    weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float tensor to int8 with one scale per (row, group of columns).

    Group g of row r covers columns [g * group_size, min((g + 1) * group_size, cols)); the
    last group of a row is partial when cols is not a multiple of group_size. Per group, in
    float32: scale = absmax / 127, rounded to `scale_dtype` (nearest even); q =
    clamp(round_half_even(w / s), -127, 127) with s the stored scale (1 where it is 0).

    Args:
        weight: 2-D float tensor (any float dtype), on any device.
        group_size: columns per group (>= 1).
        scale_dtype: float32, bfloat16 or float16: the dtype the scales are stored in.

    Returns:
        (q, scales): int8 tensor of weight's shape, scales of shape (rows, ceil(cols /
        group_size)) in `scale_dtype`.

    Raises:
        NonFiniteError: weight holds NaN or +-inf, or a scale overflows `scale_dtype`.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8_groups needs a 2-D float tensor, got {weight.dim()}-D {weight.dtype}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if scale_dtype not in GROUP_SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {GROUP_SCALE_DTYPES}, got {scale_dtype}")
    rows, cols = weight.shape
    ng = group_count(cols, group_size)
    padded = ng * group_size
    q = torch.empty((rows, cols), dtype=torch.int8, device=weight.device)
    scales = torch.empty((rows, ng), dtype=scale_dtype, device=weight.device)
    block_bytes = ROW_BLOCK_BYTES if weight.device.type == "cpu" else DEVICE_ROW_BLOCK_BYTES
    step = max(1, block_bytes // max(1, padded * 4))
    buf = torch.zeros((min(step, rows), padded), dtype=torch.float32, device=weight.device)
    for r0 in range(0, rows, step):
        src = weight[r0 : r0 + step]
        k = src.shape[0]
        block = buf[:k]
        block[:, :cols].copy_(src)  # columns past `cols` stay 0: they never raise an absmax
        g = block.view(k, ng, group_size)
        absmax = torch.maximum(g.amax(dim=2), g.amin(dim=2).neg_()) if ng else block.new_zeros((k, 0))
        if not torch.isfinite(absmax).all():
            raise NonFiniteError("tensor holds NaN or infinity")
        stored = (absmax / QMAX).to(scale_dtype)
        if not torch.isfinite(stored).all():
            raise NonFiniteError(f"a group scale overflows {scale_dtype}")
        s = stored.to(torch.float32)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        g.div_(safe[:, :, None]).round_().clamp_(-QMAX, QMAX)
        q[r0 : r0 + k].copy_(block[:, :cols])
        scales[r0 : r0 + k] = stored
    return q, scales


def dequantize_int8_groups(q: torch.Tensor, scales: torch.Tensor, group_size: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_int8_groups: float32(q[r, c]) * float32(scale[r, c // group_size])
    (one binary32 multiplication), cast to `dtype`."""
    if q.dim() != 2 or group_size < 1 or scales.shape != (q.shape[0], group_count(q.shape[1], group_size)):
        raise ValueError(f"dequantize_int8_groups: q {tuple(q.shape)}, scales {tuple(scales.shape)} and "
                         f"group_size {group_size} disagree")
    cols = q.shape[1]
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :cols]
    return (q.to(torch.float32) * s).to(dtype)
