"""tools/graph_decode.py: the static-cache decode loop the benchmark captures in a CUDA graph
gives the same greedy tokens as `generate`, for a transformers model and for a loaded .cllm
model (eagerly on the CPU here; captured on a GPU in test_gpu_model-style runs of the bench)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import codecllm_format as cf  # noqa: E402
from tiny_models import make_folder, model_class  # noqa: E402
from tools.graph_decode import GraphGenerator  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "llama"
    make_folder("llama", path)
    return path


def greedy(model, prompt, n):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def test_static_cache_loop_matches_generate_for_transformers(folder):
    model = model_class("llama").from_pretrained(folder).eval()
    prompt = torch.tensor([[2, 10, 11, 12, 13]])
    gen = GraphGenerator(model, max_len=40, capture=False)
    want = greedy(model, prompt, 20)
    assert torch.equal(gen.generate(prompt, 20), want)
    assert torch.equal(gen.generate(prompt, 20), want), "a second call (cache reset) differs"
    other = torch.tensor([[2, 30, 31]])
    assert torch.equal(gen.generate(other, 12), greedy(model, other, 12))


def test_static_cache_loop_matches_generate_for_a_cllm_model(folder, tmp_path):
    from codecllm_format.convert import convert

    path = convert(folder, tmp_path / "m.cllm").output
    with cf.load(path, tokenizer=False) as m:
        prompt = torch.tensor([[2, 14, 15, 16]])
        want = m.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        got = GraphGenerator(m.model, max_len=32, capture=False).generate(prompt, 16)
        assert torch.equal(got, want)


def test_too_long_is_refused(folder):
    model = model_class("llama").from_pretrained(folder).eval()
    with pytest.raises(ValueError, match="at most 8 tokens"):
        GraphGenerator(model, max_len=8, capture=False).generate(torch.tensor([[2, 10, 11]]), 6)
