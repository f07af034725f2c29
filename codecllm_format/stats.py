"""Size accounting for cllm-info: per-tensor sizes, ratios, and the order-0 entropy floor.

The floor of the int8 encoding is what an ideal order-0 entropy coder would need:
for each int8_row tensor, H0(values) * numel / 8 + 4 * rows (the float32 scales), plus every
raw tensor at its stored size. For a float_planes tensor the floor is the exponent plane at
its order-0 entropy plus sign and mantissa raw: H0(exponent) * numel / 8 + k * numel (the
bound lossless codecs such as DFloat11 and ZipNN are measured against). `bf16` sizes count
float tensors at 2 bytes per value.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import constants as C
from .reader import CllmFile


def order0_entropy_bits(values: torch.Tensor) -> float:
    """Order-0 (histogram) entropy in bits per value of an int8 tensor."""
    counts = np.bincount(values.reshape(-1).view(torch.uint8).numpy(), minlength=256).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def bf16_size(entry) -> int:
    return entry.numel * (2 if entry.dtype in C.FLOAT_DTYPES else C.DTYPE_SIZE[entry.dtype])


def describe(f: CllmFile, floor: bool = True) -> dict:
    """Everything cllm-info prints, as a JSON-serialisable dict."""
    tensors = []
    total_floor = 0.0
    floor_skipped = None
    if floor and f.gpu_only_codecs:  # the floor decodes every int8 tensor: not on the CPU
        floor, floor_skipped = False, "int8 streams use the GPU-only codec ANS"
    for e in f.index.tensors:
        row = {
            "name": e.name,
            "shape": list(e.shape),
            "dtype": e.dtype.name.lower(),
            "encoding": e.encoding.name.lower(),
            "group": f.index.groups[e.group].name,
            "logical_bytes": e.nbytes,
            "bf16_bytes": bf16_size(e),
            "stored_bytes": e.stored_length,
            "chunks": sum(s.num_chunks for s in e.streams),
        }
        row["ratio_bf16"] = row["stored_bytes"] / row["bf16_bytes"] if row["bf16_bytes"] else None
        if floor:
            if e.encoding in (C.Encoding.INT8_ROW, C.Encoding.INT8_GROUP):
                raw = f.get_raw(e.name)
                h = order0_entropy_bits(raw.data)
                row["entropy_bits"] = h
                row["floor_bytes"] = h * e.numel / 8 + raw.scales.numel() * raw.scales.element_size()
            elif e.encoding == C.Encoding.FLOAT_PLANES:
                exponent, sign_mantissa = f.get_planes(e.name)
                h = order0_entropy_bits(exponent)
                row["entropy_bits"] = h  # of the exponent plane
                row["floor_bytes"] = h * e.numel / 8 + sign_mantissa.numel()
            else:
                row["floor_bytes"] = float(e.stored_length)
            total_floor += row["floor_bytes"]
        tensors.append(row)
    bf16_total = sum(t["bf16_bytes"] for t in tensors)
    logical_total = sum(t["logical_bytes"] for t in tensors)
    stored_total = sum(t["stored_bytes"] for t in tensors)
    enc_counts: dict[str, int] = {}
    for t in tensors:
        enc_counts[t["encoding"]] = enc_counts.get(t["encoding"], 0) + 1
    out = {
        "path": str(f.path),
        "version": f"{f.version[0]}.{f.version[1]}",
        "file_bytes": f.file_size,
        "index_bytes": f.header.index_length,
        "tensor_count": len(tensors),
        "encodings": enc_counts,
        "aliases": dict(f.index.aliases),
        "groups": len(f.index.groups),
        "logical_bytes": logical_total,
        "bf16_bytes": bf16_total,
        "stored_tensor_bytes": stored_total,
        "ratio_bf16": f.file_size / bf16_total if bf16_total else None,
        "ratio_logical": f.file_size / logical_total if logical_total else None,
        "files": {fe.name: fe.stream.length for fe in f.index.files},
        "codecs": sorted({s.codec.name.lower() for _n, _g, s in f.index.iter_streams()}),
        "metadata": f.metadata(),
        "tensors": tensors,
    }
    if floor_skipped:
        out["floor_skipped"] = floor_skipped
    if floor:
        out["floor_bytes"] = total_floor
        out["floor_ratio_bf16"] = total_floor / bf16_total if bf16_total else None
        out["over_floor"] = f.file_size / total_floor - 1 if total_floor else None
    return out


def human(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{int(n)} B"
    units = ["KiB", "MiB", "GiB", "TiB"]
    e = min(int(math.log(n, 1024)), len(units))
    return f"{n / 1024 ** e:.1f} {units[e - 1]}"
