"""Pipeline split over 2 GPUs (load(device_map=...)): for every tier the logits of a tiny Llama
equal the one-GPU run bit for bit, greedy tokens are identical, each GPU holds its own blocks,
KV cache and bounded memory, and generate() runs 50 tokens.

Why bit-exact: both runs execute the same kernels (nvCOMP decode, the fused int8 Triton GEMM or
the reference dequantize + matmul, cuBLAS, SDPA) on the same inputs and GPUs of the same model;
moving hidden states between GPUs is an exact copy, and none of these kernels reduces in a
run-dependent order (no atomics; Triton's autotuned configs are cached by shape in the process,
so both runs use the same ones). A mismatch therefore means a routing or placement bug, not
rounding.

Skipped with fewer than 2 CUDA devices (run on a 2x H100/H200 machine). NCCL is not used (peer
copies only); NCCL_NVLS_ENABLE=0 is set anyway, as everywhere in this project.
"""

from __future__ import annotations

import gc
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_folder  # noqa: E402

import codecllm_format as cf  # noqa: E402
from codecllm_format import DeviceError, LoadError  # noqa: E402
from codecllm_format.runtime.plan import TIERS  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multi_gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

MiB = 1024 * 1024
VOCAB = 2048
SLACK = 32 * MiB
"""Per-GPU allowance above the plan's weight VRAM: KV cache and activations of ~70 tokens of a
4-layer, 256-wide model, raw norms, moved hidden states (well under 1 MiB each) and the caching
allocator's rounding."""


def _tiny(tmp_path_factory, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from codecllm_format.convert import convert

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=1024, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny") / ("tied" if tie else "untied")
    model.save_pretrained(folder)
    out = folder.parent / f"{folder.name}.cllm"
    convert(folder, out, chunk_size=16384)
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _tiny(tmp_path_factory, tie=False)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    return _tiny(tmp_path_factory, tie=True)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _ids(n=24, batch=2, seed=3):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _logits(m, ids):
    with torch.no_grad():
        return m(ids.to(m.device)).logits.float().cpu()


def _options(tier):
    return {"residency": tier, **({"max_vram": "2GiB"} if tier == "auto" else {})}


def _generate(m, ids, n=50):
    return m.generate(ids.to(m.device), max_new_tokens=n, min_new_tokens=n, do_sample=False).cpu()


def _warm_blas(i: int) -> None:
    """The first matmul of each dtype on a device allocates cuBLAS/cuBLASLt workspaces (~32 MiB on
    an H100) through torch's caching allocator: a one-time cost of the device, not of our plan."""
    for dt in (torch.float32, torch.bfloat16):
        a = torch.ones(64, 64, device=f"cuda:{i}", dtype=dt)
        (a @ a).sum()
        torch.nn.functional.linear(a[:1], a)


def _mem_marks():
    gc.collect()  # models of earlier tests (reference cycles) must not be freed mid-measurement
    for i in (0, 1):
        _warm_blas(i)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    base = [torch.cuda.memory_allocated(i) for i in (0, 1)]
    for i in (0, 1):
        torch.cuda.reset_peak_memory_stats(i)
    return base


def _diff(a, b) -> str:
    return f"max |diff| {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tier", [*TIERS, "auto"])
def test_two_gpus_equal_one_gpu(tiny_llama, tier, dtype):
    ids = _ids()
    with cf.load(tiny_llama, device="cuda:0", dtype=dtype, tokenizer=False, **_options(tier)) as one:
        ref = _logits(one, ids)
        ref_tokens = _generate(one, ids[:1])
        one_resident = one.provider.plan.resident_bytes
    base = _mem_marks()
    with cf.load(tiny_llama, device_map=[0, 1], dtype=dtype, tokenizer=False, **_options(tier)) as m:
        plan = m.provider.plan
        assert plan.block_device == [0, 0, 1, 1], plan.summary()
        assert m.model.hf_device_map["model.layers.0"] == 0 and m.model.hf_device_map["model.layers.3"] == 1
        for i, p in enumerate(m.provider.providers):
            assert p.device == torch.device("cuda", i)
            assert set(p.layouts) == plan.groups_on(i)
            if tier != "auto":
                assert set(p.plan.tiers.values()) == {tier}
        assert m.model.model.layers[2].input_layernorm.weight.device == torch.device("cuda", 1)
        assert m.model.model.norm.weight.device == torch.device("cuda", 1)
        got = _logits(m, ids)
        assert torch.equal(got, ref), f"{tier}: 2-GPU logits differ from 1-GPU ({_diff(got, ref)})"
        tokens = _generate(m, ids[:1])
        assert tokens.shape[1] == ids.shape[1] + 50
        assert torch.equal(tokens, ref_tokens), tier
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        for i, p in enumerate(m.provider.providers):
            peak = torch.cuda.max_memory_allocated(i) - base[i]
            assert peak <= p.plan.weight_vram + SLACK, (tier, i, peak / MiB, p.plan.weight_vram / MiB)
            held = torch.cuda.memory_allocated(i) - base[i]
            assert held >= p.plan.resident_bytes
            if tier == "gpu":  # each GPU holds its share, not the whole model
                assert 0 < p.plan.resident_bytes < one_resident and held < one_resident, (i, held, one_resident)


def test_kv_cache_of_each_layer_lives_on_its_gpu(tiny_llama):
    with cf.load(tiny_llama, device_map="0,1", dtype=torch.bfloat16, residency="host", tokenizer=False) as m:
        with torch.no_grad():
            out = m.model(_ids(batch=1).to(m.device), use_cache=True)
        cache = out.past_key_values
        devices = [layer.keys.device.index for layer in cache.layers]
        assert devices == [0, 0, 1, 1]
        assert out.logits.device == torch.device("cuda", 1)  # untied head on the last GPU


