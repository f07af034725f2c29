"""Sibling projections (q/k/v, gate/up) decoded back to back and computed by one launch.

On the CPU: the layout places the siblings' rows and scales back to back exactly where the
members' own slices are (decoded here with zstandard as the GPU would); FusedProjection gives
every member the output it would compute alone, and falls back to computing alone whenever the
input is not the very same, unmodified, single-row tensor; a tiny Llama (Qwen2, Mistral, BERT)
loaded with a provider that serves fused weights gives the CPU path's outputs and tokens. On a
GPU (marker gpu): every tier serves the fused rows, and the fused Triton GEMV matches each layer
alone (test_gpu_model also checks that generation is fused and equals the CPU path's tokens).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard

import codecllm_format as cf
from codecllm_format.convert import convert
from codecllm_format.loader import _load_resolved
from codecllm_format.runtime import kernels
from codecllm_format.runtime.layout import SLOT_ALIGNMENT, build_layouts, slice_views
from codecllm_format.runtime.modules import CompressedLinear, FusedProjection
from codecllm_format.runtime.provider import CpuProvider

from tiny_models import make_folder


def _decode_group(f, lay) -> torch.Tensor:
    """A group's decoded slot, built on the CPU exactly as the GPU decode fills it."""
    group = bytes(f.group_bytes(lay.gid))
    out = bytearray(lay.decoded_bytes)
    d = zstandard.ZstdDecompressor()
    for off, size, o_off, o_size in zip(lay.in_offsets, lay.in_sizes, lay.out_offsets, lay.out_sizes):
        out[o_off : o_off + o_size] = d.decompress(group[off : off + size])
    return torch.frombuffer(out, dtype=torch.uint8)


class SlotProvider(CpuProvider):
    """CpuProvider that serves int8 weights the way GpuProvider does: views of each group's
    decoded slot laid out by build_layouts, fused sets included (fusion_sets / fused_weight)."""

    def __init__(self, cllm, **options):
        super().__init__(cllm, **options)
        self.layouts = build_layouts(cllm.index)
        self._bufs: dict[int, torch.Tensor] = {}
        self._group = {n: g for g, lay in self.layouts.items() for n in lay.tensors}
        self.fused_calls = 0

    def _buf(self, gid):
        if gid not in self._bufs:
            self._bufs[gid] = _decode_group(self.cllm, self.layouts[gid])
        return self._bufs[gid]

    def linear_weight(self, name):
        name = self.cllm.index.aliases.get(name, name)
        gid = self._group[name]
        return slice_views(self._buf(gid), self.layouts[gid].tensors[name])

    def fusion_sets(self):
        return [m for lay in self.layouts.values() for m in lay.fused]

    def fused_weight(self, members):
        gid = self._group[members[0]]
        self.fused_calls += 1
        return slice_views(self._buf(gid), self.layouts[gid].fused[members])


def _block_file(path, rows=(128, 32, 32), cols=96, bias=False, quantize=cf.Encoding.INT8_ROW):
    g = torch.Generator().manual_seed(5)
    names = ["q_proj", "k_proj", "v_proj"]
    with cf.CllmWriter(path, chunk_size=4096) as w:
        w.begin_group("model.layers.0")
        # file order differs from the pattern order: k, o, q, v (sorted names)
        for n, r in sorted(zip(names + ["o_proj"], list(rows) + [cols])):
            kw = {"group_size": 32} if quantize == cf.Encoding.INT8_GROUP else {}
            w.add_tensor(f"model.layers.0.self_attn.{n}.weight", torch.randn(r, cols, generator=g), quantize, **kw)
            if bias:
                w.add_tensor(f"model.layers.0.self_attn.{n}.bias", torch.randn(r, generator=g))
        w.add_tensor("model.layers.0.mlp.gate_proj.weight", torch.randn(200, cols, generator=g), cf.Encoding.INT8_ROW)
        w.add_tensor("model.layers.0.mlp.up_proj.weight", torch.randn(200, cols + 1, generator=g), cf.Encoding.INT8_ROW)
        w.finish()


