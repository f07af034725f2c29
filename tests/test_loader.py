"""The CPU loader and runtime: provider, kernels, compressed modules, group hooks, load() options
and every refusal (missing config, unknown architecture, tensors that do not fit, bad devices)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import CHAT_TEMPLATE, Recorder, check_bracketing, make_folder, reference_from_file  # noqa: E402

import codecllm_format  # noqa: E402
from codecllm_format import CllmWriter, DeviceError, Encoding, LoadError  # noqa: E402
from codecllm_format.convert import convert  # noqa: E402
from codecllm_format.quant import dequantize_int8_rows, quantize_int8_rows  # noqa: E402
from codecllm_format.runtime import (  # noqa: E402
    CompressedEmbedding,
    CompressedLinear,
    CpuProvider,
    WeightProvider,
    int8_embedding,
    int8_linear,
)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- provider ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    """A table of 300 rows x 100 int8 (4 KiB chunks: rows straddle chunk boundaries), a
    linear weight and a raw bias."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(300, 100, generator=g)
    weight = torch.randn(48, 100, generator=g)
    path = tmp_path_factory.mktemp("prov") / "t.cllm"
    with CllmWriter(path, chunk_size=4096) as w:
        w.begin_group("embed")
        w.add_tensor("embed.weight", table, Encoding.INT8_ROW)
        w.begin_group("layers.0")
        w.add_tensor("layers.0.proj.weight", weight, Encoding.INT8_ROW)
        w.add_tensor("layers.0.proj.bias", torch.randn(48, generator=g), Encoding.RAW)
        w.finish()
    return path


def test_cpu_provider_is_a_weight_provider(table_file):
    with codecllm_format.open(table_file) as f:
        p = CpuProvider(f)
        assert isinstance(p, WeightProvider)
        assert p.device == torch.device("cpu")


def test_linear_weight_is_the_stored_int8(table_file):
    with codecllm_format.open(table_file) as f:
        p = CpuProvider(f)
        q, s = p.linear_weight("layers.0.proj.weight")
        raw = f.get_raw("layers.0.proj.weight")
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert torch.equal(q, raw.data) and torch.equal(s, raw.scales)
        with pytest.raises(LoadError, match="layers.0.proj.bias.*not an int8_row"):
            p.linear_weight("layers.0.proj.bias")


def test_embedding_rows_decode_only_the_needed_chunks(table_file):
    with codecllm_format.open(table_file) as f:
        p = CpuProvider(f)
        raw = f.get_raw("embed.weight")
        chunks = f.entry("embed.weight").streams[0].num_chunks
        assert chunks >= 7
        # duplicates, unsorted, first and last rows, rows that straddle 4096-byte boundaries (40, 81)
        ids = torch.tensor([299, 40, 0, 40, 81, 7, 299, 163])
        before = p.stats["bytes_decoded"]
        q, s = p.embedding_rows("embed.weight", ids)
        decoded = p.stats["bytes_decoded"] - before
        assert torch.equal(q, raw.data[ids]) and torch.equal(s, raw.scales[ids])
        assert decoded < raw.data.numel(), "the whole table was decoded"
        one = p.stats["bytes_decoded"]
        p.embedding_rows("embed.weight", torch.tensor([[5]]))
        assert p.stats["bytes_decoded"] - one <= 4096 + 1200  # one chunk of values + one of scales
        everything = torch.arange(300).flip(0)
        q, s = p.embedding_rows("embed.weight", everything)
        assert torch.equal(q, raw.data.flip(0)) and torch.equal(s, raw.scales.flip(0))
        q, s = p.embedding_rows("embed.weight", torch.tensor([], dtype=torch.long))
        assert q.shape == (0, 100) and s.shape == (0,)


def test_embedding_rows_out_of_range(table_file):
    with codecllm_format.open(table_file) as f:
        p = CpuProvider(f)
        with pytest.raises(IndexError, match=r"id 300 out of range \[0, 300\)"):
            p.embedding_rows("embed.weight", torch.tensor([1, 300]))
        with pytest.raises(IndexError, match="id -1"):
            p.embedding_rows("embed.weight", torch.tensor([-1]))


def test_cpu_provider_refuses_options_it_does_not_know(table_file):
    with codecllm_format.open(table_file) as f:
        with pytest.raises(DeviceError, match=r"\['max_vram', 'residency'\].*not used on device 'cpu'"):
            CpuProvider(f, residency="host", max_vram="1G")
        with pytest.raises(DeviceError, match="CPU"):
            CpuProvider(f, device="meta")


# --- kernels and modules ---------------------------------------------------------------------


