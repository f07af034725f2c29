"""spec/FORMAT.md and codecllm_format/constants.py must agree, both ways.

The spec's machine-readable tables are the Markdown tables that follow a
`<!-- table: NAME -->` marker. Every enum member and value, every format constant, the header
layout and the chunk record layout are compared with the code; a change on either side alone
fails here.
"""

from __future__ import annotations

import enum
import re
import struct
from pathlib import Path

import pytest
import torch

from codecllm_format import constants as C
from codecllm_format import index as index_module
from codecllm_format.reader import Header
from codecllm_format.writer import DTYPE_TO_TORCH

SPEC = Path(__file__).resolve().parent.parent / "spec" / "FORMAT.md"

REQUIRED_CONSTANTS = (
    "MAGIC VERSION_MAJOR VERSION_MINOR HEADER_SIZE CHUNK_ALIGNMENT GROUP_ALIGNMENT INDEX_ALIGNMENT "
    "DATA_START DEFAULT_CHUNK_SIZE MIN_CHUNK_SIZE MAX_CHUNK_SIZE CHUNK_RECORD_SIZE MAX_ZSTD_EXPANSION "
    "MAX_INDEX_LENGTH MAX_TENSORS MAX_NDIM MAX_NAME_LENGTH MAX_GROUPS MAX_FILES MAX_EMBEDDED_FILE_LENGTH "
    "MAX_METADATA_ENTRIES MAX_METADATA_VALUE_LENGTH"
).split()
"""Constants the spec's constants table must list (the code may not drop them either)."""

SPEC_ONLY_ELSEWHERE = {"MAX_DIM": index_module}
"""Constants of the spec's table that live in another module than constants.py."""

STRUCT_CODES = {"bytes[8]": "8s", "u16": "H", "u32": "I", "u64": "Q"}
STRUCT_SIZES = {"8s": 8, "H": 2, "I": 4, "Q": 8}


# --- parsing the spec ------------------------------------------------------------------------


def _cell(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == "`" and text[-1] == "`":
        text = text[1:-1]
    return text


def parse_tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """{marker name: rows as {column: cell}} for every `<!-- table: NAME -->` table."""
    tables: dict[str, list[dict[str, str]]] = {}
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"\s*<!--\s*table:\s*(.+?)\s*-->\s*", line)
        if not m:
            continue
        name = m.group(1)
        if name in tables:
            raise AssertionError(f"FORMAT.md: table {name!r} is marked twice")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        rows: list[list[str]] = []
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            # a cell may hold an escaped pipe (\|, markdown's way to put | in a table)
            cells = [_cell(c).replace("\\|", "|") for c in re.split(r"(?<!\\)\|", lines[j].strip().strip("|"))]
            if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                rows.append(cells)
            j += 1
        if len(rows) < 2:
            raise AssertionError(f"FORMAT.md: table {name!r} has no rows")
        header, body = rows[0], rows[1:]
        for r in body:
            assert len(r) == len(header), f"FORMAT.md table {name!r}: row {r} has {len(r)} cells, header {len(header)}"
        tables[name] = [dict(zip(header, r)) for r in body]
    return tables


@pytest.fixture(scope="module")
def tables() -> dict[str, list[dict[str, str]]]:
    return parse_tables(SPEC.read_text(encoding="utf-8"))


def _int(text: str) -> int:
    return int(text.replace("_", "").replace(",", ""))


def _spec_value(name: str, text: str):
    if name == "MAGIC":
        return bytes.fromhex(text)
    if name == "FILES_GROUP":
        return text
    return _int(text)


# --- constants -------------------------------------------------------------------------------


def _code_constants() -> dict[str, object]:
    """Scalar format constants of constants.py (ints, bytes, strs; not enums, not META_* keys)."""
    out = {}
    for name, value in vars(C).items():
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name) or name.startswith("META_"):
            continue
        if isinstance(value, enum.Enum) or not isinstance(value, (int, bytes, str)):
            continue
        out[name] = value
    return out


def test_constants_table_lists_required_constants(tables):
    names = [r["constant"] for r in tables["constants"]]
    assert len(names) == len(set(names)), "FORMAT.md constants table repeats a constant"
    missing = [n for n in REQUIRED_CONSTANTS if n not in names]
    assert not missing, f"FORMAT.md constants table lacks {missing}"