@pytest.mark.parametrize("quantize", [cf.Encoding.INT8_ROW, cf.Encoding.INT8_GROUP])
def test_layout_puts_siblings_back_to_back(tmp_path, quantize):
    path = tmp_path / "m.cllm"
    _block_file(path, quantize=quantize)
    with cf.open(path) as f:
        (lay,) = build_layouts(f.index).values()
        members = tuple(f"model.layers.0.self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj"))
        assert list(lay.fused) == [members]  # gate/up differ in columns: not fused
        fs = lay.fused[members]
        assert fs.rows == (128, 32, 32) and fs.cols == 96 and fs.q_offset % SLOT_ALIGNMENT == 0
        buf = _decode_group(f, lay)
        q, s = slice_views(buf, fs)
        raws = [f.get_raw(n) for n in members]
        assert torch.equal(q, torch.cat([r.data for r in raws]))
        assert torch.equal(s, torch.cat([r.scales for r in raws]))
        for n in f.keys():  # every tensor's own views still read its own values
            if n in lay.tensors:
                q1, s1 = slice_views(buf, lay.tensors[n])
                assert torch.equal(q1, f.get_raw(n).data) and torch.equal(s1, f.get_raw(n).scales), n
        assert np.all(np.diff(np.sort(lay.out_offsets)) > 0)


def test_siblings_with_an_alignment_gap_are_not_fused(tmp_path):
    path = tmp_path / "m.cllm"
    _block_file(path, rows=(128, 33, 32))  # 33 * 96 bytes is not a multiple of 256
    with cf.open(path) as f:
        (lay,) = build_layouts(f.index).values()
        assert lay.fused == {}


def _members(f, provider, bias):
    mods = []
    for n in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{n}.weight"
        rows, cols = f.entry(name).shape
        b = f.get_tensor(f"model.layers.0.self_attn.{n}.bias") if bias else None
        mods.append(CompressedLinear(name, 0, provider, cols, rows, b))
    fused_bias = torch.cat([m.bias.detach() for m in mods]) if bias else None
    return mods, FusedProjection(mods, provider, fused_bias)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_outputs_equal_each_layer_alone(tmp_path, bias):
    path = tmp_path / "m.cllm"
    _block_file(path, bias=bias)
    with cf.open(path) as f:
        p = SlotProvider(f)
        mods, fusion = _members(f, p, bias)

        def alone(m, x):
            q, s = p.linear_weight(m.name)
            return kernels.int8_linear_reference(x, q, s, m.bias)

        x = torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            outs = [m(x) for m in mods]
            assert fusion.calls == 1 and p.fused_calls == 1
            for m, y in zip(mods, outs):
                assert y.shape == (1, 1, m.out_features) and y.is_contiguous()
                torch.testing.assert_close(y, alone(m, x), rtol=1e-5, atol=1e-5)
            # a part is handed out once: a second call computes alone
            y = mods[1](x)
            assert fusion.calls == 1
            torch.testing.assert_close(y, alone(mods[1], x), rtol=1e-5, atol=1e-5)
            # modified in place after the fused call: the siblings compute alone, on the new values
            x2 = torch.randn(1, 1, 96)
            mods[0](x2)
            x2.mul_(3)
            torch.testing.assert_close(mods[1](x2), alone(mods[1], x2), rtol=1e-5, atol=1e-5)
            # a different tensor with the same values is not the same input
            x3 = torch.randn(1, 1, 96)
            mods[0](x3)
            calls = fusion.calls
            x3b = x3.clone()
            torch.testing.assert_close(mods[2](x3b), alone(mods[2], x3b), rtol=1e-5, atol=1e-5)
            assert fusion.calls == calls + 1  # v_proj started a fused call of its own for x3b
            # several rows (prefill): each layer alone
            xs = torch.randn(1, 5, 96)
            calls = fusion.calls
            for m in mods:
                torch.testing.assert_close(m(xs), alone(m, xs), rtol=1e-5, atol=1e-5)
            assert fusion.calls == calls
        # autograd: never fused
        xg = torch.randn(1, 1, 96, requires_grad=True)
        calls = fusion.calls
        mods[0](xg)
        assert fusion.calls == calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_loaded_model_with_fused_provider_generates_the_same_tokens(tmp_path, arch):
    """Through the loader: every block's q/k/v (with biases in qwen2) and gate/up are linked, and
    greedy decoding (fused at every step) gives the CPU path's tokens."""
    make_folder(arch, tmp_path / arch)
    out = tmp_path / "m.cllm"
    convert(tmp_path / arch, out, chunk_size=4096)
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with cf.load(out, tokenizer=False) as plain:
        want = plain.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        want_logits = plain(ids[:, :1]).logits
    m = _load_resolved(out, torch.device("cpu"), SlotProvider, None, tokenizer=False)
    try:
        fusions = {id(mod.fusion): mod.fusion for mod in m.model.modules()
                   if isinstance(mod, CompressedLinear) and mod.fusion is not None}
        assert len(fusions) == 2 * 2  # q/k/v and gate/up of each of the 2 blocks
        with torch.no_grad():
            torch.testing.assert_close(m(ids[:, :1]).logits, want_logits, rtol=1e-5, atol=1e-5)
        got = m.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert torch.equal(got, want)
        assert sum(f.calls for f in fusions.values()) >= 12 * 4  # every decode step, every set
    finally:
        m.close()


