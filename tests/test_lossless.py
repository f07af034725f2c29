"""Lossless files (cllm-convert --quantize none: FLOAT_PLANES) end to end on the CPU: a tiny
transformers model converted losslessly loads through codecllm_format.load, its Linear weights
stay compressed and are decoded bit-exact for each forward, and its logits and generations
equal transformers' with the original weights, exactly. Export back to safetensors gives the
original tensors bit for bit."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_folder, model_class  # noqa: E402

import codecllm_format  # noqa: E402
from codecllm_format import Encoding  # noqa: E402
from codecllm_format import constants as C  # noqa: E402
from codecllm_format.convert import convert  # noqa: E402
from codecllm_format.export import export  # noqa: E402
from codecllm_format.runtime.modules import CompressedFloatLinear  # noqa: E402


def _cast_folder(folder, dtype: torch.dtype) -> None:
    """Rewrite an HF folder's weights (and config dtype) in `dtype`."""
    import json

    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg))


def _reference(arch: str, folder, dtype: torch.dtype):
    return model_class(arch).from_pretrained(folder, dtype=dtype).eval()


@pytest.fixture(scope="module", params=[("llama", torch.bfloat16), ("llama-tied", torch.float16), ("bert", torch.float32)],
                ids=["llama-bf16", "llama-tied-f16", "bert-f32"])
def lossless(request, tmp_path_factory):
    arch, dtype = request.param
    tmp = tmp_path_factory.mktemp(f"lossless-{arch}")
    cfg, tok = make_folder(arch, tmp / "hf", seed=5)
    _cast_folder(tmp / "hf", dtype)
    path = tmp / "m.cllm"
    convert(tmp / "hf", path, quantize="none", chunk_size=4096)
    return arch, dtype, tmp / "hf", path, tok


def test_every_float_tensor_is_float_planes(lossless):
    _arch, _dtype, _hf, path, _tok = lossless
    with codecllm_format.open(path) as f:
        assert f.version == (1, 1) and f.verify() == []
        for name in f.keys():
            e = f.entry(name)
            want = Encoding.FLOAT_PLANES if e.dtype.name in ("BF16", "F16", "F32") else Encoding.RAW
            assert e.encoding == want, name


