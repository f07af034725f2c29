"""Hostile and broken .cllm files, built byte by byte from a valid one.

Each case changes one thing (keeping every other check passing: header checksum, index
checksum, lengths) and asserts the CllmError subclass raised and a fragment of its message.
Opening validates header and index; reading a tensor checks its chunks; verify() checks
everything, padding included. Nothing may crash, hang, or allocate what the file size does not
justify.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import zstandard

import hostile_builder as hb
import codecllm_format as cf
from codecllm_format import constants as C
from codecllm_format.errors import (
    ChecksumError,
    CllmError,
    DecodeError,
    FormatError,
    IndexSchemaError,
    LayoutError,
    NotACllmFile,
    TruncatedFile,
    UnsupportedVersion,
)
from conftest import small_tensors, write_small_cllm

GiB = 1 << 30
BIAS = "model.layers.0.attn.bias"  # raw f32 [3000]: 3 chunks of 4 KiB raw
ATTN = "model.layers.0.attn.weight"  # int8_row [64, 96]: values in 2 chunks, scales in 1
MASK = "model.layers.0.mask"  # raw bool [10]
EMBED = "embed.weight"  # int8_row [40, 64], group 0


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    """Bytes of the small valid multi-group file of conftest (4 KiB chunks)."""
    path = write_small_cllm(tmp_path_factory.mktemp("valid") / "small.cllm")
    return path.read_bytes()


def read_everything(path: Path) -> list[str]:
    """Open, read every tensor (aliases too) and file, then verify(): the problems found."""
    with cf.open(path) as f:
        for name in f.keys():
            f.get_tensor(name)
        for name in f.file_names():
            f.read_file(name)
        return f.verify()


# --- the case table ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[bytes], bytes]
    exc: type[CllmError]
    fragment: str
    when: str = "open"  # "open": opening raises; "read": get_tensor(read) raises


CASES: list[Case] = []


def case(id: str, exc: type[CllmError], fragment: str, when: str = "open"):
    def deco(fn: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
        CASES.append(Case(id, fn, exc, fragment, when))
        return fn

    return deco


def edit(fn: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    return lambda blob: hb.edit_index(blob, fn)


def add_case(id: str, build: Callable[[bytes], bytes], exc: type[CllmError], fragment: str, when: str = "open") -> None:
    CASES.append(Case(id, build, exc, fragment, when))


# not a .cllm file at all

add_case("empty-file", lambda b: b"", NotACllmFile, "empty file")
add_case("text-file", lambda b: b"hello, this is a text file\nnot a model\n" * 4, NotACllmFile, "not a .cllm file")
add_case("magic-prefix-only", lambda b: b[:5], TruncatedFile, "shorter than the 64-byte header")
add_case("crlf-mangled-magic", lambda b: b.replace(b"\r\n", b"\n", 1), NotACllmFile, "expected b'CLLM")


@case("safetensors-file", NotACllmFile, "not a .cllm file")
def _safetensors(b: bytes) -> bytes:
    from safetensors.torch import save

    return save({"w": torch.zeros(4, 4)})


# truncation at several points

add_case("truncated-in-header", lambda b: b[:40], TruncatedFile, "shorter than the 64-byte header")
add_case("truncated-after-header", lambda b: b[: C.HEADER_SIZE], TruncatedFile, "truncated")
add_case("truncated-in-padding", lambda b: b[:2000], TruncatedFile, "the header says")
add_case("truncated-in-data", lambda b: b[: hb.chunk_location(b, BIAS, 0, 1)[0] + 100], TruncatedFile, "truncated")
add_case("truncated-in-index", lambda b: b[:-1], TruncatedFile, "truncated")

# header fields

add_case("major-version-2", lambda b: hb.with_header(b, major=2), UnsupportedVersion, "version 2.0")
add_case("major-version-0", lambda b: hb.with_header(b, major=0), UnsupportedVersion, "version 0.0")
add_case("unknown-header-flag", lambda b: hb.with_header(b, flags=1 << 5), UnsupportedVersion, "flags 0x20")
add_case("reserved-nonzero", lambda b: hb.with_header(b, reserved=7), FormatError, "reserved field is 0x7")
add_case("header-checksum-mismatch", lambda b: hb.flip_bit(b, 17, 3), ChecksumError, "header checksum mismatch")
add_case("header-checksum-field-flipped", lambda b: hb.flip_bit(b, 60), ChecksumError, "header checksum mismatch")
add_case(
    "index-length-past-eof",
    lambda b: hb.with_header(b, index_length=hb.read_header(b)["index_length"] + 64),
    LayoutError, "does not end at the end of the file",
)
add_case(
    "index-and-file-length-past-eof",
    lambda b: hb.with_header(
        b, index_length=hb.read_header(b)["index_length"] + 64, file_length=len(b) + 64
    ),
    TruncatedFile, f"file is {{n}} bytes, the header says",
)
add_case(
    "index-length-over-cap",
    lambda b: hb.with_header(b, index_length=C.MAX_INDEX_LENGTH + 1),
    LayoutError, "over the 268435456-byte limit",
)
add_case(
    "index-length-2**64-1",
    lambda b: hb.with_header(b, index_length=(1 << 64) - 1),
    LayoutError, "limit",
)


@case("index-offset-misaligned", LayoutError, "is not a 16-aligned offset")
def _index_misaligned(b: bytes) -> bytes:
    h = hb.read_header(b)
    return hb.with_header(b, index_offset=h["index_offset"] + 8, index_length=h["index_length"] - 8)


@case("index-offset-before-data-start", LayoutError, ">= 4096")
def _index_before_data(b: bytes) -> bytes:
    return hb.with_header(b, index_offset=1024, index_length=len(b) - 1024)


@case("index-offset-past-eof", TruncatedFile, "the header says")
def _index_offset_past_eof(b: bytes) -> bytes:
    return hb.with_header(b, index_offset=(1 << 63), file_length=(1 << 63) + 16)


add_case("trailing-bytes-after-index", lambda b: b + b"\0" * 16, FormatError, "trailing data")
add_case(
    "trailing-bytes-counted-in-file-length",
    lambda b: hb.with_header(b + b"junk" * 4, file_length=len(b) + 16),
    LayoutError, "does not end at the end of the file",
)


@case("index-checksum-mismatch", ChecksumError, "index checksum mismatch")
def _index_checksum(b: bytes) -> bytes:
    return hb.flip_bit(b, hb.read_header(b)["index_offset"] + 30, 2)


# the index is not msgpack / not the schema

add_case("index-empty", lambda b: hb.with_index_bytes(b, b""), IndexSchemaError, "not valid msgpack")
add_case("index-not-msgpack", lambda b: hb.with_index_bytes(b, b"\xc1" * 32), IndexSchemaError, "not valid msgpack")
add_case(
    "index-msgpack-truncated",
    lambda b: hb.with_index_bytes(b, hb.split(b)[1][:-7]),
    IndexSchemaError, "not valid msgpack",
)
add_case(
    "index-msgpack-trailing-bytes",
    lambda b: hb.with_index_bytes(b, hb.split(b)[1] + b"\x00"),
    IndexSchemaError, "not valid msgpack (ExtraData",
)
add_case(
    "index-nested-array-bomb",
    lambda b: hb.with_index_bytes(b, b"\xdd\x00\x0f\x42\x40" * 2000),
    IndexSchemaError, "not valid msgpack",
)
add_case(
    "index-bin-longer-than-index",
    lambda b: hb.with_index_bytes(b, b"\xc6\x0f\xff\xff\xff" + b"\0" * 11),
    IndexSchemaError, "not valid msgpack",
)
add_case(
    "index-bad-utf8",
    lambda b: hb.with_index_bytes(b, hb.map_with_pairs([("tensors", [])])[:-1] + b"\xa2\xff\xfe"),
    IndexSchemaError, "UTF-8",
)
add_case(
    "index-deeply-nested",
    lambda b: hb.with_index_bytes(b, b"\x91" * 5000 + b"\x00"),
    IndexSchemaError, "not valid msgpack",
)
add_case(
    "index-ext-type",
    lambda b: hb.with_index_bytes(b, hb.pack_index({"tensors": [], "groups": [], "x-e": __import__("msgpack").ExtType(5, b"ab")})),
    IndexSchemaError, "not valid msgpack",
)
add_case(
    "metadata-too-many-entries",
    edit(lambda o: o["metadata"].update({f"k{i}": "v" for i in range(C.MAX_METADATA_ENTRIES + 1)})),
    IndexSchemaError, f"entries, limit {C.MAX_METADATA_ENTRIES}",
)
add_case(
    "tensor-in-the-files-group",
    edit(lambda o: hb.tensor(o, "model.layers.1.norm.weight").update(group=3)),
    IndexSchemaError, "tensor 'model.layers.1.norm.weight' is in the '__files__' group",
)
add_case("index-is-a-list", lambda b: hb.with_index_bytes(b, hb.pack_index([1, 2])), IndexSchemaError, "expected a map, got list")
add_case("missing-groups", edit(lambda o: o.pop("groups")), IndexSchemaError, "missing field(s) ['groups']")
add_case("missing-tensor-dtype", edit(lambda o: o["tensors"][2].pop("dtype")), IndexSchemaError, "missing field(s) ['dtype']")
add_case("missing-stream-chunks", edit(lambda o: hb.stream_of(o, BIAS).pop("chunks")), IndexSchemaError, "missing field(s) ['chunks']")
add_case("tensor-name-not-string", edit(lambda o: o["tensors"][0].update(name=5)), IndexSchemaError, "expected a string, got int")
add_case("tensor-name-empty", edit(lambda o: o["tensors"][0].update(name="")), IndexSchemaError, "string length 0")
add_case("tensor-name-too-long", edit(lambda o: o["tensors"][0].update(name="w" * 5000)), IndexSchemaError, "string length 5000")
add_case("tensors-not-a-list", edit(lambda o: o.update(tensors={"a": 1})), IndexSchemaError, "tensors: expected an array, got dict")
add_case("tensor-not-a-map", edit(lambda o: o["tensors"].append(7)), IndexSchemaError, "tensors[6]: expected a map, got int")
add_case("shape-is-a-string", edit(lambda o: o["tensors"][2].update(shape="3000")), IndexSchemaError, "shape")
add_case("group-offset-not-int", edit(lambda o: o["groups"][1].update(offset="8192")), IndexSchemaError, "groups[1].offset: expected an integer, got str")
add_case("stream-length-is-bool", edit(lambda o: hb.stream_of(o, MASK).update(length=True)), IndexSchemaError, "expected an integer, got bool")
add_case("stream-length-is-float", edit(lambda o: hb.stream_of(o, BIAS).update(length=12000.0)), IndexSchemaError, "expected an integer, got float")
add_case("chunks-not-binary", edit(lambda o: hb.stream_of(o, BIAS).update(chunks=[1, 2, 3])), IndexSchemaError, "expected binary, got list")
add_case("metadata-value-not-string", edit(lambda o: o["metadata"].update(source=3)), IndexSchemaError, "metadata['source']: expected a string value")
add_case("metadata-not-a-map", edit(lambda o: o.update(metadata=["a"])), IndexSchemaError, "metadata: expected a map")
add_case("int-map-key", edit(lambda o: o["tensors"][0].update({7: "x"})), IndexSchemaError, "map key")
add_case("bytes-map-key", edit(lambda o: o["groups"][0].update({b"offset": 1})), IndexSchemaError, "map key b'offset' is not a string")


@case("duplicate-map-key", IndexSchemaError, "duplicate map key 'tensors'")
def _dup_key(b: bytes) -> bytes:
    o = hb.index_obj(b)
    pairs = [("tensors", o["tensors"]), ("groups", o["groups"]), ("tensors", [])]
    return hb.with_index_bytes(b, hb.map_with_pairs(pairs))


add_case("unknown-top-level-field", edit(lambda o: o.update(compression="lz4")), UnsupportedVersion, "unknown field(s) ['compression']")
add_case("unknown-tensor-field", edit(lambda o: o["tensors"][1].update(layout="tiled")), UnsupportedVersion, "unknown field(s) ['layout']")
add_case("unknown-stream-field", edit(lambda o: hb.stream_of(o, BIAS).update(dictionary=b"x")), UnsupportedVersion, "unknown field(s) ['dictionary']")
add_case("unknown-group-field", edit(lambda o: o["groups"][0].update(device="cuda")), UnsupportedVersion, "unknown field(s) ['device']")

# names


@case("duplicate-tensor-names", IndexSchemaError, f"duplicate tensor name {BIAS!r}")
def _dup_tensor(b: bytes) -> bytes:
    return hb.edit_index(b, lambda o: hb.tensor(o, MASK).update(name=BIAS))


add_case(
    "duplicate-group-names",
    edit(lambda o: o["groups"][2].update(name="model.layers.0")),
    IndexSchemaError, "duplicate group names",
)
add_case("alias-to-missing-tensor", edit(lambda o: o["aliases"].update(x="nope")), IndexSchemaError, "points to 'nope', which is not a stored tensor")
add_case("alias-to-an-alias", edit(lambda o: o["aliases"].update(y="lm_head.weight")), IndexSchemaError, "not a stored tensor")
add_case("alias-collides-with-tensor", edit(lambda o: o["aliases"].update({BIAS: EMBED})), IndexSchemaError, "has the name of a stored tensor")
add_case("alias-target-not-string", edit(lambda o: o["aliases"].update(z=5)), IndexSchemaError, "aliases['z']: expected a tensor name")
add_case("tensor-group-out-of-range", edit(lambda o: o["tensors"][0].update(group=9)), IndexSchemaError, "group: 9 is outside [0, 3]")
add_case("tensor-group-negative", edit(lambda o: o["tensors"][0].update(group=-1)), IndexSchemaError, "group: -1 is outside")

# layout: offsets, lengths, alignment


def edit_records(name: str, stream: int, fn: Callable[[list[list[int]]], None]) -> Callable[[bytes], bytes]:
    def build(b: bytes) -> bytes:
        def e(o: dict) -> None:
            s = hb.stream_of(o, name, stream)
            recs = hb.records(s)
            fn(recs)
            hb.set_records(s, recs)

        return hb.edit_index(b, e)

    return build


add_case(
    "chunk-offset-past-eof",
    edit_records(BIAS, 0, lambda r: r[2].__setitem__(0, 1 << 40)),
    LayoutError, "a chunk starts at or past the index",
)
add_case(
    "chunk-offset-2**64-1",
    edit_records(BIAS, 0, lambda r: r[1].__setitem__(0, (1 << 64) - 1)),
    LayoutError, "at or past the index",
)
add_case(
    "overlapping-chunks",
    edit_records(BIAS, 0, lambda r: r[1].__setitem__(0, r[0][0])),
    LayoutError, "chunk 1 at offset",
)
add_case(
    "hole-between-chunks",
    edit_records(BIAS, 0, lambda r: r[2].__setitem__(0, r[2][0] + 16)),
    LayoutError, "(overlap or hole)",
)
add_case(
    "misaligned-chunk",
    edit_records(BIAS, 0, lambda r: r[0].__setitem__(0, r[0][0] + 1)),
    LayoutError, f"{BIAS!r}: chunk 0 at offset",
)
add_case(
    "chunk-stored-length-too-short",
    edit_records(ATTN, 0, lambda r: r[0].__setitem__(1, r[0][1] - 16)),
    LayoutError, "overlap or hole",
)
add_case(
    "chunk-past-the-index",
    edit_records("config.json", 0, lambda r: r[0].__setitem__(1, r[0][1] + 64)),
    LayoutError, "runs past the index",
)
add_case(
    "misaligned-group",
    edit(lambda o: o["groups"][1].update(offset=o["groups"][1]["offset"] + 16)),
    LayoutError, "group 'model.layers.0': offset 8208, expected 8192",
)
add_case(
    "group-length-wrong",
    edit(lambda o: o["groups"][1].update(length=o["groups"][1]["length"] + 1)),
    LayoutError, "group 'model.layers.0': length",
)


@case("empty-group-with-a-length", LayoutError, "group 'ghost': length 4, but its chunks span 0 bytes")
def _ghost(b: bytes) -> bytes:
    def e(o: dict) -> None:
        o["groups"].insert(1, {"name": "ghost", "offset": 8192, "length": 4})
        for _n, item, _s in hb.layout_items(o):
            if item["group"] >= 1 and "_seen" not in item:
                item["group"] += 1
                item["_seen"] = True
        for _n, item, _s in hb.layout_items(o):
            item.pop("_seen", None)

    return hb.edit_index(b, e)


@case("tensors-out-of-group-order", LayoutError, "is in group 1 after items of group 2: groups must be in layout order")
def _order(b: bytes) -> bytes:
    def e(o: dict) -> None:
        # move layers.0.idx (group 1) after layers.1.norm (group 2); group 1 now ends at the mask
        idx = hb.tensor(o, "model.layers.0.idx")
        o["tensors"].remove(idx)
        o["tensors"].append(idx)
        off, stored = hb.records(hb.stream_of(o, MASK))[0][:2]
        o["groups"][1]["length"] = off + stored - o["groups"][1]["offset"]

    return hb.edit_index(b, e)


@case("gap-before-index", LayoutError, "right after the data")
def _gap_before_index(b: bytes) -> bytes:
    data, index = hb.split(b)
    return hb.assemble(data + b"\0" * 16, index)


@case("gap-between-groups", LayoutError, "offset 12288, expected 8192")
def _gap_between_groups(b: bytes) -> bytes:
    data, index = hb.split(b)
    obj = hb.index_obj(b)
    start = obj["groups"][1]["offset"]
    data = data[:start] + b"\0" * 4096 + data[start:]
    for _n, item, s in hb.layout_items(obj):
        if item["group"] >= 1:
            recs = hb.records(s)
            for r in recs:
                r[0] += 4096
            hb.set_records(s, recs)
    for g in obj["groups"][1:]:
        g["offset"] += 4096
    return hb.assemble(data, hb.pack_index(obj))


# chunk tables against shape x dtype

add_case("chunk-missing", edit_records(BIAS, 0, lambda r: r.pop()), IndexSchemaError, "2 chunks, but 12000 bytes in chunks of 4096 need 3")
add_case("chunk-extra", edit_records(BIAS, 0, lambda r: r.append(list(r[-1]))), IndexSchemaError, "4 chunks")
add_case("chunk-raw-size-wrong", edit_records(BIAS, 0, lambda r: r[1].__setitem__(2, 4000)), IndexSchemaError, "chunk 1 declares 4000 raw bytes, expected 4096")
add_case("chunk-stored-zero", edit_records(MASK, 0, lambda r: r[0].__setitem__(1, 0)), IndexSchemaError, "stores 0 bytes for 10 raw")
add_case(
    "chunks-bin-not-multiple-of-24",
    edit(lambda o: hb.stream_of(o, BIAS).update(chunks=hb.stream_of(o, BIAS)["chunks"][:-1])),
    IndexSchemaError, "71 bytes is not a multiple of 24",
)
add_case("stream-length-wrong", edit(lambda o: hb.stream_of(o, BIAS).update(length=12004)), IndexSchemaError, "12004 bytes, but shape x dtype needs 12000")
add_case("shape-changed", edit(lambda o: hb.tensor(o, BIAS).update(shape=[3001])), IndexSchemaError, "shape x dtype needs 12004")
add_case("dtype-changed", edit(lambda o: hb.tensor(o, BIAS).update(dtype=int(C.DType.F64))), IndexSchemaError, "needs 24000")
add_case("chunk-size-too-small", edit(lambda o: hb.stream_of(o, BIAS).update(chunk_size=16)), IndexSchemaError, "chunk_size: 16 is outside")
add_case("chunk-size-too-large", edit(lambda o: hb.stream_of(o, BIAS).update(chunk_size=1 << 30)), IndexSchemaError, "chunk_size: 1073741824 is outside")


@case("raw-over-max-zstd-expansion", IndexSchemaError, f"bytes for 16777216 raw (a zstd frame expands at most {C.MAX_ZSTD_EXPANSION}x)")
def _expansion(b: bytes) -> bytes:
    """The mask's one chunk (a few dozen bytes) claims 16 MiB: more than 32768 x stored."""

    def e(o: dict) -> None:
        t = hb.tensor(o, MASK)
        t["shape"] = [C.MAX_CHUNK_SIZE]
        s = t["streams"][0]
        s.update(length=C.MAX_CHUNK_SIZE, chunk_size=C.MAX_CHUNK_SIZE)
        recs = hb.records(s)
        assert recs[0][1] * C.MAX_ZSTD_EXPANSION < C.MAX_CHUNK_SIZE
        recs[0][2] = C.MAX_CHUNK_SIZE
        hb.set_records(s, recs)

    return hb.edit_index(b, e)


