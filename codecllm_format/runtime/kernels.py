"""Compute kernels of the runtime. For now only the reference implementations: dequantize
int8 weights (per-row float32 scales [rows], or int8_group bfloat16 scales [rows, groups]) to
the activation dtype, then use torch's own ops. Faster (fused) kernels
must match these (see DESIGN.md: every fast path is proven equal to the slow path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import group_size_for

LAYOUTS = ("linear", "conv1d")


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32(q) * scale[row], cast to `dtype` (bit-identical to quant.dequantize_int8_rows);
    with 2-D scales [rows, groups] (int8_group), float32(q[r, c]) * scale[r, c // group_size]
    (bit-identical to quant.dequantize_int8_groups; the group size follows from the shapes)."""
    w = q.to(torch.float32)
    if scales.dim() == 2:
        cols = q.shape[1]
        if cols:
            g = group_size_for(cols, scales.shape[1])
            w.mul_(scales.to(torch.float32).repeat_interleave(g, dim=1)[:, :cols])
        return w.to(dtype)
    w.mul_(scales.to(torch.float32)[:, None])
    return w.to(dtype)


class LinearPlan:
    """What a module keeps for its int8_linear calls: the fused kernels' dispatch cache
    (triton_kernels.LinearPlan), created on the first CUDA call. Importing or creating it loads
    no Triton; copies and pickles start empty."""

    __slots__ = ("fused",)

    def __init__(self):
        self.fused = None

    def __deepcopy__(self, memo):
        return LinearPlan()

    def __reduce__(self):
        return (LinearPlan, ())


def _no_fused(x, q, scales, bias):
    return None


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    layout: str = "linear",
    plan: LinearPlan | None = None,
) -> torch.Tensor:
    """y = x @ W^T + bias with W from int8 rows: the fused Triton kernel (runtime/triton_kernels.py,
    the dequantized weight never exists) when x is a bfloat16/float16 CUDA tensor, layout is
    "linear", Triton imports and the shapes are supported; int8_linear_reference otherwise (always
    on the CPU). CODECLLM_TRITON=0 forces the reference. Same arguments and result as
    int8_linear_reference; `plan` (one per calling module, optional) caches the dispatch decisions
    across calls, which makes a decode call cost little more host time than F.linear."""
    if layout == "linear" and x.is_cuda:
        if plan is not None:
            fused = plan.fused
            if fused is None:
                tk = _triton_kernels()
                fused = plan.fused = tk.LinearPlan() if tk is not None else _no_fused
            y = fused(x, q, scales, bias)
            if y is not None:
                return y
        elif x.dtype in (torch.bfloat16, torch.float16):
            tk = _triton_kernels()
            y = tk.maybe_int8_linear(x, q, scales, bias) if tk is not None else None
            if y is not None:
                return y
    return int8_linear_reference(x, q, scales, bias, layout=layout)


_TRITON: list = []  # [module or None], filled on first use


def _triton_kernels():
    """runtime.triton_kernels, or None where Triton is missing/broken or CODECLLM_TRITON=0."""
    if not _TRITON:
        import os

        mod = None
        if os.environ.get("CODECLLM_TRITON", "1").lower() not in ("0", "false", "off", "no"):
            try:
                from . import triton_kernels as mod
            except Exception:  # ImportError, or a Triton that fails to initialise
                mod = None
        _TRITON.append(mod)
    return _TRITON[0]


def int8_linear_reference(
    x: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    layout: str = "linear",
) -> torch.Tensor:
    """y = x @ W^T + bias with W dequantized from int8 rows (reference implementation).

    Args:
        x: activations (..., in_features); its dtype is the compute dtype.
        q: int8 weight in its stored shape: (out, in) for layout "linear" (nn.Linear),
            (in, out) for layout "conv1d" (transformers' GPT-2 Conv1D).
        scales: float32 scale of each stored row, or (int8_group) the scales [stored rows,
            groups] of each group of columns of a stored row.
        bias: optional (out,) bias, in x's dtype.
        layout: "linear" or "conv1d".

    Returns:
        (..., out_features) in x's dtype. The dequantized weight is a temporary freed on return.
    """
    w = dequantize(q, scales, x.dtype)
    if layout == "conv1d":
        w = w.t()
    elif layout != "linear":
        raise ValueError(f"int8_linear: layout must be one of {LAYOUTS}, got {layout!r}")
    return F.linear(x, w, bias)


def int8_embedding(
    ids: torch.Tensor, q_rows: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Embedding vectors of `ids` from their int8 rows.

    Args:
        ids: token ids, any shape (only the shape is used).
        q_rows: int8 rows [ids.numel(), dim], the table rows of ids.reshape(-1) in order.
        scales: float32 [ids.numel()], the scales of those rows, or (int8_group) their
            [ids.numel(), groups] group scales.
        dtype: output dtype.

    Returns:
        ids.shape + (dim,) tensor of `dtype`.
    """
    if q_rows.dim() != 2 or q_rows.shape[0] != ids.numel() or scales.shape[:1] != (ids.numel(),) or scales.dim() > 2:
        raise ValueError(
            f"int8_embedding: {ids.numel()} ids, but rows {tuple(q_rows.shape)} and scales {tuple(scales.shape)}"
        )
    return dequantize(q_rows, scales, dtype).reshape(*ids.shape, q_rows.shape[1])
