"""Golden vectors (spec/vectors/): the compatibility contract of .cllm v1.

For every committed vector: codecllm_format.open returns exactly (bit for bit) the expected
tensors of its .safetensors companion, the int8 values and scales too, the embedded files and
metadata; verify() finds nothing. A from-scratch reader written only from spec/FORMAT.md
(struct + msgpack + zstandard + xxhash + numpy, no codecllm_format) returns the same bits.
And regenerating the vectors with the current writer (tools/make_vectors.py) gives
byte-identical files, so any change of the writer's output is caught.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import xxhash
import zstandard
from safetensors import safe_open

import codecllm_format
from codecllm_format import Encoding

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
MAKE_VECTORS = ROOT / "tools" / "make_vectors.py"


def _load_make_vectors():
    spec = importlib.util.spec_from_file_location("make_vectors", MAKE_VECTORS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mv = _load_make_vectors()
STEMS = list(mv.VECTOR_NAMES)


def expected_of(stem: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, {keys, metadata, files}) of a vector's expected .safetensors."""
    path = VECTORS / f"{mv.EXPECTED_OF[stem]}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(f.metadata()[mv.EXPECTED_KEY])
    return tensors, info


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.numel():
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def test_vectors_are_committed_and_small():
    for stem in STEMS:
        p = VECTORS / f"{stem}.cllm"
        assert p.is_file(), f"{p} is missing: run python tools/make_vectors.py"
        assert p.stat().st_size < 32 * 1024, f"{p.name} is {p.stat().st_size} bytes: vectors must stay tiny"
    assert (VECTORS / "README.md").is_file()


# --- the reference reader returns the expected bits ---------------------------------------


@pytest.mark.parametrize("stem", STEMS)
def test_reader_returns_expected_bits(stem):
    expected, info = expected_of(stem)
    with codecllm_format.open(VECTORS / f"{stem}.cllm") as f:
        assert f.verify() == []
        assert f.keys() == info["keys"]
        assert f.metadata() == info["metadata"]
        assert {n: f.read_file(n) for n in f.file_names()} == {
            n: base64.b64decode(v) for n, v in info["files"].items()
        }
        seen = set()
        for name in f.keys():
            got = f.get_tensor(name)
            assert same_bits(got, expected[name]), f"{stem}: tensor {name!r} differs from the expected bits"
            seen.add(name)
            entry = f.entry(name)
            if entry.encoding in (Encoding.INT8_ROW, Encoding.INT8_GROUP) and name == entry.name:
                raw = f.get_raw(name)
                assert same_bits(raw.data, expected[name + ".__q"]), f"{stem}: {name!r} int8 values"
                assert same_bits(raw.scales, expected[name + ".__scale"]), f"{stem}: {name!r} scales"
                seen.update({name + ".__q", name + ".__scale"})
            if entry.encoding == Encoding.FLOAT_PLANES and name == entry.name:
                exponent, sign_mantissa = f.get_planes(name)
                assert same_bits(exponent, expected[name + ".__exponent"]), f"{stem}: {name!r} exponent plane"
                assert same_bits(sign_mantissa, expected[name + ".__sign_mantissa"]), f"{stem}: {name!r} sign_mantissa"
                seen.update({name + ".__exponent", name + ".__sign_mantissa"})
        assert seen == set(expected), f"{stem}: expected tensors not checked: {sorted(set(expected) - seen)}"


def test_vectors_cover_the_format():
    """The vectors exercise what they claim to (README.md): dtypes, encodings, chunking, groups."""
    dtypes, encodings, multi_chunk, groups, aliases, files, empty_groups = set(), set(), 0, 0, 0, 0, 0
    for stem in STEMS:
        with codecllm_format.open(VECTORS / f"{stem}.cllm") as f:
            for t in f.index.tensors:
                dtypes.add(t.dtype)
                encodings.add(t.encoding)
                multi_chunk += any(s.num_chunks > 2 for s in t.streams)
            groups = max(groups, len(f.index.groups))
            empty_groups += sum(g.length == 0 for g in f.index.groups)
            aliases += len(f.index.aliases)
            files += len(f.index.files)
    assert dtypes == set(codecllm_format.DType)
    assert encodings == set(Encoding)
    assert multi_chunk and groups >= 4 and aliases and files and empty_groups
    with codecllm_format.open(VECTORS / "extensions.cllm") as f:
        assert f.version[0] == 1 and f.version[1] > codecllm_format.constants.VERSION_MINOR
    blob = (VECTORS / "extensions.cllm").read_bytes()
    index = msgpack.unpackb(blob[struct.unpack_from("<Q", blob, 16)[0]:], raw=False)
    assert any(k.startswith("x-") for k in index) and any(k.startswith("x-") for k in index["tensors"][0])


# --- regeneration is byte-identical --------------------------------------------------------