def test_spec_constants_equal_code(tables):
    for row in tables["constants"]:
        name = row["constant"]
        module = SPEC_ONLY_ELSEWHERE.get(name, C)
        assert hasattr(module, name), f"FORMAT.md lists {name}, which {module.__name__} does not define"
        spec_value = _spec_value(name, row["value"])
        code_value = getattr(module, name)
        assert spec_value == code_value, f"{name}: FORMAT.md says {spec_value!r}, {module.__name__} says {code_value!r}"


def test_every_code_constant_is_in_the_spec(tables):
    names = {r["constant"] for r in tables["constants"]}
    missing = sorted(set(_code_constants()) - names)
    assert not missing, f"constants.py defines {missing}, which FORMAT.md's constants table does not list"


def test_limits_table_names_every_limit(tables):
    text = " ".join(r["limit"] for r in tables["limits"])
    for name in _code_constants():
        if name.startswith(("MAX_", "MIN_")):
            assert name in text, f"{name} bounds input but FORMAT.md's limits table does not mention it"
    assert "MAX_DIM" in text


def test_metadata_keys_table(tables):
    spec = {r["constant"]: r["key"] for r in tables["metadata keys"]}
    code = {n: v for n, v in vars(C).items() if n.startswith("META_")}
    assert spec == code


# --- enums ---------------------------------------------------------------------------------


@pytest.mark.parametrize("enum_type", [C.DType, C.Encoding, C.Codec, C.Checksum], ids=lambda e: e.__name__)
def test_enum_tables_equal_code(tables, enum_type):
    rows = tables[f"enum {enum_type.__name__}"]
    spec = {r["name"]: _int(r["value"]) for r in rows}
    assert len(spec) == len(rows), f"enum {enum_type.__name__}: FORMAT.md repeats a name"
    code = {m.name: m.value for m in enum_type}
    only_spec = {k: v for k, v in spec.items() if code.get(k) != v}
    only_code = {k: v for k, v in code.items() if spec.get(k) != v}
    assert not only_spec and not only_code, (
        f"enum {enum_type.__name__}: FORMAT.md has {only_spec}, constants.py has {only_code}"
    )
    assert 0 not in spec.values(), "value 0 is never assigned"
    assert len(set(spec.values())) == len(spec), "enum values must be unique"


@pytest.mark.parametrize("enum_type", [C.Encoding, C.Codec], ids=lambda e: e.__name__)
def test_since_column_equals_feature_minor(tables, enum_type):
    """The "since" column of the encoding and codec tables is constants.FEATURE_MINOR."""
    for row in tables[f"enum {enum_type.__name__}"]:
        member = enum_type[row["name"]]
        assert row["since"] == f"1.{C.FEATURE_MINOR.get(member, 0)}", row


def test_dtype_table_columns(tables):
    for row in tables["enum DType"]:
        dt = C.DType[row["name"]]
        assert _int(row["size"]) == C.DTYPE_SIZE[dt], f"{dt.name}: size"
        assert (row["float"] == "yes") == (dt in C.FLOAT_DTYPES), f"{dt.name}: float column"
        assert getattr(torch, row["torch"]) == DTYPE_TO_TORCH[dt], f"{dt.name}: torch dtype"
        assert torch.empty(0, dtype=DTYPE_TO_TORCH[dt]).element_size() == C.DTYPE_SIZE[dt]


def test_encoding_table_streams(tables):
    for row in tables["enum Encoding"]:
        enc = C.Encoding[row["name"]]
        streams = tuple(s.strip() for s in row["streams"].split(","))
        assert streams == C.ENCODING_STREAMS[enc], f"{enc.name}: streams"
    assert set(C.ENCODING_STREAMS) == set(C.Encoding)


# --- header and chunk records ----------------------------------------------------------------


def _struct_from_table(rows: list[dict[str, str]], what: str) -> tuple[str, list[str]]:
    fmt = "<"
    pos = 0
    names = []
    for row in rows:
        code = STRUCT_CODES.get(row["type"])
        assert code is not None, f"{what}: unknown type {row['type']!r}"
        assert _int(row["offset"]) == pos, f"{what} field {row['field']}: offset {row['offset']}, expected {pos}"
        assert _int(row["size"]) == STRUCT_SIZES[code], f"{what} field {row['field']}: size {row['size']}"
        fmt += code
        pos += STRUCT_SIZES[code]
        names.append(row["field"])
    return fmt, names