# absurd shapes

add_case("shape-negative-dim", edit(lambda o: hb.tensor(o, BIAS).update(shape=[-1, 3000])), IndexSchemaError, "bad dimension -1")
add_case("shape-dim-2**48", edit(lambda o: hb.tensor(o, BIAS).update(shape=[1 << 48])), IndexSchemaError, f"bad dimension {1 << 48}")
add_case("shape-dim-2**64-1", edit(lambda o: hb.tensor(o, BIAS).update(shape=[(1 << 64) - 1])), IndexSchemaError, "bad dimension")
add_case("shape-too-many-dims", edit(lambda o: hb.tensor(o, BIAS).update(shape=[1] * 9)), IndexSchemaError, "at most 8 dims")
add_case("shape-float-dim", edit(lambda o: hb.tensor(o, BIAS).update(shape=[3000.0])), IndexSchemaError, "bad dimension 3000.0")
add_case(
    "shape-product-overflows",
    edit(lambda o: hb.tensor(o, BIAS).update(shape=[(1 << 48) - 1] * 8)),
    IndexSchemaError, "shape x dtype needs",
)
add_case(
    "shape-product-overflows-int64",
    edit(lambda o: hb.tensor(o, BIAS).update(shape=[1 << 32, 1 << 32, 1])),
    IndexSchemaError, f"shape x dtype needs {4 << 64}",
)

