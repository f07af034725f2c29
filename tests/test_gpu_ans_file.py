"""Files written with `cllm-convert --codec ans` on a GPU: int8 streams stored as nvCOMP ANS.

The same tiny Llama converted with zstd and with ANS holds the same int8 weights, so every
residency tier must give bit-identical logits from both files, get_raw/get_tensor must agree,
cllm-verify must decode every chunk (trusted), transcoding .cllm -> .cllm must keep the values
(ANS -> zstd gives back the zstd file byte for byte), and hostile or corrupt ANS chunks must be
refused before nvCOMP sees them. Skipped without CUDA + nvCOMP >= 6.0 (run on the lent H200:
`python -m pytest -q -m gpu tests/test_gpu_ans_file.py`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import codecllm_format as cf
from codecllm_format import constants as C
from codecllm_format.codecs.ans import gpu_decoder_unavailable

_REASON = gpu_decoder_unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=f"needs CUDA + nvCOMP >= 6.0 ({_REASON})")]

TIERS = ("gpu", "gpu-compressed", "host", "disk")
Q = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama as zstd, as ANS (converted from safetensors), as ANS transcoded from the
    zstd .cllm (cllm-convert FILE.cllm --codec ans), and back to zstd from the ANS file."""
    from tiny_models import make_folder

    from codecllm_format.cli import convert_main
    from codecllm_format.convert import convert

    d = tmp_path_factory.mktemp("ans")
    make_folder("llama", d / "tiny-llama")
    out = {"zstd": d / "zstd.cllm", "ans": d / "ans.cllm", "transcoded": d / "transcoded.cllm", "back": d / "back.cllm"}
    convert(d / "tiny-llama", out["zstd"], chunk_size=4096)
    convert(d / "tiny-llama", out["ans"], chunk_size=4096, codec="ans")
    assert convert_main([str(out["zstd"]), "--codec", "ans", "-o", str(out["transcoded"]), "-q"]) == 0
    assert convert_main([str(out["ans"]), "--codec", "zstd", "--trust-gpu-codecs", "-o", str(out["back"]), "-q"]) == 0
    return out


def test_ans_file_layout(files):
    with cf.open(files["ans"]) as f:
        assert f.version == (1, 1)
        assert f.metadata()["int8_codec"].startswith("ans (nvCOMP 6.")
        int8 = [t for t in f.index.tensors if t.encoding == C.Encoding.INT8_ROW]
        assert int8 and all(s.codec == C.Codec.ANS for t in int8 for s in t.streams)
        assert all(s.codec == C.Codec.ZSTD for t in f.index.tensors if t.encoding == C.Encoding.RAW for s in t.streams)
        assert all(fe.stream.codec == C.Codec.ZSTD for fe in f.index.files)
    with cf.open(files["zstd"]) as f:
        assert f.version == (1, 0)


def test_cllm_verify_decodes_every_ans_chunk(files, capsys):
    from codecllm_format.cli import verify_main

    for name in ("ans", "transcoded"):
        assert verify_main([str(files[name]), "--trust-gpu-codecs", "--strict"]) == 0, capsys.readouterr().err
        out = capsys.readouterr()
        assert "OK —" in out.out and "PARTLY" not in out.err
        with cf.open(files[name], trust_gpu_codecs=True) as f:
            undecoded: list[str] = []
            assert f.verify(undecoded=undecoded) == [] and undecoded == []
    with cf.open(files["ans"]) as f:  # untrusted: checksums only, ANS streams reported undecoded
        undecoded = []
        assert f.verify(undecoded=undecoded) == []
        assert undecoded and all("TRUST" in u.upper() for u in undecoded)


def test_get_tensor_equals_the_zstd_file(files):
    with cf.open(files["zstd"]) as z:
        for name in ("ans", "transcoded", "back"):
            with cf.open(files[name], trust_gpu_codecs=True) as a:
                assert a.keys() == z.keys() and a.file_names() == z.file_names()
                for k in z.keys():
                    rz, ra = z.get_raw(k), a.get_raw(k)
                    assert torch.equal(rz.data, ra.data), (name, k)
                    assert (rz.scales is None) == (ra.scales is None)
                    if rz.scales is not None:
                        assert torch.equal(rz.scales, ra.scales), (name, k)
                    assert torch.equal(z.get_tensor(k), a.get_tensor(k)), (name, k)


def test_untrusted_ans_is_refused(files):
    from codecllm_format.runtime.gpu import GpuProvider

    with cf.open(files["ans"]) as f:
        with pytest.raises(cf.TrustRequired, match=Q):
            f.get_tensor(Q)
        with pytest.raises(cf.TrustRequired, match="trust_gpu_codecs"):
            GpuProvider(f, "cuda", residency="host")
    with pytest.raises(cf.TrustRequired):
        cf.load(files["ans"], device="cuda", tokenizer=False)