def test_logits_equal_transformers_exactly(lossless):
    arch, dtype, hf, path, tok = lossless
    compute = torch.float32 if dtype == torch.float16 else dtype  # the loader runs f16 models in f32 on the CPU
    ref = _reference(arch, hf, compute)
    ids = torch.randint(7, len(tok), (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids)
    with codecllm_format.load(path) as m:
        assert m.dtype == compute
        lossless_linears = [mod for mod in m.model.modules() if isinstance(mod, CompressedFloatLinear)]
        assert len(lossless_linears) >= 2 * 6  # q, k, v, o and MLP projections of both blocks
        assert not any(name == "weight" for mod in lossless_linears for name, _ in mod.named_parameters())
        got = m(ids)
        calls = m.provider.stats["float_calls"]
        assert calls == len(lossless_linears)  # each lossless linear decoded once per forward
    key = "logits" if arch != "bert" else "last_hidden_state"
    assert torch.equal(getattr(got, key), getattr(want, key)), f"{arch}: outputs differ from transformers'"


def test_generation_equals_transformers(lossless):
    arch, dtype, hf, path, _tok = lossless
    if arch == "bert":
        pytest.skip("encoder")
    compute = torch.float32 if dtype == torch.float16 else dtype
    ref = _reference(arch, hf, compute)
    ids = torch.tensor([[8, 9, 10, 11]])
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
    with codecllm_format.load(path) as m:
        assert torch.equal(m.generate(ids, **kw), want)


def test_export_gives_the_original_tensors_bit_for_bit(lossless, tmp_path):
    from safetensors.torch import load_file

    _arch, _dtype, hf, path, _tok = lossless
    export(path, tmp_path / "out")
    original = load_file(hf / "model.safetensors")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert set(original) - set(exported) <= {"lm_head.weight"}  # tied: re-tied on load
    for name, t in exported.items():
        o = original[name]
        assert t.dtype == o.dtype and t.shape == o.shape, name
        assert torch.equal(t.reshape(-1).view(torch.uint8), o.reshape(-1).view(torch.uint8)), name
    assert (tmp_path / "out" / "config.json").read_bytes() == (hf / "config.json").read_bytes()


def test_a_provider_without_float_weight_gets_parameters(lossless, monkeypatch):
    """The GPU provider (or any without float_weight) gets lossless weights as parameters
    decoded at load: same outputs."""
    from codecllm_format.runtime.provider import CpuProvider

    arch, _dtype, _hf, path, tok = lossless
    ids = torch.randint(7, len(tok), (1, 7), generator=torch.Generator().manual_seed(2))
    with codecllm_format.load(path) as m:
        want = m(ids)
    monkeypatch.delattr(CpuProvider, "float_weight")
    with codecllm_format.load(path) as m:
        assert not any(isinstance(mod, CompressedFloatLinear) for mod in m.model.modules())
        got = m(ids)
    key = "logits" if arch != "bert" else "last_hidden_state"
    assert torch.equal(getattr(got, key), getattr(want, key))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tier", ["gpu", "gpu-compressed", "host", "disk"])
def test_gpu_load_equals_transformers_on_the_gpu(lossless, tier):
    """device='cuda', every tier: lossless Linear weights are decoded from their planes with the
    group (nvCOMP) and re-interleaved per forward (Triton), giving transformers' outputs on the
    same GPU exactly: with transformers' own norm modules (fuse_norms=False), and with the
    fused RMSNorm on both sides (the default on CUDA runs other norm kernels than transformers)."""
    from codecllm_format.runtime.norms import fuse_rms_norms

    arch, dtype, hf, path, tok = lossless
    compute = torch.float32 if dtype == torch.float16 else dtype
    ref = _reference(arch, hf, compute).to("cuda")
    ids = torch.randint(7, len(tok), (2, 11), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        want = ref(ids)
    with codecllm_format.load(path, device="cuda", dtype=compute, residency=tier) as m:
        fused = m.fused_norms
        got_fused = m(ids)
    with torch.no_grad():
        assert fuse_rms_norms(ref, compute) == fused
        want_fused = ref(ids)
    key = "logits" if arch != "bert" else "last_hidden_state"
    assert torch.equal(getattr(got_fused, key), getattr(want_fused, key))
    with codecllm_format.load(path, device="cuda", dtype=compute, residency=tier, fuse_norms=False) as m:
        got = m(ids)
        got2 = m(ids)  # second forward: slots reused, planes decoded again
        n_float = sum(isinstance(mod, CompressedFloatLinear) for mod in m.model.modules())
        streamed = sum(len(lay.planes) for lay in m.provider.layouts.values())
        calls = m.provider.stats["float_calls"]
    assert n_float > 0 and streamed == n_float, (n_float, streamed)
    assert calls == 2 * n_float
    assert torch.equal(getattr(got, key), getattr(want, key))
    assert torch.equal(getattr(got2, key), getattr(want, key))


def test_lossless_weights_are_decoded_inside_their_group(lossless):
    """Every float_weight call comes between begin_group and end_group of the weight's group
    (where a GPU provider would prefetch and free), and no decoded weight outlives the forward."""
    import weakref

    _arch, _dtype, _hf, path, tok = lossless
    with codecllm_format.load(path) as m:
        p = m.provider
        events, handed = [], []
        for meth in ("float_weight", "begin_group", "end_group"):
            orig = getattr(p, meth)

            def call(arg, _orig=orig, _meth=meth):
                events.append((_meth, arg))
                out = _orig(arg)
                if out is not None:
                    handed.append(weakref.ref(out))
                return out

            setattr(p, meth, call)
        m(torch.randint(7, len(tok), (1, 5), generator=torch.Generator().manual_seed(3)))
        open_group = None
        for meth, arg in events:
            if meth == "begin_group":
                assert open_group is None
                open_group = arg
            elif meth == "end_group":
                assert arg == open_group
                open_group = None
            else:
                assert open_group is not None and m.file.entry(arg).group == open_group, (meth, arg)
        assert sum(e[0] == "float_weight" for e in events) > 0
        assert all(r() is None for r in handed), "a decoded lossless weight outlived the forward"


def test_gpu_layouts_place_planes_where_a_cpu_decode_finds_them(lossless):
    """runtime/layout.py on the CPU: decoding every chunk of a group's layout into a slot (as
    nvCOMP does on the GPU) leaves each float_planes tensor's planes at its PlaneSlice offsets."""
    import zstandard

    from codecllm_format.planes import join_planes
    from codecllm_format.runtime.layout import build_layouts

    _arch, _dtype, _hf, path, _tok = lossless
    with codecllm_format.open(path) as f:
        layouts = build_layouts(f.index)
        assert sum(len(lay.planes) for lay in layouts.values()) == sum(
            t.encoding == C.Encoding.FLOAT_PLANES for t in f.index.tensors)
        some = {next(iter(lay.planes)) for lay in layouts.values() if lay.planes}
        only = build_layouts(f.index, planes=some)
        assert {n for lay in only.values() for n in lay.planes} == some
        dz = zstandard.ZstdDecompressor()
        for lay in layouts.values():
            data = f.group_bytes(lay.gid)
            slot = bytearray(lay.decoded_bytes)
            for off, size, out, raw in zip(lay.in_offsets.tolist(), lay.in_sizes.tolist(),
                                           lay.out_offsets.tolist(), lay.out_sizes.tolist()):
                slot[out:out + raw] = dz.decompress(bytes(data[off:off + size]), max_output_size=raw)
            data.release()
            for name, ps in lay.planes.items():
                k = C.FLOAT_PLANES_LAYOUT[ps.dtype][2]
                got = join_planes(slot[ps.exp_offset:ps.exp_offset + ps.numel],
                                  slot[ps.sm_offset:ps.sm_offset + k * ps.numel], ps.dtype)
                want = f.get_tensor(name)
                assert torch.equal(got.view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