# unknown enum values

add_case("unknown-codec", edit(lambda o: hb.stream_of(o, BIAS).update(codec=7)), UnsupportedVersion, "unknown Codec value 7")
add_case("unknown-encoding", edit(lambda o: hb.tensor(o, BIAS).update(encoding=9)), UnsupportedVersion, "unknown Encoding value 9")
add_case("unknown-dtype", edit(lambda o: hb.tensor(o, BIAS).update(dtype=99)), UnsupportedVersion, "unknown DType value 99")
add_case("negative-enum", edit(lambda o: hb.tensor(o, BIAS).update(dtype=-1)), IndexSchemaError, "dtype: -1 is outside")
add_case("huge-enum", edit(lambda o: hb.stream_of(o, BIAS).update(codec=1 << 40)), IndexSchemaError, "codec: 1099511627776 is outside")

# encodings

add_case(
    "int8-row-on-1d-tensor",
    edit(lambda o: hb.tensor(o, BIAS).update(encoding=int(C.Encoding.INT8_ROW))),
    IndexSchemaError, "int8_row needs a 2-D tensor, shape is [3000]",
)
add_case(
    "int8-row-on-integer-dtype",
    edit(lambda o: hb.tensor(o, ATTN).update(dtype=int(C.DType.I32))),
    IndexSchemaError, "int8_row needs a float dtype, got I32",
)
add_case(
    "int8-row-scales-stream-missing",
    edit(lambda o: hb.tensor(o, ATTN).update(streams=hb.tensor(o, ATTN)["streams"][:1])),
    IndexSchemaError, "1 streams, encoding INT8_ROW needs 2",
)
add_case(
    "int8-row-scales-wrong-length",
    edit(lambda o: hb.stream_of(o, ATTN, 1).update(length=252)),
    IndexSchemaError, "252 bytes, but shape x dtype needs 256",
)
add_case(
    "raw-with-two-streams",
    edit(lambda o: hb.tensor(o, BIAS)["streams"].append(hb.stream_of(o, BIAS))),
    IndexSchemaError, "2 streams, encoding RAW needs 1",
)
add_case(
    "streams-not-a-list",
    edit(lambda o: hb.tensor(o, BIAS).update(streams=hb.stream_of(o, BIAS))),
    IndexSchemaError, "streams: expected an array, got dict",
)