def test_int8_linear_equals_dequantize_then_linear():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 24, generator=g)
    q, s = quantize_int8_rows(w)
    x = torch.randn(3, 5, 24, generator=g)
    b = torch.randn(40, generator=g)
    ref = F.linear(x, dequantize_int8_rows(q, s), b)
    assert torch.equal(int8_linear(x, q, s, b), ref)
    assert torch.equal(int8_linear(x, q, s), F.linear(x, dequantize_int8_rows(q, s)))
    # Conv1D layout: weight stored (in, out), rows are input features
    wc = torch.randn(24, 40, generator=g)
    qc, sc = quantize_int8_rows(wc)
    ref_c = torch.addmm(b, x.reshape(-1, 24), dequantize_int8_rows(qc, sc)).reshape(3, 5, 40)
    assert rel_diff(int8_linear(x, qc, sc, b, layout="conv1d"), ref_c) <= 1e-6
    out16 = int8_linear(x.bfloat16(), q, s, b.bfloat16())
    assert out16.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="layout"):
        int8_linear(x, q, s, layout="transposed")


def test_int8_embedding_shape_and_values():
    q, s = quantize_int8_rows(torch.randn(10, 6))
    ids = torch.tensor([[1, 2, 3], [9, 9, 0]])
    out = int8_embedding(ids, q[ids.reshape(-1)], s[ids.reshape(-1)], torch.float32)
    assert out.shape == (2, 3, 6)
    assert torch.equal(out, dequantize_int8_rows(q, s)[ids])
    with pytest.raises(ValueError):
        int8_embedding(ids, q[:5], s[:5])


def test_compressed_linear_keeps_no_decoded_weight(table_file):
    with codecllm_format.open(table_file) as f:
        p = CpuProvider(f)
        rec = Recorder(p)
        bias = f.get_tensor("layers.0.proj.bias")
        lin = CompressedLinear("layers.0.proj.weight", 1, p, 100, 48, bias)
        x = torch.randn(2, 100)
        y = lin(x)
        assert torch.equal(y, F.linear(x, f.get_tensor("layers.0.proj.weight"), bias))
        assert rec.handed_out and all(r() is None for r in rec.handed_out), "a decoded weight outlived the forward"
        assert [n for n, _ in lin.named_parameters()] == ["bias"] and not list(lin.buffers())
        emb = CompressedEmbedding("embed.weight", 0, p, 300, 100)
        ids = torch.tensor([[3, 250]])
        assert torch.equal(emb(ids), f.get_tensor("embed.weight")[ids])
        assert all(r() is None for r in rec.handed_out)


# --- load(): a tiny Llama --------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    cfg, tok = make_folder("llama", tmp / "hf", seed=11, chat_template=CHAT_TEMPLATE)
    path = tmp / "llama.cllm"
    convert(tmp / "hf", path, level=1, chunk_size=4096)
    return path, cfg, tok, tmp


def test_group_hooks_bracket_every_weight_access(llama):
    path, _cfg, tok, _ = llama
    with codecllm_format.load(path) as m:
        rec = Recorder(m.provider)
        ids = torch.randint(7, len(tok), (1, 9), generator=torch.Generator().manual_seed(0))
        m(ids)
        # embeddings, each block once, in order, then lm_head
        assert check_bracketing(m, rec) == ["model", "model.layers.0", "model.layers.1", "lm_head"]
        per_block = [e for e in rec.events if e[0] == "linear_weight" and ".layers.0." in e[1]]
        assert len(per_block) == 7
        assert all(r() is None for r in rec.handed_out), "a decoded weight outlived the forward"
    # the hooks of a closed model are gone
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.model.modules())


