"""Round trips through CllmWriter -> CllmFile: every dtype, both encodings, odd shapes, chunk
boundaries, int8 accuracy bounds, and byte-for-byte determinism."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from codecllm_format import constants as C
from codecllm_format.quant import dequantize_int8_rows, quantize_int8_rows, sqnr_db
from codecllm_format.reader import open_cllm
from codecllm_format.writer import TORCH_TO_DTYPE, CllmWriter

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
              torch.int16, torch.int32, torch.int64, torch.bool]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random data that uses the whole value range of `dtype` (incl. negative ints, bools)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).to(torch.bool)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def write(path, tensors: dict[str, tuple[torch.Tensor, C.Encoding]], **kw):
    with CllmWriter(path, **kw) as w:
        w.begin_group("g")
        for name, (t, enc) in tensors.items():
            w.add_tensor(name, t, enc)
        w.finish()
    return path


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_raw_roundtrip_every_dtype(tmp_path, dtype):
    tensors = {
        "matrix": make(dtype, (37, 53), 1),
        "vector": make(dtype, (1000,), 2),
        "scalar": make(dtype, (), 3),
        "empty": make(dtype, (0,), 4),
        "empty2d": make(dtype, (5, 0), 5),
        "cube": make(dtype, (2, 3, 4, 5), 6),
    }
    path = write(tmp_path / "t.cllm", {k: (v, C.Encoding.RAW) for k, v in tensors.items()}, chunk_size=4096)
    with open_cllm(path) as f:
        assert f.verify() == []
        assert f.keys() == list(tensors)
        for name, t in tensors.items():
            e = f.entry(name)
            assert e.dtype == TORCH_TO_DTYPE[dtype] and e.encoding == C.Encoding.RAW and e.shape == tuple(t.shape)
            got = f.get_tensor(name)
            assert same_bits(got, t), name


def test_raw_floats_keep_nan_inf_and_signed_zero(tmp_path):
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-45, -3.4e38])
    for dtype in FLOAT_DTYPES:
        x = t.to(dtype)
        path = write(tmp_path / f"{dtype}.cllm", {"x": (x, C.Encoding.RAW)})
        with open_cllm(path) as f:
            assert same_bits(f.get_tensor("x"), x)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_int8_row_roundtrip_every_float_dtype(tmp_path, dtype):
    w = make(dtype, (300, 257), 7)
    path = write(tmp_path / "q.cllm", {"w": (w, C.Encoding.INT8_ROW)}, chunk_size=4096)
    q_ref, s_ref = quantize_int8_rows(w)
    with open_cllm(path) as f:
        assert f.verify() == []
        e = f.entry("w")
        assert e.encoding == C.Encoding.INT8_ROW and e.dtype == TORCH_TO_DTYPE[dtype] and e.shape == (300, 257)
        raw = f.get_raw("w")
        assert torch.equal(raw.data, q_ref) and torch.equal(raw.scales, s_ref)
        got = f.get_tensor("w")
        assert got.dtype == dtype
        assert torch.equal(got, dequantize_int8_rows(q_ref, s_ref, dtype))
        assert sqnr_db(w, got) > 38


@pytest.mark.parametrize("shape", [(0, 16), (16, 0), (1, 1), (1, 70000)])
def test_int8_row_degenerate_shapes(tmp_path, shape):
    w = make(torch.float32, shape, 8)
    path = write(tmp_path / "d.cllm", {"w": (w, C.Encoding.INT8_ROW)}, chunk_size=4096)
    with open_cllm(path) as f:
        assert f.verify() == []
        got = f.get_tensor("w")
        assert got.shape == w.shape
        if w.numel():
            err = (got - w).abs().amax(dim=1)
            assert bool((err <= f.get_raw("w").scales / 2 * (1 + 1e-6)).all())


def test_int8_row_rejects_what_it_cannot_encode(tmp_path):
    with CllmWriter(tmp_path / "x.cllm") as w:
        w.begin_group("g")
        with pytest.raises(ValueError, match="int8_row needs a 2-D float tensor"):
            w.add_tensor("v", torch.randn(10), C.Encoding.INT8_ROW)
        with pytest.raises(ValueError, match="int8_row needs a 2-D float tensor"):
            w.add_tensor("i", torch.ones(3, 3, dtype=torch.int32), C.Encoding.INT8_ROW)
        w.abort()
    assert not (tmp_path / "x.cllm").exists()


CS = 4096


@pytest.mark.parametrize("chunk_size", [4096, 5000, 65536, 1 << 20])
@pytest.mark.parametrize("nbytes_fn", [
    lambda cs: 1, lambda cs: cs - 1, lambda cs: cs, lambda cs: cs + 1,
    lambda cs: 3 * cs, lambda cs: 3 * cs + 7, lambda cs: 17 * cs,
], ids=["1", "cs-1", "cs", "cs+1", "3cs", "3cs+7", "17cs"])
def test_chunking_at_and_around_boundaries(tmp_path, chunk_size, nbytes_fn):
    n = nbytes_fn(chunk_size)
    t = make(torch.uint8, (n,), n)
    path = write(tmp_path / "c.cllm", {"t": (t, C.Encoding.RAW)}, chunk_size=chunk_size)
    with open_cllm(path) as f:
        stream = f.entry("t").streams[0]
        assert stream.chunk_size == chunk_size and stream.length == n
        raws = stream.chunks["raw"].tolist()
        assert len(raws) == math.ceil(n / chunk_size)
        assert all(r == chunk_size for r in raws[:-1]) and raws[-1] == n - (len(raws) - 1) * chunk_size
        offsets = stream.chunks["offset"].tolist()
        assert all(o % C.CHUNK_ALIGNMENT == 0 for o in offsets)
        assert offsets == sorted(offsets)
        assert torch.equal(f.get_tensor("t"), t)
        assert f.verify() == []


def test_many_chunks_int8_and_scales_span_chunks(tmp_path):
    # q: 2000 x 300 = 146 chunks of 4 KiB; scales: 8000 bytes = 2 chunks
    w = make(torch.bfloat16, (2000, 300), 9)
    path = write(tmp_path / "m.cllm", {"w": (w, C.Encoding.INT8_ROW)}, chunk_size=CS)
    q_ref, s_ref = quantize_int8_rows(w)
    with open_cllm(path) as f:
        q_stream, s_stream = f.entry("w").streams
        assert q_stream.num_chunks == math.ceil(2000 * 300 / CS) and s_stream.num_chunks == 2
        raw = f.get_raw("w")
        assert torch.equal(raw.data, q_ref) and torch.equal(raw.scales, s_ref)


# --- int8 accuracy ----------------------------------------------------------------------


def roundtrip_int8(tmp_path, w: torch.Tensor):
    path = write(tmp_path / "acc.cllm", {"w": (w, C.Encoding.INT8_ROW)})
    with open_cllm(path) as f:
        raw = f.get_raw("w")
        return f.get_tensor("w", torch.float64), raw.scales.to(torch.float64)


def test_int8_sqnr_on_gaussian_weights(tmp_path):
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(10)) * 0.02
    got, _ = roundtrip_int8(tmp_path, w)
    # uniform quantization of a gaussian with step absmax/127 (absmax ~ 3.9 sigma at 1024 cols)
    assert sqnr_db(w, got) >= 38.0


def test_int8_per_row_error_is_at_most_half_a_step(tmp_path):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(256, 333, generator=g) * torch.logspace(-6, 2, 256)[:, None]  # rows of very different size
    got, scales = roundtrip_int8(tmp_path, w)
    err = (got - w.to(torch.float64)).abs().amax(dim=1)
    # |w - q*s| <= s/2 exactly in real arithmetic; float32 division adds a few ulps of |w|
    tol = scales / 2 + w.abs().amax(dim=1).to(torch.float64) * 2**-22
    assert bool((err <= tol).all())
    # the largest value of each row is represented by +-127 exactly (up to float32 rounding)
    am = w.abs().amax(dim=1).to(torch.float64)
    assert torch.allclose(scales * 127, am, rtol=1e-6)


def test_int8_zero_rows_stay_zero(tmp_path):
    w = torch.randn(64, 100, generator=torch.Generator().manual_seed(12))
    w[[0, 17, 63]] = 0
    got, scales = roundtrip_int8(tmp_path, w)
    assert bool((scales[[0, 17, 63]] == 0).all())
    assert bool((got[[0, 17, 63]] == 0).all())
    assert sqnr_db(w, got) > 38


def test_int8_outlier_costs_only_its_own_row(tmp_path):
    g = torch.Generator().manual_seed(13)
    w = torch.randn(128, 4096, generator=g) * 0.02
    w[5, 1234] = 1000.0  # one huge value
    got, scales = roundtrip_int8(tmp_path, w)
    w64 = w.to(torch.float64)
    assert got[5, 1234] == pytest.approx(1000.0, rel=1e-6)
    # row 5: every other value is below half a step (1000/127/2 ~ 3.9) and becomes 0
    assert float((got[5] - w64[5]).abs().max()) <= float(scales[5]) / 2 + 1e-3
    assert int((got[5] != 0).sum()) == 1
    # the other rows keep their own precision
    others = torch.ones(128, dtype=torch.bool)
    others[5] = False
    assert sqnr_db(w64[others], got[others]) >= 38
    assert float(scales[others].max()) < 0.02 * 6 / 127


def test_int8_rejects_nan_and_inf(tmp_path):
    from codecllm_format.quant import NonFiniteError

    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(40, 40)
        w[39, 39] = bad
        with CllmWriter(tmp_path / "bad.cllm") as wr:
            wr.begin_group("g")
            with pytest.raises(NonFiniteError):
                wr.add_tensor("w", w, C.Encoding.INT8_ROW)
            wr.abort()


def test_quantize_does_not_modify_its_input():
    for dtype in FLOAT_DTYPES:
        w = make(dtype, (70, 90), 14)
        before = w.clone()
        quantize_int8_rows(w)
        assert same_bits(w, before), dtype


# --- determinism ------------------------------------------------------------------------


def _mixed_model() -> dict[str, tuple[torch.Tensor, C.Encoding]]:
    return {
        "emb": (make(torch.bfloat16, (1000, 64), 20), C.Encoding.INT8_ROW),
        "w": (make(torch.float16, (300, 300), 21), C.Encoding.INT8_ROW),
        "norm": (make(torch.float32, (300,), 22), C.Encoding.RAW),
        "ids": (make(torch.int64, (1, 512), 23), C.Encoding.RAW),
        "mask": (make(torch.bool, (33,), 24), C.Encoding.RAW),
    }


def _write_model(path, threads: int, chunk_size: int = CS) -> bytes:
    with CllmWriter(path, threads=threads, chunk_size=chunk_size, metadata={"k": "v"}) as w:
        for name, (t, enc) in _mixed_model().items():
            w.begin_group(name)
            w.add_tensor(name, t, enc)
        w.add_file("config.json", b'{"a": 1}' * 100)
        w.finish()
    return path.read_bytes()


def test_same_input_same_bytes_whatever_the_threads(tmp_path):
    a = _write_model(tmp_path / "a.cllm", threads=1)
    b = _write_model(tmp_path / "b.cllm", threads=1)
    c = _write_model(tmp_path / "c.cllm", threads=2)
    d = _write_model(tmp_path / "d.cllm", threads=4)
    assert a == b == c == d


def test_add_int8_tensor_writes_what_add_tensor_writes(tmp_path):
    w = make(torch.bfloat16, (500, 96), 30)
    q, s = quantize_int8_rows(w)
    a = write(tmp_path / "a.cllm", {"w": (w, C.Encoding.INT8_ROW)}, chunk_size=CS).read_bytes()
    with CllmWriter(tmp_path / "b.cllm", chunk_size=CS) as wr:
        wr.begin_group("g")
        wr.add_int8_tensor("w", q, s, dtype=torch.bfloat16)
        wr.finish()
    assert (tmp_path / "b.cllm").read_bytes() == a


@pytest.mark.parametrize("encoding", [C.Encoding.RAW, C.Encoding.INT8_ROW])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_progress_totals_the_input_bytes(tmp_path, encoding, dtype):
    t = make(dtype, (777, 129), 31)  # odd sizes: the int8 share of progress is not a whole number
    got = []
    with CllmWriter(tmp_path / "p.cllm", chunk_size=CS) as w:
        w.begin_group("g")
        w.add_tensor("t", t, encoding, progress=got.append)
        w.finish()
    assert all(n >= 0 for n in got)
    assert sum(got) == t.numel() * t.element_size()


def test_layout_of_chunks_tiles_groups_exactly(tmp_path):
    path = tmp_path / "l.cllm"
    _write_model(path, threads=2)
    with open_cllm(path) as f:
        ends = []
        for g in f.index.groups:
            assert g.offset % C.GROUP_ALIGNMENT == 0
            ends.append((g.offset, g.offset + g.length))
        assert ends == sorted(ends)
        assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))
        for e in f.index.tensors:
            g = f.index.groups[e.group]
            for s in e.streams:
                for off, stored, _raw, _ck in s.chunks.tolist():
                    assert g.offset <= off and off + stored <= g.offset + g.length
        # group_bytes is one contiguous range holding every chunk of the group
        gb = np.frombuffer(f.group_bytes(0), dtype=np.uint8)
        assert len(gb) == f.index.groups[0].length
        del gb


def test_minor_version_is_the_lowest_that_covers_the_features_used(tmp_path, monkeypatch):
    """v1.0-only files say minor 0; a file using a feature marked newer says that minor, and
    the same file relabelled minor 0 is refused (spec section 4, rejection 31)."""
    from codecllm_format.errors import UnsupportedVersion
    from codecllm_format.writer import build_header

    w = torch.randn(8, 32)
    plain = write(tmp_path / "plain.cllm", {"w": (w, C.Encoding.INT8_ROW)})
    with open_cllm(plain) as f:
        assert f.version == (1, 0)

    monkeypatch.setitem(C.FEATURE_MINOR, C.Encoding.INT8_ROW, 1)  # pretend INT8_ROW came in 1.1
    newer = write(tmp_path / "newer.cllm", {"w": (w, C.Encoding.INT8_ROW)})
    with open_cllm(newer) as f:
        assert f.version == (1, 1)
        header = f.header
    data = bytearray(newer.read_bytes())
    data[: C.HEADER_SIZE] = build_header(header.index_offset, header.index_length, header.index_checksum,
                                         header.file_length, minor=0)
    relabelled = tmp_path / "relabelled.cllm"
    relabelled.write_bytes(bytes(data))
    with pytest.raises(UnsupportedVersion, match=r"says format 1\.0, but uses encoding INT8_ROW, which needs minor 1"):
        open_cllm(relabelled)


# --- FLOAT_PLANES: lossless byte planes (format 1.1) ----------------------------------------

PLANE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
_INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def random_bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Every bit pattern equally likely (NaNs with payloads, infinities, subnormals, -0 among
    them), plus the special values planted at the front."""
    g = torch.Generator().manual_seed(seed)
    width = 8 * torch.empty(0, dtype=dtype).element_size()
    n = math.prod(shape)
    bits = torch.randint(0, 1 << width, (n,), generator=g, dtype=torch.int64)
    bits = torch.where(bits >= 1 << (width - 1), bits - (1 << width), bits).to(_INT_OF[dtype])
    t = bits.view(dtype)
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.0, -1.0], dtype=dtype)
    sub = torch.tensor([1, -(1 << (width - 1)) + 1], dtype=_INT_OF[dtype]).view(dtype)  # +/- smallest subnormal
    front = torch.cat([special, sub])[: n]
    t[: front.numel()] = front
    return t.reshape(shape)


