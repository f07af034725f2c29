"""Mutation fuzzing of the .cllm reader: seed files, mutators, the property, a campaign runner.

The property, checked on every mutant of a few small valid files (tests/test_fuzz.py runs it
under hypothesis; this script runs long campaigns):

    opening the file, get_tensor() of every key, read_file() of every embedded file and
    verify() either raise a CllmError subclass (never another exception, never a crash or a
    hang), or succeed; and a success is explained:
      - its output equals what an independent decoder written here from spec/FORMAT.md (msgpack
        + zstandard + numpy, no codecllm_format code) makes of the same bytes, and verify()
        reports a problem exactly when some padding byte is not zero;
      - if only raw byte mutations were applied (no checksum recomputed), the output is also
        identical to the seed's, and verify() is clean only when the bytes are the seed's.
    Every case also runs within 1 s and allocates at most 4 x file size + 64 MiB (one known
    exception, out of these mutators' reach: deeply nested msgpack, see SECURITY.md).

Mutators come in two families. Raw mutations (bit flips, byte overwrites, truncations,
splices of two files, insertions, deletions) fix nothing, so the header and index checksums
stop them early. Fixed mutations recompute every checksum they break so that the change
reaches deep validation: header fields, index fields re-encoded as valid msgpack (shapes,
dtypes, encodings, offsets, chunk records, groups, names, alias targets, metadata types, x-
extensions, unknown keys), raw edits of the msgpack bytes, edits inside zstd frames, and
replacement frames re-laid-out (other levels, trailing bytes, no content size, truncated,
dictionary frames, RLE bombs). Such a mutant may be a different valid file; the independent
decoder is then the oracle.

Memory is bounded with RLIMIT_AS (address space), set before each case to the process's
current size + 4 x file size + 64 MiB: it covers every allocator at once (Python, numpy,
torch's CPU allocator, libzstd), counts reservations even before they are touched, and an
allocation over it fails (MemoryError / torch RuntimeError), which the property reports.
The reader runs with threads=1 and torch with one thread, so no thread stack or malloc arena
appears mid-case. The test adds tracemalloc's peak for Python allocations.

Usage:
    python tools/fuzz.py --executions 1000000 --seed 1 --workers 2 --corpus fuzz-crashers
    python tools/fuzz.py --replay 1:12345          # re-run one case of a campaign, verbosely
    python tools/fuzz.py --atheris                 # coverage-guided (if atheris is installed)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import msgpack
import numpy as np
import torch
import xxhash
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import hostile_builder as hb  # noqa: E402

import codecllm_format as cf  # noqa: E402
from codecllm_format import constants as C  # noqa: E402
from codecllm_format.errors import CllmError  # noqa: E402
from codecllm_format.reader import CllmFile  # noqa: E402

MiB = 1 << 20
TIME_LIMIT_S = 1.0
HANG_LIMIT_S = 20.0


def memory_bound(file_size: int) -> int:
    """Most bytes one case may allocate: 4 x file size + 64 MiB."""
    return 4 * file_size + 64 * MiB


# --- seed files -------------------------------------------------------------------------------


def _seed_small(path: Path) -> None:
    """The small model of tests/conftest.py: int8 (2 chunks), raw (3 chunks), bool, int64, f16,
    an alias, an embedded file, metadata."""
    g = torch.Generator().manual_seed(0)
    with cf.CllmWriter(path, chunk_size=4096, metadata={"source": "fuzz", "k": "v"}) as w:
        w.begin_group("embed")
        w.add_tensor("embed.weight", torch.randn(40, 64, generator=g), cf.Encoding.INT8_ROW)
        w.begin_group("model.layers.0")
        w.add_tensor("model.layers.0.attn.weight", torch.randn(64, 96, generator=g), cf.Encoding.INT8_ROW)
        w.add_tensor("model.layers.0.attn.bias", torch.randn(3000, generator=g), cf.Encoding.RAW)
        w.add_tensor("model.layers.0.mask", torch.arange(10) % 3 == 0, cf.Encoding.RAW)
        w.add_tensor("model.layers.0.idx", torch.arange(7, dtype=torch.int64) * -5, cf.Encoding.RAW)
        w.begin_group("model.layers.1")
        w.add_tensor("model.layers.1.norm.weight", torch.randn(64, generator=g).half(), cf.Encoding.RAW)
        w.add_alias("lm_head.weight", "embed.weight")
        w.add_file("config.json", b'{"model_type": "test"}')
        w.finish()


def _seed_tiny(path: Path) -> None:
    """Two groups, bf16 int8_row, an alias, two embedded files (one of two chunks)."""
    g = torch.Generator().manual_seed(3)
    with cf.CllmWriter(path, chunk_size=4096, metadata={"quantize": "int8"}) as w:
        w.begin_group("a")
        w.add_tensor("a.w", torch.randn(6, 8, generator=g).bfloat16(), cf.Encoding.INT8_ROW)
        w.add_tensor("a.b", torch.randn(5, generator=g).half(), cf.Encoding.RAW)
        w.begin_group("b")
        w.add_tensor("b.i", torch.arange(4, dtype=torch.int32), cf.Encoding.RAW)
        w.add_tensor("b.u", torch.arange(9, dtype=torch.uint8), cf.Encoding.RAW)
        w.add_alias("c", "a.w")
        w.add_file("config.json", b"{}")
        w.add_file("tokenizer.json", bytes(range(256)) * 20)
        w.finish()


def _seed_raw(path: Path) -> None:
    """Raw only, no files, no aliases: every dtype, an empty tensor, a 0-d tensor, a 3-D one,
    an f64 int8_row of 3 value chunks."""
    g = torch.Generator().manual_seed(5)
    with cf.CllmWriter(path, chunk_size=4096) as w:
        w.begin_group("g0")
        w.add_tensor("f32", torch.randn(2, 3, 4, generator=g), cf.Encoding.RAW)
        w.add_tensor("bf16", torch.randn(17, generator=g).bfloat16(), cf.Encoding.RAW)
        w.add_tensor("f64", torch.randn(3, generator=g).double(), cf.Encoding.RAW)
        w.add_tensor("i8", torch.arange(-5, 5, dtype=torch.int8), cf.Encoding.RAW)
        w.add_tensor("i16", torch.arange(6, dtype=torch.int16) * 1000, cf.Encoding.RAW)
        w.add_tensor("empty", torch.zeros(0, 5), cf.Encoding.RAW)
        w.add_tensor("scalar", torch.tensor(2.5), cf.Encoding.RAW)
        w.begin_group("g1")
        w.add_tensor("w64", torch.randn(96, 128, generator=g).double(), cf.Encoding.INT8_ROW)
        w.finish()


def _seed_planes(path: Path) -> None:
    """Format 1.1: float_planes bf16 (both planes in 2 chunks), f16 (2 byte planes), f32 (3),
    a 0-d and an empty one, beside an int8_row and a raw tensor."""
    g = torch.Generator().manual_seed(7)
    with cf.CllmWriter(path, chunk_size=4096) as w:
        w.begin_group("p")
        w.add_tensor("p.bf16", (torch.randn(50, 100, generator=g) * 0.02).bfloat16(), cf.Encoding.FLOAT_PLANES)
        w.add_tensor("p.f16", torch.randn(3, 7, generator=g).half(), cf.Encoding.FLOAT_PLANES)
        w.add_tensor("p.f32", torch.randn(33, generator=g), cf.Encoding.FLOAT_PLANES)
        w.add_tensor("p.scalar", torch.tensor(-0.0).bfloat16(), cf.Encoding.FLOAT_PLANES)
        w.add_tensor("p.empty", torch.zeros(2, 0).half(), cf.Encoding.FLOAT_PLANES)
        w.begin_group("q")
        w.add_tensor("q.w", torch.randn(8, 16, generator=g), cf.Encoding.INT8_ROW)
        w.add_tensor("q.b", torch.randn(8, generator=g), cf.Encoding.RAW)
        w.finish()


SEED_BUILDERS: dict[str, Callable[[Path], None]] = {"small": _seed_small, "tiny": _seed_tiny, "raw": _seed_raw,
                                                     "planes": _seed_planes}


def build_seeds(folder: Path | None = None) -> list[bytes]:
    """The seed files' bytes (deterministic: the writer gives the same bytes for the same calls)."""
    with tempfile.TemporaryDirectory(prefix="cllm-fuzz-seeds-") as tmp:
        out = []
        for name, build in SEED_BUILDERS.items():
            p = Path(tmp) / f"{name}.cllm"
            build(p)
            out.append(p.read_bytes())
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / p.name).write_bytes(out[-1])
    return out


