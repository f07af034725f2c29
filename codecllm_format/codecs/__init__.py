"""Chunk codecs behind one interface, looked up by id or name."""

from .base import ChunkCodec, get_codec, register
from .zstd import ZstdCodec
from .ans import AnsCodec

__all__ = ["AnsCodec", "ChunkCodec", "ZstdCodec", "get_codec", "register"]