class ResidentSlotProvider(SlotProvider):
    """A provider with nothing to schedule (like a GPU provider holding every group resident)."""

    needs_group_hooks = False


def test_a_provider_without_scheduling_gets_no_group_hooks(tmp_path):
    make_folder("llama", tmp_path / "llama")
    out = tmp_path / "m.cllm"
    convert(tmp_path / "llama", out, chunk_size=4096)
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with cf.load(out, tokenizer=False) as plain:
        want = plain.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    m = _load_resolved(out, torch.device("cpu"), ResidentSlotProvider, None, tokenizer=False)
    try:
        assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.model.modules())
        assert torch.equal(m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False), want)
    finally:
        m.close()
    m = _load_resolved(out, torch.device("cpu"), SlotProvider, None, tokenizer=False)
    try:  # the default: hooked
        assert any(mod._forward_pre_hooks for mod in m.model.modules())
    finally:
        m.close()


def test_bert_attention_is_fused(tmp_path):
    make_folder("bert", tmp_path / "bert")
    out = tmp_path / "m.cllm"
    convert(tmp_path / "bert", out, chunk_size=4096)
    ids = torch.tensor([[5]])
    with cf.load(out, tokenizer=False) as plain, torch.no_grad():
        want = plain(ids).last_hidden_state
    m = _load_resolved(out, torch.device("cpu"), SlotProvider, None, tokenizer=False)
    try:
        fusions = {id(mod.fusion): mod.fusion for mod in m.model.modules()
                   if isinstance(mod, CompressedLinear) and mod.fusion is not None}
        assert len(fusions) == 2  # query/key/value of each block
        with torch.no_grad():
            torch.testing.assert_close(m(ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)
        assert all(f.calls == 1 for f in fusions.values())
    finally:
        m.close()


# --- GPU ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("fusion") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    out = folder.parent / "llama.cllm"
    convert(folder, out, chunk_size=16384)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tier", ["gpu", "gpu-compressed", "host", "disk"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fused_decode_step_matches_each_layer_alone(llama_file, tier, dtype):
    """Every tier serves the fused rows (the concatenation of the members' own rows and scales),
    and a decode step's fused outputs (Triton GEMV over the stacked rows) match each layer
    computed alone to bf16/fp16 rounding."""
    with cf.load(llama_file, device="cuda", dtype=dtype, residency=tier, tokenizer=False) as m:
        p = m.provider
        assert len(p.fusion_sets()) == 2 * 3
        fusions = {id(mod.fusion): mod.fusion for mod in m.model.modules()
                   if isinstance(mod, CompressedLinear) and mod.fusion is not None}
        assert len(fusions) == 2 * 3
        for fusion in fusions.values():
            gid = m.file.entry(fusion.key[0]).group
            p.begin_group(gid)
            q, s = p.fused_weight(fusion.key)
            raws = [m.file.get_raw(n) for n in fusion.key]
            assert torch.equal(q.cpu(), torch.cat([r.data for r in raws]))
            assert torch.equal(s.cpu(), torch.cat([r.scales for r in raws]))
            members = [mod for mod in m.model.modules() if isinstance(mod, CompressedLinear) and mod.fusion is fusion]
            for _ in range(3):  # fresh random inputs each check
                x = torch.randn(1, 1, members[0].in_features, device="cuda", dtype=dtype)
                with torch.no_grad():
                    calls = fusion.calls
                    outs = [mod(x) for mod in members]
                    assert fusion.calls == calls + 1
                    for mod, y in zip(members, outs):
                        qm, sm = p.linear_weight(mod.name)
                        ref = x.double().reshape(1, -1) @ (qm.double() * sm.double()[:, None]).T
                        rel = ((y.double().reshape(1, -1) - ref).norm() / ref.norm()).item()
                        assert rel <= 1e-2, (mod.name, rel)
            p.end_group(gid)
        ids = torch.randint(0, 1024, (1, 8), generator=torch.Generator().manual_seed(2)).cuda()
        before = sum(f.calls for f in fusions.values())
        m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert sum(f.calls for f in fusions.values()) >= before + 5 * len(fusions)