# --- choices: random for campaigns, hypothesis draws in the test ----------------------------------


class RandomChooser:
    """The source of every choice a mutator makes (tests/test_fuzz.py has a hypothesis one)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.rng.randrange(len(seq))]

    def binary(self, n: int) -> bytes:
        return self.rng.randbytes(n)


# --- raw mutations (nothing is fixed) ------------------------------------------------------------


def _pos(ch, blob: bytes, end_inclusive: bool = False) -> int:
    """A position in the blob, biased towards the header and the index, where the bytes matter."""
    n = len(blob) + (1 if end_inclusive else 0)
    if n <= 1:
        return 0
    region = ch.integer(0, 3)
    if region == 0 and n > C.HEADER_SIZE:
        return ch.integer(0, C.HEADER_SIZE - 1)
    if region == 1 and len(blob) >= C.HEADER_SIZE:
        ioff = min(struct.unpack_from("<Q", blob, 16)[0], n - 1)
        return ch.integer(ioff, n - 1)
    return ch.integer(0, n - 1)


def m_bit_flip(blob: bytes, seeds, ch) -> bytes:
    if not blob:
        return blob
    b = bytearray(blob)
    for _ in range(ch.integer(1, 4)):
        p = _pos(ch, blob)
        b[p] ^= 1 << ch.integer(0, 7)
    return bytes(b)


INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC1, 0xDD, 0xDF, 0xC4, 0xD9)


def m_overwrite(blob: bytes, seeds, ch) -> bytes:
    if not blob:
        return blob
    p = _pos(ch, blob)
    n = min(ch.integer(1, 8), len(blob) - p)
    data = bytes(ch.choice(INTERESTING_BYTES) for _ in range(n)) if ch.integer(0, 1) else ch.binary(n)
    return blob[:p] + data + blob[p + n :]


def m_truncate(blob: bytes, seeds, ch) -> bytes:
    return blob[: _pos(ch, blob)]


def m_splice(blob: bytes, seeds, ch) -> bytes:
    other = ch.choice(seeds)
    a = ch.integer(0, len(blob))
    b = ch.integer(0, len(other)) if ch.integer(0, 1) else min(a, len(other))
    return blob[:a] + other[b:]


def m_insert(blob: bytes, seeds, ch) -> bytes:
    p = _pos(ch, blob, end_inclusive=True)
    n = ch.choice((1, 2, 7, 8, 16, 100))
    data = b"\0" * n if ch.integer(0, 1) else ch.binary(n)
    return blob[:p] + data + blob[p:]


def m_delete(blob: bytes, seeds, ch) -> bytes:
    p = _pos(ch, blob)
    return blob[:p] + blob[p + ch.choice((1, 2, 8, 16, 100)) :]


# --- fixed mutations: checksums recomputed so the change reaches deep validation -------------------


def _sane(blob: bytes) -> bool:
    """The blob still has a readable header whose index range lies in the blob."""
    if len(blob) < C.HEADER_SIZE or blob[:8] != C.MAGIC:
        return False
    h = hb.read_header(blob)
    return C.HEADER_SIZE <= h["index_offset"] <= len(blob) and h["index_offset"] + h["index_length"] == len(blob)


def _index(blob: bytes) -> dict | None:
    if not _sane(blob):
        return None
    try:
        obj = msgpack.unpackb(hb.split(blob)[1], raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - an earlier mutation broke it: nothing to edit
        return None
    return obj if isinstance(obj, dict) else None


def _with_index(blob: bytes, obj: Any) -> bytes:
    try:
        packed = hb.pack_index(obj)
    except (OverflowError, TypeError, ValueError):
        return blob
    return hb.with_index_bytes(blob, packed)


HEADER_VALUES = (0, 1, 2, 15, 16, 64, 4095, 4096, 4097, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1)


def m_header_field(blob: bytes, seeds, ch) -> bytes:
    """One header field changed, header checksum recomputed; sometimes the file resized to the
    new file_length."""
    if len(blob) < C.HEADER_SIZE or blob[:8] != C.MAGIC:
        return blob
    fields = hb.read_header(blob)
    name = ch.choice(("major", "minor", "flags", "index_offset", "index_length", "index_checksum",
                      "file_length", "reserved"))
    bits = {"major": 16, "minor": 16, "flags": 32}.get(name, 64)
    v = fields[name]
    op = ch.integer(0, 3)
    if op == 0:
        v = ch.choice(HEADER_VALUES)
    elif op == 1:
        v = v + ch.choice((-4096, -16, -8, -1, 1, 8, 16, 4096))
    elif op == 2:
        v = v ^ (1 << ch.integer(0, bits - 1))
    else:
        v = ch.integer(0, (1 << bits) - 1)
    fields[name] = v % (1 << bits)
    out = hb.pack_header(fields) + blob[C.HEADER_SIZE :]
    if name == "file_length" and ch.integer(0, 1) and fields["file_length"] < 4 * len(blob) + 4096:
        n = fields["file_length"]
        out = out[:n] + b"\0" * max(0, n - len(out))
    return out


INTS = (0, 1, 2, 3, 15, 16, 17, 24, 255, 256, 4095, 4096, 4097, 65535, 65536, 2**24, 2**31 - 1, 2**31,
        2**32 - 1, 2**32, 2**48 - 1, 2**48, 2**62, 2**62 + 1, 2**63 - 1, 2**63, 2**64 - 1, -1, -2**63)
JUNK = (None, True, False, 1.5, float("nan"), "x", b"x", b"", [], {}, [1, 2], {"a": 1}, 0, -1, 2**64 - 1)
STRINGS = ("", "x", "__files__", "../up", "/abs", "a/../b", "x-ext", "é" * 600, "a" * 1025, "a" * 1024,
           "config.json", "embed.weight", "\x00")


def _walk(obj: Any, path: tuple = ()):
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, path + (i,))


def _strings(obj: Any) -> list[str]:
    return [v for _, v in _walk(obj) if isinstance(v, str)] + [k for _, v in _walk(obj) if isinstance(v, dict) for k in v]


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _mutate_int(v: int, ch) -> Any:
    op = ch.integer(0, 4)
    if op == 0:
        return ch.choice(INTS)
    if op == 1:
        return v + ch.choice((-4096, -24, -16, -1, 1, 16, 24, 4096))
    if op == 2:
        return v * ch.choice((2, 3, 1024)) if ch.integer(0, 1) else v // ch.choice((2, 3, 16))
    if op == 3:
        return v ^ (1 << ch.integer(0, 63))
    return ch.choice(JUNK)


RECORD_FIELDS = (("offset", 8, 0), ("stored", 4, 8), ("raw", 4, 12), ("checksum", 8, 16))


def _mutate_records(raw: bytes, ch) -> bytes:
    n = len(raw) // 24
    op = ch.integer(0, 7)
    if op <= 2 and n:  # one field of one record
        i = ch.integer(0, n - 1)
        _name, width, at = ch.choice(RECORD_FIELDS)
        pos = i * 24 + at
        old = int.from_bytes(raw[pos : pos + width], "little")
        new = _mutate_int(old, ch)
        if not isinstance(new, int):
            new = 0
        new %= 1 << (8 * width)
        return raw[:pos] + new.to_bytes(width, "little") + raw[pos + width :]
    if op == 3:
        return raw[: -ch.integer(1, 23)] if raw else b"\0" * ch.integer(1, 23)
    if op == 4 and n:  # duplicate a record
        i = ch.integer(0, n - 1)
        return raw[: (i + 1) * 24] + raw[i * 24 : (i + 1) * 24] + raw[(i + 1) * 24 :]
    if op == 5 and n:  # drop a record
        i = ch.integer(0, n - 1)
        return raw[: i * 24] + raw[(i + 1) * 24 :]
    if op == 6 and n >= 2:  # swap two records
        i, j = ch.integer(0, n - 1), ch.integer(0, n - 1)
        recs = [raw[k * 24 : (k + 1) * 24] for k in range(n)]
        recs[i], recs[j] = recs[j], recs[i]
        return b"".join(recs)
    return b""


def _mutate_value(v: Any, ch, obj: dict) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, float):
        return ch.choice(JUNK)
    if isinstance(v, int):
        return _mutate_int(v, ch)
    if isinstance(v, bytes):
        return _mutate_records(v, ch) if ch.integer(0, 3) else ch.choice(JUNK)
    if isinstance(v, str):
        op = ch.integer(0, 3)
        if op == 0:
            return ch.choice(STRINGS)
        if op == 1:
            return ch.choice(_strings(obj) or ["x"])
        if op == 2:
            return v + ch.choice(("x", "/..", "\x00", "é"))
        return ch.choice(JUNK)
    if isinstance(v, list):
        op = ch.integer(0, 5)
        v = list(v)
        if op == 0 and v:
            v.pop(ch.integer(0, len(v) - 1))
        elif op == 1 and v:
            i = ch.integer(0, len(v) - 1)
            v.insert(ch.integer(0, len(v)), v[i])
        elif op == 2 and len(v) >= 2:
            i, j = ch.integer(0, len(v) - 1), ch.integer(0, len(v) - 1)
            v[i], v[j] = v[j], v[i]
        elif op == 3:
            v.insert(ch.integer(0, len(v)), ch.choice(JUNK))
        elif op == 4:
            v.reverse()
        else:
            v = ch.choice(JUNK)
        return v
    if isinstance(v, dict):
        op = ch.integer(0, 4)
        v = dict(v)
        if op == 0 and v:
            v.pop(ch.choice(list(v)))
        elif op == 1:
            v["x-" + ch.choice(("ext", "a", "tensors"))] = ch.choice(JUNK)
        elif op == 2:
            v[ch.choice(("unknown", "name", "shape", "group", "stream", "aliases", "files", "metadata"))] = ch.choice(JUNK)
        elif op == 3 and v:
            k = ch.choice(list(v))
            v[ch.choice(STRINGS[:7]) or "k"] = v.pop(k)
        else:
            v = ch.choice(JUNK)
        return v
    return ch.choice(JUNK)


def m_index_field(blob: bytes, seeds, ch) -> bytes:
    """Any node of the index tree changed (value, type, list or map structure), re-encoded as
    valid msgpack, header fixed."""
    obj = _index(blob)
    if obj is None:
        return blob
    nodes = list(_walk(obj))
    path, value = ch.choice(nodes)
    new = _mutate_value(value, ch, obj)
    if not path:
        return _with_index(blob, new)
    _get(obj, path[:-1])[path[-1]] = new
    return _with_index(blob, obj)


SAME_SIZE_DTYPES = ((1, 8), (2, 3, 7), (4, 9), (5, 6, 10))


def _tensors(obj: dict) -> list[dict]:
    ts = obj.get("tensors")
    return [t for t in ts if isinstance(t, dict)] if isinstance(ts, list) else []


def _streams(obj: dict) -> list[dict]:
    out = []
    for t in _tensors(obj):
        out += [s for s in t.get("streams", []) if isinstance(s, dict)] if isinstance(t.get("streams"), list) else []
    files = obj.get("files")
    if isinstance(files, list):
        out += [f["stream"] for f in files if isinstance(f, dict) and isinstance(f.get("stream"), dict)]
    return out


def m_index_semantic(blob: bytes, seeds, ch) -> bytes:
    """A targeted edit that keeps the index well-typed: reshape (same numel), same-size dtype
    swap, encoding toggle, group moves, tensor order, alias retargets, file moves, group
    offsets/lengths, chunk sizes, consistent size inflation, whole-stream offset shifts."""
    obj = _index(blob)
    if obj is None:
        return blob
    ts = _tensors(obj)
    groups = obj.get("groups") if isinstance(obj.get("groups"), list) else []
    op = ch.integer(0, 13)
    if op == 0 and ts:  # reshape, same numel
        t = ch.choice(ts)
        shape = t.get("shape")
        if isinstance(shape, list) and all(type(d) is int for d in shape):
            n = math.prod(shape)
            if n == 0:  # an empty tensor may take any dims beside its zero one
                big = ch.choice((2**16, 2**31, 2**40, 2**47, 2**48 - 1))
                t["shape"] = ch.choice(([0, big], [big, 0], [0, big, big], [big, big, 0], [0] + [big] * 7, shape + [big]))
            else:
                t["shape"] = ch.choice(([n], [1, n], [n, 1], list(reversed(shape)), shape + [1], [1] + shape, []))
    elif op == 1 and ts:
        t = ch.choice(ts)
        for fam in SAME_SIZE_DTYPES:
            if t.get("dtype") in fam:
                t["dtype"] = ch.choice(fam)
    elif op == 2 and ts:
        t = ch.choice(ts)
        t["encoding"] = 3 - t["encoding"] if t.get("encoding") in (1, 2) else 1
    elif op == 3 and ts:
        t = ch.choice(ts)
        if type(t.get("group")) is int:
            t["group"] += ch.choice((-1, 1, len(groups) - 1 - t["group"]))
    elif op == 4 and len(ts) >= 2:
        i, j = ch.integer(0, len(ts) - 1), ch.integer(0, len(ts) - 1)
        obj["tensors"][i], obj["tensors"][j] = obj["tensors"][j], obj["tensors"][i]
    elif op == 5 and ts:
        aliases = obj.setdefault("aliases", {})
        if isinstance(aliases, dict):
            names = [t.get("name") for t in ts] + list(aliases)
            aliases[ch.choice(names + ["new.alias"])] = ch.choice(names + ["missing"])
    elif op == 6:
        files = obj.get("files")
        if isinstance(files, list) and files and all(isinstance(f, dict) for f in files):
            f = ch.choice(files)
            k = ch.integer(0, 2)
            if k == 0:
                f["group"] = ch.integer(0, max(0, len(groups) - 1))
            elif k == 1:
                f["name"] = ch.choice(STRINGS)
            else:
                files.reverse()
    elif op == 7 and groups:
        g = ch.choice(groups)
        if isinstance(g, dict):
            key = ch.choice(("offset", "length", "name"))
            if key == "name":
                g["name"] = ch.choice(["__files__"] + [x.get("name") for x in groups if isinstance(x, dict)])
            elif type(g.get(key)) is int:
                g[key] += ch.choice((-4096, -16, 16, 4096))
    elif op == 8:  # add an empty group, at the end (valid) or elsewhere
        pos = ch.integer(0, len(groups))
        last = groups[-1] if groups and isinstance(groups[-1], dict) else {"offset": 4096, "length": 0}
        off = hb.align_up(last.get("offset", 0) + last.get("length", 0), C.GROUP_ALIGNMENT) if pos == len(groups) else 4096
        groups.insert(pos, {"name": f"g{pos}-new", "offset": off, "length": 0})
    elif op == 9 and groups and len(groups) >= 2:
        groups.pop(ch.integer(0, len(groups) - 1))
    elif op == 10:  # chunk_size / length edits
        ss = _streams(obj)
        if ss:
            s = ch.choice(ss)
            key = ch.choice(("chunk_size", "length"))
            if type(s.get(key)) is int:
                s[key] = ch.choice((C.MIN_CHUNK_SIZE, C.MAX_CHUNK_SIZE, s[key] + 1, s[key] - 1, s[key] * 2))
    elif op == 11 and ts:  # consistent inflation: shape, length, chunk_size and raw sizes agree
        t = ch.choice(ts)
        ss = t.get("streams")
        if t.get("encoding") == 1 and isinstance(ss, list) and ss and isinstance(ss[0], dict) and t.get("dtype") in C.DTYPE_SIZE.keys():
            s = ss[0]
            recs = hb.records(s) if isinstance(s.get("chunks"), bytes) and len(s["chunks"]) % 24 == 0 else []
            if recs:
                size = C.DTYPE_SIZE[C.DType(t["dtype"])]
                factor = ch.choice((2, 17, 1000, 30000))
                cs = C.MAX_CHUNK_SIZE
                per_chunk = min(cs, recs[0][1] * ch.choice((1, C.MAX_ZSTD_EXPANSION)))
                numel = max(1, per_chunk * len(recs) // size // factor * factor // 1)
                length = numel * size
                n = -(-length // cs)
                if n == len(recs):
                    t["shape"] = [numel]
                    s.update(length=length, chunk_size=cs)
                    for i, r in enumerate(recs):
                        r[2] = cs if i < n - 1 else length - (n - 1) * cs
                    hb.set_records(s, recs)
    elif op == 12:  # shift a whole stream, or one chunk, by 16 bytes
        ss = [s for s in _streams(obj) if isinstance(s.get("chunks"), bytes) and s["chunks"] and len(s["chunks"]) % 24 == 0]
        if ss:
            s = ch.choice(ss)
            recs = hb.records(s)
            d = ch.choice((-16, 16))
            one = ch.integer(0, len(recs) - 1) if ch.integer(0, 1) else None
            for i, r in enumerate(recs):
                if one is None or i == one:
                    r[0] = max(0, r[0] + d)
            hb.set_records(s, recs)
    else:  # metadata values and keys
        meta = obj.setdefault("metadata", {})
        if isinstance(meta, dict):
            meta[ch.choice(list(meta) + ["", "new", "x-" + "k"])] = ch.choice(JUNK + ("value",))
    return _with_index(blob, obj)


def m_index_bytes(blob: bytes, seeds, ch) -> bytes:
    """Raw edits of the msgpack bytes of the index (bad types, truncated containers, invalid
    UTF-8, ext types...), with the index checksum and lengths fixed."""
    if not _sane(blob):
        return blob
    data, index = hb.split(blob)
    if not index:
        return blob
    b = bytearray(index)
    op = ch.integer(0, 3)
    p = ch.integer(0, len(b) - 1)
    if op == 0:
        b[p] ^= 1 << ch.integer(0, 7)
    elif op == 1:
        b[p] = ch.choice(INTERESTING_BYTES + (0xC7, 0xD4, 0x92, 0x81, 0xCF, 0xD3))
    elif op == 2:
        b[p:p] = ch.binary(ch.integer(1, 9))
    else:
        del b[p : p + ch.integer(1, 9)]
    return hb.assemble(data, bytes(b))


def _chunk_refs(obj: dict) -> list[tuple[dict, int]]:
    """(stream map, record index) of every chunk whose record parses."""
    refs = []
    for s in _streams(obj):
        raw = s.get("chunks")
        if isinstance(raw, bytes) and len(raw) % 24 == 0:
            refs += [(s, i) for i in range(len(raw) // 24)]
    return refs


def m_chunk_bytes(blob: bytes, seeds, ch) -> bytes:
    """Bytes inside one zstd frame changed and that chunk's checksum recomputed: the corrupt
    frame reaches the decoder."""
    obj = _index(blob)
    if obj is None:
        return blob
    refs = _chunk_refs(obj)
    if not refs:
        return blob
    s, i = ch.choice(refs)
    recs = hb.records(s)
    off, stored, _raw, _ck = recs[i]
    if not (C.HEADER_SIZE <= off and off + stored <= hb.read_header(blob)["index_offset"]) or not stored:
        return blob
    frame = bytearray(blob[off : off + stored])
    for _ in range(ch.integer(1, 3)):
        p = ch.integer(0, min(len(frame) - 1, 24)) if ch.integer(0, 1) else ch.integer(0, len(frame) - 1)
        if ch.integer(0, 1):
            frame[p] ^= 1 << ch.integer(0, 7)
        else:
            frame[p] = ch.choice(INTERESTING_BYTES)
    recs[i][3] = xxhash.xxh3_64_intdigest(bytes(frame))
    hb.set_records(s, recs)
    out = blob[:off] + bytes(frame) + blob[off + stored :]
    return _with_index(out, obj)


def _layout_keys(obj: dict) -> list[tuple[str, int, int, int, int]]:
    """(item name, stream index, chunk index, offset, stored) of every chunk, as relayout names them."""
    keys, seen = [], {}
    for name, _item, stream in hb.layout_items(obj):
        sidx = seen.get(name, 0)
        seen[name] = sidx + 1
        for ci, (off, stored, _raw, _ck) in enumerate(hb.records(stream)):
            keys.append((name, sidx, ci, off, stored))
    return keys


_CCTX = {}


def _zstd(data: bytes, **kw) -> bytes:
    key = tuple(sorted(kw.items()))
    if key not in _CCTX:
        _CCTX[key] = zstandard.ZstdCompressor(**kw)
    return _CCTX[key].compress(data)


def m_chunk_frame(blob: bytes, seeds, ch) -> bytes:
    """One chunk replaced by another frame, the layout redone (offsets, stored lengths,
    checksums, groups, header): recompressed, other content, trailing bytes, two frames, a
    skippable frame, no content size, a content checksum, truncated, a dictionary frame, an RLE
    frame lying about its size, another chunk's frame."""
    try:
        obj = hb.index_obj(blob)
        keys = _layout_keys(obj)
    except Exception:  # noqa: BLE001 - not a seed-shaped file any more (stacked mutations)
        return blob
    if not keys:
        return blob
    name, sidx, ci, off, stored = ch.choice(keys)
    frame = blob[off : off + stored]
    try:
        raw = zstandard.ZstdDecompressor().decompress(frame)
    except zstandard.ZstdError:
        return blob
    op = ch.integer(0, 11)
    if op == 0:
        new = _zstd(raw, level=ch.choice((-5, 1, 19)))
    elif op == 1:  # other content, same size: random, reversed, or NaN/negative floats
        new = _zstd(ch.choice((raw[::-1], bytes(len(raw)), b"\xff" * len(raw), ch.binary(len(raw)))))
    elif op == 2:
        new = frame + ch.binary(ch.integer(1, 8))
    elif op == 3:
        new = frame + frame
    elif op == 4:
        new = frame + struct.pack("<II", 0x184D2A50, 4) + b"skip"
    elif op == 5:
        new = _zstd(raw, write_content_size=False)
    elif op == 6:
        new = _zstd(raw, write_checksum=True)
    elif op == 7:
        new = frame[: ch.integer(1, max(1, len(frame) - 1))]
    elif op == 8:
        d = zstandard.ZstdCompressionDict(b"dictionary content " * 8, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        new = zstandard.ZstdCompressor(dict_data=d).compress(raw)
    elif op == 9:
        declared = ch.choice((len(raw), len(raw) + 1, None))
        total = ch.choice((len(raw), len(raw) * 4, 1 << 20))
        new = hb.rle_zstd_frame(declared, total, block=ch.choice((1 << 16, 1 << 17)))
    elif op == 10:
        other = ch.choice(keys)
        new = blob[other[3] : other[3] + other[4]]
    else:
        new = _zstd(raw + b"\0" * ch.choice((1, 16)) if ch.integer(0, 1) else raw[:-1])
    try:
        return hb.relayout(blob, {(name, sidx, ci): new})
    except Exception:  # noqa: BLE001 - stacked mutations made the layout unreadable
        return blob


RAW_MUTATORS: dict[str, Callable] = {
    "bit_flip": m_bit_flip, "overwrite": m_overwrite, "truncate": m_truncate, "splice": m_splice,
    "insert": m_insert, "delete": m_delete,
}
FIXED_MUTATORS: dict[str, Callable] = {
    "header_field": m_header_field, "index_field": m_index_field, "index_semantic": m_index_semantic,
    "index_bytes": m_index_bytes, "chunk_bytes": m_chunk_bytes, "chunk_frame": m_chunk_frame,
}
MUTATORS = {**RAW_MUTATORS, **FIXED_MUTATORS}


@dataclasses.dataclass
class Mutant:
    blob: bytes
    seed: int
    steps: list[str]

    @property
    def raw_only(self) -> bool:
        """Only raw mutations: no checksum was recomputed."""
        return all(s in RAW_MUTATORS for s in self.steps)


def mutate(seeds: list[bytes], ch, family: str | None = None) -> Mutant:
    """A mutant of one seed: 1-3 stacked mutations (of `family` "raw"/"fixed" if given)."""
    k = ch.integer(0, len(seeds) - 1)
    blob = seeds[k]
    names = list(RAW_MUTATORS if family == "raw" else FIXED_MUTATORS if family == "fixed" else MUTATORS)
    steps = []
    for _ in range(ch.choice((1, 1, 1, 2, 3))):
        name = ch.choice(names)
        try:
            blob = MUTATORS[name](blob, seeds, ch)
        except Exception:  # noqa: BLE001 - a structure an earlier step broke: this step is a no-op
            continue
        steps.append(name)
    return Mutant(blob, k, steps)


# --- the independent decoder (the oracle for accepted files) ----------------------------------

NP_DTYPES = {1: "<f4", 2: "<f2", 3: "<u2", 4: "<f8", 5: "i1", 6: "u1", 7: "<i2", 8: "<i4", 9: "<i8", 10: "u1"}
TORCH_DTYPES = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float64, 5: torch.int8,
                6: torch.uint8, 7: torch.int16, 8: torch.int32, 9: torch.int64, 10: torch.bool}


