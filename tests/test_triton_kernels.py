"""Fused int8 x bf16/fp16 Triton kernels == dequantize-then-matmul computed in float64.

On the CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, small shapes) in one
subprocess per half of the cases, so that this process's Triton stays a compiler for the GPU
tests; where CUDA exists, the GPU tests run the autotuned kernels at Llama-2-7B shapes. Every
check draws fresh random inputs (its own seed), poisons the output (and the split-K workspace)
with NaN first, and compares ||out - ref|| / ||ref|| with float64 dequantize-then-matmul.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from codecllm_format.runtime import kernels

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
TOL = 1e-2  # bf16 operands/output: measured errors are 2e-3..4e-3 (bf16) and ~2e-4 (fp16)

# id -> case. x: shape of x; kind: "c" contiguous, "t" x given transposed, "s" every other column
# of a wider tensor, "r" rows padded (row stride > K), "p" 3-D permuted, "q" the weight's rows
# padded (q row stride > K). config: forced meta-parameters.
_C = {}


def _case(cid, x, n, dtype, path, bias, config=None, kind="c", group=0):
    _C[cid] = dict(x=list(x), n=n, dtype=dtype, path=path, bias=bias, config=config, kind=kind, group=group)


# GEMV (decode): BLOCK_M 1/2/4/8, K tails, N tails, split-K, both int8 conversions, odd sizes.
_case("gemv-m1-bf16", (1, 300), 37, "bfloat16", "gemv", True, dict(BLOCK_N=8, BLOCK_K=64))
_case("gemv-m1-bf16-i2f", (1, 300), 37, "bfloat16", "gemv", False, dict(BLOCK_N=8, BLOCK_K=64, FAST_CVT=False))
_case("gemv-m1-fp16-nobias", (1, 256), 64, "float16", "gemv", False, dict(BLOCK_N=16, BLOCK_K=128))
_case("gemv-m2-fp16", (2, 200), 19, "float16", "gemv", True, dict(BLOCK_N=4, BLOCK_K=64))
_case("gemv-m3-bf16", (3, 129), 33, "bfloat16", "gemv", False, dict(BLOCK_N=4, BLOCK_K=64))
_case("gemv-m5-bf16-split", (5, 700), 21, "bfloat16", "gemv", True, dict(BLOCK_N=2, BLOCK_K=128, SPLIT_K=2))
_case("gemv-m8-fp16-split3", (8, 500), 9, "float16", "gemv", False, dict(BLOCK_N=2, BLOCK_K=64, SPLIT_K=3))
_case("gemv-default-split", (1, 2500), 29, "bfloat16", None, True)  # default config, automatic split-K
_case("gemv-n1", (1, 77), 1, "bfloat16", "gemv", True, dict(BLOCK_N=4, BLOCK_K=32))
_case("gemv-k1", (4, 1), 10, "float16", "gemv", True, dict(BLOCK_N=2, BLOCK_K=32))
_case("gemv-3d", (2, 3, 96), 40, "bfloat16", "gemv", True, dict(BLOCK_N=4, BLOCK_K=32), kind="c")
_case("gemv-transposed-x", (2, 160), 24, "bfloat16", "gemv", True, dict(BLOCK_N=8, BLOCK_K=64), kind="t")
_case("gemv-strided-cols", (1, 144), 24, "float16", "gemv", False, dict(BLOCK_N=8, BLOCK_K=64), kind="s")
_case("gemv-row-stride", (3, 160), 24, "bfloat16", "gemv", True, dict(BLOCK_N=4, BLOCK_K=64), kind="r")
_case("gemv-1d-x", (90,), 12, "float16", None, True)
_case("gemv-q-row-padded", (2, 100), 30, "bfloat16", "gemv", False, dict(BLOCK_N=4, BLOCK_K=32), kind="q")
# GEMM (prefill): both orientations, M/N/K tails, split-K, grouping, odd sizes, defaults.
_case("gemm-bf16", (40, 200), 50, "bfloat16", "gemm", True, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, SWAP_AB=False))
_case("gemm-bf16-swap", (40, 200), 50, "bfloat16", "gemm", False, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, SWAP_AB=True))
_case("gemm-fp16", (33, 150), 70, "float16", "gemm", True, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=4, SWAP_AB=False))
_case("gemm-fp16-swap", (33, 150), 70, "float16", "gemm", True, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=1, SWAP_AB=True))
_case("gemm-split", (20, 300), 37, "bfloat16", "gemm", True, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, SWAP_AB=True, SPLIT_K=3))
_case("gemm-split-fp16", (17, 260), 40, "float16", "gemm", False, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, GROUP_M=1, SWAP_AB=False, SPLIT_K=2))
_case("gemm-default", (24, 100), 45, "bfloat16", None, True)
_case("gemm-m1-n1", (1, 50), 1, "float16", "gemm", True, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, SWAP_AB=True))
_case("gemm-3d-permuted", (3, 5, 64), 48, "bfloat16", None, False, kind="p")
_case("gemm-transposed-x", (18, 96), 20, "float16", "gemm", True, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SWAP_AB=False), kind="t")
# int8_group scales (bfloat16 [N, ceil(K / group)]): groups smaller and larger than BLOCK_K,
# a partial last group (K not a multiple of the group), split-K, both GEMM orientations.
_case("group-gemv-m1-bf16", (1, 300), 37, "bfloat16", "gemv", True, dict(BLOCK_N=8, BLOCK_K=64), group=16)
_case("group-gemv-m3-fp16-i2f", (3, 200), 19, "float16", "gemv", False, dict(BLOCK_N=4, BLOCK_K=64, FAST_CVT=False), group=128)
_case("group-gemv-m5-split", (5, 700), 21, "bfloat16", "gemv", True, dict(BLOCK_N=2, BLOCK_K=128, SPLIT_K=2), group=64)
_case("group-gemv-default", (1, 2500), 29, "bfloat16", None, True, group=128)
_case("group-gemm-bf16", (40, 200), 50, "bfloat16", "gemm", True, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, SWAP_AB=False), group=32)
_case("group-gemm-bf16-swap", (40, 200), 50, "bfloat16", "gemm", False, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, SWAP_AB=True), group=16)
_case("group-gemm-fp16-split", (17, 260), 40, "float16", "gemm", True, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, GROUP_M=1, SWAP_AB=False, SPLIT_K=2), group=128)
_case("group-gemm-default", (24, 100), 45, "bfloat16", None, True, kind="t", group=16)


def _make(case: dict, seed: int):
    """(x, q, scales, bias) of a case: random normal activations, int8 in [-128, 127], positive
    scales of the size per-row absmax quantization gives; all from their own seed."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case["dtype"])
    shape, n, kind = case["x"], case["n"], case["kind"]
    k = shape[-1]
    if kind == "t":  # x given as the transpose of a (K, M) tensor: strides (1, M)
        x = torch.randn(k, shape[0], generator=g).to(dtype).t()
    elif kind == "s":  # every other column of a (M, 2K) tensor
        x = torch.randn(*shape[:-1], 2 * k, generator=g).to(dtype)[..., ::2]
    elif kind == "r":  # rows padded: row stride K + 24
        x = torch.randn(shape[0], k + 24, generator=g).to(dtype)[:, 5 : 5 + k]
    elif kind == "p":  # 3-D (B, S, K) viewed from (S, B, K)
        x = torch.randn(shape[1], shape[0], k, generator=g).to(dtype).permute(1, 0, 2)
    else:
        x = torch.randn(*shape, generator=g).to(dtype)
    assert tuple(x.shape) == tuple(shape)
    q = torch.randint(-128, 128, (n, k + (16 if kind == "q" else 0)), generator=g, dtype=torch.int8)[:, :k]
    if case.get("group"):  # int8_group: bfloat16 [n, ceil(k / group)]
        scales = (torch.rand(n, -(-k // case["group"]), generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    else:
        scales = torch.rand(n, generator=g) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g).to(dtype) if case["bias"] else None
    return x, q, scales, bias


def _reference64(x, q, scales, bias):
    """Dequantize-then-matmul in float64 (on x's device); 2-D scales are int8_group's."""
    if scales.dim() == 2:
        group = -(-q.shape[1] // scales.shape[1])
        group = 1 << (group - 1).bit_length()  # the power of two that gives that many groups
        w = q.to(torch.float64) * scales.to(torch.float64).repeat_interleave(group, dim=1)[:, : q.shape[1]]
    else:
        w = q.to(torch.float64) * scales.to(torch.float64)[:, None]
    y = x.to(torch.float64) @ w.t()
    return y if bias is None else y + bias.to(torch.float64)


def _check(x, q, scales, bias, **kw) -> dict:
    """Run int8_linear_triton into a NaN-poisoned output; relative error vs float64 and the
    number of non-finite outputs."""
    from codecllm_format.runtime import triton_kernels as tk

    out = torch.full((*x.shape[:-1], q.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    y = tk.int8_linear_triton(x, q, scales, bias, out=out, **kw)
    assert y is out
    ref = _reference64(x, q, scales, bias)
    err = ((y.to(torch.float64) - ref).norm() / ref.norm()).item()
    return {"err": err, "nonfinite": int((~torch.isfinite(y)).sum()), "shape": list(y.shape)}


def _interp_driver(ids: list[str]) -> None:
    """Subprocess body (TRITON_INTERPRET=1 is in its environment): print one JSON line of results."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from codecllm_format.runtime import triton_kernels as tk

    assert tk.INTERPRET
    tk._POISON_WORKSPACE = True
    results = {}
    for cid in ids:
        case = _C[cid]
        seed = 1000 + sorted(_C).index(cid)
        x, q, scales, bias = _make(case, seed)
        try:
            results[cid] = _check(x, q, scales, bias, path=case["path"], config=case["config"])
        except Exception as e:  # reported per case by the parent
            results[cid] = {"error": f"{type(e).__name__}: {e}"}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interp_results():
    """Run all interpreter cases in two parallel subprocesses; {case id: result}."""
    ids = sorted(_C)
    env = dict(os.environ, TRITON_INTERPRET="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--interp", json.dumps(part)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for part in (ids[0::2], ids[1::2])
    ]
    results = {}
    for p in procs:
        out, err = p.communicate(timeout=600)
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULTS ")]
        assert p.returncode == 0 and lines, f"interpreter subprocess failed (rc {p.returncode}):\n{err[-4000:]}"
        results.update(json.loads(lines[-1][len("RESULTS ") :]))
    return results


@needs_triton
@pytest.mark.parametrize("cid", sorted(_C))
def test_interpreter_matches_float64(interp_results, cid):
    r = interp_results[cid]
    assert "error" not in r, r.get("error")
    case = _C[cid]
    assert r["shape"] == case["x"][:-1] + [case["n"]]
    assert r["nonfinite"] == 0, f"{cid}: {r['nonfinite']} outputs not written (still NaN)"
    assert r["err"] <= TOL, f"{cid}: relative error {r['err']:.3e} > {TOL}"


# ---------------------------------------------------------------------------------------------
# CPU: dispatch and planning (no kernel runs).


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_cpu_int8_linear_is_the_reference_bit_for_bit(dtype, layout):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 48, generator=g).to(dtype)
    q = torch.randint(-127, 128, (40, 48) if layout == "linear" else (48, 40), generator=g, dtype=torch.int8)
    s = torch.rand(q.shape[0], generator=g) + 0.01
    b = torch.randn(40, generator=g).to(dtype)
    y = kernels.int8_linear(x, q, s, b, layout=layout)
    assert torch.equal(y, kernels.int8_linear_reference(x, q, s, b, layout=layout))
    w = kernels.dequantize(q, s, dtype)
    assert torch.equal(y, torch.nn.functional.linear(x, w if layout == "linear" else w.t(), b))


@needs_triton
def test_unsupported_reasons():
    from codecllm_format.runtime import triton_kernels as tk

    if tk.INTERPRET:
        pytest.skip("the interpreter accepts CPU tensors")
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    q = torch.zeros(4, 8, dtype=torch.int8)
    s = torch.ones(4)
    assert "CUDA" in tk.unsupported_reason(x, q, s)
    with pytest.raises(ValueError, match="CUDA"):
        tk.int8_linear_triton(x, q, s)


@needs_triton
def test_split_k_and_config_choices():
    from codecllm_format.runtime import triton_kernels as tk

    # Llama-2-7B decode shapes fill a 132-SM GPU without split-K; a narrow layer gets split
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)):
        assert tk.gemv_split_k(1, n, k, 132) == 1
    assert tk.gemv_split_k(1, 256, 8192, 132) > 1
    assert tk.gemm_split_k(16, 4096, 4096, 132) > 1 and tk.gemm_split_k(512, 4096, 4096, 132) == 1
    for bm in (1, 2, 4, 8, 16, 32, 64):
        cfgs = tk._prune_gemv(tk.GEMV_CONFIGS, {"BLOCK_M": bm})
        assert cfgs and all(c.kwargs["BLOCK_K"] == 256 * c.num_warps for c in cfgs)
    for m_key in (1, 16, 64, 128, 256, 4096):
        assert tk._prune_gemm(tk.GEMM_CONFIGS, {"M_KEY": m_key})


# ---------------------------------------------------------------------------------------------
# GPU: compiled, autotuned kernels at real shapes.

needs_gpu = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()) or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs triton and a CUDA GPU (and no TRITON_INTERPRET)",
)

LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)]  # (out, in)


def _gpu_inputs(m_shape, n, k, dtype, bias, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*m_shape, k, generator=g, device="cuda").to(dtype)
    q = torch.randint(-127, 128, (n, k), generator=g, device="cuda", dtype=torch.int8)
    s = torch.rand(n, generator=g, device="cuda") * 0.02 + 1e-3
    b = torch.randn(n, generator=g, device="cuda").to(dtype) if bias else None
    return x, q, s, b


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 64])
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
def test_gpu_llama_shapes(n, k, m):
    from codecllm_format.runtime import triton_kernels as tk

    tk._POISON_WORKSPACE = True
    try:
        seed = n * 7 + k * 3 + m
        x, q, s, b = _gpu_inputs((m,), n, k, torch.bfloat16, m % 2 == 0, seed)
        paths = [None] + (["gemv", "gemm"] if m <= 16 else [])
        for path in paths:
            r = _check(x, q, s, b, path=path)
            assert r["nonfinite"] == 0, (path, r)
            assert r["err"] <= TOL, (path, r)
    finally:
        tk._POISON_WORKSPACE = False


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "m_shape,n,k",
    [((1,), 1, 1), ((3,), 333, 7), ((1,), 5, 4097), ((9,), 1000, 100), ((2, 50), 257, 4100), ((300,), 96, 4096),
     ((1,), 256, 8192), ((4,), 1024, 4096)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_odd_shapes(m_shape, n, k, dtype):
    from codecllm_format.runtime import triton_kernels as tk

    tk._POISON_WORKSPACE = True
    try:
        x, q, s, b = _gpu_inputs(m_shape, n, k, dtype, True, n + k + len(m_shape))
        for path in (None, "gemv", "gemm") if x.numel() // k <= 16 else (None,):
            r = _check(x, q, s, b, path=path)
            assert r["nonfinite"] == 0 and r["err"] <= TOL, (path, r)
    finally:
        tk._POISON_WORKSPACE = False


@pytest.mark.gpu
@needs_gpu
def test_gpu_dispatch_through_int8_linear():
    from codecllm_format.runtime import triton_kernels as tk

    x, q, s, b = _gpu_inputs((2, 5), 384, 512, torch.float16, True, 11)
    xt = x.transpose(0, 1)  # non-contiguous 3-D-able view (5, 2, 512)
    for xx, bb in ((x, b), (xt, None), (x[:, :1], b)):
        y = kernels.int8_linear(xx, q, s, bb)
        assert torch.equal(y, tk.int8_linear_triton(xx, q, s, bb))  # it took the fused path
        ref = _reference64(xx, q, s, bb)
        assert ((y.double() - ref).norm() / ref.norm()).item() <= TOL
    # cases the kernels don't take fall back to the reference, unchanged
    x32 = x.float()
    assert torch.equal(kernels.int8_linear(x32, q, s), kernels.int8_linear_reference(x32, q, s))
    qc = q.t().contiguous()  # conv1d layout stores (in, out)
    assert torch.equal(
        kernels.int8_linear(x, qc, torch.ones(512, device="cuda"), layout="conv1d"),
        kernels.int8_linear_reference(x, qc, torch.ones(512, device="cuda"), layout="conv1d"),
    )
    xg = x.clone().requires_grad_()
    y = kernels.int8_linear(xg, q, s, b)  # autograd needs the reference path
    y.float().sum().backward()
    assert xg.grad is not None


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interp":
        _interp_driver(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: test_triton_kernels.py --interp '<json list of case ids>' (run by the tests)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("n,k", LLAMA_SHAPES + [(576, 1536), (1536, 576)])  # + SmolLM2's (576: partial groups of 128)
def test_gpu_int8_group_scales(n, k, group, m):
    """int8_group (bfloat16 [N, ceil(K / group)] scales) through both paths, vs float64."""
    from codecllm_format.runtime import triton_kernels as tk

    tk._POISON_WORKSPACE = True
    try:
        x, q, _s, b = _gpu_inputs((m,), n, k, torch.bfloat16, m % 2 == 0, n + k + m + group)
        g = torch.Generator(device="cuda").manual_seed(group + m)
        s = (torch.rand(n, -(-k // group), generator=g, device="cuda") * 0.02 + 1e-3).to(torch.bfloat16)
        for path in [None] + (["gemv", "gemm"] if m <= 16 else []):
            r = _check(x, q, s, b, path=path)
            assert r["nonfinite"] == 0, (path, r)
            assert r["err"] <= TOL, (path, r)
    finally:
        tk._POISON_WORKSPACE = False
