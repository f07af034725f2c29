"""Runtime: modules that keep weights compressed and the providers that decode them."""

from .kernels import int8_embedding, int8_linear
from .modules import CompressedEmbedding, CompressedLinear
from .provider import CpuProvider, WeightProvider

__all__ = ["CompressedEmbedding", "CompressedLinear", "CpuProvider", "WeightProvider", "int8_embedding", "int8_linear"]
