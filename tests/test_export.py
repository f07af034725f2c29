"""cllm-export: .cllm -> Hugging Face folder (safetensors or compressed-tensors), round trips
through transformers and the compressed-tensors library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import codecllm_format
from codecllm_format.cli import export_main
from codecllm_format.convert import convert
from codecllm_format.errors import CllmError
from codecllm_format.export import ExportWarning, export
from codecllm_format.writer import CllmWriter
from tiny_models import make_folder


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(p))
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_folder("llama", d / "hf")
    convert(d / "hf", d / "none.cllm", quantize="none")
    convert(d / "hf", d / "int8.cllm", quantize="int8")
    return d


def test_lossless_round_trip_bit_exact(llama, tmp_path):
    out = tmp_path / "out"
    rep = export(llama / "none.cllm", out)
    orig = load_file(llama / "hf" / "model.safetensors")
    got = folder_tensors(out)
    assert set(got) == set(orig)
    for k, t in orig.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)), k
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (llama / "hf" / name).exists():
            assert (out / name).read_bytes() == (llama / "hf" / name).read_bytes(), name
    assert rep.shards == 1 and not (out / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_int8_export_loads_in_transformers_with_same_logits(llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    export(llama / "int8.cllm", out)
    with codecllm_format.open(llama / "int8.cllm") as f:
        for k, t in folder_tensors(out).items():
            assert torch.equal(t, f.get_tensor(k)), k  # dequantized exactly as the reader does
    hf, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    with codecllm_format.load(llama / "int8.cllm", dtype=torch.float32) as m:
        ref = m(ids).logits
    with torch.no_grad():
        got = hf.eval()(ids).logits
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, rel


def test_dtype_option_casts_dequantized_only(llama, tmp_path):
    out = tmp_path / "out"
    export(llama / "int8.cllm", out, dtype="bf16")
    got = folder_tensors(out)
    with codecllm_format.open(llama / "int8.cllm") as f:
        for k, t in got.items():
            e = f.entry(k)
            if e.encoding == codecllm_format.Encoding.INT8_ROW:
                assert t.dtype == torch.bfloat16 and torch.equal(t, f.get_tensor(k, torch.bfloat16)), k
            else:
                assert t.dtype == torch.float32 and torch.equal(t, f.get_tensor(k)), k


@pytest.mark.parametrize("arch", ["llama-tied", "llama-alias"])
def test_tied_embeddings(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    make_folder(arch, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "m.cllm", quantize="none")
    with codecllm_format.open(tmp_path / "m.cllm") as f:
        has_alias = bool(f.index.aliases)
    assert has_alias == (arch == "llama-alias")
    rep = export(tmp_path / "m.cllm", tmp_path / "out")
    got = folder_tensors(tmp_path / "out")
    assert "lm_head.weight" not in got and "model.embed_tokens.weight" in got
    assert rep.omitted == (["lm_head.weight"] if arch == "llama-alias" else [])
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    orig = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(hf.lm_head.weight, orig["model.embed_tokens.weight"])


def test_untied_alias_is_written_as_a_copy(tmp_path):
    """Identical tensors that the converter aliased but the config does not tie: both written."""
    make_folder("llama", tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    sd["model.layers.1.input_layernorm.weight"] = sd["model.layers.0.input_layernorm.weight"].clone()
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    convert(tmp_path / "hf", tmp_path / "m.cllm", quantize="none")
    with codecllm_format.open(tmp_path / "m.cllm") as f:
        assert f.index.aliases
    export(tmp_path / "m.cllm", tmp_path / "out")
    got = folder_tensors(tmp_path / "out")
    assert set(got) == set(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k]), k


def test_sharding_index_read_by_from_pretrained(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    rep = export(llama / "none.cllm", out, max_shard_size="40KB")
    assert rep.shards > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in folder_tensors(out).values())
    hf, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    orig = load_file(llama / "hf" / "model.safetensors")
    for k, p in hf.state_dict().items():
        assert torch.equal(p, orig[k]), k


@pytest.mark.parametrize("ct_format", ["pack-quantized", "int-quantized"])
def test_compressed_tensors_export_matches_library_decompression(llama, tmp_path, ct_format):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / "out"
    rep = export(llama / "int8.cllm", out, format="compressed-tensors", ct_format=ct_format)
    cfg = json.loads((out / "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])  # the library's own schema
    assert qc.quant_method == "compressed-tensors" and qc.format == ct_format == scheme_format(qc)
    scheme = qc.config_groups["group_0"]
    assert scheme.targets == ["Linear"] and scheme.input_activations is None
    w = scheme.weights
    assert (w.num_bits, w.type, w.symmetric, w.strategy, w.dynamic) == (8, "int", True, "channel", False)
    assert qc.ignore == ["lm_head"]
    compressor = BaseCompressor.load_from_registry(qc.format)
    got = folder_tensors(out)
    with codecllm_format.open(llama / "int8.cllm") as f:
        scales = sorted(k.removesuffix("_scale") for k in got if k.endswith(".weight_scale"))
        assert rep.quantized and sorted(rep.quantized) == scales
        assert all("embed" not in n and "lm_head" not in n for n in rep.quantized)
        for name in rep.quantized:
            mod = name.removesuffix(".weight")
            params = {k.removeprefix(mod + "."): t for k, t in got.items() if k.startswith(mod + ".weight")}
            s = params["weight_scale"]
            assert s.dtype == torch.float32 and s.shape == (f.entry(name).shape[0], 1)
            if ct_format == "pack-quantized":
                assert set(params) == {"weight_packed", "weight_scale", "weight_shape"}
                assert params["weight_packed"].dtype == torch.int32
                assert params["weight_shape"].tolist() == list(f.entry(name).shape)
            else:
                assert set(params) == {"weight", "weight_scale"} and params["weight"].dtype == torch.int8
            dq = compressor.decompress(params, scheme)["weight"]
            # the library computes float32(q) * float32 scale, like our reader: bit-exact
            assert dq.dtype == torch.float32
            assert torch.equal(dq, f.get_tensor(name, torch.float32)), name
        for k, t in got.items():
            if k.removesuffix("_scale").removesuffix("_packed").removesuffix("_shape") in rep.quantized:
                continue
            assert torch.equal(t, f.get_tensor(k)), k  # embeddings, lm_head, norms: dequantized / exact
        assert "ct" and ct.__version__


def scheme_format(qc) -> str:
    return qc.config_groups["group_0"].format


def test_errors(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CllmError, match="already exists"):
        export(llama / "none.cllm", out)
    export(llama / "none.cllm", out, overwrite=True)
    assert (out / "model.safetensors").exists()
    with pytest.raises(CllmError, match="unsupported export format"):
        export(llama / "none.cllm", tmp_path / "x", format="gguf")
    with pytest.raises(CllmError, match="--dtype"):
        export(llama / "none.cllm", tmp_path / "x", dtype="int4")
    with pytest.raises(CllmError, match="no int8 Linear"):
        export(llama / "none.cllm", tmp_path / "x", format="compressed-tensors")
    assert not (tmp_path / "x").exists()


def test_no_config_warns_but_writes_weights(tmp_path):
    p = tmp_path / "bare.cllm"
    t = torch.randn(8, 16)
    with CllmWriter(p) as w:
        w.begin_group("g")
        w.add_tensor("w", t, codecllm_format.Encoding.RAW)
        w.finish()
    with pytest.warns(ExportWarning, match="no embedded config.json"):
        export(p, tmp_path / "out")
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["w"], t)
    with pytest.raises(CllmError, match="config.json"):
        export(p, tmp_path / "out2", format="compressed-tensors")


def test_cli(llama, tmp_path, capsys):
    out = tmp_path / "out"
    assert export_main([str(llama / "int8.cllm"), str(out), "--max-shard-size", "64K"]) == 0
    assert (out / "model.safetensors.index.json").exists()
    assert export_main([str(llama / "int8.cllm"), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert export_main([str(llama / "int8.cllm"), str(out), "--force", "--format", "compressed-tensors"]) == 0
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    assert export_main([str(tmp_path / "missing.cllm"), str(tmp_path / "o2")]) == 1
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