def _tensor_key(t: torch.Tensor) -> tuple:
    t = t.detach().contiguous().reshape(-1)
    return str(t.dtype), bytes(t.view(torch.uint8).numpy()) if t.numel() else b""


def reference_decode(blob: bytes) -> tuple[dict, bool]:
    """What spec/FORMAT.md says the (already accepted) file holds, decoded without
    codecllm_format: ({"keys", "tensors" {name: (shape, dtype, bytes)}, "files", "metadata"},
    padding_is_zero)."""
    h = hb.read_header(blob)
    index = msgpack.unpackb(blob[h["index_offset"] :], raw=False)
    covered = [(0, C.HEADER_SIZE), (h["index_offset"], len(blob))]

    def stream_bytes(s: dict) -> bytes:
        out = bytearray()
        for i in range(0, len(s["chunks"]), 24):
            off, stored, raw, _ck = struct.unpack_from("<QIIQ", s["chunks"], i)
            covered.append((off, off + stored))
            chunk = zstandard.ZstdDecompressor().decompress(blob[off : off + stored], max_output_size=raw)
            assert len(chunk) == raw
            out += chunk
        return bytes(out)

    tensors = {}
    for t in index["tensors"]:
        shape, dt = tuple(t["shape"]), t["dtype"]
        if t["encoding"] == 2:
            q = np.frombuffer(stream_bytes(t["streams"][0]), dtype="i1").reshape(shape)
            s = np.frombuffer(stream_bytes(t["streams"][1]), dtype="<f4")
            with np.errstate(over="ignore", invalid="ignore"):
                prod = torch.from_numpy(q.astype(np.float32) * s[:, None])
            value = prod.to(TORCH_DTYPES[dt])
        elif t["encoding"] == 3:  # FLOAT_PLANES, spec section 10.3, with Python-int arithmetic
            w, m, k = {3: (16, 7, 1), 2: (16, 10, 2), 1: (32, 23, 3)}[dt]
            e = stream_bytes(t["streams"][0])
            sb = stream_bytes(t["streams"][1])
            n = len(e)
            sm = [sum(sb[j * n + i] << (8 * j) for j in range(k)) for i in range(n)]
            if dt == 2 and (any(x > 31 for x in e) or any(x >> 11 for x in sm)):
                raise ValueError("F16 planes with spare bits set (the reader must refuse them)")
            bits = [(v >> m) << (w - 1) | x << m | (v & ((1 << m) - 1)) for x, v in zip(e, sm)]
            arr = np.array(bits, dtype=np.uint32 if w == 32 else np.uint16).view(np.int32 if w == 32 else np.int16)
            value = torch.from_numpy(arr.copy()).view(TORCH_DTYPES[dt]).reshape(shape)
        else:
            arr = np.frombuffer(stream_bytes(t["streams"][0]), dtype=NP_DTYPES[dt]).reshape(shape).copy()
            value = torch.from_numpy(arr)
            value = value.view(torch.bfloat16) if dt == 3 else value.to(torch.bool) if dt == 10 else value
        tensors[t["name"]] = (shape, *_tensor_key(value))
    aliases = {k: v for k, v in index.get("aliases", {}).items()}
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    files = {f["name"]: stream_bytes(f["stream"]) for f in index.get("files", [])}
    keys = [t["name"] for t in index["tensors"]] + list(aliases)
    covered.sort()
    pos, zero = 0, True
    for a, b in covered:
        if a > pos and any(blob[pos:a]):
            zero = False
        pos = max(pos, b)
    content = {"keys": keys, "tensors": tensors, "files": files, "metadata": dict(index.get("metadata", {}))}
    return content, zero