@pytest.mark.parametrize("dtype", PLANE_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 5), (1,), (7, 13), (2, 3, 4, 5), (5000, 3)])
def test_float_planes_roundtrip_bit_exact(tmp_path, dtype, shape):
    t = random_bits(dtype, shape, seed=zlib.crc32(f'{dtype}{shape}'.encode()))
    path = write(tmp_path / "p.cllm", {"t": (t, C.Encoding.FLOAT_PLANES)}, chunk_size=C.MIN_CHUNK_SIZE)
    with open_cllm(path) as f:
        assert f.version == (1, 1)
        e = f.entry("t")
        assert e.encoding == C.Encoding.FLOAT_PLANES and e.dtype == TORCH_TO_DTYPE[dtype]
        assert same_bits(f.get_tensor("t"), t)
        assert same_bits(f.get_raw("t").data, t)
        exponent, sign_mantissa = f.get_planes("t")
        k = C.FLOAT_PLANES_LAYOUT[e.dtype][2]
        assert exponent.dtype == torch.uint8 and exponent.numel() == t.numel()
        assert sign_mantissa.numel() == k * t.numel()
        assert f.verify() == []


@pytest.mark.parametrize("dtype", PLANE_DTYPES)
def test_float_planes_compress_gaussian_weights(tmp_path, dtype):
    """Gaussian weights * 0.02: the exponent plane takes about 3 bits, sign+mantissa planes
    are nearly raw: well under the raw size, and within 3% of the order-0 entropy of the
    byte planes (each plane's histogram entropy)."""
    from codecllm_format.planes import exponent_entropy_bits, split_planes

    t = (torch.randn(256, 1024, generator=torch.Generator().manual_seed(5)) * 0.02).to(dtype)
    path = write(tmp_path / "g.cllm", {"t": (t, C.Encoding.FLOAT_PLANES)})
    exponent, sign_mantissa = split_planes(t)
    n = t.numel()
    bound = sum(exponent_entropy_bits(p) * n / 8 for p in [exponent, *sign_mantissa.reshape(-1, n)])
    with open_cllm(path) as f:
        stored = f.entry("t").stored_length
        assert same_bits(f.get_tensor("t"), t)
    assert stored < {torch.bfloat16: 0.7, torch.float16: 0.9, torch.float32: 0.85}[dtype] * n * t.element_size()
    assert stored < 1.03 * bound, (stored, bound)


