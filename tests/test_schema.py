"""spec/index.schema.json validates the index of real files, and rejects broken indexes that
the reader (index.decode_index) rejects too.

JSON convention (see the schema's description): msgpack bin -> {"$bin": base64},
float -> {"$float": number}.
"""

from __future__ import annotations

import base64
import copy
import json
import math
from pathlib import Path

import msgpack
import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")  # a test dependency (CI installs it; the GPU machine may lack it)

from codecllm_format import CllmWriter, Encoding
from codecllm_format import constants as C
from codecllm_format.errors import FormatError
from codecllm_format.index import decode_index

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "spec" / "index.schema.json").read_text(encoding="utf-8"))
VECTORS = ROOT / "spec" / "vectors"


def to_json(obj):
    """A decoded msgpack value in the schema's JSON convention: bin -> {"$bin": base64},
    float -> {"$float": number, or "nan" / "inf" / "-inf"}."""
    if isinstance(obj, bytes):
        return {"$bin": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, float):
        return {"$float": obj if math.isfinite(obj) else str(obj)}
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def validator():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    return jsonschema.Draft202012Validator(SCHEMA)


def read_index(path: Path) -> tuple[dict, int]:
    """(decoded msgpack index, index_offset) of a .cllm file, read by hand per FORMAT.md."""
    data = path.read_bytes()
    fields = C.HEADER_STRUCT.unpack(data[: C.HEADER_SIZE])
    index_offset, index_length = fields[4], fields[5]
    return msgpack.unpackb(data[index_offset : index_offset + index_length], raw=False), index_offset


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def write_varied(path: Path, *, chunk_size: int, files: bool, aliases: bool, metadata: dict | None) -> Path:
    g = _gen(chunk_size + files + 2 * aliases)
    with CllmWriter(path, chunk_size=chunk_size, metadata=metadata) as w:
        w.begin_group("embed")
        w.add_tensor("embed.weight", torch.randn(33, 70, generator=g).to(torch.bfloat16), Encoding.INT8_ROW)
        w.begin_group("model.layers.0")
        w.add_tensor("model.layers.0.w", torch.randn(64, 80, generator=g), Encoding.INT8_ROW)
        w.add_tensor("model.layers.0.w16", torch.randn(3, 5, generator=g).half(), Encoding.INT8_ROW)
        w.add_tensor("model.layers.0.w64", torch.randn(2, 2, generator=g).double(), Encoding.INT8_ROW)
        w.add_tensor("model.layers.0.wide", torch.randn(1, 3000, generator=g), Encoding.INT8_ROW)
        w.add_tensor("model.layers.0.bias", torch.randn(3000, generator=g), Encoding.RAW)
        w.add_tensor("model.layers.0.zero_cols", torch.zeros(4, 0), Encoding.INT8_ROW)
        w.begin_group("model.layers.1")
        w.add_tensor("scalar", torch.tensor(2.5, dtype=torch.float64), Encoding.RAW)
        w.add_tensor("ids", torch.arange(1000, dtype=torch.int64), Encoding.RAW)
        w.add_tensor("mask", torch.arange(9) % 2 == 0, Encoding.RAW)
        w.add_tensor("empty", torch.zeros(0, 4, 2, dtype=torch.int16), Encoding.RAW)
        w.add_tensor("u8", torch.arange(256, dtype=torch.uint8).reshape(2, 2, 2, 2, 2, 2, 2, 2), Encoding.RAW)
        w.begin_group("empty.group")
        if aliases:
            w.add_alias("lm_head.weight", "embed.weight")
            w.add_alias("tied.bias", "model.layers.0.bias")
        if files:
            w.add_file("config.json", b'{"model_type": "x"}')
            w.add_file("tokenizer/tokenizer.json", b"{}" * 5000)
            w.add_file("empty.txt", b"")
        w.finish()
    return path


CASES = {
    "full": dict(chunk_size=4096, files=True, aliases=True,
                 metadata={"created_by": "test", "note": "é ✓", "x-not-special": "metadata keys are data"}),
    "plain": dict(chunk_size=C.DEFAULT_CHUNK_SIZE, files=False, aliases=False, metadata=None),
    "files_only": dict(chunk_size=8192, files=True, aliases=False, metadata={"k": "v" * 10000}),
}