# --- running one case ---------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """A case ran past HANG_LIMIT_S (raised by the interval timer)."""


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


class Guard:
    """RLIMIT_AS = current address space + `extra` bytes, and an interval timer that raises
    CaseTimeout after HANG_LIMIT_S, for the duration of a with-block."""

    def __init__(self, extra: int, hang_s: float = HANG_LIMIT_S):
        self.extra = extra
        self.hang_s = hang_s

    def _alarm(self, *_):
        raise CaseTimeout(f"case ran past {self.hang_s} s")

    def __enter__(self):
        self.old = resource.getrlimit(resource.RLIMIT_AS)
        self.old_handler = signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, self.hang_s)
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + self.extra, self.old[1]))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_AS, self.old)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old_handler)


@dataclasses.dataclass
class Outcome:
    error: str | None  # CllmError subclass name, or None when everything read
    message: str = ""
    content: dict | None = None
    problems: list[str] | None = None
    seconds: float = 0.0
    foreign: str | None = None  # traceback of an exception that is not a CllmError


def read_all(path: Path) -> tuple[dict, list[str]]:
    """Open, get_tensor every key, read_file every file, verify(): (content, problems)."""
    with CllmFile(path, threads=1) as f:
        keys = f.keys()
        tensors = {}
        for k in keys:
            t = f.get_tensor(k)
            e = f.entry(k)
            if tuple(t.shape) != tuple(e.shape) or t.dtype != TORCH_DTYPES[int(e.dtype)]:
                raise AssertionError(f"{k}: got {tuple(t.shape)} {t.dtype}, entry says {e.shape} {e.dtype.name}")
            tensors[k] = (tuple(t.shape), *_tensor_key(t))
        files = {n: f.read_file(n) for n in f.file_names()}
        content = {"keys": keys, "tensors": tensors, "files": files, "metadata": f.metadata()}
        problems = f.verify()
    return content, problems