def test_float_planes_exponent_is_the_only_plane_that_shrinks(tmp_path):
    t = (torch.randn(128, 512, generator=torch.Generator().manual_seed(6)) * 0.02).to(torch.bfloat16)
    with open_cllm(write(tmp_path / "s.cllm", {"t": (t, C.Encoding.FLOAT_PLANES)})) as f:
        exp_stream, sm_stream = f.entry("t").streams
        assert exp_stream.stored_length < 0.5 * exp_stream.length
        assert sm_stream.stored_length >= sm_stream.length  # raw blocks: incompressible


def test_float_planes_rejects_other_dtypes(tmp_path):
    with CllmWriter(tmp_path / "r.cllm") as w:
        w.begin_group("g")
        for dtype in (torch.float64, torch.int8, torch.int32, torch.bool):
            with pytest.raises(ValueError, match=r"tensor 'x': float_planes takes bfloat16, float16 or float32"):
                w.add_tensor("x", torch.zeros(3, dtype=dtype), C.Encoding.FLOAT_PLANES)
            w._names.discard("x")
        w.abort()


def test_float_planes_same_bytes_whatever_the_threads(tmp_path):
    t = make(torch.bfloat16, (700, 300), 40)
    blobs = [write(tmp_path / f"{n}.cllm", {"t": (t, C.Encoding.FLOAT_PLANES)}, threads=n, chunk_size=CS).read_bytes()
             for n in (1, 2, 3)]
    assert blobs[0] == blobs[1] == blobs[2]


