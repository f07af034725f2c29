"""Drop-in modules whose weights stay compressed: each forward asks the provider for the int8
weight, computes, and drops it (decompress -> compute -> free). They hold no weight tensor."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .provider import WeightProvider


class CompressedLinear(nn.Module):
    """Replaces nn.Linear (layout "linear", weight stored (out, in)) or transformers' Conv1D
    (layout "conv1d", weight stored (in, out)).

    Args:
        name: stored tensor name of the weight in the file (aliases resolved).
        group: layer group index of that tensor.
        provider: the WeightProvider to ask for the weight.
        in_features, out_features: the layer's sizes.
        bias: the bias parameter (already materialized) or None.
        layout: "linear" or "conv1d".
    """

    def __init__(
        self,
        name: str,
        group: int,
        provider: WeightProvider,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None = None,
        layout: str = "linear",
    ):
        super().__init__()
        if layout not in kernels.LAYOUTS:
            raise ValueError(f"layout must be one of {kernels.LAYOUTS}, got {layout!r}")
        self.name = name
        self.group = group
        self.provider = provider
        self.in_features = in_features
        self.out_features = out_features
        self.layout = layout
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias
        self._plan = kernels.LinearPlan()  # the kernels' dispatch cache for this layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scales = self.provider.linear_weight(self.name)
        return kernels.int8_linear(x, q, scales, self.bias, layout=self.layout, plan=self._plan)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"layout={self.layout}, weight={self.name!r}, group={self.group}"
        )


class CompressedEmbedding(nn.Module):
    """Replaces nn.Embedding: looks rows up in the compressed table (the provider decodes only
    the chunks that hold them); the table is never dequantized whole.

    Args:
        name: stored tensor name of the table.
        group: layer group index of that tensor.
        provider: the WeightProvider.
        num_embeddings, embedding_dim: the table's shape.
        dtype: dtype of the output vectors (the model's compute dtype).
        padding_idx: kept for inspection (it only affects gradients in nn.Embedding).
    """

    def __init__(
        self,
        name: str,
        group: int,
        provider: WeightProvider,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype = torch.float32,
        padding_idx: int | None = None,
    ):
        super().__init__()
        self.name = name
        self.group = group
        self.provider = provider
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.dtype = dtype
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q_rows, scales = self.provider.embedding_rows(self.name, ids.reshape(-1))
        return kernels.int8_embedding(ids, q_rows, scales, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}, weight={self.name!r}, group={self.group}"