def run_case(path: Path, size: int, guard: bool = True) -> Outcome:
    """read_all under the memory and hang guards; classifies the result."""
    t0 = time.perf_counter()
    try:
        if guard:
            with Guard(memory_bound(size)):
                content, problems = read_all(path)
        else:
            content, problems = read_all(path)
        return Outcome(None, content=content, problems=problems, seconds=time.perf_counter() - t0)
    except CllmError as e:
        return Outcome(type(e).__name__, str(e), seconds=time.perf_counter() - t0)
    except BaseException as e:  # noqa: BLE001 - the point: anything else is a finding
        if isinstance(e, KeyboardInterrupt):
            raise
        return Outcome("foreign", seconds=time.perf_counter() - t0,
                       foreign="".join(traceback.format_exception(type(e), e, e.__traceback__)))


def violations(m: Mutant, out: Outcome, seeds: list[bytes], seed_contents: list[dict]) -> list[str]:
    """What is wrong with this outcome (empty: the property holds)."""
    bad = []
    if out.foreign:
        bad.append("raised something other than a CllmError:\n" + out.foreign)
        return bad
    if out.seconds > TIME_LIMIT_S:
        bad.append(f"took {out.seconds:.2f} s (limit {TIME_LIMIT_S} s)")
    if out.error is not None:
        if "alloc" in out.message.lower() or "memory" in out.message.lower():
            bad.append(f"{out.error} that looks like an allocation failure under the memory bound: {out.message}")
        return bad
    try:
        ref, padding_zero = reference_decode(m.blob)
    except Exception as e:  # noqa: BLE001
        return bad + [f"the reader accepted a file the independent decoder cannot read: {type(e).__name__}: {e}"]
    if out.content != ref:
        diff = [k for k in ref if ref[k] != out.content.get(k)]
        bad.append(f"the reader's output differs from the independent decoder's in {diff}")
    if not all("padding" in p for p in out.problems):
        bad.append(f"verify() reported problems other than padding on a file whose every chunk read: {out.problems}")
    if bool(out.problems) == padding_zero:
        bad.append(f"verify() problems {out.problems} but the padding is {'all zero' if padding_zero else 'not zero'}")
    if m.raw_only:
        same = [k for k, s in enumerate(seeds) if s[: C.HEADER_SIZE] == m.blob[: C.HEADER_SIZE]]
        if not same:
            bad.append("accepted after raw mutations, but its header is no seed's")
        else:
            k = same[0]
            if out.content != seed_contents[k]:
                bad.append("accepted after raw mutations, with content other than the seed's")
            if (m.blob == seeds[k]) != (not out.problems):
                bad.append(f"raw mutations: verify() problems {out.problems}, bytes {'equal' if m.blob == seeds[k] else 'differ from'} the seed's")
    return bad