def test_header_table_equals_header_struct(tables):
    rows = tables["header"]
    fmt, names = _struct_from_table(rows, "header")
    assert fmt == C.HEADER_STRUCT.format, f"header: FORMAT.md gives {fmt}, HEADER_STRUCT is {C.HEADER_STRUCT.format}"
    assert struct.calcsize(fmt) == C.HEADER_SIZE
    assert names[0] == "magic" and names[-1] == "header_checksum" and names[-2] == "reserved"
    checksum_row = rows[-1]
    assert _int(checksum_row["offset"]) == C.HEADER_CHECKSUM_OFFSET
    assert "0..55" in checksum_row["value / rule"] and C.HEADER_CHECKSUM_OFFSET == 56
    # the fields between magic and reserved are the reader's Header, in order
    assert names[1:-2] == list(Header.__dataclass_fields__), f"header fields {names[1:-2]} vs reader.Header"
    magic_hex = re.search(r"((?:[0-9A-Fa-f]{2} ){7}[0-9A-Fa-f]{2})", rows[0]["value / rule"]).group(1)
    assert bytes.fromhex(magic_hex) == C.MAGIC


def test_chunk_record_table_equals_struct(tables):
    fmt, names = _struct_from_table(tables["chunk record"], "chunk record")
    assert fmt == C.CHUNK_RECORD_STRUCT.format
    assert struct.calcsize(fmt) == C.CHUNK_RECORD_SIZE
    dtype_names = list(index_module.CHUNK_DTYPE.names)
    assert len(names) == len(dtype_names)
    for spec_name, code_name in zip(names, dtype_names):
        assert spec_name.startswith(code_name), f"chunk record field {spec_name!r} vs CHUNK_DTYPE {code_name!r}"
    assert index_module.CHUNK_DTYPE.itemsize == C.CHUNK_RECORD_SIZE


def test_parser_catches_a_changed_value():
    """The parser reads what the tests compare: a one-character edit of the spec is seen."""
    text = SPEC.read_text(encoding="utf-8")
    original = parse_tables(text)
    row = next(r for r in original["constants"] if r["constant"] == "MAX_NDIM")
    edited = text.replace(f"| MAX_NDIM | {row['value']} |", f"| MAX_NDIM | {_int(row['value']) + 1} |")
    assert edited != text
    changed = parse_tables(edited)
    new = next(r for r in changed["constants"] if r["constant"] == "MAX_NDIM")
    assert _int(new["value"]) == C.MAX_NDIM + 1


def test_float_planes_table_equals_code(tables):
    """Section 10.3's bit-mapping table: its E, M, k columns are constants.FLOAT_PLANES_LAYOUT,
    and its formulas, evaluated on random bit patterns, give the planes planes.split_planes writes."""
    import numpy as np

    from codecllm_format.planes import split_planes

    rows = {C.DType[r["dtype"]]: r for r in tables["float planes"]}
    assert set(rows) == set(C.FLOAT_PLANES_LAYOUT)
    for dt, r in rows.items():
        e, m, k = C.FLOAT_PLANES_LAYOUT[dt]
        assert (_int(r["E"]), _int(r["M"]), _int(r["k"])) == (e, m, k), dt.name
        assert _int(r["w"]) == 8 * C.DTYPE_SIZE[dt], dt.name
        w = _int(r["w"])
        g = np.random.default_rng(int(dt))
        bits = g.integers(0, 1 << w, size=1000, dtype=np.uint64).astype(np.uint32 if w == 32 else np.uint16)
        tensor = torch.from_numpy(bits.view(np.int32 if w == 32 else np.int16).copy()).view(DTYPE_TO_TORCH[dt])
        exponent, sign_mantissa = split_planes(tensor)
        py = [int(b) for b in bits]
        assert exponent.tolist() == [eval(r["exponent byte"], {"bits": b}) for b in py], dt.name  # noqa: S307
        sm = [eval(r["sign_mantissa value sm (k bytes)"], {"bits": b}) for b in py]  # noqa: S307
        assert sign_mantissa.tobytes() == bytes((v >> (8 * j)) & 0xFF for j in range(k) for v in sm), dt.name