def test_regenerated_vectors_are_byte_identical(tmp_path):
    written = mv.make_vectors(tmp_path)
    committed = sorted(p.name for p in VECTORS.iterdir() if p.suffix in (".cllm", ".safetensors"))
    assert sorted(p.name for p in written) == committed
    for p in written:
        old = (VECTORS / p.name).read_bytes()
        new = p.read_bytes()
        assert new == old, (
            f"{p.name}: the current writer no longer reproduces the committed vector "
            f"({len(new)} vs {len(old)} bytes; libzstd {zstandard.ZSTD_VERSION}). If the format "
            f"changed on purpose, old files must still read: keep the old vector, add a new one."
        )


# --- an independent reader written from FORMAT.md alone -----------------------------------

DTYPES = {1: np.float32, 2: np.float16, 3: "bf16", 4: np.float64, 5: np.int8, 6: np.uint8, 7: np.int16,
          8: np.int32, 9: np.int64, 10: np.bool_}
SIZES = {1: 4, 2: 2, 3: 2, 4: 8, 5: 1, 6: 1, 7: 2, 8: 4, 9: 8, 10: 1}
TORCH = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float64, 5: torch.int8,
         6: torch.uint8, 7: torch.int16, 8: torch.int32, 9: torch.int64, 10: torch.bool}


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _to_dtype(prod: np.ndarray, dtype: int) -> torch.Tensor:
    """binary32 products -> the logical dtype (section 10.2's convert_to_dtype)."""
    if dtype == 3:
        bits = prod.view(np.uint32).astype(np.uint64)
        bf = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return torch.from_numpy(bf.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(prod.astype(DTYPES[dtype]))


def spec_read(path: Path) -> dict[str, object]:
    """Read a .cllm file following spec/FORMAT.md only. Returns {name: torch tensor,
    name + '.__q' / '.__scale': int8 parts, 'file:' + name: bytes}."""
    data = path.read_bytes()
    magic, major, minor, flags, ioff, ilen, icheck, flen, reserved, hcheck = struct.unpack_from("<8sHHIQQQQQQ", data)
    assert magic == b"CLLM\r\n\x1a\n" and major == 1 and flags == 0 and reserved == 0
    assert xxhash.xxh3_64_intdigest(data[:56]) == hcheck
    assert flen == len(data) == ioff + ilen and ioff % 16 == 0 and ioff >= 4096
    assert xxhash.xxh3_64_intdigest(data[ioff:]) == icheck
    index = msgpack.unpackb(data[ioff:], raw=False)
    drop_ext = lambda m: {k: v for k, v in m.items() if not k.startswith("x-")}  # noqa: E731

    def stream_bytes(s: dict) -> bytes:
        s = drop_ext(s)
        assert set(s) == {"codec", "length", "chunk_size", "chunks"} and s["codec"] == 1
        recs = [struct.unpack_from("<QIIQ", s["chunks"], i) for i in range(0, len(s["chunks"]), 24)]
        assert len(recs) == math.ceil(s["length"] / s["chunk_size"])
        out = bytearray()
        for i, (off, stored, raw, check) in enumerate(recs):
            assert raw == (s["chunk_size"] if i < len(recs) - 1 else s["length"] - i * s["chunk_size"])
            frame = data[off : off + stored]
            assert xxhash.xxh3_64_intdigest(frame) == check
            assert zstandard.frame_content_size(frame) == raw
            d = zstandard.ZstdDecompressor().decompressobj()
            chunk = d.decompress(frame)
            assert d.eof and not d.unused_data and len(chunk) == raw
            out += chunk
        return bytes(out)

    # layout (section 8)
    items = [(t["group"], t["streams"]) for t in index["tensors"]] + [(f["group"], [f["stream"]]) for f in index["files"]]
    gids = [gid for gid, _ in items]
    assert gids == sorted(gids) and all(0 <= g < len(index["groups"]) for g in gids)
    pos = 4096
    for g, grp in enumerate(index["groups"]):
        start = 4096 if g == 0 else _align(pos, 4096)
        assert grp["offset"] == start
        cur = start
        for gid, streams in items:
            if gid != g:
                continue
            for s in streams:
                for i in range(0, len(s["chunks"]), 24):
                    off, stored = struct.unpack_from("<QI", s["chunks"], i)
                    assert off == _align(cur, 16)
                    cur = off + stored
        assert grp["length"] == cur - start
        pos = cur
    assert ioff == _align(pos, 16)
    assert not any(data[64:4096])

    out: dict[str, object] = {}
    for t in index["tensors"]:
        t = drop_ext(t)
        shape, dtype = tuple(t["shape"]), t["dtype"]
        numel = math.prod(shape)
        if t["encoding"] == 1:
            (raw,) = [stream_bytes(s) for s in t["streams"]]
            assert len(raw) == numel * SIZES[dtype]
            arr = np.frombuffer(raw, dtype=np.uint8).copy()
            out[t["name"]] = (torch.from_numpy(arr).view(TORCH[dtype]).reshape(shape) if numel
                              else torch.empty(shape, dtype=TORCH[dtype]))
        elif t["encoding"] == 3:  # FLOAT_PLANES, section 10.3
            assert dtype in (1, 2, 3) and minor >= 1
            w, m, k = {3: (16, 7, 1), 2: (16, 10, 2), 1: (32, 23, 3)}[dtype]
            eb, sb = [stream_bytes(s) for s in t["streams"]]
            assert len(eb) == numel and len(sb) == numel * k
            exponent = np.frombuffer(eb, dtype=np.uint8).astype(np.uint64)
            planes = np.frombuffer(sb, dtype=np.uint8).reshape(k, numel).astype(np.uint64)  # byte j of each sm
            sm = sum(planes[j] << np.uint64(8 * j) for j in range(k)) if numel else np.zeros(0, np.uint64)
            if dtype == 2:
                assert not (exponent > 31).any() and not (sm >> np.uint64(11)).any()
            mask = np.uint64((1 << m) - 1)
            bits = ((sm >> np.uint64(m)) << np.uint64(w - 1)) | (exponent << np.uint64(m)) | (sm & mask)
            u = bits.astype(np.uint32 if w == 32 else np.uint16)
            arr = u.view(np.int32 if w == 32 else np.int16).copy()
            out[t["name"]] = (torch.from_numpy(arr).view(TORCH[dtype]).reshape(shape) if numel
                              else torch.empty(shape, dtype=TORCH[dtype]))
            out[t["name"] + ".__exponent"] = torch.from_numpy(np.frombuffer(eb, dtype=np.uint8).copy())
            out[t["name"] + ".__sign_mantissa"] = torch.from_numpy(np.frombuffer(sb, dtype=np.uint8).copy())
        elif t["encoding"] == 4:  # INT8_GROUP (section 10.4): bfloat16 scales [rows, ceil(cols / G)]
            assert minor >= 1 and len(shape) == 2 and dtype in (1, 2, 3, 4)
            G = t["group_size"]
            assert G in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
            rows, cols = shape
            n = math.ceil(cols / G)
            qb, sb = [stream_bytes(s) for s in t["streams"]]
            assert len(qb) == rows * cols and len(sb) == rows * n * 2
            q = np.frombuffer(qb, dtype=np.int8).reshape(shape)
            sbits = np.frombuffer(sb, dtype="<u2").reshape(rows, n)
            scale32 = (sbits.astype(np.uint32) << 16).view(np.float32)
            assert np.all(np.isfinite(scale32)) and np.all(scale32 >= 0)
            expand = scale32[:, [c // G for c in range(cols)]] if cols else np.zeros(shape, np.float32)
            prod = (q.astype(np.float32) * expand).astype(np.float32)
            out[t["name"]] = _to_dtype(prod, dtype).reshape(shape)
            out[t["name"] + ".__q"] = torch.from_numpy(q.copy())
            out[t["name"] + ".__scale"] = torch.from_numpy(sbits.view(np.int16).copy()).view(torch.bfloat16)
        else:
            assert "group_size" not in t
            assert t["encoding"] == 2 and len(shape) == 2 and dtype in (1, 2, 3, 4)
            qb, sb = [stream_bytes(s) for s in t["streams"]]
            q = np.frombuffer(qb, dtype=np.int8).reshape(shape)
            scale = np.frombuffer(sb, dtype="<f4")
            prod = (q.astype(np.float32) * scale[:, None]).astype(np.float32)
            if dtype == 3:
                bits = prod.view(np.uint32).astype(np.uint64)
                bf = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
                value = torch.from_numpy(bf.view(np.int16).copy()).view(torch.bfloat16)
            else:
                value = torch.from_numpy(prod.astype(DTYPES[dtype]))
            out[t["name"]] = value.reshape(shape)
            out[t["name"] + ".__q"] = torch.from_numpy(q.copy())
            out[t["name"] + ".__scale"] = torch.from_numpy(scale.astype(np.float32))
    for alias, target in index.get("aliases", {}).items():
        out[alias] = out[target]
    for f in index.get("files", []):
        out["file:" + f["name"]] = stream_bytes(f["stream"])
    return out


@pytest.mark.parametrize("stem", STEMS)
def test_spec_only_reader_agrees(stem):
    expected, info = expected_of(stem)
    got = spec_read(VECTORS / f"{stem}.cllm")
    tensors = {k: v for k, v in got.items() if not k.startswith("file:")}
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert same_bits(tensors[name], t), f"{stem}: {name!r} (spec-only reader)"
    files = {k[5:]: v for k, v in got.items() if k.startswith("file:")}
    assert files == {n: base64.b64decode(v) for n, v in info["files"].items()}