# --- campaign ---------------------------------------------------------------------------------------


def case_rng(seed: int, i: int) -> random.Random:
    return random.Random(f"cllm-fuzz:{seed}:{i}")


def _prepare_process() -> None:
    torch.set_num_threads(1)


def _worker(wid: int, nworkers: int, seed: int, start: int, stop: int, seeds: list[bytes], workdir: str,
            progress, conn) -> None:
    """Run cases start+wid, start+wid+nworkers, ... < stop; report findings and counts on `conn`."""
    _prepare_process()
    # per-worker names: rewriting a file another process has mapped would SIGBUS it
    seed_contents = [read_all(write_case(Path(workdir) / f"seed{k}-{wid}.cllm", s))[0] for k, s in enumerate(seeds)]
    path = Path(workdir) / f"case-{wid}.cllm"
    stats: dict[str, dict[str, int]] = {}
    slowest = [0.0, -1]
    for i in range(start + wid, stop, nworkers):
        progress[wid] = i  # in flight: if this process dies, the parent knows which case killed it
        m = mutate(seeds, RandomChooser(case_rng(seed, i)))
        write_case(path, m.blob)
        out = run_case(path, len(m.blob))
        bad = violations(m, out, seeds, seed_contents)
        key = out.error or ("accepted" if not out.problems else "accepted+padding")
        by = stats.setdefault(m.steps[0] if len(m.steps) == 1 else "stacked", {})
        by[key] = by.get(key, 0) + 1
        if out.seconds > slowest[0]:
            slowest[:] = [out.seconds, i]
        if bad:
            conn.send(("finding", i, m.steps, bad))
    progress[wid] = stop
    conn.send(("stats", stats, slowest))


