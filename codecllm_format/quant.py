"""Quantization primitives: pure functions on torch tensors, no I/O.

int8_row: symmetric per-row absmax. For a 2-D weight W (rows x cols),
    scale[r] = max_c |W[r, c]| / 127          (float32)
    q[r, c]  = round_half_even(W[r, c] / scale[r])   in [-127, 127]   (int8)
    W'[r, c] = float32(q[r, c]) * scale[r], then cast to the logical dtype.
A row of zeros gets scale 0 and q 0. For nn.Linear (out_features x in_features) a row is
an output channel; for an embedding table a row is a token.
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