@pytest.fixture(scope="module")
def varied_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("schema")
    return {name: write_varied(d / f"{name}.cllm", **kw) for name, kw in CASES.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_writer_output_validates(validator, varied_files, case):
    obj, offset = read_index(varied_files[case])
    errors = [e.message for e in validator.iter_errors(to_json(obj))]
    assert not errors, f"{case}: {errors[:3]}"
    decode_index(msgpack.packb(obj, use_bin_type=True), offset)  # and the reader agrees


@pytest.mark.parametrize("stem", ["int8", "raw", "multi", "extensions", "planes"])
def test_vectors_validate(validator, stem):
    obj, _ = read_index(VECTORS / f"{stem}.cllm")
    errors = [e.message for e in validator.iter_errors(to_json(obj))]
    assert not errors, f"{stem}: {errors[:3]}"


def test_schema_enums_equal_constants():
    defs = SCHEMA["$defs"]
    assert defs["dtype"]["enum"] == [d.value for d in C.DType]
    assert defs["float_dtype"]["enum"] == sorted(d.value for d in C.FLOAT_DTYPES)
    assert defs["encoding"]["enum"] == [e.value for e in C.Encoding]
    assert defs["planes_dtype"]["enum"] == sorted(d.value for d in C.FLOAT_PLANES_LAYOUT)
    assert defs["codec"]["enum"] == [c.value for c in C.Codec]
    stream = defs["stream"]["properties"]
    assert stream["chunk_size"]["minimum"] == C.MIN_CHUNK_SIZE
    assert stream["chunk_size"]["maximum"] == C.MAX_CHUNK_SIZE
    assert defs["name"]["maxLength"] == C.MAX_NAME_LENGTH
    assert defs["tensor"]["properties"]["shape"]["maxItems"] == C.MAX_NDIM
    top = SCHEMA["properties"]
    assert top["tensors"]["maxItems"] == C.MAX_TENSORS
    assert top["groups"]["maxItems"] == C.MAX_GROUPS
    assert top["files"]["maxItems"] == C.MAX_FILES
    assert top["metadata"]["maxProperties"] == C.MAX_METADATA_ENTRIES
    assert defs["file"]["properties"]["stream"]["allOf"][1]["properties"]["length"]["maximum"] == C.MAX_EMBEDDED_FILE_LENGTH


# --- negative cases: the schema and the reader both reject -------------------------------


def _tensor(obj, name):
    return next(t for t in obj["tensors"] if t["name"] == name)


def _set(path_fn, value):
    def mutate(obj):
        parent, key = path_fn(obj)
        parent[key] = value
    return mutate


def _delete(path_fn):
    def mutate(obj):
        parent, key = path_fn(obj)
        del parent[key]
    return mutate


W = "model.layers.0.w"
BIAS = "model.layers.0.bias"

NEGATIVE = {
    "missing groups": _delete(lambda o: (o, "groups")),
    "unknown top-level key": _set(lambda o: (o, "layout"), 1),
    "unknown tensor key": _set(lambda o: (_tensor(o, W), "scales"), []),
    "unknown stream key": _set(lambda o: (_tensor(o, W)["streams"][0], "dictionary"), b""),
    "unknown group key": _set(lambda o: (o["groups"][0], "align"), 4096),
    "unknown file key": _set(lambda o: (o["files"][0], "mode"), 0),
    "missing tensor dtype": _delete(lambda o: (_tensor(o, W), "dtype")),
    "unknown dtype": _set(lambda o: (_tensor(o, BIAS), "dtype"), 99),
    "dtype 0": _set(lambda o: (_tensor(o, BIAS), "dtype"), 0),
    "unknown encoding": _set(lambda o: (_tensor(o, BIAS), "encoding"), 99),
    "float_planes with one stream": _set(lambda o: (_tensor(o, BIAS), "encoding"), int(C.Encoding.FLOAT_PLANES)),
    "float_planes of F64": lambda o: _tensor(o, W).update(encoding=int(C.Encoding.FLOAT_PLANES), dtype=int(C.DType.F64)),
    "float_planes of an int dtype": lambda o: _tensor(o, W).update(encoding=int(C.Encoding.FLOAT_PLANES), dtype=int(C.DType.I16)),
    "unknown codec": _set(lambda o: (_tensor(o, BIAS)["streams"][0], "codec"), 99),
    "int8_row 1-D": _set(lambda o: (_tensor(o, W), "shape"), [64 * 80]),
    "int8_row of an int dtype": _set(lambda o: (_tensor(o, W), "dtype"), int(C.DType.I8)),
    "raw with two streams": lambda o: _tensor(o, BIAS)["streams"].append(_tensor(o, BIAS)["streams"][0]),
    "too many dims": _set(lambda o: (_tensor(o, BIAS), "shape"), [1] * (C.MAX_NDIM + 1)),
    "negative dim": _set(lambda o: (_tensor(o, BIAS), "shape"), [-3000]),
    "dim is a float": _set(lambda o: (_tensor(o, BIAS), "shape"), [3000.0]),
    "empty tensor name": _set(lambda o: (_tensor(o, BIAS), "name"), ""),
    "too long tensor name": _set(lambda o: (_tensor(o, BIAS), "name"), "n" * (C.MAX_NAME_LENGTH + 1)),
    "chunk_size too small": _set(lambda o: (_tensor(o, BIAS)["streams"][0], "chunk_size"), C.MIN_CHUNK_SIZE - 1),
    "chunk_size too large": _set(lambda o: (_tensor(o, BIAS)["streams"][0], "chunk_size"), C.MAX_CHUNK_SIZE + 1),
    "chunks not a multiple of 24": lambda o: _tensor(o, BIAS)["streams"][0].update(
        chunks=_tensor(o, BIAS)["streams"][0]["chunks"][:-1]),
    "chunks as str": lambda o: _tensor(o, BIAS)["streams"][0].update(
        chunks=_tensor(o, BIAS)["streams"][0]["chunks"].hex()),
    "stream length too large": _set(lambda o: (_tensor(o, BIAS)["streams"][0], "length"), (1 << 62) + 1),
    "group offset is a float": _set(lambda o: (o["groups"][0], "offset"), 4096.0),
    "group offset negative": _set(lambda o: (o["groups"][0], "offset"), -1),
    "group name empty": _set(lambda o: (o["groups"][0], "name"), ""),
    "file name with ..": _set(lambda o: (o["files"][0], "name"), "../config.json"),
    "file name with inner ..": _set(lambda o: (o["files"][0], "name"), "a/../../config.json"),
    "absolute file name": _set(lambda o: (o["files"][0], "name"), "/etc/config.json"),
    "alias target empty": _set(lambda o: (o["aliases"], "lm_head.weight"), ""),
    "alias target not a string": _set(lambda o: (o["aliases"], "lm_head.weight"), 0),
    "aliases not a map": _set(lambda o: (o, "aliases"), [["lm_head.weight", "embed.weight"]]),
    "metadata value not a string": _set(lambda o: (o["metadata"], "created_by"), 3),
    "metadata key empty": _set(lambda o: (o["metadata"], ""), "v"),
    "files not an array": _set(lambda o: (o, "files"), {}),
    "tensors not an array": _set(lambda o: (o, "tensors"), {}),
}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_schema_and_reader_reject(validator, varied_files, case):
    obj, offset = read_index(varied_files["full"])
    broken = copy.deepcopy(obj)
    NEGATIVE[case](broken)
    assert msgpack.packb(broken, use_bin_type=True) != msgpack.packb(obj, use_bin_type=True)
    errors = list(validator.iter_errors(to_json(broken)))
    assert errors, f"{case}: the schema accepts it"
    with pytest.raises(FormatError):
        decode_index(msgpack.packb(broken, use_bin_type=True), offset)


def test_top_level_not_a_map(validator):
    assert list(validator.iter_errors([]))
    with pytest.raises(FormatError):
        decode_index(msgpack.packb([]), C.DATA_START)


def test_extension_keys_accepted_everywhere(validator, varied_files):
    obj, offset = read_index(varied_files["full"])
    obj["x-top"] = {"anything": [1, 2.5, None, True, b"\x00"]}
    for t in obj["tensors"]:
        t["x-t"] = 1
        for s in t["streams"]:
            s["x-s"] = "s"
    for g in obj["groups"]:
        g["x-g"] = None
    for f in obj["files"]:
        f["x-f"] = [1]
        f["stream"]["x-s"] = 2
    assert not [e.message for e in validator.iter_errors(to_json(obj))]
    index = decode_index(msgpack.packb(obj, use_bin_type=True), offset)
    assert [t.name for t in index.tensors] == [t["name"] for t in obj["tensors"]]


def test_optional_top_level_keys(validator):
    empty = {"tensors": [], "groups": []}
    assert not list(validator.iter_errors(empty))
    index = decode_index(msgpack.packb(empty), C.DATA_START)
    assert index.tensors == () and index.files == () and index.aliases == {} and index.metadata == {}