def write_case(path: Path, blob: bytes) -> Path:
    """Write `blob` as a new file (new inode) at `path`: truncating a file that a map (kept
    alive by a leaked view) still covers would SIGBUS whoever touches that map."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(blob)
    os.replace(tmp, path)
    return path


def campaign(executions: int, seed: int, workers: int, corpus: Path, start: int = 0) -> dict:
    """Run cases [start, start + executions) of campaign `seed` on `workers` processes."""
    import multiprocessing as mp

    seeds = build_seeds()
    ctx = mp.get_context("fork")
    workdir = tempfile.mkdtemp(prefix="cllm-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    progress = ctx.Array("q", workers, lock=False)
    for w in range(workers):
        progress[w] = -1  # not started: a death now is the harness's, not a case's
    findings, stats, crashes = [], {}, []
    stop = start + executions
    t0 = time.perf_counter()
    pending = {}  # wid -> (process, parent end of the pipe)
    slowest = [0.0, -1]

    def merge(msg) -> None:
        for mut, outcomes in msg[1].items():
            for k, v in outcomes.items():
                stats.setdefault(mut, {})[k] = stats.setdefault(mut, {}).get(k, 0) + v
        if msg[2][0] > slowest[0]:
            slowest[:] = msg[2]

    def launch(wid: int, first: int) -> None:
        progress[wid] = -1
        parent, child = ctx.Pipe(duplex=False)
        # a worker's cases are first, first + workers, ...: keep that residue class
        p = ctx.Process(target=_worker, args=(wid, workers, seed, first - wid, stop, seeds, workdir, progress, child),
                        daemon=True)
        p.start()
        child.close()
        pending[wid] = (p, parent)

    for wid in range(workers):
        launch(wid, start + wid)
    last_print = t0
    while pending:
        for wid, (p, conn) in list(pending.items()):
            while conn.poll():
                try:
                    msg = conn.recv()
                except EOFError:
                    break
                if msg[0] == "finding":
                    findings.append({"case": f"{seed}:{msg[1]}", "steps": msg[2], "problems": msg[3]})
                    _save(corpus, seed, msg[1], seeds, msg[3])
                    print(f"FINDING {seed}:{msg[1]} {msg[2]}: {msg[3][0][:300]}", flush=True)
                else:
                    merge(msg)
            if not p.is_alive():
                p.join()
                while conn.poll():
                    try:
                        msg = conn.recv()
                    except EOFError:
                        break
                    if msg[0] == "stats":
                        merge(msg)
                del pending[wid]
                if p.exitcode != 0:
                    i = progress[wid]
                    if i < 0:
                        raise RuntimeError(f"worker {wid} died (exit code {p.exitcode}) before its first case")
                    crashes.append({"case": f"{seed}:{i}", "exitcode": p.exitcode})
                    _save(corpus, seed, i, seeds, [f"worker died with exit code {p.exitcode}"])
                    print(f"CRASH {seed}:{i} exit code {p.exitcode}", flush=True)
                    if i + workers < stop:
                        launch(wid, i + workers)
        now = time.perf_counter()
        if now - last_print > 30:
            done = sum(max(0, min(progress[w], stop) - (start + w) + workers - 1) // workers for w in range(workers))
            print(f"{done} executions, {done / (now - t0):.0f}/s, {len(findings)} findings, {len(crashes)} crashes",
                  flush=True)
            last_print = now
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    totals: dict[str, int] = {}
    for outcomes in stats.values():
        for k, v in outcomes.items():
            totals[k] = totals.get(k, 0) + v
    totals = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
    for f in Path(workdir).iterdir():
        f.unlink()
    os.rmdir(workdir)
    return {"executions": executions, "seed": seed, "first_case": start, "workers": workers,
            "seconds": round(seconds, 1), "executions_per_s": round(executions / seconds, 1),
            "outcomes": totals, "by_mutator": {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in sorted(stats.items())},
            "slowest_case": {"case": f"{seed}:{slowest[1]}", "seconds": round(slowest[0], 4)},
            "findings": findings, "crashes": crashes}


def _save(corpus: Path, seed: int, i: int, seeds: list[bytes], problems: list[str]) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    m = mutate(seeds, RandomChooser(case_rng(seed, i)))
    (corpus / f"case-{seed}-{i}.cllm").write_bytes(m.blob)
    (corpus / f"case-{seed}-{i}.txt").write_text(f"steps: {m.steps}\n\n" + "\n\n".join(problems))


def replay(spec: str) -> int:
    """Re-run one case `SEED:I` (or a file path) verbosely; exit code 1 if it violates the property."""
    _prepare_process()
    seeds = build_seeds()
    with tempfile.TemporaryDirectory() as tmp:
        seed_contents = [read_all(write_case(Path(tmp) / f"s{k}.cllm", s))[0] for k, s in enumerate(seeds)]
        if os.path.exists(spec):
            m = Mutant(Path(spec).read_bytes(), -1, ["file"])
        else:
            s, i = (int(x) for x in spec.split(":"))
            m = mutate(seeds, RandomChooser(case_rng(s, i)))
        path = write_case(Path(tmp) / "case.cllm", m.blob)
        out = run_case(path, len(m.blob))
    bad = violations(m, out, seeds, seed_contents)
    print(f"seed file {m.seed}, steps {m.steps}, {len(m.blob)} bytes, {out.seconds * 1e3:.1f} ms")
    print(f"outcome: {out.error or 'accepted'} {out.message}")
    if out.problems:
        print(f"verify(): {out.problems}")
    for b in bad:
        print("VIOLATION:", b)
    return 1 if bad else 0


def _instrument_reader(atheris) -> int:
    """Coverage instrumentation of the reader's own code only (instrument_all() would spend
    minutes on torch): every function and method of the modules a read goes through."""
    import importlib
    import inspect

    count = 0
    for modname in ("reader", "index", "codecs.zstd", "codecs.base", "quant", "checksums"):
        mod = importlib.import_module(f"codecllm_format.{modname}")
        for name, obj in list(vars(mod).items()):
            if inspect.isfunction(obj) and obj.__module__ == mod.__name__:
                setattr(mod, name, atheris.instrument_func(obj))
                count += 1
            elif inspect.isclass(obj) and obj.__module__ == mod.__name__:
                for mname, meth in list(vars(obj).items()):
                    if inspect.isfunction(meth):
                        setattr(obj, mname, atheris.instrument_func(meth))
                        count += 1
    return count


def atheris_main(argv: list[str]) -> None:
    """Coverage-guided fuzzing with atheris: its input bytes drive the same mutators."""
    import atheris  # noqa: PLC0415

    _prepare_process()
    seeds = build_seeds()
    tmp = Path(tempfile.mkdtemp(prefix="cllm-atheris-"))
    seed_contents = [read_all(write_case(tmp / f"s{k}.cllm", s))[0] for k, s in enumerate(seeds)]
    path = tmp / "case.cllm"

    class FdpChooser:
        def __init__(self, fdp):
            self.fdp = fdp

        def integer(self, lo, hi):
            return self.fdp.ConsumeIntInRange(lo, hi)

        def choice(self, seq):
            return seq[self.fdp.ConsumeIntInRange(0, len(seq) - 1)]

        def binary(self, n):
            return self.fdp.ConsumeBytes(n).ljust(n, b"\0")

    def one(data: bytes) -> None:
        m = mutate(seeds, FdpChooser(atheris.FuzzedDataProvider(data)))
        write_case(path, m.blob)
        out = run_case(path, len(m.blob))
        bad = violations(m, out, seeds, seed_contents)
        if bad:
            raise AssertionError("\n".join(bad))

    _instrument_reader(atheris)
    atheris.Setup(argv, one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--executions", "-n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=int, default=0, help="first case number (to resume a campaign)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--corpus", type=Path, default=Path("fuzz-crashers"), help="where crashing cases are saved")
    ap.add_argument("--json", type=Path, help="write the campaign summary here")
    ap.add_argument("--replay", metavar="SEED:I|FILE", help="re-run one case verbosely")
    ap.add_argument("--atheris", action="store_true", help="coverage-guided fuzzing (atheris; extra args go to it)")
    ap.add_argument("--write-seeds", type=Path, help="write the seed files to this folder and exit")
    args, rest = ap.parse_known_args(argv)
    if args.write_seeds:
        build_seeds(args.write_seeds)
        return 0
    if args.replay:
        return replay(args.replay)
    if args.atheris:
        atheris_main([sys.argv[0], *rest])
        return 0
    summary = campaign(args.executions, args.seed, args.workers, args.corpus, args.start)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 1 if summary["findings"] or summary["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
