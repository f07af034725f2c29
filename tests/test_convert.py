"""The converter: input forms (file, sharded folder, HF model folder), what it embeds, tied
weights, encodings chosen, layer groups, output path, atomicity, progress, determinism."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from codecllm_format import constants as C
from codecllm_format.cli import convert_main
from codecllm_format.convert import (
    SUPERSEDED_BY_TOKENIZER_JSON,
    convert,
    default_output,
    group_of,
    open_checkpoint,
)
from codecllm_format.errors import ConversionError
from codecllm_format.quant import dequantize_int8_rows, quantize_int8_rows, sqnr_db
from codecllm_format.reader import open_cllm
from codecllm_format.writer import PARTIAL_SUFFIX


def rand(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).to(torch.bool)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 0.05).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def mixed_state() -> dict[str, torch.Tensor]:
    """A small model-like state dict that uses every dtype and both encodings."""
    sd = {"embed.weight": rand((200, 48), torch.bfloat16, 1), "lm_head.weight": rand((200, 48), torch.float16, 2)}
    for i in range(3):
        p = f"model.layers.{i}."
        sd[p + "attn.weight"] = rand((48, 48), torch.float32, 10 + i)
        sd[p + "mlp.weight"] = rand((96, 48), torch.float64, 20 + i)
        sd[p + "norm.weight"] = rand((48,), torch.float32, 30 + i)
        sd[p + "bias"] = rand((96,), torch.bfloat16, 40 + i)
    sd.update({
        "buffers.position_ids": torch.arange(64, dtype=torch.int64)[None],
        "buffers.i8": rand((7, 3), torch.int8, 50),
        "buffers.u8": torch.arange(256, dtype=torch.uint8).reshape(16, 16),
        "buffers.i16": rand((5, 5), torch.int16, 51),
        "buffers.i32": rand((9,), torch.int32, 52),
        "buffers.mask": rand((4, 4), torch.bool, 53),
        "buffers.scalar": torch.tensor(2.5),
        "buffers.empty": torch.zeros(0, 8),
    })
    return sd


def check_converted(path: Path, sd: dict[str, torch.Tensor], quantized: bool = True, keep=None):
    """Every tensor present with its shape and dtype; raw ones bit-exact, int8 ones close."""
    with open_cllm(path) as f:
        assert f.verify() == []
        assert sorted(f.keys()) == sorted(sd)
        for name, t in sd.items():
            e = f.entry(name)
            got = f.get_tensor(name)
            assert got.shape == t.shape and got.dtype == t.dtype, name
            want_int8 = (quantized and t.dim() == 2 and t.is_floating_point() and t.numel() > 0
                         and not (keep and re.search(keep, name)))
            if want_int8:
                assert e.encoding == C.Encoding.INT8_ROW, name
                q, s = quantize_int8_rows(t)
                raw = f.get_raw(name)
                assert torch.equal(raw.data, q) and torch.equal(raw.scales, s), name
                assert sqnr_db(t, got) > 38, name
            else:
                kept = keep and re.search(keep, name) or not quantized
                lossless = kept and t.dtype in (torch.bfloat16, torch.float16, torch.float32)
                assert e.encoding == (C.Encoding.FLOAT_PLANES if lossless else C.Encoding.RAW), name
                assert got.reshape(-1).view(torch.uint8).equal(t.reshape(-1).view(torch.uint8)) if t.numel() \
                    else got.shape == t.shape, name


# --- input forms ------------------------------------------------------------------------


def test_single_file(tmp_path):
    sd = mixed_state()
    save_file(sd, tmp_path / "model.safetensors")
    rep = convert(tmp_path / "model.safetensors", tmp_path / "out.cllm")
    check_converted(tmp_path / "out.cllm", sd)
    assert rep.tensors == len(sd) and rep.int8_tensors == 8
    assert rep.input_bytes == sum(t.numel() * t.element_size() for t in sd.values())
    assert rep.output_bytes == (tmp_path / "out.cllm").stat().st_size


def _write_sharded(folder: Path, sd: dict[str, torch.Tensor], parts: int = 3) -> None:
    folder.mkdir()
    names = sorted(sd)
    weight_map = {}
    for i in range(parts):
        fname = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: sd[n] for n in names[i::parts]}
        save_file(chunk, folder / fname)
        weight_map.update({n: fname for n in chunk})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_folder_and_index_file(tmp_path):
    sd = mixed_state()
    _write_sharded(tmp_path / "sharded", sd)
    convert(tmp_path / "sharded", tmp_path / "a.cllm")
    check_converted(tmp_path / "a.cllm", sd)
    convert(tmp_path / "sharded" / "model.safetensors.index.json", tmp_path / "b.cllm")
    # same tensors in the same order and the same bytes: only the 'source' label differs
    with open_cllm(tmp_path / "a.cllm") as a, open_cllm(tmp_path / "b.cllm") as b:
        assert a.keys() == b.keys()
        for e, f in zip(a.index.tensors, b.index.tensors):
            assert e.stored_length == f.stored_length
            assert [s.chunks["checksum"].tolist() for s in e.streams] == [s.chunks["checksum"].tolist() for s in f.streams]


def test_sharded_and_single_file_give_the_same_tensors(tmp_path):
    sd = mixed_state()
    _write_sharded(tmp_path / "sharded", sd)
    save_file(sd, tmp_path / "single.safetensors")
    convert(tmp_path / "sharded", tmp_path / "a.cllm")
    convert(tmp_path / "single.safetensors", tmp_path / "b.cllm")
    with open_cllm(tmp_path / "a.cllm") as a, open_cllm(tmp_path / "b.cllm") as b:
        assert a.keys() == b.keys()
        assert [g.name for g in a.index.groups] == [g.name for g in b.index.groups]
        for n in a.keys():
            assert torch.equal(a.get_tensor(n), b.get_tensor(n))


def test_missing_shard_is_a_clear_error(tmp_path):
    _write_sharded(tmp_path / "sharded", mixed_state())
    (tmp_path / "sharded" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ConversionError, match="shard model-00002-of-00003.safetensors is missing"):
        convert(tmp_path / "sharded", tmp_path / "x.cllm")
    assert not (tmp_path / "x.cllm").exists()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny Llama saved by transformers (save_pretrained) with a fast tokenizer."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms start as ones (identical bytes): make them distinct, like trained ones
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(299)}
    vocab["[UNK]"] = 299
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return folder, sd


def test_hf_model_folder(tmp_path, tiny_llama):
    folder, sd = tiny_llama
    out = tmp_path / "tiny.cllm"
    rep = convert(folder, out)
    check_converted(out, sd)
    with open_cllm(out) as f:
        # side files embedded byte for byte
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file(), name
            assert f.read_file(name) == (folder / name).read_bytes(), name
        assert set(f.file_names()) == {p.name for p in folder.iterdir() if p.name != "model.safetensors"}
        assert set(rep.files) == set(f.file_names())
        meta = f.metadata()
        assert meta["architecture"] == "LlamaForCausalLM" and meta["model_type"] == "llama"
        assert meta["quantize"] == "int8" and meta["source"] == "tiny-llama"
        # layer groups: every tensor of model.layers.N in group model.layers.N, and nothing else
        groups = [g.name for g in f.index.groups]
        for i in range(3):
            members = [e.name for e in f.index.tensors if f.index.groups[e.group].name == f"model.layers.{i}"]
            assert sorted(members) == sorted(n for n in sd if n.startswith(f"model.layers.{i}."))
        assert groups == ["lm_head", "model", "model.layers.0", "model.layers.1", "model.layers.2", C.FILES_GROUP]
        assert {e.name for e in f.index.tensors if f.index.groups[e.group].name == "model"} == {
            "model.embed_tokens.weight", "model.norm.weight"}
        # groups are 4096-aligned, disjoint, in file order, and each holds exactly its own chunks
        spans = [(g.offset, g.offset + g.length) for g in f.index.groups]
        assert all(a % C.GROUP_ALIGNMENT == 0 for a, _ in spans)
        assert all(s1[1] <= s2[0] for s1, s2 in zip(spans, spans[1:]))
        for e in f.index.tensors:
            lo, hi = spans[e.group]
            for s in e.streams:
                for off, stored, _, _ in s.chunks.tolist():
                    assert lo <= off and off + stored <= hi, e.name


def test_hf_folder_loads_back_into_the_model(tmp_path, tiny_llama):
    transformers = pytest.importorskip("transformers")
    folder, sd = tiny_llama
    out = tmp_path / "tiny.cllm"
    convert(folder, out, quantize="none")
    with open_cllm(out) as f:
        cfg = transformers.LlamaConfig.from_dict(json.loads(f.read_file("config.json")))
        model = transformers.LlamaForCausalLM(cfg)
        missing, unexpected = model.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=False)
    assert not missing and not unexpected
    ids = torch.tensor([[1, 5, 9, 2]])
    ref = transformers.LlamaForCausalLM(cfg)
    ref.load_state_dict(sd)
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_vocab_txt_is_left_out_only_when_tokenizer_json_has_it(tmp_path):
    sd = {"w": rand((8, 8))}
    a = tmp_path / "a"
    a.mkdir()
    save_file(sd, a / "model.safetensors")
    (a / "config.json").write_text("{}")
    (a / "vocab.txt").write_text("[PAD]\nhello\n")
    convert(a, tmp_path / "a.cllm")
    with open_cllm(tmp_path / "a.cllm") as f:
        assert set(f.file_names()) == {"config.json", "vocab.txt"}
    (a / "tokenizer.json").write_text('{"model": {"vocab": {"[PAD]": 0, "hello": 1}}}')
    (a / "merges.txt").write_text("h e\n")
    convert(a, tmp_path / "b.cllm")
    with open_cllm(tmp_path / "b.cllm") as f:
        assert set(f.file_names()) == {"config.json", "tokenizer.json"}
        assert not set(f.file_names()) & set(SUPERSEDED_BY_TOKENIZER_JSON)


# --- tied weights ---------------------------------------------------------------------------


def test_identical_tensors_are_stored_once(tmp_path):
    emb = rand((100, 32), torch.bfloat16, 3)
    sd = {"model.embed.weight": emb, "lm_head.weight": emb.clone(), "other.weight": rand((100, 32), torch.bfloat16, 4),
          "a.zeros": torch.zeros(4, 4), "b.zeros": torch.zeros(16), "c.zeros": torch.zeros(4, 4, dtype=torch.int32)}
    save_file(sd, tmp_path / "m.safetensors")
    got = []
    rep = convert(tmp_path / "m.safetensors", tmp_path / "m.cllm", progress=got.append)
    # 'lm_head' sorts before 'model': lm_head is stored, the embedding is its alias
    assert rep.aliases == {"model.embed.weight": "lm_head.weight"}
    assert sum(got) == rep.input_bytes
    with open_cllm(tmp_path / "m.cllm") as f:
        assert dict(f.index.aliases) == {"model.embed.weight": "lm_head.weight"}
        assert "model.embed.weight" not in {e.name for e in f.index.tensors}
        assert torch.equal(f.get_tensor("model.embed.weight"), f.get_tensor("lm_head.weight"))
        # same bytes but another shape or dtype: not a tie
        for n in ("a.zeros", "b.zeros", "c.zeros"):
            assert torch.equal(f.get_tensor(n), sd[n])
        assert sorted(f.keys()) == sorted(sd)


def test_tied_model_saved_by_save_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_model

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms start as identical ones: make them distinct, like trained ones
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    save_model(model, str(tmp_path / "model.safetensors"))  # keeps one name, records the other in metadata
    ckpt = open_checkpoint(tmp_path / "model.safetensors")
    assert len(ckpt.ties) == 1
    rep = convert(tmp_path / "model.safetensors", tmp_path / "t.cllm", quantize="none")
    sd = model.state_dict()
    with open_cllm(tmp_path / "t.cllm") as f:
        assert sorted(f.keys()) == sorted(sd)
        assert len(f.index.aliases) == 1 and rep.aliases == dict(f.index.aliases)
        (alias, target), = f.index.aliases.items()
        assert {alias, target} == {"lm_head.weight", "model.embed_tokens.weight"}
        for k, v in sd.items():
            assert torch.equal(f.get_tensor(k), v), k


# --- encodings chosen -----------------------------------------------------------------------


def test_keep_regex_keeps_matching_tensors_lossless(tmp_path):
    sd = mixed_state()
    save_file(sd, tmp_path / "m.safetensors")
    keep = r"lm_head|layers\.1\.(attn|mlp)"
    convert(tmp_path / "m.safetensors", tmp_path / "k.cllm", keep_regex=keep)
    check_converted(tmp_path / "k.cllm", sd, keep=keep)
    with open_cllm(tmp_path / "k.cllm") as f:
        assert f.version == (1, 1)  # float_planes is a format 1.1 feature
        assert f.entry("lm_head.weight").encoding == C.Encoding.FLOAT_PLANES
        assert f.entry("model.layers.1.attn.weight").encoding == C.Encoding.FLOAT_PLANES
        assert f.entry("model.layers.1.mlp.weight").encoding == C.Encoding.RAW  # f64: no planes
        assert f.entry("model.layers.0.attn.weight").encoding == C.Encoding.INT8_ROW


def test_bad_keep_regex_is_a_clear_error(tmp_path):
    save_file({"w": rand((4, 4))}, tmp_path / "m.safetensors")
    with pytest.raises(ConversionError, match="not a valid regular expression"):
        convert(tmp_path / "m.safetensors", tmp_path / "k.cllm", keep_regex="(")


def test_quantize_none_is_bit_exact(tmp_path):
    sd = mixed_state()
    sd["nan_and_inf"] = torch.tensor([[float("nan"), float("inf")], [-float("inf"), -0.0]])
    save_file(sd, tmp_path / "m.safetensors")
    rep = convert(tmp_path / "m.safetensors", tmp_path / "n.cllm", quantize="none")
    planes = {n for n, t in sd.items() if t.dtype in (torch.bfloat16, torch.float16, torch.float32)}
    assert rep.planes_tensors == len(planes) and rep.int8_tensors == 0
    assert f"{len(planes)} lossless" in rep.summary()
    with open_cllm(tmp_path / "n.cllm") as f:
        assert f.metadata()["quantize"] == "none" and f.version == (1, 1) and f.verify() == []
        for name, t in sd.items():
            assert f.entry(name).encoding == (C.Encoding.FLOAT_PLANES if name in planes else C.Encoding.RAW), name
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_non_finite_weight_names_the_tensor_and_the_way_out(tmp_path):
    bad = rand((8, 8))
    bad[3, 3] = float("nan")
    save_file({"good.weight": rand((8, 8)), "bad.weight": bad}, tmp_path / "m.safetensors")
    with pytest.raises(ConversionError, match=r"tensor 'bad\.weight' holds NaN.*--keep-regex"):
        convert(tmp_path / "m.safetensors", tmp_path / "nan.cllm")
    assert not (tmp_path / "nan.cllm").exists()
    assert not list(tmp_path.glob(f"*{PARTIAL_SUFFIX}"))
    convert(tmp_path / "m.safetensors", tmp_path / "nan.cllm", keep_regex=r"^bad\.")
    with open_cllm(tmp_path / "nan.cllm") as f:
        assert f.entry("bad.weight").encoding == C.Encoding.FLOAT_PLANES
        assert torch.equal(f.get_tensor("bad.weight").view(torch.uint8), bad.view(torch.uint8))


def test_group_of():
    assert group_of("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert group_of("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert group_of("transformer.h.0.attn.c_attn.weight") == "transformer.h.0"
    assert group_of("model.norm.weight") == "model"
    assert group_of("lm_head.weight") == "lm_head"
    assert group_of("embeddings.LayerNorm.bias") == "embeddings"
    assert group_of("scale") == "scale"


# --- output path and atomicity --------------------------------------------------------------


def test_default_output_path(tmp_path):
    save_file({"w": rand((4, 4))}, tmp_path / "model.safetensors")
    rep = convert(tmp_path / "model.safetensors")
    assert rep.output == tmp_path / "model.cllm" and rep.output.is_file()
    folder = tmp_path / "my-model"
    folder.mkdir()
    save_file({"w": rand((4, 4))}, folder / "model.safetensors")
    assert default_output(folder) == tmp_path / "my-model.cllm"
    # an index file: beside it, named after its folder ('model.safetensors.index' says nothing)
    assert default_output(folder / "model.safetensors.index.json") == folder / "my-model.cllm"
    assert convert(folder).output == tmp_path / "my-model.cllm"
    assert (tmp_path / "my-model.cllm").is_file()


def test_existing_output_needs_overwrite(tmp_path):
    save_file({"w": rand((4, 4))}, tmp_path / "m.safetensors")
    (tmp_path / "m.cllm").write_bytes(b"keep me")
    with pytest.raises(ConversionError, match="exists"):
        convert(tmp_path / "m.safetensors")
    assert (tmp_path / "m.cllm").read_bytes() == b"keep me"
    convert(tmp_path / "m.safetensors", overwrite=True)
    with open_cllm(tmp_path / "m.cllm") as f:
        assert f.keys() == ["w"]


PARTIAL_RE = re.compile(r"^\.out\.cllm\.(\d+)-[0-9a-f]+" + re.escape(PARTIAL_SUFFIX) + "$")


def test_target_appears_only_when_complete(tmp_path):
    sd = mixed_state()
    save_file(sd, tmp_path / "m.safetensors")
    target = tmp_path / "out.cllm"
    seen = []

    def progress(n):
        partials = [p.name for p in tmp_path.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]
        seen.append((target.exists(), partials))

    convert(tmp_path / "m.safetensors", target, progress=progress)
    assert seen and not any(exists for exists, _ in seen)
    for _, partials in seen:
        assert len(partials) == 1
        m = PARTIAL_RE.match(partials[0])
        assert m and int(m.group(1)) == os.getpid()
    assert target.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partials_of_dead_converters_are_removed(tmp_path):
    save_file({"w": rand((4, 4))}, tmp_path / "m.safetensors")
    dead = tmp_path / f".out.cllm.{_dead_pid()}-deadbeef{PARTIAL_SUFFIX}"
    live = tmp_path / f".out.cllm.{os.getppid()}-cafe0123{PARTIAL_SUFFIX}"
    other = tmp_path / f".other.cllm.{_dead_pid()}-deadbeef{PARTIAL_SUFFIX}"  # another target's: not ours
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    convert(tmp_path / "m.safetensors", tmp_path / "out.cllm")
    assert not dead.exists()
    assert live.exists() and other.exists()


def test_failed_conversion_leaves_nothing(tmp_path):
    sd = {"a.weight": rand((8, 8)), "z.weight": torch.full((8, 8), float("inf"))}
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(ConversionError):
        convert(tmp_path / "m.safetensors", tmp_path / "out.cllm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# --- progress and determinism ---------------------------------------------------------------


def test_progress_totals_the_input_bytes(tmp_path):
    sd = mixed_state()
    sd["tied"] = sd["embed.weight"].clone()
    save_file(sd, tmp_path / "m.safetensors")
    starts, got = [], []
    rep = convert(tmp_path / "m.safetensors", tmp_path / "p.cllm", progress=got.append, on_start=starts.append)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    assert starts == [total] and rep.input_bytes == total
    assert all(n >= 0 for n in got) and sum(got) == total


def test_converting_twice_gives_identical_bytes_whatever_the_threads(tmp_path):
    sd = mixed_state()
    save_file(sd, tmp_path / "m.safetensors")
    outs = []
    for i, threads in enumerate((1, 1, 2, 3)):
        out = tmp_path / f"d{i}.cllm"
        convert(tmp_path / "m.safetensors", out, threads=threads, chunk_size=4096)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2] == outs[3]


def test_cli_is_deterministic_too(tmp_path, capsys):
    sd = mixed_state()
    save_file(sd, tmp_path / "m.safetensors")
    assert convert_main([str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "a.cllm"), "-q", "--threads", "1"]) == 0
    assert convert_main([str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "b.cllm"), "-q", "--threads", "2"]) == 0
    assert (tmp_path / "a.cllm").read_bytes() == (tmp_path / "b.cllm").read_bytes()
    assert convert_main([str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "a.cllm"), "-q"]) == 1
    assert "exists" in capsys.readouterr().err


def test_convert_leaves_torch_threads_as_it_found_them(tmp_path):
    save_file({"w": rand((4, 4))}, tmp_path / "m.safetensors")
    before = torch.get_num_threads()
    convert(tmp_path / "m.safetensors", tmp_path / "t.cllm")
    assert torch.get_num_threads() == before
