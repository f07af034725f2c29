"""INT8_GROUP (format 1.1): int8 values with one bfloat16 scale per `group_size` columns of a
row. Quantization, the file round trip, index validation and hostile files, the converter and
CLI, the CPU runtime against a transformers reference holding the file's dequantized weights
(bit-exact), export, and the GPU runtime's layouts (the fused kernels' group path is tested in
tests/test_triton_kernels.py and tests/test_launch_plan.py; `gpu`-marked tests need CUDA)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import hostile_builder as hb  # noqa: E402
from tiny_models import make_folder, reference_from_file  # noqa: E402

import codecllm_format as cf  # noqa: E402
from codecllm_format import CllmWriter, Encoding  # noqa: E402
from codecllm_format import constants as C  # noqa: E402
from codecllm_format.convert import convert, parse_quantize  # noqa: E402
from codecllm_format.errors import (  # noqa: E402
    CllmError,
    ConversionError,
    DecodeError,
    IndexSchemaError,
    UnsupportedVersion,
)
from codecllm_format.quant import (  # noqa: E402
    NonFiniteError,
    dequantize_int8_groups,
    dequantize_int8_rows,
    group_count,
    group_size_for,
    quantize_int8_groups,
    quantize_int8_rows,
    sqnr_db,
)
from codecllm_format.runtime import kernels  # noqa: E402


def _outlier_weight(rows=48, cols=200, seed=0) -> torch.Tensor:
    """Gaussian weights whose rows each hold a few large values: what group scales are for."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    if not cols:
        return w
    idx = torch.randint(0, cols, (rows, 2), generator=g)
    w.scatter_(1, idx, torch.randn(rows, 2, generator=g).sign() * 0.5)
    return w


# --- quantization --------------------------------------------------------------------------


