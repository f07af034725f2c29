"""Format constants of .cllm v1.

Everything here is mirrored by spec/FORMAT.md; tests/test_spec_agreement.py parses the
spec's tables and checks that they and this module agree. Change both or neither.
"""

from __future__ import annotations

import enum
import struct

# --- header -----------------------------------------------------------------------------

MAGIC = b"CLLM\r\n\x1a\n"
"""8 bytes. The CR LF / Ctrl-Z / LF tail catches text-mode and line-ending mangling (as PNG)."""

VERSION_MAJOR = 1
VERSION_MINOR = 1
"""The newest minor version this implementation reads and writes. A writer stamps each file with
the lowest minor version that covers the features it uses (`minor_version_for`), so a file
that uses only v1.0 features stays a v1.0 file, byte for byte."""

HEADER_SIZE = 64
HEADER_STRUCT = struct.Struct("<8sHHIQQQQQQ")
"""magic, major, minor, flags, index_offset, index_length, index_checksum, file_length,
reserved (must be 0), header_checksum (XXH3-64 of the 56 bytes before it)."""
assert HEADER_STRUCT.size == HEADER_SIZE

HEADER_CHECKSUM_OFFSET = 56

KNOWN_FLAGS = 0
"""No header flag is defined in v1.0: a reader MUST reject any set bit it does not know."""

# --- alignment --------------------------------------------------------------------------

CHUNK_ALIGNMENT = 16
GROUP_ALIGNMENT = 4096
INDEX_ALIGNMENT = 16
DATA_START = GROUP_ALIGNMENT
"""The first layer group starts at byte 4096; bytes 64..4095 are zero padding."""

# --- chunking ---------------------------------------------------------------------------

DEFAULT_CHUNK_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
CHUNK_RECORD_STRUCT = struct.Struct("<QIIQ")
"""One chunk-table record: offset (absolute), stored_length, raw_length, checksum."""
CHUNK_RECORD_SIZE = CHUNK_RECORD_STRUCT.size
MAX_ZSTD_EXPANSION = 32768
"""A zstd frame cannot decode to more than 32768 x its own size (an RLE block of 128 KiB
costs 4 bytes); a chunk claiming more is rejected before anything is allocated."""

# --- limits (a reader MUST reject files over these) -------------------------------------

MAX_INDEX_LENGTH = 256 * 1024 * 1024
MAX_TENSORS = 1_000_000
MAX_NDIM = 8
MAX_NAME_LENGTH = 1024
MAX_GROUPS = 100_000
MAX_FILES = 256
MAX_EMBEDDED_FILE_LENGTH = 256 * 1024 * 1024
MAX_METADATA_ENTRIES = 4096
MAX_METADATA_VALUE_LENGTH = 1024 * 1024


class DType(enum.IntEnum):
    """Logical element type of a tensor (what get_tensor returns)."""

    F32 = 1
    F16 = 2
    BF16 = 3
    F64 = 4
    I8 = 5
    U8 = 6
    I16 = 7
    I32 = 8
    I64 = 9
    BOOL = 10


DTYPE_SIZE = {
    DType.F32: 4,
    DType.F16: 2,
    DType.BF16: 2,
    DType.F64: 8,
    DType.I8: 1,
    DType.U8: 1,
    DType.I16: 2,
    DType.I32: 4,
    DType.I64: 8,
    DType.BOOL: 1,
}

FLOAT_DTYPES = frozenset({DType.F32, DType.F16, DType.BF16, DType.F64})


class Encoding(enum.IntEnum):
    """How a tensor's values are represented in its streams."""

    RAW = 1
    """One stream: the tensor's bytes, little-endian, row-major, in its logical dtype."""
    INT8_ROW = 2
    """Two streams: int8 values (row-major), then float32 scales, one per row (dim 0).
    value = int8 * scale[row]. Only for float tensors of 2 dimensions."""
    FLOAT_PLANES = 3
    """Lossless float (BF16, F16, F32; since 1.1): two streams, the biased exponent of every
    value (one byte each), then sign and mantissa (sm = sign << mantissa_bits | mantissa) as
    k = 1, 2 or 3 byte planes of numel bytes (byte j of every sm). Bit-exact; spec/FORMAT.md
    section 10.3."""
    INT8_GROUP = 4
    """Two streams: int8 values (row-major), then bfloat16 scales, one per group of
    `group_size` consecutive columns of a row (the tensor map's `group_size`, a power of two;
    a row's last group may be partial): value = int8 * scale[row, col // group_size].
    Only for float tensors of 2 dimensions. Since format 1.1."""


