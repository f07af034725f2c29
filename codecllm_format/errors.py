"""The error hierarchy. Every problem with a file, an input or the environment that a user
can act on is a CllmError subclass whose message names what is wrong."""

from __future__ import annotations


class CllmError(Exception):
    """Base class of every error codecllm raises on purpose."""


class FormatError(CllmError, ValueError):
    """The bytes are not a valid .cllm file (bad magic, truncation, bad index, bad layout)."""


class NotACllmFile(FormatError):
    """The file does not start with the .cllm magic."""


class TruncatedFile(FormatError):
    """The file is shorter than its header or index says."""


class UnsupportedVersion(FormatError):
    """The file's major version (or a required feature) is newer than this reader."""


class IndexSchemaError(FormatError):
    """The msgpack index is malformed or violates the schema."""


class LayoutError(FormatError):
    """Offsets or lengths are out of bounds, overlap, leave holes, or break alignment."""


class ChecksumError(FormatError):
    """Stored bytes do not match their checksum."""


class DecodeError(FormatError):
    """A chunk does not decode to exactly its declared bytes."""


class CodecUnavailable(CllmError, RuntimeError):
    """A codec or backend the operation needs is not installed (e.g. nvCOMP)."""


class TrustRequired(CllmError):
    """Decoding the file needs a decoder that assumes valid input and whose bitstream cannot be
    checked on the CPU (nvCOMP ANS): refused unless the caller trusts the file
    (trust_gpu_codecs=True, --trust-gpu-codecs)."""


class ConversionError(CllmError):
    """The converter's input is missing, unreadable or unsupported."""


class LoadError(CllmError):
    """The file is sound but cannot be turned into a model (architecture, parameters)."""


class DeviceError(CllmError, RuntimeError):
    """The requested device does not exist or cannot be used."""


__all__ = [
    "CllmError",
    "FormatError",
    "NotACllmFile",
    "TruncatedFile",
    "UnsupportedVersion",
    "IndexSchemaError",
    "LayoutError",
    "ChecksumError",
    "DecodeError",
    "CodecUnavailable",
    "TrustRequired",
    "ConversionError",
    "LoadError",
    "DeviceError",
]