def test_embedding_lookup_never_decodes_the_whole_table(llama):
    path, _cfg, tok, _ = llama
    with codecllm_format.load(path) as m:
        rec = Recorder(m.provider)
        m.generate(torch.tensor([[8, 9, 10]]), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        emb_name = m.model.get_input_embeddings().name
        assert ("embedding_rows", emb_name) in rec.events
        assert ("linear_weight", emb_name) not in rec.events


def test_dtype_bfloat16_and_default(llama):
    path, cfg, tok, _ = llama
    ref = reference_from_file("llama", path, cfg)
    ids = torch.randint(7, len(tok), (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
    with codecllm_format.load(path, dtype="bfloat16") as m:
        assert m.dtype == torch.bfloat16
        assert {p.dtype for p in m.model.parameters()} == {torch.bfloat16}
        assert m.model.model.rotary_emb.inv_freq.dtype == torch.float32
        got = m(ids).logits
        assert got.dtype == torch.bfloat16
        assert rel_diff(got.float(), want) <= 0.03
    with codecllm_format.load(path) as m:  # dtype=None: the config's (float32)
        assert m.dtype == torch.float32
        assert rel_diff(m(ids).logits, want) <= 1e-5


def test_generate_text_and_chat(llama):
    path, _cfg, tok, _ = llama
    with codecllm_format.load(path) as m:
        kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
        text = m.generate("what is the capital of italy ?", chat=True, **kw)
        templated = tok.apply_chat_template([{"role": "user", "content": "what is the capital of italy ?"}],
                                            tokenize=False, add_generation_prompt=True)
        assert templated.endswith("assistant :")
        ids = tok(templated, return_tensors="pt", add_special_tokens=False).input_ids
        out = m.generate(ids, pad_token_id=0, **kw)
        assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        both = m.generate(["paris is", "the quick brown fox jumps"], **kw)
        assert isinstance(both, list) and len(both) == 2
        assert both[1] == m.generate("the quick brown fox jumps", **kw)
        with pytest.raises(ValueError, match="chat=True needs a text prompt"):
            m.generate(ids, chat=True)
    with codecllm_format.load(path, tokenizer=False) as m:
        assert m.tokenizer is None
        with pytest.raises(LoadError, match="no usable embedded tokenizer"):
            m.generate("paris is")


def test_chat_without_template_is_refused(tmp_path):
    make_folder("llama", tmp_path / "hf", seed=3)
    convert(tmp_path / "hf", tmp_path / "m.cllm", level=1)
    with codecllm_format.load(tmp_path / "m.cllm") as m:
        assert m.generate("paris is", max_new_tokens=2, do_sample=False)  # plain text works
        with pytest.raises(ValueError, match="no chat template"):
            m.generate("paris is", chat=True, max_new_tokens=2)


def test_task_base_builds_the_bare_model(llama):
    path, cfg, tok, _ = llama
    ref = reference_from_file("llama", path, cfg)
    ids = torch.randint(7, len(tok), (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref.model(ids).last_hidden_state
    with codecllm_format.load(path, task="base") as m:
        assert type(m.model).__name__ == "LlamaModel"
        assert rel_diff(m(ids).last_hidden_state, want) <= 1e-5
    with codecllm_format.load(path, auto_class="LlamaModel") as m:
        assert type(m.model).__name__ == "LlamaModel"
    with pytest.raises(LoadError, match="task='speech'"):
        codecllm_format.load(path, task="speech")


def test_closed_model_refuses_to_run(llama):
    path, *_ = llama
    m = codecllm_format.load(path)
    m.close()
    with pytest.raises(codecllm_format.CllmError):
        m.model(torch.tensor([[8, 9]]))


# --- refusals --------------------------------------------------------------------------------


def test_missing_config_is_a_load_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(4, 4)}, tmp_path / "bare.safetensors")
    convert(tmp_path / "bare.safetensors", tmp_path / "bare.cllm", level=1)
    with pytest.raises(LoadError, match="embedded config.json is missing"):
        codecllm_format.load(tmp_path / "bare.cllm")


@pytest.mark.parametrize("config,match", [
    (b'{"model_type": "no_such_model_type", "architectures": ["NoSuchModelForCausalLM"]}', "no_such_model_type"),
    (b'{"architectures": ["LlamaForCausalLM"]}', "cannot read the embedded config"),
    (b'["not", "an", "object"]', "not a JSON object"),
    (b'{"model_type": "llama", ', "not valid JSON"),
])
def test_unbuildable_architecture_is_a_load_error(tmp_path, config, match):
    with CllmWriter(tmp_path / "x.cllm") as w:
        w.begin_group("model")
        w.add_tensor("model.w", torch.randn(4, 4), Encoding.INT8_ROW)
        w.add_file("config.json", config)
        w.finish()
    with pytest.raises(LoadError, match=match):
        codecllm_format.load(tmp_path / "x.cllm")


def test_architecture_transformers_cannot_build(llama, tmp_path):
    """A config transformers reads but whose model it cannot construct."""
    path, cfg, *_ = llama
    bad = cfg.to_dict()
    bad["hidden_act"] = "no_such_activation"  # read fine, fails when the MLP is built
    with codecllm_format.open(path) as f, CllmWriter(tmp_path / "y.cllm") as w:
        w.begin_group("model")
        w.add_tensor("model.norm.weight", f.get_tensor("model.norm.weight"), Encoding.RAW)
        w.add_file("config.json", json.dumps(bad).encode())
        w.finish()
    with pytest.raises(LoadError, match="transformers cannot build LlamaForCausalLM.*no_such_activation"):
        codecllm_format.load(tmp_path / "y.cllm")


def test_tensors_that_do_not_fit_are_named(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _cfg, _tok, tmp = llama
    hf = tmp / "hf"
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in hf.iterdir():
        if p.name != "model.safetensors":
            (bad / p.name).write_bytes(p.read_bytes())
    sd = load_file(hf / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.1.mlp.extra.weight"] = torch.randn(8, 8)
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.randn(64, 32)
    save_file(sd, bad / "model.safetensors")
    convert(bad, tmp_path / "bad.cllm", level=1)
    with pytest.raises(LoadError) as ei:
        codecllm_format.load(tmp_path / "bad.cllm")
    msg = str(ei.value)
    assert "missing from the file: model.layers.1.mlp.up_proj.weight" in msg
    assert "not in the model: model.layers.1.mlp.extra.weight" in msg
    assert "shape mismatch: model.layers.0.self_attn.q_proj.weight (file (64, 32), model (64, 64))" in msg


def test_devices_that_cannot_be_used(llama):
    path, *_ = llama
    with pytest.raises(DeviceError, match="not a device"):
        codecllm_format.load(path, device="gpu0")
    with pytest.raises(DeviceError, match="not supported"):
        codecllm_format.load(path, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match='device="cuda" but CUDA is not available'):
            codecllm_format.load(path, device="cuda")
        with pytest.raises(DeviceError, match="CUDA is not available"):
            codecllm_format.load(path, device="cuda:1")
    else:
        with pytest.raises(DeviceError, match="does not exist"):
            codecllm_format.load(path, device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(DeviceError, match="max_vram"):
        codecllm_format.load(path, device="cpu", max_vram="1GiB")


def test_cli_generate(llama, capsys):
    from codecllm_format.cli import generate_main

    path, *_ = llama
    rc = generate_main([str(path), "paris is the", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    with codecllm_format.load(path) as m:
        want = m.generate("paris is the", max_new_tokens=4, do_sample=False)
    assert out == want + "\n"
    rc = generate_main([str(path), "what is", "--max-new-tokens", "3", "--chat"])
    assert rc == 0
    capsys.readouterr()
    rc = generate_main([str(path), "paris is the", "--max-new-tokens", "4", "--no-fuse-norms"])  # CPU: the same text
    assert rc == 0 and capsys.readouterr().out == want + "\n"
    rc = generate_main([str(path), "paris", "--device", "cuda:99"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("cllm-generate: error: ") and "Traceback" not in err


def test_base_model_checkpoint_into_a_model_with_a_head(tmp_path):
    """A LlamaModel checkpoint (no 'model.' prefix) loaded as LlamaForCausalLM with tied
    embeddings: names are mapped through base_model_prefix, as transformers does."""
    from transformers import LlamaModel

    from tiny_models import randomize, tiny_config, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = tiny_config("llama-tied", len(tok))
    torch.manual_seed(5)
    base = LlamaModel(cfg)
    randomize(base, 5)
    base.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "base.cllm", level=1)
    with codecllm_format.open(tmp_path / "base.cllm") as f:
        assert "layers.0.mlp.up_proj.weight" in f.keys()
    with codecllm_format.load(tmp_path / "base.cllm", task="causal-lm", tokenizer=False) as m:
        assert type(m.model).__name__ == "LlamaForCausalLM"
        rec = Recorder(m.provider)
        ids = torch.randint(7, len(tok), (1, 6), generator=torch.Generator().manual_seed(0))
        logits = m(ids).logits
        check_bracketing(m, rec)
        assert ("linear_weight", "layers.1.mlp.down_proj.weight") in rec.events
    with torch.no_grad():
        hidden = base.eval()(ids).last_hidden_state
        want = hidden @ base.embed_tokens.weight.T
    # the reference holds the original float weights: int8 error only
    assert rel_diff(logits, want) <= 0.02


def test_buffer_the_model_cannot_recreate_is_a_load_error(llama):
    """A non-persistent buffer that neither the file nor the model's _init_weights provides is
    refused, never left empty."""
    from transformers import LlamaForCausalLM

    class WithOddBuffer(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.register_buffer("odd", torch.arange(5.0), persistent=False)

    path, *_ = llama
    with pytest.raises(LoadError, match="cannot re-create odd"):
        codecllm_format.load(path, auto_class=WithOddBuffer)


def test_embedded_files_that_cannot_be_laid_out_are_a_load_error(tmp_path):
    """A file holding both "tok" and "tok/x.json" (the spec allows it) cannot be written out as
    a folder: a LoadError naming it, not an OSError."""
    import codecllm_format as cf

    path = tmp_path / "m.cllm"
    with cf.CllmWriter(path) as w:
        w.begin_group("w")
        w.add_tensor("w", torch.zeros(4))
        w.add_file("config.json", b'{"model_type": "llama"}')
        w.add_file("tok", b"a")
        w.add_file("tok/x.json", b"{}")
        w.finish()
    with pytest.raises(cf.LoadError, match="tok"):
        cf.load(path)