ENCODING_STREAMS = {
    Encoding.RAW: ("data",),
    Encoding.INT8_ROW: ("q", "scale"),
    Encoding.FLOAT_PLANES: ("exponent", "sign_mantissa"),
    Encoding.INT8_GROUP: ("q", "scale"),
}

FLOAT_PLANES_LAYOUT = {
    # dtype: (exponent bits E, mantissa bits M, byte planes k of sign_mantissa)
    DType.BF16: (8, 7, 1),
    DType.F16: (5, 10, 2),
    DType.F32: (8, 23, 3),
}
"""FLOAT_PLANES bit mapping per dtype (spec/FORMAT.md section 10.3): the dtypes it takes."""

MIN_GROUP_SIZE = 16
MAX_GROUP_SIZE = 4096
"""An INT8_GROUP tensor's `group_size` is a power of two in [MIN_GROUP_SIZE, MAX_GROUP_SIZE]."""
DEFAULT_GROUP_SIZE = 128
"""The group size the converter uses for `--quantize int8-group` (benchmarks/RESULTS.md)."""


class Codec(enum.IntEnum):
    """How a stream's chunks are stored."""

    ZSTD = 1
    """Each chunk is exactly one standard zstd frame (RFC 8878) with its content size."""
    ANS = 2
    """Each chunk is exactly one nvCOMP 6.0 ANS compressed chunk (RAW bitstream, uint8 data):
    GPU-only (only nvCOMP decodes it), allowed in the streams of INT8_ROW tensors only."""


class Checksum(enum.IntEnum):
    """Checksum algorithm for the header, the index and every stored chunk."""

    XXH3_64 = 1


CHECKSUM_ALGORITHM = Checksum.XXH3_64

class _FeatureMinor(dict):
    """{enum member: minor version}, keyed by (enum class, value): members of different IntEnums
    with the same value (Encoding.INT8_ROW == Codec.ANS == 2 as ints) are different features,
    which a plain dict would merge."""

    @staticmethod
    def _key(member) -> tuple[type, int]:
        return type(member), int(member)

    def __setitem__(self, member, minor) -> None:
        super().__setitem__(self._key(member), minor)

    def __getitem__(self, member):
        return super().__getitem__(self._key(member))

    def __delitem__(self, member) -> None:
        super().__delitem__(self._key(member))

    def __contains__(self, member) -> bool:
        return super().__contains__(self._key(member))

    def get(self, member, default=None):
        return super().get(self._key(member), default)


# Minor version that introduced each enum value; values absent here are v1.0.
FEATURE_MINOR: dict[enum.IntEnum, int] = _FeatureMinor()
FEATURE_MINOR[Codec.ANS] = 1
FEATURE_MINOR[Encoding.FLOAT_PLANES] = 1

GPU_ONLY_CODECS = frozenset({Codec.ANS})
"""Codecs whose bitstream only a GPU library decodes (nvCOMP): a reader without it can open the
file, check every checksum and read everything else, but not decode these chunks."""
FEATURE_MINOR[Encoding.INT8_GROUP] = 1


def minor_version_for(encodings, codecs) -> int:
    """The minor version a file using these encodings and codecs must carry."""
    used = [*encodings, *codecs]
    return max((FEATURE_MINOR.get(v, 0) for v in used), default=0)

FILES_GROUP = "__files__"
"""Name of the last layer group, which holds the embedded files (and only them)."""

# --- well-known metadata keys -----------------------------------------------------------

META_CREATED_BY = "created_by"
META_SOURCE = "source"
META_QUANTIZE = "quantize"
