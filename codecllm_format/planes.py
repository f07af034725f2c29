"""FLOAT_PLANES: lossless byte planes of float tensors (spec/FORMAT.md section 10.3).

Pure functions, like quant.py. A float value's bits are split into two planes:

- ``exponent``: the biased exponent field of every value, one byte each (BF16, F32: 8 bits;
  F16: 5 bits, the upper 3 bits of the byte zero). Weights use few exponents (about 2.7 bits
  of order-0 entropy per value for real bf16 checkpoints), so this plane is what compresses.
- ``sign_mantissa``: ``sm = sign << mantissa_bits | mantissa`` of every value, an integer of
  k = 1 (BF16), 2 (F16) or 3 (F32) bytes, stored as k byte planes of numel bytes each: plane j
  holds byte j (bits 8j..8j+7) of every value. The low planes are nearly incompressible; the
  top plane of F16 (sign and 2 mantissa bits) and the mantissa planes of F32 tensors that hold
  less precision than F32 compress.

Moving the sign out of the exponent byte (as ZipNN does) is what makes the exponent plane
compress to its entropy: with the sign in, the high byte of a bf16 value carries a sign bit
that is a coin flip. The round trip is bit-exact for every pattern (NaN payloads, signed
zeros, infinities, subnormals).
"""

from __future__ import annotations

import numpy as np
import torch

from . import constants as C
from .errors import DecodeError

_UINT = {C.DType.BF16: np.dtype("<u2"), C.DType.F16: np.dtype("<u2"), C.DType.F32: np.dtype("<u4")}
_TORCH = {C.DType.BF16: torch.bfloat16, C.DType.F16: torch.float16, C.DType.F32: torch.float32}
_FROM_TORCH = {v: k for k, v in _TORCH.items()}


def plane_dtype(dtype: torch.dtype | C.DType) -> C.DType:
    """The DType of a float dtype FLOAT_PLANES takes.

    Raises:
        ValueError: a dtype other than bfloat16, float16, float32.
    """
    d = _FROM_TORCH.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    if d not in C.FLOAT_PLANES_LAYOUT:
        raise ValueError(f"float_planes takes bfloat16, float16 or float32, not {dtype}")
    return C.DType(d)


def plane_lengths(numel: int, dtype: C.DType) -> tuple[int, int]:
    """Byte lengths of the (exponent, sign_mantissa) streams of `numel` values of `dtype`."""
    return numel, numel * C.FLOAT_PLANES_LAYOUT[C.DType(dtype)][2]


def split_planes(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Split a CPU float tensor into its planes.

    Args:
        t: bfloat16, float16 or float32 tensor, any shape (0-d and empty included).

    Returns:
        (exponent uint8 [numel], sign_mantissa uint8 [k * numel]): k = 1, 2, 3 byte planes.

    Raises:
        ValueError: another dtype.
    """
    d = plane_dtype(t.dtype)
    ebits, mbits, k = C.FLOAT_PLANES_LAYOUT[d]
    ut = _UINT[d]
    width = 8 * ut.itemsize
    u = t.detach().cpu().contiguous().reshape(-1).view(torch.int16 if width == 16 else torch.int32).numpy().view(ut)
    n = u.size
    exponent = np.empty(n, np.uint8)
    np.copyto(exponent, u >> mbits, casting="unsafe")  # keeps the low 8 bits: E bits + (F16) the sign
    if ebits < 8:
        exponent &= (1 << ebits) - 1
    sign_mantissa = np.empty(k * n, np.uint8)
    for j in range(k - 1):  # whole mantissa bytes
        np.copyto(sign_mantissa[j * n : (j + 1) * n], u >> (8 * j) if j else u, casting="unsafe")
    top = sign_mantissa[(k - 1) * n :]  # the last mantissa bits, the sign above them
    rest = mbits - 8 * (k - 1)
    np.copyto(top, u >> (8 * (k - 1)) if k > 1 else u, casting="unsafe")
    top &= (1 << rest) - 1
    sign = np.empty(n, np.uint8)
    np.copyto(sign, u >> (width - 1 - rest), casting="unsafe")
    sign &= 1 << rest
    top |= sign
    return exponent, sign_mantissa


def join_planes(exponent: np.ndarray | bytes | bytearray | memoryview, sign_mantissa, dtype: torch.dtype | C.DType,
                shape: tuple[int, ...] | None = None, where: str = "") -> torch.Tensor:
    """Re-interleave planes into a float tensor (the CPU reference of runtime/planes.py).

    Args:
        exponent: numel bytes; sign_mantissa: k planes of numel bytes (buffers or uint8 arrays).
        dtype: bfloat16, float16 or float32 (torch dtype or DType).
        shape: the output shape (default: flat).
        where: names the tensor in error messages.

    Returns:
        A new CPU tensor of `dtype`.

    Raises:
        DecodeError: plane lengths that do not match, or (F16) an exponent byte above 31 or a
            sign_mantissa value with bits set above bit 10.
        ValueError: an unsupported dtype.
    """
    d = plane_dtype(dtype)
    ebits, mbits, k = C.FLOAT_PLANES_LAYOUT[d]
    e = np.frombuffer(exponent, dtype=np.uint8) if not isinstance(exponent, np.ndarray) else exponent.reshape(-1)
    s = np.frombuffer(sign_mantissa, dtype=np.uint8) if not isinstance(sign_mantissa, np.ndarray) else sign_mantissa.reshape(-1)
    n = e.size
    if s.size != n * k:
        raise DecodeError(f"{where}: sign_mantissa plane is {s.size} bytes, {n} values of {d.name} need {n * k}")
    if shape is not None and int(np.prod(shape, dtype=object)) != n:
        raise DecodeError(f"{where}: {n} exponents for shape {list(shape)}")
    if not n:
        return torch.empty(shape if shape is not None else (0,), dtype=_TORCH[d])
    ut = _UINT[d]
    width = 8 * ut.itemsize
    rest = mbits - 8 * (k - 1)  # mantissa bits in the top plane; the sign is the bit above them
    top = s[(k - 1) * n :]
    if ebits < 8 and int(e.max()) >> ebits:
        i = int(np.argmax(e >> ebits))
        raise DecodeError(f"{where}: exponent byte {int(e[i])} of value {i} has bits set above the {ebits}-bit field")
    if rest < 7 and int(top.max()) >> (rest + 1):
        i = int(np.argmax(top >> (rest + 1)))
        sm = sum(int(s[j * n + i]) << (8 * j) for j in range(k))
        raise DecodeError(f"{where}: sign_mantissa of value {i} ({sm:#x}) has bits set above bit {mbits}")
    out = e.astype(ut)
    out <<= mbits
    for j in range(k - 1):
        w = s[j * n : (j + 1) * n].astype(ut)
        if j:
            w <<= 8 * j
        out |= w
    w = top.astype(ut)
    low = w & ((1 << rest) - 1)
    if k > 1:
        low <<= 8 * (k - 1)
    out |= low
    del low
    w >>= rest
    w <<= width - 1
    out |= w
    t = torch.from_numpy(out.view(np.int16 if width == 16 else np.int32)).view(_TORCH[d])
    return t.reshape(shape) if shape is not None else t


def exponent_entropy_bits(exponent: np.ndarray) -> float:
    """Order-0 (histogram) entropy of an exponent plane, in bits per value."""
    counts = np.bincount(exponent.reshape(-1), minlength=256).astype(np.float64)
    total = counts.sum()
    if not total:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())