# embedded files

add_case("file-name-escapes", edit(lambda o: o["files"][0].update(name="../evil.json")), IndexSchemaError, "../evil.json")
add_case("file-group-out-of-range", edit(lambda o: o["files"][0].update(group=7)), IndexSchemaError, "group: 7 is outside")
add_case("files-without-groups", edit(lambda o: o.update(groups=[], tensors=[], aliases={})), FormatError, "group")
add_case(
    "file-stream-length-over-limit",
    edit(lambda o: o["files"][0]["stream"].update(length=C.MAX_EMBEDDED_FILE_LENGTH + 1)),
    IndexSchemaError, f"length: {C.MAX_EMBEDDED_FILE_LENGTH + 1} is outside",
)

# chunk contents: errors when a tensor is read (open succeeds, the index is sound)


@case("chunk-checksum-mismatch", ChecksumError, f"tensor {BIAS!r} chunk 1 at offset", when="read")
def _chunk_checksum(b: bytes) -> bytes:
    off, stored = hb.chunk_location(b, BIAS, 0, 1)
    return hb.flip_bit(b, off + stored // 2, 4)


@case("scales-checksum-mismatch", ChecksumError, f"tensor {ATTN!r} scales chunk 0", when="read")
def _scales_checksum(b: bytes) -> bytes:
    off, stored = hb.chunk_location(b, ATTN, 1, 0)
    return hb.flip_bit(b, off + stored - 1, 0)


@case("zstd-bomb-declared-1GiB", DecodeError, "zstd frame declares 1073741824 decoded bytes, the index says 4096", when="read")
def _bomb_declared(b: bytes) -> bytes:
    return hb.relayout(b, {(BIAS, 0, 0): hb.rle_zstd_frame(GiB, GiB)})


@case("zstd-bomb-declared-64KiB-holds-1GiB", DecodeError, f"tensor {BIAS!r}", when="read")
def _bomb_lying(b: bytes) -> bytes:
    return hb.relayout(b, {(BIAS, 0, 0): hb.rle_zstd_frame(4096, GiB, block=1 << 17, window_log=17)})


@case("zstd-frame-declares-less", DecodeError, "zstd frame declares 100 decoded bytes, the index says 4096", when="read")
def _declares_less(b: bytes) -> bytes:
    return hb.relayout(b, {(BIAS, 0, 0): zstandard.ZstdCompressor().compress(b"\1" * 100)})


@case("zstd-frame-without-content-size", DecodeError, "zstd frame declares -1 decoded bytes", when="read")
def _no_content_size(b: bytes) -> bytes:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 4096)
    return hb.relayout(b, {(BIAS, 0, 0): frame})