@pytest.mark.parametrize("cols,group", [(200, 64), (128, 128), (40, 16), (7, 16), (300, 256), (0, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_quantize_matches_the_spec_formula(cols, group, dtype):
    w = _outlier_weight(cols=cols).to(dtype)
    q, s = quantize_int8_groups(w, group, torch.bfloat16)
    n = group_count(cols, group)
    assert q.shape == w.shape and q.dtype == torch.int8
    assert s.shape == (w.shape[0], n) and s.dtype == torch.bfloat16
    # the spec's procedure (10.4), group by group, in numpy
    x = w.to(torch.float32).numpy()
    for g in range(n):
        cs = slice(g * group, min((g + 1) * group, cols))
        absmax = np.abs(x[:, cs]).max(axis=1)
        want_s = torch.from_numpy((absmax / np.float32(127)).astype(np.float32)).to(torch.bfloat16)
        assert torch.equal(s[:, g], want_s)
        d = np.where(want_s.float().numpy() > 0, want_s.float().numpy(), np.float32(1))
        want_q = np.clip(np.rint(x[:, cs] / d[:, None]), -127, 127).astype(np.int8)
        assert np.array_equal(q[:, cs].numpy(), want_q)
    deq = dequantize_int8_groups(q, s, group, torch.float32)
    expand = s.float().repeat_interleave(group, dim=1)[:, :cols]
    assert torch.equal(deq, q.float() * expand)
    assert q.abs().max() <= 127 if q.numel() else True


def test_group_scales_beat_row_scales_on_outliers():
    w = _outlier_weight()
    qr, sr = quantize_int8_rows(w)
    row = sqnr_db(w, dequantize_int8_rows(qr, sr))
    qg, sg = quantize_int8_groups(w, 32, torch.bfloat16)
    grp = sqnr_db(w, dequantize_int8_groups(qg, sg, 32))
    assert grp > row + 3, (grp, row)


def test_zero_groups_and_non_finite():
    w = torch.zeros(3, 40)
    w[1, 20] = 2.0
    q, s = quantize_int8_groups(w, 16, torch.bfloat16)
    assert s.float().tolist() == [[0, 0, 0], [0, torch.tensor(2 / 127).to(torch.bfloat16).item(), 0], [0, 0, 0]]
    assert int(q[1, 20]) == 127 and int(q.abs().sum()) == 127
    with pytest.raises(NonFiniteError):
        quantize_int8_groups(torch.tensor([[1.0, float("nan")]]), 16)
    with pytest.raises(NonFiniteError):
        quantize_int8_groups(torch.tensor([[1.0, float("inf")]]), 16)
    with pytest.raises(NonFiniteError, match="overflows"):  # 1e7 / 127 > float16's 65504
        quantize_int8_groups(torch.tensor([[1e7, 1.0]]), 16, torch.float16)
    with pytest.raises(ValueError):
        quantize_int8_groups(torch.zeros(4), 16)


@pytest.mark.parametrize("cols", [1, 15, 16, 17, 100, 128, 129, 576, 1536, 4097])
@pytest.mark.parametrize("group", [16, 32, 64, 128, 256, 4096])
def test_group_size_follows_from_the_scales_shape(cols, group):
    n = group_count(cols, group)
    g = group_size_for(cols, n)
    # the same columns fall into the same groups (with one group any size >= cols does)
    assert [c // g for c in range(cols)] == [c // group for c in range(cols)]


def test_group_size_for_rejects_impossible_shapes():
    with pytest.raises(ValueError):
        group_size_for(100, 0)
    with pytest.raises(ValueError):
        group_size_for(100, 101)  # more groups than columns: no power of two fits


def test_runtime_dequantize_equals_quant_and_reader():
    w = _outlier_weight(rows=10, cols=40)
    q, s = quantize_int8_groups(w, 16, torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(kernels.dequantize(q, s, dtype), dequantize_int8_groups(q, s, 16, dtype))
    x = torch.randn(3, 40, dtype=torch.float32)
    bias = torch.randn(10)
    assert torch.equal(kernels.int8_linear(x, q, s, bias), torch.nn.functional.linear(x, dequantize_int8_groups(q, s, 16), bias))
    ids = torch.tensor([[3, 1], [1, 9]])
    rows = q[ids.reshape(-1)]
    got = kernels.int8_embedding(ids, rows, s[ids.reshape(-1)], torch.float32)
    assert torch.equal(got, dequantize_int8_groups(q, s, 16)[ids])


# --- file round trip -------------------------------------------------------------------------


def _write(path, tensors: dict, chunk_size=C.MIN_CHUNK_SIZE):
    with CllmWriter(path, chunk_size=chunk_size, level=1, threads=1) as w:
        w.begin_group("model.layers.0")
        for name, (t, enc, g) in tensors.items():
            w.add_tensor(name, t, enc, **({"group_size": g} if g else {}))
        w.finish()
    return path


@pytest.fixture(scope="module")
def gfile(tmp_path_factory):
    w = _outlier_weight(rows=64, cols=200).to(torch.bfloat16)
    path = _write(tmp_path_factory.mktemp("g") / "g.cllm", {
        "model.layers.0.w": (w, Encoding.INT8_GROUP, 64),
        "model.layers.0.r": (w, Encoding.INT8_ROW, None),
        "model.layers.0.b": (torch.randn(5), Encoding.RAW, None),
    })
    return path, w


def test_round_trip_is_bit_exact_and_minor_1(gfile):
    path, w = gfile
    with cf.open(path) as f:
        assert f.version == (1, 1)
        e = f.entry("model.layers.0.w")
        assert e.encoding == Encoding.INT8_GROUP and e.group_size == 64
        assert [s.length for s in e.streams] == [64 * 200, 64 * 4 * 2]
        raw = f.get_raw("model.layers.0.w")
        q, s = quantize_int8_groups(w, 64, torch.bfloat16)
        assert torch.equal(raw.data, q) and raw.scales.dtype == torch.bfloat16 and torch.equal(raw.scales, s)
        got = f.get_tensor("model.layers.0.w")
        assert got.dtype == torch.bfloat16 and torch.equal(got, dequantize_int8_groups(q, s, 64, torch.bfloat16))
        assert torch.equal(f.get_tensor("model.layers.0.w", torch.float32), dequantize_int8_groups(q, s, 64))
        assert f.entry("model.layers.0.r").group_size is None
        assert f.verify() == []
    # group_size sits after encoding in the tensor map; int8_row maps have none
    tensors = hb.index_obj(path.read_bytes())["tensors"]
    assert list(tensors[0]) == ["name", "shape", "dtype", "encoding", "group_size", "group", "streams"]
    assert "group_size" not in tensors[1] and "group_size" not in tensors[2]


def test_files_without_int8_group_stay_minor_0(tmp_path):
    p = _write(tmp_path / "r.cllm", {"w": (torch.randn(4, 32), Encoding.INT8_ROW, None)})
    with cf.open(p) as f:
        assert f.version == (1, 0)


def test_writer_refuses_bad_group_sizes(tmp_path):
    with CllmWriter(tmp_path / "x.cllm") as w:
        w.begin_group("g")
        for bad in (0, 8, 48, 100, 8192, 2.0):
            with pytest.raises(ValueError, match="power of two"):
                w.add_tensor(f"w{bad}", torch.randn(4, 32), Encoding.INT8_GROUP, group_size=bad)
        with pytest.raises(ValueError, match="only for int8_group"):
            w.add_tensor("r", torch.randn(4, 32), Encoding.INT8_ROW, group_size=64)
        with pytest.raises(ValueError, match="2-D float"):
            w.add_tensor("i", torch.ones(4, 32, dtype=torch.int32), Encoding.INT8_GROUP)
        with pytest.raises(ValueError, match="bfloat16"):
            w.add_int8_tensor("q", torch.zeros(4, 32, dtype=torch.int8), torch.zeros(4, 2), group_size=16)
        w.abort()


def test_add_int8_tensor_writes_the_same_bytes_as_add_tensor(tmp_path):
    t = _outlier_weight(rows=8, cols=100)
    a = _write(tmp_path / "a.cllm", {"w": (t, Encoding.INT8_GROUP, 32)})
    q, s = quantize_int8_groups(t, 32, torch.bfloat16)
    with CllmWriter(tmp_path / "b.cllm", chunk_size=C.MIN_CHUNK_SIZE, level=1, threads=1) as w:
        w.begin_group("model.layers.0")
        w.add_int8_tensor("w", q, s, dtype=torch.float32, group_size=32)
        w.finish()
    assert a.read_bytes() == (tmp_path / "b.cllm").read_bytes()


# --- index validation and hostile files ------------------------------------------------------

W = "model.layers.0.w"


def _edit_w(fn):
    return lambda blob: hb.edit_index(blob, lambda o: fn(hb.tensor(o, W)))


HOSTILE = [
    ("no-group-size", _edit_w(lambda t: t.pop("group_size")), IndexSchemaError, "missing field(s) ['group_size']"),
    ("group-size-not-power-of-two", _edit_w(lambda t: t.update(group_size=48)), IndexSchemaError, "not a power of two"),
    ("group-size-too-small", _edit_w(lambda t: t.update(group_size=8)), IndexSchemaError, "outside [16, 4096]"),
    ("group-size-too-large", _edit_w(lambda t: t.update(group_size=8192)), IndexSchemaError, "outside [16, 4096]"),
    ("group-size-not-int", _edit_w(lambda t: t.update(group_size="64")), IndexSchemaError, "expected an integer"),
    # a different group size changes the scale stream's required length
    ("group-size-disagrees-with-scales", _edit_w(lambda t: t.update(group_size=128)), IndexSchemaError, "length"),
    ("group-size-on-int8-row", lambda b: hb.edit_index(b, lambda o: hb.tensor(o, "model.layers.0.r").update(group_size=64)),
     IndexSchemaError, "only int8_group tensors have a group size"),
    ("int8-group-1d", _edit_w(lambda t: t.update(shape=[64 * 200])), IndexSchemaError, "2-D"),
    ("int8-group-int-dtype", _edit_w(lambda t: t.update(dtype=int(C.DType.I32))), IndexSchemaError, "float dtype"),
    ("int8-group-in-a-1.0-file", lambda b: hb.with_header(b, minor=0), UnsupportedVersion, "encoding INT8_GROUP, which needs minor 1"),
]


@pytest.mark.parametrize("build,exc,fragment", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_index(gfile, tmp_path, build, exc, fragment):
    blob = build(gfile[0].read_bytes())
    p = tmp_path / "h.cllm"
    p.write_bytes(blob)
    with pytest.raises(exc) as info:
        cf.open(p)
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_scale_is_rejected_when_read(gfile, tmp_path, bad):
    import zstandard

    s = torch.full((64, 4), 0.01, dtype=torch.bfloat16)
    s[5, 2] = bad
    frame = zstandard.ZstdCompressor().compress(s.view(torch.int16).numpy().tobytes())
    blob = hb.relayout(gfile[0].read_bytes(), {(W, 1, 0): frame})
    p = tmp_path / "h.cllm"
    p.write_bytes(blob)
    with cf.open(p) as f:
        f.get_tensor("model.layers.0.r")  # other tensors still read
        with pytest.raises(DecodeError, match=f"tensor {W!r}: a scale is negative, NaN or infinite"):
            f.get_tensor(W)


def test_negative_zero_scale_is_allowed(gfile, tmp_path):
    import zstandard

    raw = None
    with cf.open(gfile[0]) as f:
        raw = f.get_raw(W)
    s = raw.scales.clone()
    s[0, 0] = -0.0
    frame = zstandard.ZstdCompressor().compress(s.view(torch.int16).numpy().tobytes())
    p = tmp_path / "z.cllm"
    p.write_bytes(hb.relayout(gfile[0].read_bytes(), {(W, 1, 0): frame}))
    with cf.open(p) as f:
        got = f.get_tensor(W, torch.float32)
    assert torch.equal(got[0, :64], raw.data[0, :64].float() * -0.0)


def test_schema_validates_group_size(gfile):
    jsonschema = pytest.importorskip("jsonschema")
    from test_schema import SCHEMA, to_json

    v = jsonschema.Draft202012Validator(SCHEMA)
    obj = hb.index_obj(gfile[0].read_bytes())
    assert not list(v.iter_errors(to_json(obj)))
    for edit in (lambda t: t.pop("group_size"), lambda t: t.update(group_size=48)):
        bad = hb.index_obj(gfile[0].read_bytes())
        edit(hb.tensor(bad, W))
        assert list(v.iter_errors(to_json(bad)))
    bad = hb.index_obj(gfile[0].read_bytes())
    hb.tensor(bad, "model.layers.0.r")["group_size"] = 64
    assert list(v.iter_errors(to_json(bad)))


# --- converter and CLI -----------------------------------------------------------------------


def test_parse_quantize():
    assert parse_quantize("int8") == (Encoding.INT8_ROW, None)
    assert parse_quantize("none") == (None, None)
    assert parse_quantize("int8-g64") == (Encoding.INT8_GROUP, 64)
    assert parse_quantize("int8-group") == (Encoding.INT8_GROUP, C.DEFAULT_GROUP_SIZE)
    for bad in ("int8-g100", "int8-g8", "int8-g8192", "int4", "int8-g", "int8-g0128x"):
        with pytest.raises(ConversionError, match="int8-gN"):
            parse_quantize(bad)


@pytest.fixture(scope="module")
def llama_g(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama-g")
    cfg, tok = make_folder("llama", tmp / "hf", seed=5)
    paths = {}
    for q in ("int8-g16", "int8-g128"):
        paths[q] = tmp / f"{q}.cllm"
        convert(tmp / "hf", paths[q], quantize=q, level=1, chunk_size=4096)
    return paths, cfg, tok, tmp


def test_convert_int8_group(llama_g):
    paths, _cfg, _tok, tmp = llama_g
    with cf.open(paths["int8-g16"]) as f:
        assert f.version == (1, 1) and f.metadata()["quantize"] == "int8-g16"
        enc = {t.encoding for t in f.index.tensors if len(t.shape) == 2}
        assert enc == {Encoding.INT8_GROUP}
        assert {t.group_size for t in f.index.tensors if t.encoding == Encoding.INT8_GROUP} == {16}
        from safetensors import safe_open

        with safe_open(tmp / "hf" / "model.safetensors", framework="pt") as s:
            for t in f.index.tensors:
                if t.encoding == Encoding.INT8_GROUP:
                    q, sc = quantize_int8_groups(s.get_tensor(t.name), 16, torch.bfloat16)
                    raw = f.get_raw(t.name)
                    assert torch.equal(raw.data, q) and torch.equal(raw.scales, sc), t.name


def test_cli_quantize_option(llama_g, tmp_path, capsys):
    from codecllm_format.cli import convert_main

    _paths, _cfg, _tok, tmp = llama_g
    out = tmp_path / "cli.cllm"
    assert convert_main([str(tmp / "hf"), "-o", str(out), "--quantize", "int8-group", "-q"]) == 0
    with cf.open(out) as f:
        assert {t.group_size for t in f.index.tensors if t.encoding == Encoding.INT8_GROUP} == {C.DEFAULT_GROUP_SIZE}
        assert f.metadata()["quantize"] == f"int8-g{C.DEFAULT_GROUP_SIZE}"
    with pytest.raises(SystemExit):
        convert_main([str(tmp / "hf"), "-o", str(tmp_path / "x.cllm"), "--quantize", "int8-g100"])
    assert "int8-g100" in capsys.readouterr().err


# --- CPU runtime: bit-exact against transformers with the file's weights ----------------------


@pytest.mark.parametrize("quantize", ["int8-g16", "int8-g128"])
def test_cpu_runtime_matches_transformers_bit_exactly(llama_g, quantize):
    paths, cfg, tok, _ = llama_g
    path = paths[quantize]
    ref = reference_from_file("llama", path, cfg)
    ids = torch.randint(7, len(tok), (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
    with cf.load(path, dtype=torch.float32) as m:
        from codecllm_format.runtime import CompressedEmbedding, CompressedLinear

        mods = list(m.model.modules())
        assert sum(isinstance(x, CompressedLinear) for x in mods) >= 14
        assert any(isinstance(x, CompressedEmbedding) for x in mods)
        got = m(ids).logits
        assert torch.equal(got, want)
        out = m.generate(ids[:1, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    ref_out = ref.generate(ids[:1, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref_out)


def test_cpu_runtime_bert(tmp_path):
    cfg, tok = make_folder("bert", tmp_path / "hf", seed=6)
    path = tmp_path / "bert.cllm"
    convert(tmp_path / "hf", path, quantize="int8-g32", level=1, chunk_size=4096)
    ref = reference_from_file("bert", path, cfg)
    ids = torch.randint(7, len(tok), (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(ids).last_hidden_state
    with cf.load(path, dtype=torch.float32) as m:
        assert torch.equal(m(ids).last_hidden_state, want)


def test_embedding_rows_decode_group_scales(gfile):
    from codecllm_format.runtime.provider import CpuProvider

    path, _w = gfile
    p = CpuProvider(cf.open(path))
    try:
        ids = torch.tensor([0, 63, 5, 5])
        q, s = p.embedding_rows(W, ids)
        raw = p.cllm.get_raw(W)
        assert torch.equal(q, raw.data[ids]) and s.dtype == torch.bfloat16 and torch.equal(s, raw.scales[ids])
        q0, s0 = p.embedding_rows(W, torch.tensor([], dtype=torch.long))
        assert q0.shape == (0, 200) and s0.shape == (0, 4)
    finally:
        p.cllm.close()


# --- export ----------------------------------------------------------------------------------


def test_safetensors_export_is_dequantized(llama_g, tmp_path):
    from safetensors.torch import load_file

    from codecllm_format.export import export

    paths, _cfg, _tok, _ = llama_g
    export(paths["int8-g16"], tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    with cf.open(paths["int8-g16"]) as f:
        for k, t in got.items():
            assert torch.equal(t, f.get_tensor(k)), k


@pytest.mark.parametrize("ct_format", ["pack-quantized", "int-quantized"])
def test_compressed_tensors_group_export(llama_g, tmp_path, ct_format):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from codecllm_format.export import export

    paths, _cfg, _tok, _ = llama_g
    out = tmp_path / "out"
    rep = export(paths["int8-g16"], out, format="compressed-tensors", ct_format=ct_format)
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    assert (scheme.weights.strategy, scheme.weights.group_size) == ("group", 16)
    compressor = BaseCompressor.load_from_registry(qc.format)
    got = load_file(out / "model.safetensors")
    with cf.open(paths["int8-g16"]) as f:
        for name in rep.quantized:
            mod = name.removesuffix(".weight")
            params = {k.removeprefix(mod + "."): t for k, t in got.items() if k.startswith(mod + ".weight")}
            rows, cols = f.entry(name).shape
            assert params["weight_scale"].shape == (rows, cols // 16)
            dq = compressor.decompress(params, scheme)["weight"]
            # the library multiplies in the scales' dtype (bfloat16): equal to ours in bfloat16
            assert torch.equal(dq.to(torch.bfloat16), f.get_tensor(name, torch.bfloat16)), name


def test_compressed_tensors_refuses_partial_groups(llama_g, tmp_path):
    from codecllm_format.export import export

    paths, _cfg, _tok, _ = llama_g
    with pytest.raises(CllmError, match="not a multiple of its scale group size 128"):
        export(paths["int8-g128"], tmp_path / "out", format="compressed-tensors")
    assert not (tmp_path / "out").exists()


# --- the GPU runtime's layouts (tested without a GPU) -----------------------------------------


def test_gpu_layouts_place_group_scales(gfile):
    """build_layouts streams int8_group tensors; decoding a group's chunks to their slot offsets
    (as the GPU decoder does) and taking GpuProvider's views gives get_raw's q and scales."""
    import zstandard

    from codecllm_format.runtime.gpu import GpuProvider
    from codecllm_format.runtime.layout import SLOT_ALIGNMENT, build_layouts

    with cf.open(gfile[0]) as f:
        (lay,) = build_layouts(f.index).values()
        assert set(lay.tensors) == {W, "model.layers.0.r"}
        assert lay.tensors[W].scale_groups == 4 and lay.tensors["model.layers.0.r"].scale_groups == 0
        data = f.group_bytes(lay.gid)
        slot = torch.zeros(lay.decoded_bytes, dtype=torch.uint8)
        for i in range(len(lay.in_offsets)):
            a, n = int(lay.in_offsets[i]), int(lay.in_sizes[i])
            raw = zstandard.ZstdDecompressor().decompress(bytes(data[a : a + n]))
            o = int(lay.out_offsets[i])
            slot[o : o + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        for name, sl in lay.tensors.items():
            assert sl.q_offset % SLOT_ALIGNMENT == 0 and sl.scale_offset % SLOT_ALIGNMENT == 0
            q, s = GpuProvider._views(slot, sl)
            raw = f.get_raw(name)
            assert torch.equal(q, raw.data) and s.dtype == raw.scales.dtype and torch.equal(s, raw.scales), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_every_tier_runs_int8_group(llama_g):
    """An int8_group file on the GPU, every residency tier: the CPU path's logits (float32 compute,
    same weights) and its greedy tokens (bfloat16 compute goes through the fused kernels)."""
    from codecllm_format.runtime.plan import TIERS

    torch.backends.cuda.matmul.allow_tf32 = False
    paths, _cfg, tok, _ = llama_g
    ids = torch.randint(7, len(tok), (2, 12), generator=torch.Generator().manual_seed(9))
    for quantize in ("int8-g16", "int8-g128"):
        with cf.load(paths[quantize], device="cpu", dtype=torch.float32) as cpu:
            with torch.no_grad():
                ref = cpu(ids).logits
        for tier in TIERS:
            with cf.load(paths[quantize], device="cuda", dtype=torch.float32, residency=tier) as m:
                with torch.no_grad():
                    got = m(ids.cuda()).logits.float().cpu()
                rel = ((got - ref).norm() / ref.norm()).item()
                assert rel <= 1e-5, (quantize, tier, rel)
            with cf.load(paths[quantize], device="cuda", dtype=torch.bfloat16, residency=tier) as m:
                with torch.no_grad():
                    got = m(ids.cuda()).logits.float().cpu()
                rel = ((got - ref).norm() / ref.norm()).item()
                assert rel <= 3e-2, (quantize, tier, rel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_int8_linear_with_group_scales():
    """On CUDA, int8_linear with int8_group scales runs the fused kernels (with and without a
    LinearPlan, bit-identical) and agrees with dequantize-then-matmul in float64."""
    g = torch.Generator().manual_seed(0)
    w = _outlier_weight(rows=96, cols=200)
    q, s = quantize_int8_groups(w, 64, torch.bfloat16)
    q, s = q.cuda(), s.cuda()
    w64 = dequantize_int8_groups(q, s, 64, torch.float64)
    plan = kernels.LinearPlan()
    with torch.no_grad():
        for m in (1, 5, 40):
            x = torch.randn(m, 200, generator=g).to(torch.bfloat16).cuda()
            y = kernels.int8_linear(x, q, s)
            ref = x.double() @ w64.t()
            assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2, m
            assert torch.equal(kernels.int8_linear(x, q, s, plan=plan), y), m
    assert plan.fused is not None


def test_hub_model_card_describes_group_scales(llama_g):
    from codecllm_format import hub

    paths, _cfg, _tok, _ = llama_g
    with cf.open(paths["int8-g16"]) as f:
        card = hub.model_card(f, "me/tiny-g16")
    assert "one bfloat16 scale per group of input columns" in card and "one float32 scale per row" not in card
    assert "int8_group" not in card.split("---")[1]  # the tag is "int8", once
    assert card.split("---")[1].count("- int8") == 1
