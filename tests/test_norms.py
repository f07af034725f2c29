"""runtime.norms: RMSNorm modules replaced by FusedRMSNorm only where the probe shows the same
function (CPU: F.rms_norm runs here too, so the whole decision and the numerics are tested in CI;
the launch count it saves is measured on the GPU by tools/profile_decode.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import codecllm_format
from codecllm_format.convert import convert
from codecllm_format.runtime.norms import FusedRMSNorm, agrees, candidate, fuse_rms_norms
from tiny_models import make_folder


def _with_weight(mod: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
    return mod.to(dtype)


def _norm_classes():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    return [LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cls_index", range(3))
def test_transformers_rms_norms_are_replaced_and_agree(cls_index, dtype):
    cls = _norm_classes()[cls_index]
    mod = _with_weight(cls(96, eps=1e-5), cls_index, dtype)
    fused = candidate(mod)
    assert isinstance(fused, FusedRMSNorm) and fused.weight is mod.weight and fused.eps == 1e-5
    assert agrees(mod, fused, dtype)
    g = torch.Generator().manual_seed(100 + cls_index)
    for _ in range(3):  # fresh inputs, also 3-D (batch, sequence, hidden) like a decoder's
        x = (torch.randn(2, 5, 96, generator=g) * 4 - 1).to(dtype)
        ref, got = mod(x), fused(x)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel <= torch.finfo(dtype).eps, rel


class _CenteredRMSNorm(nn.Module):
    """Looks like an RMSNorm (name, weight, variance_epsilon) but subtracts the mean first."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        x32 = x.float() - x.float().mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


class _GatedRMSNorm(_CenteredRMSNorm):
    def forward(self, x, gate=None):  # a second input: never replaced
        return super().forward(x)


def test_look_alikes_are_left_alone():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    gemma = _with_weight(GemmaRMSNorm(64, eps=1e-6), 1, torch.bfloat16)  # (1 + weight)
    assert candidate(gemma) is not None and not agrees(gemma, candidate(gemma), torch.bfloat16)
    centered = _CenteredRMSNorm(64)
    assert candidate(centered) is not None and not agrees(centered, candidate(centered), torch.float32)
    assert candidate(_GatedRMSNorm(64)) is None
    assert candidate(nn.LayerNorm(64)) is None  # not an RMSNorm by name (and has a bias)

    model = nn.Sequential(gemma, nn.LayerNorm(64).to(torch.bfloat16), _with_weight(_norm_classes()[0](64), 2, torch.bfloat16))
    assert fuse_rms_norms(model, torch.bfloat16) == 1
    assert model[0] is gemma and isinstance(model[1], nn.LayerNorm) and isinstance(model[2], FusedRMSNorm)
    assert fuse_rms_norms(model, torch.bfloat16) == 0  # already fused: nothing more to do


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("norms")
    make_folder("llama", tmp / "hf", seed=5)
    path = tmp / "llama.cllm"
    convert(tmp / "hf", path, level=1, chunk_size=4096)
    return path


def test_load_fuses_on_request_and_computes_the_same(llama_file):
    ids = torch.randint(7, 45, (2, 11), generator=torch.Generator().manual_seed(1))
    with codecllm_format.load(llama_file, tokenizer=False) as plain:  # CPU: off by default
        assert plain.fused_norms == 0
        assert not any(isinstance(m, FusedRMSNorm) for m in plain.model.modules())
        ref = plain(ids).logits
        layers = plain.config.num_hidden_layers
    with codecllm_format.load(llama_file, tokenizer=False, fuse_norms=True) as fused:
        assert fused.fused_norms == 2 * layers + 1  # two per block and the final norm
        assert sum(isinstance(m, FusedRMSNorm) for m in fused.model.modules()) == 2 * layers + 1
        got = fused(ids).logits
        keys = set(fused.model.state_dict())
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5
    with codecllm_format.load(llama_file, tokenizer=False) as plain:
        assert keys == set(plain.model.state_dict())  # same parameter names: the weight is shared, not renamed
