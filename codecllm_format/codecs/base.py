"""The interface every chunk codec implements, and the registry that finds one by id or name."""

from __future__ import annotations

import abc
from typing import Sequence

from ..constants import Codec
from ..errors import CodecUnavailable

Buffer = bytes | bytearray | memoryview


class ChunkCodec(abc.ABC):
    """Compresses and decompresses independent chunks. Stateless apart from settings."""

    codec_id: Codec
    name: str
    gpu_only: bool = False
    """True for codecs only a GPU library decodes (ANS): their constructor takes `trusted`."""

    @abc.abstractmethod
    def encode(self, chunks: Sequence[Buffer], threads: int = 1) -> list[Buffer]:
        """Compress each chunk independently; output order follows input order."""

    @abc.abstractmethod
    def decode_into(
        self, frames: Sequence[Buffer], raw_sizes: Sequence[int], out: memoryview, threads: int = 1, where: str = ""
    ) -> None:
        """Decode frames back to back into `out` (len(out) == sum(raw_sizes)).

        Raises:
            DecodeError: a frame is malformed or does not decode to exactly its raw size.
        """

    @abc.abstractmethod
    def check_frame(self, frame: Buffer, raw_size: int, where: str = "") -> None:
        """Strictly check one frame: exactly one well-formed frame of `raw_size` decoded bytes."""


_REGISTRY: dict[Codec, type[ChunkCodec]] = {}


def register(cls: type[ChunkCodec]) -> type[ChunkCodec]:
    _REGISTRY[cls.codec_id] = cls
    return cls


def get_codec(codec: Codec | str, **settings) -> ChunkCodec:
    """The codec for an id (Codec enum / int) or a name ("zstd")."""
    if isinstance(codec, str):
        for cls in _REGISTRY.values():
            if cls.name == codec:
                return cls(**settings)
        raise CodecUnavailable(f"unknown codec {codec!r}; known: {sorted(c.name for c in _REGISTRY.values())}")
    try:
        cls = _REGISTRY[Codec(codec)]
    except (KeyError, ValueError):
        raise CodecUnavailable(f"no implementation of codec {codec!r}") from None
    return cls(**settings)
