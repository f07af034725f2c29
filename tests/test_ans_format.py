"""Codec ANS (format 1.1, GPU-only) on the CPU: the index accepts it where the spec allows it,
the writer stamps minor 1 and writes precompressed chunks exactly, a reader without nvCOMP opens
the file, checks checksums and fails clearly on ANS data, hostile indexes are refused, and
`--codec ans` fails fast without a GPU. ANS bytes cannot be produced here (nvCOMP needs a GPU):
the ANS files of these tests hold arbitrary chunk bytes, which is all the CPU ever sees of one.
tests/test_gpu_ans_file.py runs the real thing on a GPU."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zstandard

import codecllm_format as cf
from codecllm_format import constants as C
from codecllm_format.cli import convert_main, info_main, verify_main
from codecllm_format.errors import (
    ChecksumError,
    CodecUnavailable,
    DecodeError,
    IndexSchemaError,
    TrustRequired,
    UnsupportedVersion,
)
from codecllm_format.quant import quantize_int8_rows
from codecllm_format.writer import CllmWriter, PrecompressedStream, build_header, tensor_bytes

import hostile_builder as hb

NO_GPU = not torch.cuda.is_available()
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="checks the behaviour of a machine without CUDA")
CS = 4096
W = "model.layers.0.mlp.weight"
W2 = "model.layers.0.attn.weight"
B = "model.layers.0.mlp.bias"


def _chunks(data: memoryview, cs: int = CS) -> list[bytes]:
    """Stand-ins for ANS chunks: the raw bytes themselves (valid sizes; the CPU cannot tell)."""
    return [bytes(data[o : o + cs]) for o in range(0, len(data), cs)]


def _fake_ans(t: memoryview, cs: int = CS) -> PrecompressedStream:
    return PrecompressedStream(C.Codec.ANS, len(t), cs, _chunks(t, cs))


def write_ans_file(path: Path, *, both_ans: bool = True) -> Path:
    """A file whose int8_row tensors are stored as (stand-in) ANS streams, plus a zstd RAW bias
    and an embedded config."""
    g = torch.Generator().manual_seed(3)
    w, w2 = torch.randn(48, 200, generator=g), torch.randn(16, 64, generator=g)
    with CllmWriter(path, chunk_size=CS) as wr:
        wr.begin_group("model.layers.0")
        for name, t in ((W, w), (W2, w2)):
            q, s = quantize_int8_rows(t)
            wr.add_precompressed_tensor(name, t.shape, torch.float32, C.Encoding.INT8_ROW,
                                        [_fake_ans(tensor_bytes(q)), _fake_ans(tensor_bytes(s))])
        wr.add_tensor(B, torch.randn(300, generator=g))
        wr.add_file("config.json", b'{"model_type": "test"}')
        wr.finish()
    return path


@pytest.fixture
def ans_file(tmp_path: Path) -> Path:
    return write_ans_file(tmp_path / "ans.cllm")


# --- constants and versions ------------------------------------------------------------------


def test_feature_minor_tells_enums_apart():
    """Codec.ANS == Encoding.INT8_ROW == 2 as ints: only the codec is a 1.1 feature."""
    assert C.minor_version_for({C.Encoding.INT8_ROW, C.Encoding.RAW}, {C.Codec.ZSTD}) == 0
    assert C.minor_version_for({C.Encoding.RAW}, {C.Codec.ANS}) == 1
    assert C.FEATURE_MINOR.get(C.Encoding.INT8_ROW, 0) == 0 and C.FEATURE_MINOR[C.Codec.ANS] == 1
    assert C.Encoding.INT8_ROW not in C.FEATURE_MINOR and C.Codec.ANS in C.FEATURE_MINOR


def test_zstd_int8_file_stays_v1_0(small_cllm: Path):
    with cf.open(small_cllm) as f:
        assert f.version == (1, 0) and not f.gpu_only_codecs


def test_ans_file_is_v1_1_and_opens_everywhere(ans_file: Path):
    with cf.open(ans_file) as f:
        assert f.version == (1, 1)
        assert f.gpu_only_codecs == {C.Codec.ANS}
        assert [s.codec for s in f.entry(W).streams] == [C.Codec.ANS, C.Codec.ANS]
        assert f.entry(B).streams[0].codec == C.Codec.ZSTD
        assert f.read_file("config.json") == b'{"model_type": "test"}'
        assert f.get_tensor(B).shape == (300,)  # zstd streams read as ever


def test_ans_file_labelled_v1_0_is_refused(ans_file: Path, tmp_path: Path):
    with cf.open(ans_file) as f:
        h = f.header
    data = bytearray(ans_file.read_bytes())
    data[: C.HEADER_SIZE] = build_header(h.index_offset, h.index_length, h.index_checksum, h.file_length, minor=0)
    path = tmp_path / "v10.cllm"
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedVersion, match=r"says format 1\.0, but uses codec ANS, which needs minor 1"):
        cf.open(path)


# --- reading without nvCOMP ----------------------------------------------------------------------


@needs_no_gpu
@pytest.mark.parametrize("trust", [False, True])
def test_get_tensor_of_ans_without_gpu_names_tensor_and_fix(ans_file: Path, trust: bool):
    with cf.open(ans_file, trust_gpu_codecs=trust) as f:
        with pytest.raises(CodecUnavailable) as info:
            f.get_tensor(W)
    msg = str(info.value)
    assert W in msg and "ANS" in msg and "--codec zstd" in msg
    assert "CUDA" in msg or "nvidia-nvcomp" in msg


@needs_no_gpu
def test_verify_checks_checksums_and_reports_undecoded(ans_file: Path):
    with cf.open(ans_file) as f:
        problems = f.verify()  # no list for undecoded streams: they are problems
        assert len(problems) == 4 and all("not decoded" in p for p in problems), problems
        undecoded: list[str] = []
        assert f.verify(undecoded=undecoded) == []
        assert len(undecoded) == 4 and all("checksummed but not decoded" in u for u in undecoded)


def test_verify_finds_a_corrupt_ans_chunk(ans_file: Path, tmp_path: Path):
    off, stored = hb.chunk_location(ans_file.read_bytes(), W, 0, 1)
    path = tmp_path / "bad.cllm"
    path.write_bytes(hb.flip_bit(ans_file.read_bytes(), off + stored // 2))
    with cf.open(path) as f:
        undecoded: list[str] = []
        problems = f.verify(undecoded=undecoded)
    assert any("checksum mismatch" in p and W in p and "chunk 1" in p for p in problems), problems
    with cf.open(path, trust_gpu_codecs=True) as f:  # refused before any decoder, trusted or not
        with pytest.raises((ChecksumError, CodecUnavailable)):
            f.get_tensor(W)


@needs_no_gpu
def test_cllm_verify_partly_and_strict(ans_file: Path, capsys):
    assert verify_main([str(ans_file)]) == 0
    err = capsys.readouterr().err
    assert "OK, PARTLY" in err and "not decoded" in err
    assert verify_main([str(ans_file), "--strict"]) == 1
    assert "NOT SOUND" in capsys.readouterr().err


def test_cllm_info_of_ans_file(ans_file: Path, capsys):
    assert info_main([str(ans_file)]) == 0
    out = capsys.readouterr().out
    assert "v1.1" in out and "codecs: ans, zstd" in out and "floor: not computed" in out


@needs_no_gpu
def test_load_on_cpu_is_refused_before_building(ans_file: Path):
    """The embedded config is not a model transformers can build: the codec check comes first."""
    with pytest.raises(CodecUnavailable, match="GPU-only codec ANS.*device='cuda'"):
        cf.load(ans_file)


def test_load_untrusted_is_refused_before_building(ans_file: Path):
    from codecllm_format.loader import _check_gpu_only_codecs

    with cf.open(ans_file) as f:
        with pytest.raises(TrustRequired, match="trust_gpu_codecs=True"):
            _check_gpu_only_codecs(f, torch.device("cuda", 0), trusted=False)
        _check_gpu_only_codecs(f, torch.device("cuda", 0), trusted=True)  # no error


# --- hostile indexes --------------------------------------------------------------------------------


def _refused(tmp_path: Path, blob: bytes, exc, fragment: str) -> None:
    path = tmp_path / "hostile.cllm"
    path.write_bytes(blob)
    with pytest.raises(exc) as info:
        cf.open(path)
    assert fragment in str(info.value), str(info.value)


def test_ans_on_a_raw_tensor_is_refused(ans_file: Path, tmp_path: Path):
    blob = hb.edit_index(ans_file.read_bytes(), lambda o: hb.stream_of(o, B).update(codec=int(C.Codec.ANS)))
    _refused(tmp_path, blob, IndexSchemaError, "allowed only in the streams of INT8_ROW tensors")


def test_ans_for_an_embedded_file_is_refused(ans_file: Path, tmp_path: Path):
    blob = hb.edit_index(ans_file.read_bytes(), lambda o: hb.stream_of(o, "config.json").update(codec=int(C.Codec.ANS)))
    _refused(tmp_path, blob, IndexSchemaError, "not allowed for embedded files")


@pytest.mark.parametrize("which", [(W, 1), (W2, 0)])
def test_two_codecs_in_one_group_are_refused(ans_file: Path, tmp_path: Path, which):
    name, j = which
    blob = hb.edit_index(ans_file.read_bytes(), lambda o: hb.stream_of(o, name, j).update(codec=int(C.Codec.ZSTD)))
    _refused(tmp_path, blob, IndexSchemaError, "one codec for all INT8_ROW streams of a group")


def test_ans_chunk_over_the_expansion_limit_is_refused(ans_file: Path, tmp_path: Path):
    """The expansion bound holds for ANS chunks too: 1 stored byte cannot claim 65536 raw bytes."""
    def shrink(o):
        hb.tensor(o, W)["shape"] = [4096, 16]
        st = hb.stream_of(o, W)
        off, _stored, _raw, checksum = hb.records(st)[0]
        st.update(length=65536, chunk_size=C.MAX_CHUNK_SIZE)
        hb.set_records(st, [[off, 1, 65536, checksum]])
    blob = hb.edit_index(ans_file.read_bytes(), shrink)
    _refused(tmp_path, blob, IndexSchemaError, "stores 1 bytes for 65536 raw")


def test_ans_size_rules():
    from codecllm_format.codecs.ans import check_ans_chunk_sizes

    check_ans_chunk_sizes(10, 4096)
    for stored, raw, frag in ((0, 10, "empty"), (1, C.MAX_ZSTD_EXPANSION + 1, "expansion"),
                              (10, 0, "raw bytes"), (1 << 20, C.MAX_CHUNK_SIZE + 1, "raw bytes")):
        with pytest.raises(DecodeError, match=frag):
            check_ans_chunk_sizes(stored, raw, "x")


def test_schema_accepts_ans_codec():
    import json

    schema = json.loads((Path(__file__).resolve().parent.parent / "spec" / "index.schema.json").read_text())
    assert schema["$defs"]["codec"]["enum"] == [1, 2]


# --- the writer's precompressed-chunk API, with zstd frames made by the zstandard library -------------


def _zstd_frames(data: memoryview, cs: int, level: int = 3) -> list[bytes]:
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False, write_dict_id=False)
    return [cctx.compress(data[o : o + cs]) for o in range(0, len(data), cs)]


def test_precompressed_zstd_gives_the_same_bytes_as_add_tensor(tmp_path: Path):
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(40, 300, generator=g), torch.randn(5000, generator=g)
    q, s = quantize_int8_rows(w)
    with CllmWriter(tmp_path / "a.cllm", chunk_size=CS, level=3) as wr:
        wr.begin_group("g")
        wr.add_int8_tensor("w", q, s, torch.float32)
        wr.add_tensor("b", b)
        wr.finish()
    with CllmWriter(tmp_path / "b.cllm", chunk_size=CS, level=3) as wr:
        wr.begin_group("g")
        streams = [PrecompressedStream(C.Codec.ZSTD, len(tensor_bytes(x)), CS, _zstd_frames(tensor_bytes(x), CS))
                   for x in (q, s)]
        wr.add_precompressed_tensor("w", (40, 300), torch.float32, C.Encoding.INT8_ROW, streams)
        data = tensor_bytes(b)
        raws = [min(CS, len(data) - o) for o in range(0, len(data), CS)]
        wr.add_precompressed_tensor("b", (5000,), C.DType.F32, C.Encoding.RAW,
                                    [PrecompressedStream(C.Codec.ZSTD, len(data), CS, _zstd_frames(data, CS), raws)])
        wr.finish()
    assert (tmp_path / "a.cllm").read_bytes() == (tmp_path / "b.cllm").read_bytes()
    with cf.open(tmp_path / "b.cllm") as f:
        assert f.verify() == [] and f.version == (1, 0)
        assert torch.equal(f.get_raw("w").data, q) and torch.equal(f.get_tensor("b"), b)


def _writer(tmp_path: Path) -> CllmWriter:
    wr = CllmWriter(tmp_path / "x.cllm", chunk_size=CS).open()
    wr.begin_group("g")
    return wr


@pytest.mark.parametrize("case", ["raw lengths", "chunk count", "stream length", "stream count", "ans on raw",
                                  "trailing bytes", "empty chunk", "mixed codecs", "int8 of int"])
def test_precompressed_api_rejects(tmp_path: Path, case: str):
    data = memoryview(bytes(range(256)) * 40)  # 10240 bytes: 3 chunks of 4 KiB
    frames = _zstd_frames(data, CS)
    wr = _writer(tmp_path)
    ok = PrecompressedStream(C.Codec.ZSTD, len(data), CS, frames)
    raw = lambda st: wr.add_precompressed_tensor("t", (len(data),), C.DType.U8, C.Encoding.RAW, [st])  # noqa: E731
    try:
        if case == "raw lengths":
            with pytest.raises(ValueError, match="raw lengths"):
                raw(PrecompressedStream(C.Codec.ZSTD, len(data), CS, frames, [CS, CS, CS]))
        elif case == "chunk count":
            with pytest.raises(ValueError, match="need 3"):
                raw(PrecompressedStream(C.Codec.ZSTD, len(data), CS, frames[:2]))
        elif case == "stream length":
            with pytest.raises(ValueError, match="shape x dtype needs"):
                wr.add_precompressed_tensor("t", (len(data) + 1,), C.DType.U8, C.Encoding.RAW, [ok])
        elif case == "stream count":
            with pytest.raises(ValueError, match="needs 2"):
                wr.add_precompressed_tensor("t", (40, 256), C.DType.F32, C.Encoding.INT8_ROW, [ok])
        elif case == "ans on raw":
            with pytest.raises(ValueError, match="only for int8_row"):
                raw(PrecompressedStream(C.Codec.ANS, len(data), CS, _chunks(data)))
        elif case == "trailing bytes":
            with pytest.raises(DecodeError, match="bytes after the zstd frame"):
                raw(PrecompressedStream(C.Codec.ZSTD, len(data), CS, [frames[0] + b"\0\0", *frames[1:]]))
        elif case == "empty chunk":
            with pytest.raises(ValueError, match="stores 0 bytes"):
                raw(PrecompressedStream(C.Codec.ZSTD, len(data), CS, [b"", *frames[1:]]))
        elif case == "mixed codecs":
            q, s = quantize_int8_rows(torch.randn(8, 64))
            wr.add_int8_tensor("zstd-int8", q, s)
            with pytest.raises(ValueError, match="one codec for all int8_row streams of a group"):
                wr.add_precompressed_tensor("ans-int8", (8, 64), torch.float32, C.Encoding.INT8_ROW,
                                            [_fake_ans(tensor_bytes(q)), _fake_ans(tensor_bytes(s))])
            wr.begin_group("h")  # a new group may use another codec
            wr.add_precompressed_tensor("ans-int8", (8, 64), torch.float32, C.Encoding.INT8_ROW,
                                        [_fake_ans(tensor_bytes(q)), _fake_ans(tensor_bytes(s))])
        elif case == "int8 of int":
            with pytest.raises(ValueError, match="2-D float"):
                wr.add_precompressed_tensor("t", (40, 256), C.DType.I32, C.Encoding.INT8_ROW, [ok, ok])
    finally:
        wr.abort()
    assert not list(tmp_path.iterdir()), "an aborted writer leaves nothing"


# --- writing ANS without a GPU fails fast, writing nothing -----------------------------------------


@needs_no_gpu
def test_writer_int8_codec_ans_needs_a_gpu(tmp_path: Path):
    with pytest.raises(CodecUnavailable, match="nvCOMP"):
        CllmWriter(tmp_path / "x.cllm", int8_codec="ans")
    assert not list(tmp_path.iterdir())


@needs_no_gpu
def test_cli_convert_codec_ans_fails_fast(small_safetensors: Path, small_cllm: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for src in (small_safetensors, small_cllm):
        assert convert_main([str(src), "-o", str(out / "x.cllm"), "--codec", "ans", "-q"]) == 1
        err = capsys.readouterr().err
        assert "cllm-convert: error: --codec ans" in err and "nothing was written" in err and "Traceback" not in err
    assert not list(out.iterdir())


def test_cli_transcode_cllm_keeps_everything(small_cllm: Path, tmp_path: Path):
    """A .cllm input is rewritten, not re-quantized: the same int8 values, scales and raw bytes."""
    out = tmp_path / "copy.cllm"
    assert convert_main([str(small_cllm), "-o", str(out), "--codec", "zstd", "-q"]) == 0
    with cf.open(small_cllm) as a, cf.open(out) as b:
        assert b.verify() == [] and a.keys() == b.keys() and a.file_names() == b.file_names()
        assert [g.name for g in a.index.groups] == [g.name for g in b.index.groups]
        for k in a.keys():
            ra, rb = a.get_raw(k), b.get_raw(k)
            assert torch.equal(ra.data, rb.data) and (ra.scales is None or torch.equal(ra.scales, rb.scales)), k
        for n in a.file_names():
            assert a.read_file(n) == b.read_file(n)
        assert b.index.aliases == a.index.aliases


@needs_no_gpu
def test_transcode_ans_file_without_gpu_writes_nothing(ans_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "z.cllm"
    assert convert_main([str(ans_file), "-o", str(out), "--codec", "zstd", "--trust-gpu-codecs", "-q"]) == 1
    assert "GPU-only codec ANS" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


# --- the plumbing around nvCOMP, with a stand-in for nvidia.nvcomp on the CPU --------------------------
# The real bitstream needs a GPU (tests/test_gpu_ans_file.py). Here a stand-in module with the
# calls codecs/ans.py makes (Codec.encode/decode/get_max_comp_buffer_size, as_array(s),
# BitstreamKind) and a trivial, non-identity "compression" checks everything around them:
# packing, offsets, sizes, the writer, the converter, transcoding, trust, verify.


class _FakeNvcomp:
    """Stand-in for nvidia.nvcomp: chunk = b"FANS" + u32 raw length + (raw XOR 0x5A)."""

    __version__ = "6.0.0"
    BitstreamKind = type("BitstreamKind", (), {"RAW": "RAW"})

    class Codec:
        def __init__(self, algorithm, bitstream_kind, device_id=None, cuda_stream=0):
            assert (algorithm, bitstream_kind) == ("ANS", "RAW")

        def get_max_comp_buffer_size(self, arr):
            return arr.numel() + 64

        def encode(self, srcs, out):
            sizes = []
            for s, o in zip(srcs, out):
                payload = b"FANS" + s.numel().to_bytes(4, "little") + (s.numpy() ^ 0x5A).tobytes()
                o[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
                sizes.append(len(payload))
            return type("Result", (), {"buffer_sizes": sizes})()

        def decode(self, srcs, out):
            for s, o in zip(srcs, out):
                b = s.numpy().tobytes()
                if b[:4] != b"FANS" or int.from_bytes(b[4:8], "little") != o.numel() or len(b) != 8 + o.numel():
                    raise RuntimeError("nvcompErrorCannotDecompress")
                o[:] = torch.from_numpy(np.frombuffer(b[8:], dtype=np.uint8) ^ 0x5A)

    @staticmethod
    def as_arrays(buf, offsets, sizes, stream=0):
        return [buf[o : o + n] for o, n in zip(offsets, sizes)]

    @staticmethod
    def as_array(t, stream=0):
        return t


@pytest.fixture
def fake_gpu(monkeypatch):
    import sys

    from codecllm_format.codecs import ans

    monkeypatch.setitem(sys.modules, "nvidia.nvcomp", _FakeNvcomp)
    monkeypatch.setattr(ans, "gpu_decoder_unavailable", lambda: None)
    monkeypatch.setattr(ans, "_cuda_device_and_stream", lambda: (torch.device("cpu"), None))


def test_writer_int8_codec_ans_round_trip(fake_gpu, tmp_path: Path):
    w = torch.randn(70, 300, generator=torch.Generator().manual_seed(8))
    with CllmWriter(tmp_path / "a.cllm", chunk_size=CS, int8_codec="ans") as wr:
        wr.begin_group("g")
        wr.add_tensor("w", w, C.Encoding.INT8_ROW)
        wr.add_tensor("b", torch.arange(10.0))
        wr.finish()
    q, s = quantize_int8_rows(w)
    blob = (tmp_path / "a.cllm").read_bytes()
    with cf.open(tmp_path / "a.cllm", trust_gpu_codecs=True) as f:
        assert f.version == (1, 1)
        assert [st.codec for st in f.entry("w").streams] == [C.Codec.ANS, C.Codec.ANS]
        assert f.entry("b").streams[0].codec == C.Codec.ZSTD
        off = int(f.entry("w").streams[0].chunks["offset"][0])
        assert blob[off : off + 4] == b"FANS"  # the codec really encoded it
        raw = f.get_raw("w")
        assert torch.equal(raw.data, q) and torch.equal(raw.scales, s)
        assert torch.equal(f.get_tensor("b"), torch.arange(10.0))
        undecoded: list[str] = []
        assert f.verify(undecoded=undecoded) == [] and undecoded == []
    with cf.open(tmp_path / "a.cllm") as f:  # a GPU decoder, but no trust
        with pytest.raises(TrustRequired, match="'w'"):
            f.get_tensor("w")


def test_convert_codec_ans_and_back_gives_the_zstd_file(fake_gpu, small_safetensors: Path, tmp_path: Path):
    from codecllm_format.convert import convert

    convert(small_safetensors, tmp_path / "z.cllm", chunk_size=CS)
    convert(small_safetensors, tmp_path / "a.cllm", chunk_size=CS, codec="ans")
    assert convert_main([str(tmp_path / "z.cllm"), "--codec", "ans", "-o", str(tmp_path / "t.cllm"), "-q"]) == 0
    assert convert_main([str(tmp_path / "a.cllm"), "--codec", "zstd", "-o", str(tmp_path / "back.cllm"), "-q"]) == 1
    assert not (tmp_path / "back.cllm").exists()  # not trusted: nothing written
    assert convert_main([str(tmp_path / "a.cllm"), "--codec", "zstd", "--trust-gpu-codecs",
                         "-o", str(tmp_path / "back.cllm"), "-q"]) == 0
    assert (tmp_path / "back.cllm").read_bytes() == (tmp_path / "z.cllm").read_bytes()
    with cf.open(tmp_path / "z.cllm") as z, cf.open(tmp_path / "a.cllm", trust_gpu_codecs=True) as a, \
            cf.open(tmp_path / "t.cllm", trust_gpu_codecs=True) as t:
        assert a.version == t.version == (1, 1) and a.metadata()["int8_codec"] == "ans (nvCOMP 6.0.0)"
        for k in z.keys():
            for other in (a, t):
                rz, ro = z.get_raw(k), other.get_raw(k)
                assert torch.equal(rz.data, ro.data) and (rz.scales is None or torch.equal(rz.scales, ro.scales)), k


@pytest.mark.parametrize("bad", ["not-ans", "oversized"])
def test_crafted_ans_chunk_is_refused(fake_gpu, tmp_path: Path, bad: str):
    """Checksums recomputed: the decoder's failure, or a chunk over nvCOMP's size bound (refused
    before decoding), is a DecodeError naming the tensor; the sound file decodes."""
    good = tmp_path / "good.cllm"
    with CllmWriter(good, chunk_size=CS, int8_codec="ans") as wr:
        wr.begin_group("g")
        wr.add_tensor(W, torch.randn(40, 300), C.Encoding.INT8_ROW)
        wr.finish()
    blob = good.read_bytes()
    with cf.open(good, trust_gpu_codecs=True) as f:
        raw = int(f.entry(W).streams[0].chunks["raw"][0])
        f.get_tensor(W)
        assert f.verify() == []
    data = b"\1" * 100 if bad == "not-ans" else b"FANS" + bytes(raw + 200)
    path = tmp_path / "crafted.cllm"
    path.write_bytes(hb.relayout(blob, {(W, 0, 0): data}))
    with cf.open(path, trust_gpu_codecs=True) as f:
        with pytest.raises(DecodeError, match="nvCOMP ANS decode failed" if bad == "not-ans" else "bound") as info:
            f.get_tensor(W)
        assert W in str(info.value)
        assert any(W in p for p in f.verify())