def test_memory_flat_per_gpu_over_repeated_generation(tiny_llama):
    with cf.load(tiny_llama, device_map=[0, 1], dtype=torch.bfloat16, residency="host", tokenizer=False) as m:
        ids = _ids(n=16, batch=1, seed=4)
        _generate(m, ids, 8)
        gc.collect()
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        base = [torch.cuda.memory_allocated(i) for i in (0, 1)]
        for _ in range(3):
            _generate(m, ids, 100)
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            assert [torch.cuda.memory_allocated(i) for i in (0, 1)] == base


def test_tied_head_runs_on_the_embedding_gpu(tied_llama):
    ids = _ids()
    with cf.load(tied_llama, device="cuda:0", dtype=torch.float32, residency="gpu", tokenizer=False) as one:
        ref = _logits(one, ids)
    with cf.load(tied_llama, device_map=[0, 1], dtype=torch.float32, residency="gpu", tokenizer=False) as m:
        head = m.model.get_output_embeddings()
        assert m.provider.placement.group_positions[head.group] == 0
        with torch.no_grad():
            out = m.model(ids.to(m.device))
        assert out.logits.device == torch.device("cuda", 0)
        assert torch.equal(out.logits.float().cpu(), ref), _diff(out.logits.float().cpu(), ref)


def test_auto_device_map_and_per_gpu_budgets(tiny_llama):
    ids = _ids()
    with cf.load(tiny_llama, device="cuda:0", dtype=torch.float32, residency="gpu", tokenizer=False) as one:
        ref = _logits(one, ids)
    # no options: residency auto under each GPU's free memory -> everything resident
    count = torch.cuda.device_count()
    spec = "auto" if count <= 4 else [0, 1]  # the tiny model has 4 blocks: at most 4 GPUs
    with cf.load(tiny_llama, device_map=spec, dtype=torch.float32, tokenizer=False) as m:
        assert len(m.provider.providers) == min(count, 4) if count <= 4 else 2
        assert all(set(p.plan.tiers.values()) == {"gpu"} for p in m.provider.providers)
        assert torch.equal(_logits(m, ids), ref)
    # per-GPU budgets: GPU 0 has room for the embeddings and one block only, so it gets one
    sizes = _decoded_bytes(tiny_llama)
    tight = sizes["model"] + sizes["model.layers.0"] + sizes["model.layers.0"] // 10
    with cf.load(tiny_llama, device_map=[0, 1], dtype=torch.float32, tokenizer=False, residency="gpu", reserve=0,
                 max_vram={0: tight, "cuda:1": "1GiB"}) as m:
        assert m.provider.plan.block_device == [0, 1, 1, 1], m.provider.plan.summary()
        assert m.provider.providers[0].plan.weight_vram <= tight
        assert torch.equal(_logits(m, ids), ref)


def test_a_device_map_of_one_gpu_is_the_one_gpu_runtime(tiny_llama):
    from codecllm_format.runtime.gpu import GpuProvider

    ids = _ids()
    with cf.load(tiny_llama, device="cuda:0", dtype=torch.float32, residency="gpu", tokenizer=False) as one:
        ref = _logits(one, ids)
    with cf.load(tiny_llama, device_map=[1], dtype=torch.float32, tokenizer=False) as m:
        assert isinstance(m.provider, GpuProvider) and m.device == torch.device("cuda", 1)
        assert set(m.provider.plan.tiers.values()) == {"gpu"}  # auto under the GPU's free memory
        assert torch.equal(_logits(m, ids), ref)


def _decoded_bytes(path) -> dict[str, int]:
    from codecllm_format.runtime.layout import build_layouts

    with cf.open(path) as f:
        return {lay.name: lay.decoded_bytes for lay in build_layouts(f.index).values()}


def test_refusals_on_a_gpu_machine(tiny_llama):
    n = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"cuda:{n} does not exist: this machine has {n} CUDA device"):
        cf.load(tiny_llama, device_map=[0, n], tokenizer=False)
    with pytest.raises(DeviceError, match="conflicts with device_map"):
        cf.load(tiny_llama, device="cuda:1", device_map=[0, 1], tokenizer=False)
    one_block = _decoded_bytes(tiny_llama)["model.layers.0"]
    with pytest.raises(LoadError, match="cannot be split contiguously within the budgets"):
        cf.load(tiny_llama, device_map=[0, 1], residency="gpu", max_vram=int(1.2 * one_block), reserve=0, tokenizer=False)
    with pytest.raises(LoadError, match="max_vram has 3 entries"):
        cf.load(tiny_llama, device_map=[0, 1], max_vram=["1GiB"] * 3, tokenizer=False)


def test_cli_generate_with_a_device_map(tmp_path, capsys):
    from codecllm_format.cli import generate_main
    from codecllm_format.convert import convert

    make_folder("llama", tmp_path / "llama")
    path = tmp_path / "l.cllm"
    convert(tmp_path / "llama", path, chunk_size=4096)
    capsys.readouterr()
    assert generate_main([str(path), "paris is the", "--max-new-tokens", "6", "--device", "cuda:0"]) == 0
    want = capsys.readouterr().out
    assert generate_main([str(path), "paris is the", "--max-new-tokens", "6", "--device-map", "0,1",
                          "--residency", "host"]) == 0
    assert capsys.readouterr().out == want
