"""GPU tiers end to end: a converted tiny Llama loaded with device="cuda" in every residency tier
gives the CPU path's logits (same int8 weights), identical tokens across tiers, and generates
in fixed memory. Skipped without CUDA + nvCOMP (run on the lent H100/H200)."""

from __future__ import annotations

import pytest
import torch

import codecllm_format as cf
from codecllm_format.runtime.plan import TIERS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from codecllm_format.convert import convert

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(folder)
    out = folder.parent / "tiny.cllm"
    convert(folder, out, chunk_size=16384)
    return out


def _logits(m, ids):
    with torch.no_grad():
        return m(ids.to(m.device)).logits.float().cpu()


def test_every_tier_matches_the_cpu_path(tiny_llama):
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(3))
    with cf.load(tiny_llama, device="cpu", dtype=torch.float32, tokenizer=False) as cpu:
        ref = _logits(cpu, ids)
        ref_tokens = cpu.generate(ids[:1], max_new_tokens=24, do_sample=False)
    first = None
    for tier in TIERS:
        with cf.load(tiny_llama, device="cuda", dtype=torch.float32, residency=tier, tokenizer=False) as m:
            got = _logits(m, ids)
            rel = ((got - ref).norm() / ref.norm()).item()
            assert rel <= 1e-5, (tier, rel)
            if first is None:
                first = got
            else:
                assert torch.equal(got, first), f"tier {tier} differs from tier gpu"
            # on CUDA the RMSNorms run as one F.rms_norm kernel + the weight multiply (runtime/norms.py)
            assert m.fused_norms == 2 * 4 + 1, tier
            # all resident: nothing to schedule, so no group hooks (they cost host time per block)
            hooked = any(x._forward_pre_hooks for x in m.model.modules())
            assert hooked == (tier != "gpu"), tier
            # the embedding table (not tied) is looked up by rows, never streamed, outside the gpu tier
            assert m.provider.row_lookup_tables == ([] if tier == "gpu" else ["model.embed_tokens.weight"]), tier
            fusions = {id(x.fusion): x.fusion for x in m.model.modules() if getattr(x, "fusion", None) is not None}
            calls = sum(f.calls for f in fusions.values())
            tokens = m.generate(ids[:1].cuda(), max_new_tokens=24, do_sample=False).cpu()
            assert torch.equal(tokens, ref_tokens), tier
            assert fusions and sum(f.calls for f in fusions.values()) > calls, "decode steps were not fused"


@pytest.mark.parametrize("tier", ["host", "gpu-compressed"])
def test_memory_flat_over_500_tokens(tiny_llama, tier):
    with cf.load(tiny_llama, device="cuda", dtype=torch.bfloat16, residency=tier, tokenizer=False) as m:
        ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(4)).cuda()
        m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        after = []
        for _ in range(5):  # 5 x 100 = 500 generated tokens
            m.generate(ids, max_new_tokens=100, min_new_tokens=100, do_sample=False)
            torch.cuda.synchronize()
            after.append(torch.cuda.memory_allocated())
        assert after == [base] * 5, after
        bound = m.provider.plan.weight_vram + 32 * 1024 * 1024  # + KV cache and activations of 116 tokens
        assert torch.cuda.max_memory_allocated() - base <= bound


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_three_slots_share_two_staging_buffers(tiny_llama, tier):
    """slots=3 (prefetch two groups ahead): three output buffers, two staging buffers taken in
    turn; the same logits and tokens as slots=2, and no more VRAM than the plan."""
    ids = torch.randint(0, 2048, (1, 12), generator=torch.Generator().manual_seed(6)).cuda()
    with cf.load(tiny_llama, device="cuda", dtype=torch.bfloat16, residency=tier, tokenizer=False) as m:
        ref = [_logits(m, ids) for _ in range(2)]
        ref_tokens = m.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False).cpu()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    with cf.load(tiny_llama, device="cuda", dtype=torch.bfloat16, residency=tier, tokenizer=False, slots=3) as m:
        p = m.provider
        loaded = torch.cuda.memory_allocated() - base
        assert len(p.slots) == 3 and len(p.stagings) == 2 == p.plan.staging_buffers
        assert loaded <= p.plan.weight_vram + (4 << 20), (loaded, p.plan.weight_vram)
        for want in ref:
            assert torch.equal(_logits(m, ids), want)
        tokens = m.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False).cpu()
        assert torch.equal(tokens, ref_tokens)
        used = {k[2] for k in p._bound}
        assert used == {0, 1} and len({k[1] for k in p._bound}) == 3  # both stagings, all three slots


@pytest.mark.parametrize("tier", ["host", "gpu-compressed", "disk"])
def test_timeline_records_every_streamed_group(tiny_llama, tier):
    from codecllm_format.runtime.timeline import Timeline

    with cf.load(tiny_llama, device="cuda", dtype=torch.bfloat16, residency=tier, tokenizer=False) as m:
        ids = torch.randint(0, 2048, (1, 8), generator=torch.Generator().manual_seed(5)).cuda()
        m.generate(ids, max_new_tokens=2, do_sample=False)
        streamed = {g for g, t in m.provider.plan.tiers.items() if t != "gpu"}
        m.provider.timeline = tl = Timeline()
        _logits(m, ids)
        _logits(m, ids)  # a group used outside any hooked block is released by the next one
        m.provider.timeline = None
        rep = tl.report()
        # every streamed group once per pass (the second pass's last one may still be in use)
        assert rep["groups"] in (2 * len(streamed) - 1, 2 * len(streamed))
        first_pass = rep["uses"][: len(streamed)]
        assert {u["gid"] for u in first_pass} == streamed
        for k, u in enumerate(rep["uses"]):
            assert u["tier"] == tier
            if k == 0:  # prefetched by the last generate step, before the timeline was attached
                continue
            assert "decode_ms" in u and u["decode_ms"] > 0
            assert ("copy_ms" in u) == (tier != "gpu-compressed")
            assert u["wait_start"] <= u["compute_start"] <= u["compute_end"]
            if "copy_ms" in u:
                assert u["copy_end"] <= u["decode_start"] + 1e-3  # the decode waited for its copy
            assert u["decode_end"] <= u["compute_start"] + 1e-3  # and the compute for its decode
        assert 0 <= rep["stall_ms"] <= rep["span_ms"]


@pytest.mark.parametrize("tier", ["host", "gpu-compressed", "disk"])
def test_embedding_rows_read_from_pinned_host_memory_without_a_sync(tiny_llama, tier):
    """Outside the gpu tier the (untied) embedding table stays in pinned host memory and the GPU
    gathers the asked rows from there: right rows, on the GPU, and no host synchronization."""
    with cf.load(tiny_llama, device="cpu", dtype=torch.float32, tokenizer=False) as cpu:
        ref_q, ref_s = cpu.provider.embedding_rows("model.embed_tokens.weight", torch.tensor([0, 7, 2047, 7]))
    with cf.load(tiny_llama, device="cuda", dtype=torch.bfloat16, residency=tier, tokenizer=False) as m:
        ids = torch.tensor([0, 7, 2047, 7], device="cuda")
        before = torch.cuda.memory_allocated()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            q, s = m.provider.embedding_rows("model.embed_tokens.weight", ids)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert q.is_cuda and s.is_cuda
        assert torch.equal(q.cpu(), ref_q) and torch.equal(s.cpu(), ref_s.to(s.dtype))
        # the table is not in VRAM: only the gathered rows were allocated
        assert torch.cuda.memory_allocated() - before < 64 << 10
