"""Drop-in modules whose weights stay compressed: each forward asks the provider for the int8
weight, computes, and drops it (decompress -> compute -> free). They hold no weight tensor."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
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
        self.fusion: FusedProjection | None = None  # set by the loader for sibling projections
        self._fusion_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fusion = self.fusion
        if fusion is not None:
            y = fusion.output(self._fusion_index, x)
            if y is not None:
                return y
        q, scales = self.provider.linear_weight(self.name)
        return kernels.int8_linear(x, q, scales, self.bias, layout=self.layout, plan=self._plan)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"layout={self.layout}, weight={self.name!r}, group={self.group}"
        )


class FusedProjection:
    """Sibling CompressedLinear layers that a model calls on the same input, one after the other
    (a block's q/k/v projections, gate/up), whose int8 rows the provider decodes back to back
    (provider.fused_weight): the first member called computes every member's output with ONE
    kernel launch over the stacked rows, and its siblings, called next with that very tensor,
    take their part of it. One decode step then launches 2 kernels instead of 5 for a Llama
    block's q/k/v + gate/up, which is what eager decoding at batch 1 is bound by.

    A sibling's cached part is used only when it is called with the same tensor object, not
    modified since (its version counter), each part at most once; anything else computes the
    layer on its own. Only single-row inputs (decode at batch 1) are fused: the parts of one
    output row are contiguous tensors, like the separate layers' outputs.

    Args:
        members: the member modules, in the provider's row order.
        provider: a provider with fused_weight.
        bias: the members' biases concatenated, or None (no member has one).
    """

    def __init__(self, members: list[CompressedLinear], provider, bias: torch.Tensor | None):
        self.key = tuple(m.name for m in members)
        self.provider = provider
        self.sizes = [m.out_features for m in members]
        self.bias = bias
        self.plan = kernels.LinearPlan()
        self._x = None  # weakref to the input of the last fused call
        self._version = -1
        self._parts: list = []
        for i, m in enumerate(members):
            m.fusion = self
            m._fusion_index = i
        self.calls = 0  # fused launches (tests, benchmarks)

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member `index`'s output for x, or None where the member must compute it alone."""
        ref = self._x
        if ref is not None and ref() is x and x._version == self._version:
            y = self._parts[index]
            self._parts[index] = None
            return y  # None: this member's part was taken already, it computes alone
        if x.numel() != x.shape[-1] or (x.requires_grad and torch.is_grad_enabled()):
            return None
        q, scales = self.provider.fused_weight(self.key)
        y = kernels.int8_linear(x, q, scales, self.bias, plan=self.plan)
        parts = list(y.split(self.sizes, dim=-1))
        mine = parts[index]
        parts[index] = None
        self._parts = parts
        self._x = weakref.ref(x)
        self._version = x._version
        self.calls += 1
        return mine


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


class CompressedFloatLinear(nn.Module):
    """Replaces nn.Linear whose weight is lossless (float_planes) in the file: each forward asks
    the provider for the weight decoded bit-exact, computes exactly what nn.Linear computes
    (F.linear with the weight in the layer's dtype) and drops it. Same outputs as the original
    model, bit for bit, with the weight compressed between forwards.

    Args:
        name: stored tensor name of the weight (aliases resolved).
        group: layer group index of that tensor.
        provider: a WeightProvider with `float_weight`.
        in_features, out_features: the layer's sizes.
        bias: the bias parameter (already materialized) or None.
        dtype: the layer's weight dtype in the model (the decoded weight is cast to it).
    """

    def __init__(self, name: str, group: int, provider, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.name = name
        self.group = group
        self.provider = provider
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.provider.float_weight(self.name)
        if w.dtype != self.dtype:
            w = w.to(self.dtype)
        if w.device != x.device:
            w = w.to(x.device)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.dtype}, weight={self.name!r} (lossless), group={self.group}")