@case("chunk-not-a-zstd-frame", DecodeError, "not a zstd frame", when="read")
def _not_zstd(b: bytes) -> bytes:
    return hb.relayout(b, {(BIAS, 0, 1): bytes(range(256)) * 4})


@case("chunk-zstd-frame-truncated", DecodeError, f"tensor {BIAS!r}", when="read")
def _frame_truncated(b: bytes) -> bytes:
    off, stored = hb.chunk_location(b, BIAS, 0, 1)
    return hb.relayout(b, {(BIAS, 0, 1): b[off : off + stored - 10]})


@case("zstd-frame-decodes-short", DecodeError, f"tensor {BIAS!r}", when="read")
def _decodes_short(b: bytes) -> bytes:
    # declares 4096 (matches the index) but its blocks hold only 1000 bytes
    return hb.relayout(b, {(BIAS, 0, 0): hb.rle_zstd_frame(4096, 1000)})


@case("zstd-frame-skippable", DecodeError, f"tensor {BIAS!r}", when="read")
def _skippable(b: bytes) -> bytes:
    return hb.relayout(b, {(BIAS, 0, 0): b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd"})


@case("scales-nan", DecodeError, f"tensor {ATTN!r}", when="read")
def _scales_nan(b: bytes) -> bytes:
    nan = torch.full((64,), float("nan")).numpy().tobytes()
    return hb.relayout(b, {(ATTN, 1, 0): zstandard.ZstdCompressor().compress(nan)})


@case("bool-byte-not-0-or-1", DecodeError, f"tensor {MASK!r}", when="read")
def _bool_bad(b: bytes) -> bytes:
    return hb.relayout(b, {(MASK, 0, 0): zstandard.ZstdCompressor().compress(b"\x00\x01\x02" + b"\x00" * 7)})


READ_TARGET = {
    "chunk-checksum-mismatch": BIAS, "scales-checksum-mismatch": ATTN, "scales-nan": ATTN,
    "bool-byte-not-0-or-1": MASK,
}


def test_enough_distinct_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 30


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile_case(c: Case, valid: bytes, tmp_path: Path):
    blob = c.build(valid)
    assert blob != valid
    path = tmp_path / "hostile.cllm"
    path.write_bytes(blob)
    fragment = c.fragment.replace("{n}", str(len(blob)))
    if c.when == "open":
        with pytest.raises(c.exc) as info:
            cf.open(path)
    else:
        target = READ_TARGET.get(c.id, BIAS)
        with cf.open(path) as f:
            with pytest.raises(c.exc) as info:
                f.get_tensor(target)
            # the same problem is reported by verify() (or by reading), never silently passed
            problems = f.verify()
            assert problems or c.id in ("scales-nan", "bool-byte-not-0-or-1"), problems
    assert fragment in str(info.value), f"{info.value!r} does not mention {fragment!r}"


# --- loads fine: what the spec says a reader must accept -----------------------------------


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    with cf.open(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize(
    "where",
    ["top", "tensor", "stream", "group", "file", "file-stream"],
)
def test_x_fields_are_ignored(where: str, valid: bytes, tmp_path: Path):
    def e(o: dict) -> None:
        target = {
            "top": o, "tensor": hb.tensor(o, BIAS), "stream": hb.stream_of(o, ATTN, 1),
            "group": o["groups"][1], "file": o["files"][0], "file-stream": o["files"][0]["stream"],
        }[where]
        target["x-vendor-hint"] = {"anything": [1, 2.5, b"bytes", None]}

    blob = hb.edit_index(valid, e)
    (tmp_path / "a.cllm").write_bytes(valid)
    (tmp_path / "b.cllm").write_bytes(blob)
    assert read_everything(tmp_path / "b.cllm") == []
    a, b = _all_tensors(tmp_path / "a.cllm"), _all_tensors(tmp_path / "b.cllm")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_newer_minor_version_loads(valid: bytes, tmp_path: Path):
    path = tmp_path / "minor.cllm"
    path.write_bytes(hb.with_header(valid, minor=9))
    with cf.open(path) as f:
        assert f.version == (1, 9)
    assert read_everything(path) == []


def test_builder_round_trip_is_exact(valid: bytes):
    """The helpers re-create the writer's bytes exactly, so each case changes one thing."""
    assert hb.relayout(valid) == valid
    assert hb.edit_index(valid, lambda o: None) == valid
    assert hb.with_header(valid) == valid


# --- problems only verify() sees (reading gives the right data) ---------------------------


def _verify_only(valid: bytes, blob: bytes, tmp_path: Path, fragment: str) -> None:
    (tmp_path / "ok.cllm").write_bytes(valid)
    path = tmp_path / "bad.cllm"
    path.write_bytes(blob)
    problems = read_everything(path)
    assert any(fragment in p for p in problems), problems
    a, b = _all_tensors(tmp_path / "ok.cllm"), _all_tensors(path)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where", ["header-padding", "between-groups", "between-chunks", "before-index"])
def test_nonzero_padding_is_reported(where: str, valid: bytes, tmp_path: Path):
    o = hb.index_obj(valid)
    if where == "header-padding":
        pos = 100
    elif where == "between-groups":
        pos = o["groups"][1]["offset"] - 1
    elif where == "between-chunks":  # the alignment gap after a chunk that ends unaligned
        ends = [off + stored for _n, _i, st in hb.layout_items(o) for off, stored, _r, _c in hb.records(st)]
        starts = {off for _n, _i, st in hb.layout_items(o) for off, _s, _r, _c in hb.records(st)}
        pos = next(e for e in ends if e % 16 and hb.align_up(e, 16) in starts)
    else:
        g = o["groups"][-1]
        pos = g["offset"] + g["length"]
        assert pos < hb.read_header(valid)["index_offset"]
    assert valid[pos] == 0
    _verify_only(valid, hb.patch(valid, pos, b"\x80"), tmp_path, "non-zero padding")


def test_trailing_bytes_after_frame_are_reported(valid: bytes, tmp_path: Path):
    off, stored = hb.chunk_location(valid, BIAS, 0, 2)
    frame = valid[off : off + stored]
    blob = hb.relayout(valid, {(BIAS, 0, 2): frame + b"\0\0\0\0\0"})
    path = tmp_path / "trail.cllm"
    path.write_bytes(blob)
    with cf.open(path) as f:
        problems = f.verify()
        assert any("5 bytes after the zstd frame" in p for p in problems), problems
        with pytest.raises(DecodeError, match="bytes after the zstd frame"):
            f.get_tensor(BIAS)


def test_trailing_empty_frame_is_reported(valid: bytes, tmp_path: Path):
    """An empty zstd frame after the chunk's frame decodes to the same bytes through libzstd's
    one-shot decoder; it is still not one frame per chunk, and verify() says so."""
    off, stored = hb.chunk_location(valid, BIAS, 0, 2)
    empty = zstandard.ZstdCompressor().compress(b"")
    blob = hb.relayout(valid, {(BIAS, 0, 2): valid[off : off + stored] + empty})
    path = tmp_path / "trail.cllm"
    path.write_bytes(blob)
    with cf.open(path) as f:
        problems = f.verify()
    assert any(f"{len(empty)} bytes after the zstd frame" in p for p in problems), problems


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.when == "read"])
def test_verify_reports_bad_chunks(case_id: str, valid: bytes, tmp_path: Path):
    """verify() returns a problem list naming the item for every bad chunk, and never raises."""
    c = next(c for c in CASES if c.id == case_id)
    if case_id in ("scales-nan", "bool-byte-not-0-or-1"):
        pytest.skip("the stored bytes are a sound frame; the values are checked when read")
    path = tmp_path / "bad.cllm"
    path.write_bytes(c.build(valid))
    with cf.open(path) as f:
        problems = f.verify()
    target = READ_TARGET.get(case_id, BIAS)
    assert any(repr(target) in p for p in problems), problems


# --- memory: hostile sizes are rejected before anything big is allocated -----------------


def test_huge_tensor_claim_is_rejected_at_open_without_allocating(valid: bytes, tmp_path: Path):
    """A tensor claiming 2**40 float32 values (4 TiB) with a consistent chunk table (16 MiB
    chunks, 262144 records) is rejected by index validation, before any data is read."""
    n = 1 << 40
    chunk = C.MAX_CHUNK_SIZE

    def e(o: dict) -> None:
        t = hb.tensor(o, BIAS)
        t["shape"] = [n]
        s = t["streams"][0]
        count = n * 4 // chunk
        off = hb.records(s)[0][0]
        s.update(length=n * 4, chunk_size=chunk)
        hb.set_records(s, ([off + 1024 * i, 1024, chunk, 0] for i in range(count)))

    blob = hb.edit_index(valid, e)
    path = tmp_path / "huge.cllm"
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(LayoutError, match="past the index"):
            cf.open(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the index itself is 6 MiB; decoding it may hold a few copies, never the 4 TiB tensor
    assert peak < 64 * 2**20, peak


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import codecllm_format as cf
    from codecllm_format.errors import CllmError

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    out = {}
    for path in sys.argv[2:]:
        before = peak_mib()
        errors = []
        with cf.open(path) as f:
            try:
                f.get_tensor(sys.argv[1])
            except CllmError as e:
                errors.append(type(e).__name__)
            errors += f.verify()
        out[path] = {"grew_mib": peak_mib() - before, "errors": errors}
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units are Linux's")
def test_zstd_bombs_do_not_allocate(valid: bytes, tmp_path: Path):
    """Frames that decode to 1 GiB (declared, or hidden behind a 4 KiB declaration) are
    refused by get_tensor() and verify() without the process's peak memory growing."""
    paths = []
    for c in CASES:
        if c.id.startswith("zstd-bomb"):
            p = tmp_path / f"{c.id}.cllm"
            p.write_bytes(c.build(valid))
            paths.append(str(p))
    assert len(paths) == 2
    r = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, BIAS, *paths],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    for p in paths:
        assert result[p]["errors"][0] == "DecodeError", result
        assert len(result[p]["errors"]) >= 2, result  # verify() reported it too
        assert result[p]["grew_mib"] < 200, result


# --- things that are not files --------------------------------------------------------------


def test_missing_file(tmp_path: Path):
    with pytest.raises(CllmError, match="no such file"):
        cf.open(tmp_path / "nope.cllm")


def test_directory(tmp_path: Path):
    with pytest.raises(CllmError, match="directory"):
        cf.open(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_does_not_hang(tmp_path: Path):
    fifo = tmp_path / "pipe.cllm"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def target() -> None:
        try:
            cf.open(fifo).close()
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below
            result.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader so the thread can end
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail("opening a named pipe blocked")
    assert isinstance(result[0], CllmError), result


# --- flip every byte ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> bytes:
    """A tiny valid file: two tensor groups and an embedded file (every layout region)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.cllm"
    g = torch.Generator().manual_seed(3)
    with cf.CllmWriter(path, chunk_size=4096, metadata={"k": "v"}) as w:
        w.begin_group("a")
        w.add_tensor("a.w", torch.randn(6, 8, generator=g), cf.Encoding.INT8_ROW)
        w.add_tensor("a.b", torch.randn(5, generator=g).half(), cf.Encoding.RAW)
        w.begin_group("b")
        w.add_tensor("b.i", torch.arange(4, dtype=torch.int32), cf.Encoding.RAW)
        w.add_alias("c", "a.w")
        w.add_file("config.json", b"{}")
        w.finish()
    return path.read_bytes()


def flip_positions(blob: bytes) -> list[int]:
    """Every byte of the header, of every chunk and of the index; of the zero padding between
    them (~90% of a tiny file, all handled alike) the first and last byte of each run and
    every 29th byte, a deterministic sample that keeps the test fast."""
    h = hb.read_header(blob)
    meaningful = set(range(C.HEADER_SIZE)) | set(range(h["index_offset"], len(blob)))
    for _name, _item, stream in hb.layout_items(hb.index_obj(blob)):
        for off, stored, _raw, _ck in hb.records(stream):
            meaningful.update(range(off, off + stored))
    positions = []
    for pos in range(len(blob)):
        if pos in meaningful or pos % 29 == 0 or pos - 1 in meaningful or pos + 1 in meaningful:
            positions.append(pos)
    return positions


def test_flip_every_byte(tiny: bytes, tmp_path: Path):
    """Flip one bit at every byte offset: opening, reading every tensor and verify() must
    raise a CllmError or report a problem; never succeed silently, never raise anything else."""
    assert len(tiny) < 16 * 1024
    path = tmp_path / "flip.cllm"
    path.write_bytes(tiny)
    reference = _all_tensors(path)
    assert read_everything(path) == []
    positions = flip_positions(tiny)
    h = hb.read_header(tiny)
    index_len = h["index_length"]
    assert len(positions) >= C.HEADER_SIZE + index_len + 100, len(positions)
    silent, foreign = [], []
    with open(path, "r+b") as fh:
        for pos in positions:
            bit = pos % 8
            fh.seek(pos)
            fh.write(bytes([tiny[pos] ^ (1 << bit)]))
            fh.flush()
            try:
                with cf.open(path) as f:
                    got = {k: f.get_tensor(k) for k in f.keys()}
                    files = {n: f.read_file(n) for n in f.file_names()}
                    problems = f.verify()
                if not problems:
                    same = got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
                    silent.append((pos, "same data" if same else "different data", sorted(files)))
            except CllmError:
                pass
            except Exception as e:  # noqa: BLE001 - the point of the test
                foreign.append((pos, repr(e)))
            fh.seek(pos)
            fh.write(bytes([tiny[pos]]))
            fh.flush()
    assert not foreign, foreign[:10]
    assert not silent, silent[:20]


# --- FLOAT_PLANES (format 1.1): wrong stream counts / lengths / dtypes are rejected at open ----

PL_BF16 = "model.layers.0.w_bf16"  # float_planes bf16 [20, 300]: exponent and sign_mantissa 6000 bytes each
PL_F16 = "model.layers.0.w_f16"  # float_planes f16 [7, 9]: exponent 63 bytes, sign_mantissa 126
PL_F32 = "model.layers.0.w_f32"  # float_planes f32 [5]: exponent 5, sign_mantissa 15


@pytest.fixture(scope="module")
def valid_planes(tmp_path_factory) -> bytes:
    """A small valid format-1.1 file with float_planes tensors of the three dtypes (4 KiB chunks)."""
    g = torch.Generator().manual_seed(9)
    path = tmp_path_factory.mktemp("planes") / "planes.cllm"
    with cf.CllmWriter(path, chunk_size=C.MIN_CHUNK_SIZE, threads=1) as w:
        w.begin_group("model.layers.0")
        w.add_tensor(PL_BF16, (torch.randn(20, 300, generator=g) * 0.02).to(torch.bfloat16), C.Encoding.FLOAT_PLANES)
        w.add_tensor(PL_F16, torch.randn(7, 9, generator=g).to(torch.float16), C.Encoding.FLOAT_PLANES)
        w.add_tensor(PL_F32, torch.randn(5, generator=g), C.Encoding.FLOAT_PLANES)
        w.finish()
    return path.read_bytes()


def _f16_sign_mantissa(values: list[int]) -> bytes:
    """A compressed F16 sign_mantissa stream: the low bytes of all values, then the high bytes."""
    return zstandard.ZstdCompressor().compress(bytes(v & 0xFF for v in values) + bytes(v >> 8 for v in values))


PLANES_CASES = [
    Case("planes-one-stream", edit(lambda o: hb.tensor(o, PL_BF16).update(streams=hb.tensor(o, PL_BF16)["streams"][:1])),
         IndexSchemaError, f"tensor {PL_BF16!r}: 1 streams, encoding FLOAT_PLANES needs 2"),
    Case("planes-three-streams", edit(lambda o: hb.tensor(o, PL_F32)["streams"].append(hb.stream_of(o, PL_F32, 1))),
         IndexSchemaError, f"tensor {PL_F32!r}: 3 streams, encoding FLOAT_PLANES needs 2"),
    Case("planes-exponent-length", edit(lambda o: hb.stream_of(o, PL_F16, 0).update(length=62)),
         IndexSchemaError, f"tensor {PL_F16!r}.streams[0].length: 62 bytes, but shape x dtype needs 63"),
    Case("planes-sign-mantissa-length-of-bf16", edit(lambda o: hb.tensor(o, PL_F16).update(dtype=int(C.DType.BF16))),
         IndexSchemaError, f"tensor {PL_F16!r}.streams[1].length: 126 bytes, but shape x dtype needs 63"),
    Case("planes-sign-mantissa-length", edit(lambda o: hb.stream_of(o, PL_F32, 1).update(length=20)),
         IndexSchemaError, f"tensor {PL_F32!r}.streams[1].length: 20 bytes, but shape x dtype needs 15"),
    Case("planes-f64", edit(lambda o: hb.tensor(o, PL_F32).update(dtype=int(C.DType.F64))),
         IndexSchemaError, f"tensor {PL_F32!r}: float_planes needs dtype BF16, F16 or F32, got F64"),
    Case("planes-int-dtype", edit(lambda o: hb.tensor(o, PL_F16).update(dtype=int(C.DType.I16))),
         IndexSchemaError, f"tensor {PL_F16!r}: float_planes needs dtype BF16, F16 or F32, got I16"),
    Case("planes-in-a-1.0-file", lambda b: hb.with_header(b, minor=0),
         UnsupportedVersion, "encoding FLOAT_PLANES, which needs minor 1"),
    Case("planes-f16-exponent-over-31",
         lambda b: hb.relayout(b, {(PL_F16, 0, 0): zstandard.ZstdCompressor().compress(bytes([15] * 62 + [32]))}),
         DecodeError, f"tensor {PL_F16!r}: exponent byte 32 of value 62", when="read"),
    Case("planes-f16-sign-mantissa-high-bits",
         lambda b: hb.relayout(b, {(PL_F16, 1, 0): _f16_sign_mantissa([0x7FF] * 10 + [0x800] + [0] * 52)}),
         DecodeError, f"tensor {PL_F16!r}: sign_mantissa of value 10 (0x800)", when="read"),
    Case("planes-exponent-checksum", lambda b: hb.patch(b, hb.chunk_location(b, PL_BF16, 0, 1)[0] + 5, b"\xff"),
         ChecksumError, f"tensor {PL_BF16!r} exponent plane chunk 1", when="read"),
]


@pytest.mark.parametrize("c", PLANES_CASES, ids=[c.id for c in PLANES_CASES])
def test_hostile_planes_case(c: Case, valid_planes: bytes, tmp_path: Path):
    blob = c.build(valid_planes)
    assert blob != valid_planes
    path = tmp_path / "hostile.cllm"
    path.write_bytes(blob)
    if c.when == "open":
        with pytest.raises(c.exc) as info:
            cf.open(path)
    else:
        target = PL_BF16 if "exponent-checksum" in c.id else PL_F16
        with cf.open(path) as f:
            with pytest.raises(c.exc) as info:
                f.get_tensor(target)
    assert c.fragment in str(info.value), f"{info.value!r} does not mention {c.fragment!r}"


def test_valid_planes_file_reads(valid_planes: bytes, tmp_path: Path):
    path = tmp_path / "ok.cllm"
    path.write_bytes(valid_planes)
    with cf.open(path) as f:
        assert f.version == (1, 1) and f.verify() == []
        assert f.get_tensor(PL_F16).shape == (7, 9)
