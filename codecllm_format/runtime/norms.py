"""RMSNorm in two launches instead of eight, for host-bound decoding on the GPU.

At batch-1 decode a transformer block is bound by host time (every kernel launch costs a few
microseconds of Python and dispatch, more than the kernel takes on the GPU). transformers' RMSNorm
modules (LlamaRMSNorm and ~150 copies of it) spell the norm as eight tensor ops: to(float32), pow,
mean, add, rsqrt, mul, to(dtype), mul by the weight; a Llama block has two of them. torch's
`F.rms_norm` computes the same normalization (float32 inside, cast to the input's dtype once) in
one kernel on CUDA; the weight multiply stays the module's own last op. So `FusedRMSNorm` returns
`weight * F.rms_norm(x)`, rounded exactly where the module it replaces rounds.

A module is replaced only when, on its own device and weight, it passes a probe: its class name
ends in "RMSNorm", its forward takes one tensor, it holds one 1-D weight and a float epsilon
(`variance_epsilon` or `eps`), and its output on random inputs equals ours within one rounding of
its dtype (and a few float32 roundings). That rejects what only looks alike: Gemma's `(1 + weight)`, gated norms, norms over
another axis. Nothing else about the model changes; `fuse_rms_norms(model)` returns how many were
replaced.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

_EPS_NAMES = ("variance_epsilon", "eps")


class FusedRMSNorm(nn.Module):
    """y = weight * rms_norm(x, eps): the normalization in one F.rms_norm kernel (float32 inside,
    x's dtype out), then the weight multiply in x's dtype, as transformers' RMSNorm rounds."""

    def __init__(self, weight: nn.Parameter, eps: float, replaces: str = "RMSNorm"):
        super().__init__()
        self.weight = weight
        self.eps = float(eps)
        self.replaces = replaces
        self._shape = (int(weight.shape[0]),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x, self._shape, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self._shape[0]}, eps={self.eps}, replaces={self.replaces}"


def _epsilon(mod: nn.Module) -> float | None:
    for name in _EPS_NAMES:
        v = getattr(mod, name, None)
        if isinstance(v, float) and v >= 0:
            return v
    return None


def _one_tensor_forward(mod: nn.Module) -> bool:
    try:
        params = list(inspect.signature(mod.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


def candidate(mod: nn.Module) -> FusedRMSNorm | None:
    """The replacement for `mod` if it has the shape of an RMSNorm (name, one-tensor forward, one
    1-D weight, float epsilon, no buffers); None otherwise. The probe decides the rest."""
    if isinstance(mod, FusedRMSNorm) or not type(mod).__name__.endswith("RMSNorm"):
        return None
    params = dict(mod.named_parameters(recurse=False))
    w = params.get("weight")
    if (set(params) != {"weight"} or list(mod.children()) or any(True for _ in mod.buffers(recurse=False))
            or w is None or w.dim() != 1 or not w.is_floating_point()):
        return None
    eps = _epsilon(mod)
    if eps is None or not _one_tensor_forward(mod):
        return None
    return FusedRMSNorm(w, eps, type(mod).__name__)


@torch.no_grad()
def agrees(mod: nn.Module, fused: FusedRMSNorm, dtype: torch.dtype, rows: int = 8, seed: int = 0) -> bool:
    """Whether `fused` computes what `mod` computes on random inputs of `dtype` (rows of the
    weight's width, on its device, with its real weight; mean and scale away from 0 and 1 so that a
    missing weight, a (1 + weight) or a skipped mean shows), within one rounding of `dtype`."""
    w = mod.weight
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(rows, w.shape[0], generator=g) * 3 + 0.5).to(device=w.device, dtype=dtype)
    try:
        ref, got = mod(x), fused(x)
    except Exception:
        return False
    if not isinstance(ref, torch.Tensor) or ref.shape != got.shape or ref.dtype != got.dtype:
        return False
    # one rounding of the output's dtype either way, plus a few float32 roundings inside (the two
    # rsqrt implementations and summation orders differ by several float32 ulps on the GPU)
    rel = 2 * torch.finfo(ref.dtype).eps + 16 * torch.finfo(torch.float32).eps
    ref32, got32 = ref.float(), got.float()
    tol = rel * ref32.abs() + torch.finfo(ref.dtype).tiny
    return bool(((got32 - ref32).abs() <= tol).all()) and bool(torch.isfinite(got32).all())


def fuse_rms_norms(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every RMSNorm module of `model` that passes the probe (see the module docstring) by
    a FusedRMSNorm sharing its weight; returns how many were replaced. dtype: the activations'
    dtype to probe with (default: each weight's own)."""
    todo = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            fused = candidate(child)
            if fused is not None and agrees(child, fused, dtype or child.weight.dtype):
                todo.append((parent, name, fused))
    for parent, name, fused in todo:
        setattr(parent, name, fused)
    return len(todo)
