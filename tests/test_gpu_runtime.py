"""GPU runtime at the provider level: nvCOMP batched decode == CPU zstandard decode, bit for bit,
in every residency tier, with prefetch, in fixed memory. Runs only where CUDA and nvCOMP exist."""

from __future__ import annotations

import sys

import pytest
import torch

import codecllm_format as cf
from codecllm_format.runtime.plan import TIERS

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _write(path, layers=4, rows=384, cols=512, chunk_size=16384, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with cf.CllmWriter(path, chunk_size=chunk_size, threads=2) as w:
        w.begin_group("lm_head.weight")
        t = torch.randn(1000, cols, generator=g, dtype=torch.float32).to(torch.bfloat16)
        w.add_tensor("lm_head.weight", t, cf.Encoding.INT8_ROW)
        tensors["lm_head.weight"] = t
        for i in range(layers):
            w.begin_group(f"model.layers.{i}")
            for name, shape in (("q", (rows, cols)), ("up", (rows * 3, cols)), ("down", (cols, rows * 3))):
                t = (torch.randn(*shape, generator=g) * (1 + i)).to(torch.bfloat16)
                t[:, 7] *= 20  # outlier column
                full = f"model.layers.{i}.{name}.weight"
                w.add_tensor(full, t, cf.Encoding.INT8_ROW)
                tensors[full] = t
            w.add_tensor(f"model.layers.{i}.norm.weight", torch.randn(cols, generator=g))
        w.finish()
    return tensors


@needs_cuda
@pytest.mark.parametrize(
    "tier,codec,chunk_bytes", [(t, "zstd", 0) for t in TIERS] + [
        ("host", "ans", 0), ("gpu-compressed", "ans", 0), ("host", "bitcomp", 0),
        ("host", "ans", 256 << 10), ("gpu-compressed", "ans", 1 << 20), ("host", "zstd", 256 << 10)]
)
def test_every_tier_bit_identical_to_cpu(tmp_path, tier, codec, chunk_bytes):
    """Every tier, in-memory codec and chunk merging (0: the file's chunks) serves the CPU's int8
    rows and scales bit for bit."""
    from codecllm_format.runtime.gpu import GpuProvider

    path = tmp_path / "m.cllm"
    _write(path)
    with cf.open(path) as f:
        p = GpuProvider(f, "cuda", residency=tier, codec=codec, chunk_bytes=chunk_bytes)
        merged = p.chunk_bytes if tier in ("host", "gpu-compressed") else 0
        if merged:  # fewer, larger chunks in memory than in the file
            assert all(len(p.encoded[g].in_sizes) < len(lay.in_sizes) for g, lay in p.layouts.items()
                       if len(lay.in_sizes) > 1 and lay.out_sizes.sum() > 2 * lay.out_sizes.max())
        assert p.encoded and all(e.codec == (codec if tier in ("host", "gpu-compressed") else "zstd")
                                 for g, e in p.encoded.items())
        groups = [i for i, g in enumerate(f.index.groups) if g.name.startswith("model.layers.")]
        ref = {n: f.get_raw(n) for n in f.keys() if n.endswith((".q.weight", ".up.weight", ".down.weight", "lm_head.weight"))}
        for _ in range(3):  # the second and third passes run on learned prefetch
            for gid in groups:
                p.begin_group(gid)
                for name in ref:
                    if name.startswith(f.index.groups[gid].name + "."):
                        q, s = p.linear_weight(name)
                        assert torch.equal(q.cpu(), ref[name].data), name
                        assert torch.equal(s.cpu(), ref[name].scales), name
                p.end_group(gid)
            q, s = p.linear_weight("lm_head.weight")  # outside any hooked block
            assert torch.equal(q.cpu(), ref["lm_head.weight"].data)
        torch.cuda.synchronize()
        if tier != "gpu":
            assert p.stats["prefetched"] > 0
        p.close()


@needs_cuda
def test_streaming_memory_is_flat(tmp_path):
    from codecllm_format.runtime.gpu import GpuProvider

    path = tmp_path / "m.cllm"
    _write(path, layers=6)
    with cf.open(path) as f:
        p = GpuProvider(f, "cuda", residency="host")
        groups = [i for i, g in enumerate(f.index.groups) if g.name.startswith("model.layers.")]

        def one_pass():
            for gid in groups:
                p.begin_group(gid)
                q, s = p.linear_weight(f"{f.index.groups[gid].name}.up.weight")
                (q[:4].float() * s[:4, None]).sum()
                p.end_group(gid)
            torch.cuda.synchronize()

        one_pass()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(50):
            one_pass()
        assert torch.cuda.memory_allocated() == before
        assert torch.cuda.max_memory_allocated() - before < 8 * 1024 * 1024
        p.close()


@needs_cuda
def test_corrupt_chunk_never_reaches_the_gpu(tmp_path):
    from codecllm_format.runtime.gpu import GpuProvider

    path = tmp_path / "m.cllm"
    _write(path, layers=2)
    with cf.open(path) as f:
        off = int(f.entry("model.layers.1.up.weight").streams[0].chunks["offset"][2]) + 5
    data = bytearray(path.read_bytes())
    data[off] ^= 0x40
    path.write_bytes(bytes(data))
    with cf.open(path) as f:
        for tier in ("gpu", "host"):
            with pytest.raises(cf.ChecksumError, match="model.layers.1"):
                GpuProvider(f, "cuda", residency=tier)


def test_missing_nvcomp_is_a_clear_error(tmp_path, monkeypatch):
    """Runs everywhere: with nvCOMP made unimportable, the GPU path says what to install."""
    from codecllm_format.runtime.nvcomp_decoder import import_nvcomp

    monkeypatch.setitem(sys.modules, "nvidia.nvcomp", None)
    with pytest.raises(cf.CodecUnavailable, match=r"codecllm-format\[gpu\]"):
        import_nvcomp()


@needs_cuda
def test_clean_exit_after_gpu_decode(tmp_path):
    """nvCOMP allocates through torch's caching allocator: the process must still exit cleanly."""
    import subprocess

    path = tmp_path / "m.cllm"
    _write(path, layers=1)
    code = (
        "import sys, codecllm_format as cf\n"
        "from codecllm_format.runtime.gpu import GpuProvider\n"
        f"f = cf.open({str(path)!r})\n"
        "p = GpuProvider(f, 'cuda', residency='host', codec='ans')\n"
        "p.begin_group(1); p.linear_weight('model.layers.0.up.weight'); p.end_group(1)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_direct_decoder_tables_and_options_on_the_cpu():
    """nvcomp_direct's pieces that need no GPU: the options structs are nvCOMP 6.0's 64 bytes,
    the chunk table holds absolute addresses and sizes, and the module says why it is unusable
    instead of failing where libnvcomp is absent."""
    import ctypes

    import numpy as np

    from codecllm_format.runtime import nvcomp_direct as nd

    assert ctypes.sizeof(nd.AnsDecompressOpts) == 64 and ctypes.sizeof(nd.ZstdDecompressOpts) == 64
    t = nd.chunk_table(1000, [0, 16, 48], [10, 20, 30], 1 << 40, [0, 256, 512], [100, 200, 300])
    assert t.dtype == np.int64 and t.shape == (4, 3)
    assert t[0].tolist() == [1000, 1016, 1048] and t[1].tolist() == [10, 20, 30]
    assert t[2].tolist() == [100, 200, 300] and t[3].tolist() == [(1 << 40) + o for o in (0, 256, 512)]
    why = nd.direct_unavailable("ans")
    assert why is None or isinstance(why, str)
    assert nd.direct_unavailable("bitcomp") is not None or nd.direct_unavailable() is not None


@needs_cuda
@pytest.mark.parametrize("codec", ["zstd", "ans"])
def test_direct_decode_equals_the_python_api(tmp_path, codec):
    """Decodes through nvCOMP's C API (device chunk tables) give the Python API's bytes, and a
    chunk that does not fit its output is reported by its status, at the table's first decode."""
    from codecllm_format.errors import DecodeError
    from codecllm_format.runtime import nvcomp_direct as nd
    from codecllm_format.runtime.gpu import GpuProvider
    from codecllm_format.runtime.nvcomp_decoder import GroupDecoder

    assert nd.direct_unavailable(codec) is None, nd.direct_unavailable(codec)
    path = tmp_path / "m.cllm"
    _write(path)
    with cf.open(path) as f:
        p = GpuProvider(f, "cuda", residency="gpu-compressed", codec=codec)
        dev = p.device
        stream = torch.cuda.Stream(dev)
        direct, python = GroupDecoder(dev, stream), GroupDecoder(dev, stream, direct=False)
        for g, lay in p.layouts.items():
            enc, src = p.encoded[g], p.dev_store[g]
            a = torch.zeros(lay.decoded_bytes, dtype=torch.uint8, device=dev)
            b = torch.full((lay.decoded_bytes,), 7, dtype=torch.uint8, device=dev)
            for _ in range(2):  # the second decode reuses the tables without checking
                direct.decode(enc, lay, src, a)
                python.decode(enc, lay, src, b)
            stream.synchronize()
            mask = torch.zeros_like(a, dtype=torch.bool)
            for o, n in zip(*[x.tolist() for x in enc.outputs(lay)]):
                mask[o : o + n] = True
            assert torch.equal(a[mask], b[mask]), lay.name
        assert direct._direct[codec] is not None and direct._direct_batches
        if codec != "ans":  # nvCOMP documents the overflow status for ANS only (zstd: undefined)
            p.close()
            return
        # an output one byte short for the first chunk: its status reports it
        g, lay = next(iter(p.layouts.items()))
        enc = p.encoded[g]
        out_offsets, out_sizes = enc.outputs(lay)
        short = out_sizes.copy()
        short[0] -= 1
        d = nd.DirectDecoder(codec, dev, stream)
        out = torch.empty(lay.decoded_bytes, dtype=torch.uint8, device=dev)
        batch = d.prepare(p.dev_store[g], enc.in_offsets, enc.in_sizes, out, out_offsets, short)
        with pytest.raises(DecodeError, match="chunk 0"):
            d.decode(batch, where="test")
        p.close()


@needs_cuda
@pytest.mark.parametrize("tier", TIERS)
def test_vram_after_load_and_a_pass_stays_at_the_plan(tmp_path, tier):
    """What a provider holds on the GPU once loaded and once every group was used is its plan's
    weight memory (nvCOMP's decode scratch of the streaming tier included: large for the disk
    tier's zstd), plus little (decode tables): codecs used only at load, such as the zstd decoder
    that fills the gpu tier, release their scratch."""
    from codecllm_format.runtime.gpu import GpuProvider

    path = tmp_path / "m.cllm"
    _write(path, layers=3, rows=768, cols=1024)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    with cf.open(path) as f:
        p = GpuProvider(f, "cuda", residency=tier)
        loaded = torch.cuda.memory_allocated() - base
        for gid in sorted(p.layouts):
            p.begin_group(gid)
            for name in p.layouts[gid].tensors:
                p.linear_weight(name)
            p.end_group(gid)
        torch.cuda.synchronize()
        used = torch.cuda.memory_allocated() - base
        plan = p.plan.weight_vram
        scratch = p.decoder.scratch_bytes  # nvCOMP's temporary memory, counted in the plan
        planned_scratch = p.plan.decode_scratch_bytes
        p.close()
    assert loaded <= plan + (1 << 20), (tier, loaded, plan)
    assert used <= plan + (16 << 20), (tier, used, plan)
    assert scratch <= planned_scratch + (1 << 20), (tier, scratch, planned_scratch)
    if tier == "gpu":
        assert planned_scratch == 0


@needs_cuda
def test_host_to_device_copy_with_one_runtime_call():
    """runtime/cuda_copy: the streaming tiers' H2D copy through cudaMemcpyAsync (torch's libcudart)
    lands the same bytes as torch's copy, on the given stream, and refuses a size mismatch."""
    from codecllm_format.runtime.cuda_copy import HostToDevice, unavailable

    assert unavailable() is None, unavailable()
    stream = torch.cuda.Stream()
    h2d = HostToDevice(stream)
    assert h2d.direct
    host = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8).pin_memory()
    dst = torch.zeros(4 << 20, dtype=torch.uint8, device="cuda")
    # the zero fill runs on the current stream: the copy's stream must wait for it (without this
    # the fill could land after the copy; it did under 8 test workers on one GPU)
    stream.wait_stream(torch.cuda.current_stream())
    h2d.copy(dst[5 : 5 + host.numel()], host)
    done = torch.cuda.Event()
    done.record(stream)
    done.synchronize()
    assert torch.equal(dst[5 : 5 + host.numel()].cpu(), host)
    assert int(dst[:5].sum()) == 0 and int(dst[5 + host.numel() :].sum()) == 0
    with pytest.raises(ValueError):
        h2d.copy(dst[:10], host)