def test_transcoding_back_gives_the_zstd_file(files):
    """zstd -> ANS -> zstd keeps every int8 value, and the writer is deterministic: same bytes."""
    assert files["back"].read_bytes() == files["zstd"].read_bytes()


def _logits(m, ids):
    with torch.no_grad():
        return m(ids.to(m.device)).logits.float().cpu()


def test_every_tier_gives_the_zstd_files_logits(files):
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(4, 40, (2, 12), generator=torch.Generator().manual_seed(3))
    for tier in TIERS:
        with cf.load(files["zstd"], device="cuda", dtype=torch.float32, residency=tier, tokenizer=False) as z:
            ref = _logits(z, ids)
            tables = z.provider.row_lookup_tables
        with cf.load(files["ans"], device="cuda", dtype=torch.float32, residency=tier, tokenizer=False,
                     trust_gpu_codecs=True) as a:
            enc = {g: e.codec for g, e in a.provider.encoded.items()}
            assert set(enc.values()) == {"ans"}, enc  # used as stored: no transcoding
            got = _logits(a, ids)
            # embedding rows come from the table decoded on the GPU (resident, or once at load into
            # host memory), never from the CPU fallback, which would run nvCOMP per call
            assert a.provider.cpu_fallback.stats["embedding_calls"] == 0, tier
            assert a.provider.row_lookup_tables == tables, tier
        assert torch.equal(got, ref), tier


def test_in_memory_codec_composes_with_the_file_codec(files):
    """codec='ans' uses an ANS file as stored and transcodes a zstd file (same logits);
    codec='zstd' on an ANS file is a clear error (a zstd copy would only decode slower)."""
    ids = torch.randint(4, 40, (1, 10), generator=torch.Generator().manual_seed(5))
    with cf.load(files["zstd"], device="cuda", dtype=torch.float32, residency="host", tokenizer=False, codec="zstd") as z:
        assert {e.codec for e in z.provider.encoded.values()} == {"zstd"}
        ref = _logits(z, ids)
    for src in ("ans", "zstd"):
        with cf.load(files[src], device="cuda", dtype=torch.float32, residency="gpu-compressed", tokenizer=False,
                     codec="ans", trust_gpu_codecs=True) as m:
            assert {e.codec for e in m.provider.encoded.values()} == {"ans"}
            assert torch.equal(_logits(m, ids), ref), src
    with pytest.raises(cf.CllmError, match="codec='zstd'.*nvCOMP ANS"):
        cf.load(files["ans"], device="cuda", residency="host", tokenizer=False, codec="zstd", trust_gpu_codecs=True)


def test_corrupt_ans_chunk_is_refused_before_the_gpu(files, tmp_path):
    from codecllm_format.runtime.gpu import GpuProvider

    with cf.open(files["ans"]) as f:
        off = int(f.entry(Q).streams[0].chunks["offset"][1]) + 7
    data = bytearray(files["ans"].read_bytes())
    data[off] ^= 0x20
    path = tmp_path / "corrupt.cllm"
    path.write_bytes(bytes(data))
    with cf.open(path, trust_gpu_codecs=True) as f:
        for tier in ("gpu", "host", "gpu-compressed"):
            with pytest.raises(cf.ChecksumError, match="model.layers.1"):
                GpuProvider(f, "cuda", residency=tier)
        with pytest.raises(cf.ChecksumError, match=Q):
            f.get_tensor(Q)
        problems = f.verify()
        assert any("checksum mismatch" in p for p in problems), problems


def test_oversized_ans_chunk_is_refused_before_the_gpu(files, tmp_path):
    """A crafted chunk (checksums recomputed) longer than nvCOMP's ANS bound for its raw size."""
    import hostile_builder as hb

    from codecllm_format.runtime.gpu import GpuProvider

    blob = files["ans"].read_bytes()
    with cf.open(files["ans"]) as f:
        raw = int(f.entry(Q).streams[0].chunks["raw"][0])
    crafted = hb.relayout(blob, {(Q, 0, 0): bytes(range(256)) * (4 * raw // 256 + 4)})
    path = tmp_path / "crafted.cllm"
    path.write_bytes(crafted)
    with cf.open(path, trust_gpu_codecs=True) as f:
        with pytest.raises(cf.DecodeError, match="bound"):
            GpuProvider(f, "cuda", residency="disk")
        with pytest.raises(cf.DecodeError, match="bound"):
            f.get_tensor(Q)
