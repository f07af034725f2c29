"""GPU re-interleave of FLOAT_PLANES (spec/FORMAT.md section 10.3): decoded planes -> floats.

After the exponent plane (and the sign_mantissa stream) of a lossless tensor are decompressed on
the GPU (nvCOMP zstd from the file, or ANS transcoded at load), one memory-bound Triton pass
rebuilds the values:

    sm[i]   = sum_j sign_mantissa[j * n + i] << 8j          (k = 1, 2, 3 byte planes)
    bits[i] = (sm[i] >> M) << (w - 1) | exponent[i] << M | (sm[i] & (2^M - 1))

Each program handles BLOCK values: k + 1 coalesced byte loads and one 2- or 4-byte store per
value, no per-chunk state. The CPU reference is codecllm_format.planes.join_planes; CPU
tensors use it directly unless TRITON_INTERPRET=1 (then the kernel runs in Triton's interpreter,
which is how CI checks the kernel's arithmetic against the reference, bit for bit).

Call from the GPU runtime:

    out = interleave_planes(exponent_u8, sign_mantissa_u8, torch.bfloat16, out=slot_view)
"""

from __future__ import annotations

import os

import torch

from .. import constants as C
from ..errors import DecodeError
from ..planes import join_planes, plane_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU path needs no Triton
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
BLOCK = 4096
"""Values per program: 4 KiB of exponents, 8 KiB of bf16 output."""
NUM_WARPS = 8
_INT_VIEW = {16: torch.int16, 32: torch.int32}


if triton is not None:

    @triton.jit
    def _interleave_kernel(exp_ptr, sm_ptr, out_ptr, n, K: tl.constexpr, MBITS: tl.constexpr,
                           WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        e = tl.load(exp_ptr + offs, mask=mask, other=0).to(tl.uint32)
        sm = tl.load(sm_ptr + offs, mask=mask, other=0).to(tl.uint32)
        if K >= 2:
            sm = sm | (tl.load(sm_ptr + n + offs, mask=mask, other=0).to(tl.uint32) << 8)
        if K >= 3:
            sm = sm | (tl.load(sm_ptr + 2 * n + offs, mask=mask, other=0).to(tl.uint32) << 16)
        bits = ((sm >> MBITS) << (WIDTH - 1)) | (e << MBITS) | (sm & ((1 << MBITS) - 1))
        if WIDTH == 16:
            tl.store(out_ptr + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        else:
            tl.store(out_ptr + offs, bits.to(tl.int32, bitcast=True), mask=mask)


def _check_f16(exponent: torch.Tensor, sign_mantissa: torch.Tensor, n: int, where: str) -> None:
    """F16 planes have spare bits that MUST be zero (spec section 10.3): one reduction each."""
    if n and bool((exponent > 31).any()):
        raise DecodeError(f"{where}: an F16 exponent byte is above 31")
    if n and bool((sign_mantissa[n:] > 7).any()):
        raise DecodeError(f"{where}: an F16 sign_mantissa value has bits set above bit 10")


def interleave_planes(exponent: torch.Tensor, sign_mantissa: torch.Tensor, dtype: torch.dtype,
                      out: torch.Tensor | None = None, *, validate: bool = True, where: str = "planes") -> torch.Tensor:
    """Rebuild float values from their decoded planes, bit-exact, in one pass.

    Args:
        exponent: uint8 [n], contiguous, on the device (CUDA; or CPU, see the module doc).
        sign_mantissa: uint8 [k * n] (k = 1 bf16, 2 f16, 3 f32), contiguous, same device.
        dtype: torch.bfloat16, torch.float16 or torch.float32.
        out: optional contiguous tensor of `dtype` with n elements (any shape) to write into.
        validate: F16 only: check the spare bits are zero (two reductions and a host sync);
            pass False for planes that already passed this check (e.g. verified at load).
        where: names the tensor in error messages.

    Returns:
        `out`, or a new flat tensor of `dtype` [n].

    Raises:
        ValueError: wrong dtypes, sizes, devices or a non-contiguous tensor.
        DecodeError: (validate, F16) planes with spare bits set.
    """
    d = plane_dtype(dtype)
    _e_bits, mbits, k = C.FLOAT_PLANES_LAYOUT[d]
    width = 8 * C.DTYPE_SIZE[d]
    if exponent.dtype != torch.uint8 or sign_mantissa.dtype != torch.uint8:
        raise ValueError(f"{where}: planes must be uint8, got {exponent.dtype} and {sign_mantissa.dtype}")
    if exponent.device != sign_mantissa.device:
        raise ValueError(f"{where}: planes on {exponent.device} and {sign_mantissa.device}")
    if not (exponent.is_contiguous() and sign_mantissa.is_contiguous()):
        raise ValueError(f"{where}: planes must be contiguous")
    n = exponent.numel()
    if sign_mantissa.numel() != k * n:
        raise ValueError(f"{where}: sign_mantissa has {sign_mantissa.numel()} bytes, {n} values of {d.name} need {k * n}")
    if out is None:
        out = torch.empty(n, dtype=dtype, device=exponent.device)
    elif out.dtype != dtype or out.numel() != n or not out.is_contiguous() or out.device != exponent.device:
        raise ValueError(f"{where}: out must be a contiguous {dtype} tensor of {n} elements on {exponent.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if validate and d == C.DType.F16:
        _check_f16(exponent.reshape(-1), sign_mantissa.reshape(-1), n, where)
    if not n:
        return out
    if exponent.device.type == "cpu" and not INTERPRET:
        out.view(-1).copy_(join_planes(exponent.numpy(), sign_mantissa.numpy(), d, where=where))
        return out
    if triton is None:
        raise ValueError(f"{where}: decoding planes on {exponent.device} needs Triton")
    grid = (triton.cdiv(n, BLOCK),)
    _interleave_kernel[grid](exponent, sign_mantissa, out.view(_INT_VIEW[width]), n,
                             K=k, MBITS=mbits, WIDTH=width, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