@pytest.mark.parametrize("dtype", PLANE_DTYPES)
def test_float_planes_progress_totals_the_input_bytes(tmp_path, dtype):
    t = make(dtype, (777, 129), 41)
    got = []
    with CllmWriter(tmp_path / "p.cllm", chunk_size=CS) as w:
        w.begin_group("g")
        w.add_tensor("t", t, C.Encoding.FLOAT_PLANES, progress=got.append)
        w.finish()
    assert all(n >= 0 for n in got) and sum(got) == t.numel() * t.element_size()


def test_float_planes_file_relabelled_1_0_is_refused(tmp_path):
    from codecllm_format.errors import UnsupportedVersion
    from codecllm_format.writer import build_header

    path = write(tmp_path / "v.cllm", {"t": (torch.randn(10).to(torch.bfloat16), C.Encoding.FLOAT_PLANES),
                                       "r": (torch.randn(3), C.Encoding.RAW)})
    with open_cllm(path) as f:
        h = f.header
        assert f.version == (1, 1)
    data = bytearray(path.read_bytes())
    data[: C.HEADER_SIZE] = build_header(h.index_offset, h.index_length, h.index_checksum, h.file_length, minor=0)
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedVersion, match="encoding FLOAT_PLANES, which needs minor 1"):
        open_cllm(path)


def test_join_planes_names_the_tensor_in_errors():
    from codecllm_format.errors import DecodeError
    from codecllm_format.planes import join_planes

    with pytest.raises(DecodeError, match="tensor 'w': sign_mantissa plane is 5 bytes, 3 values of F32 need 9"):
        join_planes(np.zeros(3, np.uint8), np.zeros(5, np.uint8), torch.float32, where="tensor 'w'")


def test_float_planes_of_views_and_grad_tensors(tmp_path):
    """Non-contiguous views and tensors that require grad are written as their values."""
    base = make(torch.float32, (40, 30), 42)
    t = base.t()[::2]  # transposed, every other row
    g = make(torch.bfloat16, (9, 7), 43).requires_grad_(True)
    path = write(tmp_path / "v.cllm", {"t": (t, C.Encoding.FLOAT_PLANES), "g": (g, C.Encoding.FLOAT_PLANES)})
    with open_cllm(path) as f:
        assert same_bits(f.get_tensor("t"), t.contiguous())
        assert same_bits(f.get_tensor("g"), g.detach())
