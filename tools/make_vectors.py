"""Regenerate spec/vectors/: tiny .cllm golden files and the tensors a reader must return.

    python tools/make_vectors.py [OUT_DIR]        (default: spec/vectors next to this script)

Deterministic: the inputs come from an integer-only generator (splitmix64) with a fixed seed,
every file is written with zstd level 3 on one thread. Running it twice gives identical bytes
(with the same libzstd). tests/test_golden.py regenerates the vectors into a temporary folder
and requires byte equality with the committed ones, so any change of the writer's output is
caught; the committed vectors themselves are the compatibility contract (see README.md there).

Expected tensors are computed here from the spec's formulas with numpy (not with the reader),
and the int8 values and scales are also checked against codecllm_format.quant.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import msgpack
import numpy as np
import torch
from safetensors.torch import save_file

from codecllm_format import CllmWriter, Encoding
from codecllm_format import constants as C
from codecllm_format.checksums import xxh3_64
from codecllm_format.quant import quantize_int8_groups, quantize_int8_rows
from codecllm_format.writer import build_header

SEED = 20261127
LEVEL = 3
VECTOR_NAMES = ("int8", "raw", "multi", "extensions", "planes", "group")
EXPECTED_OF = {"int8": "int8", "raw": "raw", "multi": "multi", "extensions": "multi", "planes": "planes", "group": "group"}
"""Vector -> stem of its expected-tensors file (extensions.cllm holds multi.cllm's tensors)."""
EXPECTED_KEY = "cllm.expected"
"""The expected .safetensors' single metadata key: JSON {keys, metadata, files (base64)}."""
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "spec" / "vectors"

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# --- deterministic inputs ---------------------------------------------------------------


def splitmix64(seed: int, n: int) -> np.ndarray:
    """n pseudo-random uint64 from splitmix64 (integer arithmetic only: stable everywhere)."""
    with np.errstate(over="ignore"):
        x = (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) + np.uint64(seed)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniform(seed: int, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """float32 in [-amplitude, amplitude): 24-bit integers scaled by a power of two (exact)."""
    n = int(np.prod(shape, dtype=np.int64))
    u = (splitmix64(seed, n) >> np.uint64(40)).astype(np.int64) - (1 << 23)
    return (u.astype(np.float32) * np.float32(amplitude / (1 << 23))).reshape(shape)


def smooth(seed: int, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """Compressible float32 values: a coarse staircase plus a little noise."""
    rows, cols = shape
    base = (np.arange(cols, dtype=np.float32)[None, :] // 16 + np.arange(rows, dtype=np.float32)[:, None] % 5) - 4
    noise = np.round(uniform(seed, shape, 1.0)).astype(np.float32)  # -1, 0 or 1
    return (base + noise) * np.float32(amplitude / 8)


# --- reference formulas of the spec (numpy, independent of codecllm_format) ---------------


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (finite inputs)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    return rounded.astype(np.uint16)


def to_torch(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float32 numpy array -> torch tensor of `dtype`, with round-to-nearest-even casts."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == torch.bfloat16:
        return torch.from_numpy(f32_to_bf16_bits(x).view(np.int16).copy()).view(torch.bfloat16)
    if dtype == torch.float16:
        return torch.from_numpy(x.astype(np.float16))
    if dtype == torch.float64:
        return torch.from_numpy(x.astype(np.float64))
    return torch.from_numpy(x.copy())


def reference_int8_row(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(q int8, scale float32, dequantized tensor in w.dtype) by the spec's formulas."""
    x = w.to(torch.float32).numpy()  # exact for f16/bf16; round-to-nearest-even for f64
    rows = x.shape[0]
    absmax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(rows, np.float32)
    scale = (absmax / np.float32(127)).astype(np.float32)
    divisor = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(x / divisor[:, None]), -127, 127).astype(np.int8)
    deq = (q.astype(np.float32) * scale[:, None]).astype(np.float32)
    return q, scale, to_torch(deq, w.dtype)


def reference_int8_group(w: torch.Tensor, group_size: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(q int8, scale bfloat16 bits uint16 [rows, groups], dequantized tensor in w.dtype) by the
    spec's INT8_GROUP formulas (section 10.4)."""
    x = w.to(torch.float32).numpy()
    rows, cols = x.shape
    n = -(-cols // group_size)
    absmax = np.zeros((rows, n), np.float32)
    for g in range(n):
        absmax[:, g] = np.abs(x[:, g * group_size : (g + 1) * group_size]).max(axis=1)
    bits = f32_to_bf16_bits((absmax / np.float32(127)).astype(np.float32))
    scale = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)  # exact widening
    col_scale = scale[:, np.arange(cols) // group_size] if cols else np.zeros((rows, 0), np.float32)
    divisor = np.where(col_scale > 0, col_scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(x / divisor), -127, 127).astype(np.int8)
    deq = (q.astype(np.float32) * col_scale).astype(np.float32)
    return q, bits, to_torch(deq, w.dtype)


# --- the vectors ----------------------------------------------------------------------------


def _int8_inputs() -> dict[str, torch.Tensor]:
    ties = np.zeros((3, 8), np.float32)
    ties[0] = [127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]  # scale exactly 1: rounding ties
    # row 1 stays zero: scale 0, q 0
    ties[2] = [-3.0, 1e-3, 2.0, -1.0, 0.75, 3e-38, -2.9, 1.0]  # absmax from a negative value
    return {
        "w_f32": torch.from_numpy(uniform(SEED + 1, (8, 16), 2.0)),
        "w_bf16": to_torch(uniform(SEED + 2, (4, 32), 0.5), torch.bfloat16),
        "w_f16": to_torch(uniform(SEED + 3, (5, 12), 8.0), torch.float16),
        "w_f64": torch.from_numpy(uniform(SEED + 4, (2, 5), 1.0).astype(np.float64) / 3),
        "w_ties": torch.from_numpy(ties),
        "w_nocols": torch.zeros((4, 0), dtype=torch.float32),  # no q bytes, 4 scales of 0
    }


def _group_inputs() -> list[tuple[str, torch.Tensor, Encoding, int]]:
    """INT8_GROUP tensors: (name, tensor, encoding, group size)."""
    ties = np.zeros((3, 40), np.float32)
    ties[0, :8] = [127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]  # group 0: scale exactly 1, rounding ties
    ties[0, 16:24] = 1e-3 * np.arange(1, 9, dtype=np.float32)  # group 1: a bfloat16-rounded scale
    # group 2 of row 0 (8 columns, partial) stays zero: scale 0, q 0
    ties[1] = np.linspace(-3, 5, 40, dtype=np.float32)  # absmax from a negative value in group 0
    ties[2, 32:] = [-1e30, 3e29, 0, 1, -1, 2e-38, 5e29, 1e30]  # a large scale in the partial group
    return [
        ("g_f32", torch.from_numpy(uniform(SEED + 50, (32, 168), 2.0)), Encoding.INT8_GROUP, 64),  # 2 q chunks
        ("g_bf16", to_torch(uniform(SEED + 51, (4, 64), 0.5), torch.bfloat16), Encoding.INT8_GROUP, 32),
        ("g_f16", to_torch(uniform(SEED + 52, (5, 20), 8.0), torch.float16), Encoding.INT8_GROUP, 16),
        ("g_f64", torch.from_numpy(uniform(SEED + 53, (2, 17), 1.0).astype(np.float64) / 3), Encoding.INT8_GROUP, 16),
        ("g_ties", torch.from_numpy(ties), Encoding.INT8_GROUP, 16),
        ("g_nocols", torch.zeros((4, 0), dtype=torch.float32), Encoding.INT8_GROUP, 128),  # empty streams
        ("g_row", torch.from_numpy(uniform(SEED + 54, (3, 8), 1.0)), Encoding.INT8_ROW, None),  # mixed with INT8_ROW
    ]


def _raw_inputs() -> dict[str, torch.Tensor]:
    f32 = np.array([1.5, -0.0, np.inf, -np.inf, 1e-45, 3.4028235e38], np.float32)
    f32_nan = np.array([0x7FC00001], np.uint32).view(np.float32)  # a NaN with a payload
    return {
        "bf16": to_torch(uniform(SEED + 10, (3, 5), 4.0), torch.bfloat16),
        "f16": torch.from_numpy(np.array([1.0, -0.0, np.inf, 6e-8, 65504, -2.5, 0.333], np.float16)),
        "f32": torch.from_numpy(np.concatenate([f32, f32_nan])),
        "f32_scalar": torch.tensor(3.25, dtype=torch.float32),
        "f64": torch.from_numpy(uniform(SEED + 11, (2, 2), 1.0).astype(np.float64) / 7),
        "i8": torch.tensor([-128, -1, 0, 1, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 1, 128, 254, 255], dtype=torch.uint8),
        "i16": torch.tensor([-32768, -2, 0, 3, 32767], dtype=torch.int16),
        "i32": torch.tensor([-(2**31), -5, 0, 7, 2**31 - 1], dtype=torch.int32),
        "i64": torch.tensor([-(2**63), -9, 0, 11, 2**63 - 1], dtype=torch.int64),
        "bool": torch.tensor([True, False, False, True, True, False]),
        "empty_f32": torch.zeros((0, 3), dtype=torch.float32),
        "empty_i64": torch.zeros((0,), dtype=torch.int64),
    }


def _bits(values: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `dtype` from raw bit patterns."""
    if dtype == torch.float32:
        return torch.from_numpy(np.array(values, np.uint32).view(np.int32).copy()).view(dtype)
    return torch.from_numpy(np.array(values, np.uint16).view(np.int16).copy()).view(dtype)


def _planes_inputs() -> dict[str, torch.Tensor]:
    """Lossless float_planes tensors: gaussian-like weights over several chunks, and every
    special bit pattern (NaN payloads, both zeros, infinities, subnormals, extremes)."""
    weights = uniform(SEED + 50, (40, 125), 0.25) * uniform(SEED + 51, (40, 125), 1.0)  # peaked at 0
    return {
        "w_bf16": to_torch(weights, torch.bfloat16),
        "bf16_special": _bits([0x7FC1, 0xFF80 | 0x41, 0x7F80, 0xFF80, 0x8000, 0x0000, 0x0001, 0x807F,
                               0x0080, 0x7F7F, 0xFF7F, 0x3F80, 0xBF81], torch.bfloat16),
        "f16_special": _bits([0x7E01, 0xFC00 | 0x155, 0x7C00, 0xFC00, 0x8000, 0x0000, 0x0001, 0x83FF,
                              0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC01], torch.float16).reshape(13, 1),
        "f16": to_torch(uniform(SEED + 52, (3, 7, 11), 3.0), torch.float16),
        "f32_special": _bits([0x7FC00001, 0xFFBFFFFF, 0x7F800000, 0xFF800000, 0x80000000, 0, 1, 0x807FFFFF,
                              0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0xBF800001], torch.float32),
        "f32": torch.from_numpy(uniform(SEED + 53, (6, 50), 100.0)),
        "f32_scalar": torch.tensor(-7.125, dtype=torch.float32),
        "bf16_scalar": torch.tensor(0.5, dtype=torch.bfloat16),
        "empty_bf16": torch.zeros((0, 4), dtype=torch.bfloat16),
        "empty_f16": torch.zeros((3, 0, 2), dtype=torch.float16),
    }


PLANE_LAYOUT = {torch.bfloat16: (16, 7, 1), torch.float16: (16, 10, 2), torch.float32: (32, 23, 3)}
"""dtype -> (width w, mantissa bits M, sign_mantissa bytes k): spec/FORMAT.md section 10.3."""


def reference_planes(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(exponent, sign_mantissa) uint8 planes of a float tensor by the spec's formulas
    (numpy on Python-int bit patterns, independent of codecllm_format.planes)."""
    w, m, k = PLANE_LAYOUT[t.dtype]
    bits = t.contiguous().reshape(-1).view(torch.int32 if w == 32 else torch.int16).numpy()
    bits = [int(b) & ((1 << w) - 1) for b in bits.tolist()]
    exponent = np.array([(b >> m) & (0xFF if w == 32 or m == 7 else 0x1F) for b in bits], np.uint8)
    sm = [(b >> (w - 1)) << m | (b & ((1 << m) - 1)) for b in bits]
    # k byte planes: byte j of every value, plane after plane
    sign_mantissa = np.array([(v >> (8 * j)) & 0xFF for j in range(k) for v in sm], np.uint8)
    return exponent, sign_mantissa


CONFIG_JSON = json.dumps(
    {"architectures": ["TinyTestForCausalLM"], "model_type": "tiny-test", "hidden_size": 96,
     "num_hidden_layers": 2, "vocab_size": 36, "tie_word_embeddings": True},
    indent=2, sort_keys=True,
).encode() + b"\n"
VOCAB_TXT = "".join(f"tok{i}\n" for i in range(36)).encode()


def _multi_layers() -> list[tuple[str, list[tuple[str, torch.Tensor, Encoding]]]]:
    layers = []
    for i in range(2):
        layers.append((f"model.layers.{i}", [
            (f"model.layers.{i}.q_proj.weight",
             to_torch(smooth(SEED + 20 + i, (48, 96), 1.0), torch.bfloat16), Encoding.INT8_ROW),
            (f"model.layers.{i}.norm.weight",
             torch.from_numpy(1 + np.round(uniform(SEED + 30 + i, (2100,), 4.0)) / 64), Encoding.RAW),
        ]))
    empty = [("model.empty", [  # a group without chunks: length 0, the next group starts at its offset
        ("model.empty.norows", torch.zeros((0, 96), dtype=torch.bfloat16), Encoding.INT8_ROW),
    ])]
    return [("model.embed_tokens", [
        ("model.embed_tokens.weight", to_torch(smooth(SEED + 40, (36, 128), 2.0), torch.bfloat16), Encoding.INT8_ROW),
    ])] + layers + empty


def _expected(tensors: dict[str, tuple], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, (t, enc, *gs) in tensors.items():
        if enc == Encoding.INT8_GROUP:
            q, bits, deq = reference_int8_group(t, gs[0])
            q_lib, s_lib = quantize_int8_groups(t, gs[0], torch.bfloat16)
            if not (np.array_equal(q, q_lib.numpy()) and np.array_equal(bits.view(np.int16), s_lib.view(torch.int16).numpy())):
                raise AssertionError(f"{name}: codecllm_format.quant disagrees with the spec's int8_group formula")
            out[name] = deq
            out[name + ".__q"] = torch.from_numpy(q)
            out[name + ".__scale"] = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
        elif enc == Encoding.INT8_ROW:
            q, scale, deq = reference_int8_row(t)
            q_lib, s_lib = quantize_int8_rows(t)
            if not (np.array_equal(q, q_lib.numpy()) and np.array_equal(scale.view(np.uint32), s_lib.numpy().view(np.uint32))):
                raise AssertionError(f"{name}: codecllm_format.quant disagrees with the spec's int8_row formula")
            out[name] = deq
            out[name + ".__q"] = torch.from_numpy(q)
            out[name + ".__scale"] = torch.from_numpy(scale)
        elif enc == Encoding.FLOAT_PLANES:
            exponent, sign_mantissa = reference_planes(t)
            out[name] = t.clone()
            out[name + ".__exponent"] = torch.from_numpy(exponent)
            out[name + ".__sign_mantissa"] = torch.from_numpy(sign_mantissa)
        else:
            out[name] = t.clone()
    for alias, target in aliases.items():
        out[alias] = out[target].clone()
    return out


def _save_expected(path: Path, expected: dict[str, torch.Tensor], keys: list[str], metadata: dict[str, str],
                   files: dict[str, bytes]) -> None:
    # One metadata key only: safetensors writes its metadata map in hash order.
    meta = {EXPECTED_KEY: json.dumps({
        "keys": keys,
        "metadata": metadata,
        "files": {k: base64.b64encode(v).decode() for k, v in files.items()},
    }, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in expected.items()}, str(path), metadata=meta)


def _write(path: Path, groups, *, chunk_size=C.DEFAULT_CHUNK_SIZE, aliases=None, files=None, metadata=None) -> None:
    with CllmWriter(path, chunk_size=chunk_size, level=LEVEL, threads=1, metadata=metadata) as w:
        for gname, members in groups:
            w.begin_group(gname)
            for name, t, enc, *gs in members:
                w.add_tensor(name, t, enc, **({"group_size": gs[0]} if gs and gs[0] is not None else {}))
        for alias, target in (aliases or {}).items():
            w.add_alias(alias, target)
        for fname, data in (files or {}).items():
            w.add_file(fname, data)
        w.finish()


def _vector(out: Path, stem: str, groups, **kw) -> None:
    aliases = kw.get("aliases") or {}
    files = kw.get("files") or {}
    metadata = kw.get("metadata") or {}
    _write(out / f"{stem}.cllm", groups, **kw)
    tensors = {m[0]: tuple(m[1:]) for _, members in groups for m in members}
    keys = list(tensors) + list(aliases)
    _save_expected(out / f"{stem}.safetensors", _expected(tensors, aliases), keys, metadata, files)


def add_extensions(src: Path, dst: Path, minor: int = 7) -> None:
    """Copy a .cllm file, adding 'x-' keys to every index map that allows them and raising the
    minor version: what a future v1.x writer may do that a v1.0 reader must accept."""
    data = src.read_bytes()
    _, _, _, _, index_offset, index_length, *_ = C.HEADER_STRUCT.unpack(data[: C.HEADER_SIZE])
    obj = msgpack.unpackb(data[index_offset : index_offset + index_length], raw=False)
    obj["x-note"] = "extension keys are ignored by readers"
    obj["x-nested"] = {"list": [1, -2, 3.5, None, True], "bin": b"\x00\x01"}
    for t in obj["tensors"]:
        t["x-tensor"] = t["name"].upper()
        for s in t["streams"]:
            s["x-stream"] = 1
    for g in obj["groups"]:
        g["x-group"] = [g["offset"]]
    for f in obj["files"]:
        f["x-file"] = {"mime": "application/json"}
        f["stream"]["x-stream"] = 2
    blob = msgpack.packb(obj, use_bin_type=True)
    file_length = index_offset + len(blob)
    header = build_header(index_offset, len(blob), xxh3_64(blob), file_length, minor=minor)
    dst.write_bytes(header + data[C.HEADER_SIZE : index_offset] + blob)


def make_vectors(out: Path) -> list[Path]:
    """Write every vector (.cllm + .safetensors) into `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    int8 = _int8_inputs()
    _vector(out, "int8", [("model", [(n, t, Encoding.INT8_ROW) for n, t in int8.items()])],
            metadata={"vector": "int8"})
    raw = _raw_inputs()
    _vector(out, "raw", [("model", [(n, t, Encoding.RAW) for n, t in raw.items()])],
            metadata={"vector": "raw"})
    multi_kw = dict(
        chunk_size=C.MIN_CHUNK_SIZE,
        aliases={"lm_head.weight": "model.embed_tokens.weight"},
        files={"config.json": CONFIG_JSON, "tokenizer/vocab.txt": VOCAB_TXT},
        metadata={C.META_CREATED_BY: "tools/make_vectors.py", C.META_SOURCE: "synthetic",
                  C.META_QUANTIZE: "int8", "architecture": "TinyTestForCausalLM", "note": "ünïcödé ✓"},
    )
    _vector(out, "multi", _multi_layers(), **multi_kw)
    add_extensions(out / "multi.cllm", out / "extensions.cllm")
    planes = _planes_inputs()  # format 1.1: float_planes (lossless)
    _vector(out, "planes", [("model", [(n, t, Encoding.FLOAT_PLANES) for n, t in planes.items()])],
            chunk_size=C.MIN_CHUNK_SIZE, metadata={"vector": "planes", C.META_QUANTIZE: "none"})
    _vector(out, "group", [("model", _group_inputs())], chunk_size=C.MIN_CHUNK_SIZE,
            metadata={"vector": "group"})
    return [out / f"{stem}.cllm" for stem in VECTOR_NAMES] + [out / f"{stem}.safetensors" for stem in sorted(set(EXPECTED_OF.values()))]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_OUT
    for p in make_vectors(out):
        print(f"{p}  {p.stat().st_size} bytes  xxh3={xxh3_64(p.read_bytes()):016x}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
