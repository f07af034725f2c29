"""runtime.planes.interleave_planes (Triton) == planes.join_planes (CPU reference), bit for bit.

On the CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1) in a subprocess, so
that this process's Triton stays a compiler for the GPU tests (as tests/test_triton_kernels.py
does). Inputs are random bit patterns (every NaN payload, infinity, signed zero and subnormal is
as likely as any value), at sizes around the kernel's BLOCK. Where CUDA exists, the GPU tests
run the compiled kernel at Llama-7B layer sizes against the CPU reference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

from codecllm_format.errors import DecodeError
from codecllm_format.planes import join_planes, split_planes

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
SIZES = [1, 3, 255, 4095, 4096, 4097, 3 * 4096 + 17]


def random_float_bits(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    width = 8 * torch.empty(0, dtype=dtype).element_size()
    bits = torch.randint(0, 1 << width, (n,), generator=g, dtype=torch.int64)
    bits = torch.where(bits >= 1 << (width - 1), bits - (1 << width), bits)
    return bits.to(INT_OF[dtype]).view(dtype)


def _case_ids() -> list[str]:
    return [f"{name}-{n}" for name in DTYPES for n in SIZES] + [f"{name}-out" for name in DTYPES]


def _run_case(cid: str) -> dict:
    from codecllm_format.runtime.planes import interleave_planes

    name, size = cid.split("-")
    dtype = DTYPES[name]
    n = 5000 if size == "out" else int(size)
    t = random_float_bits(dtype, n, seed=zlib.crc32(cid.encode()))
    e, s = split_planes(t)
    ref = join_planes(e, s, dtype)
    if size == "out":  # into a caller's 2-D buffer, poisoned first
        out = torch.full((50, 100), float("nan"), dtype=dtype)
        got = interleave_planes(torch.from_numpy(e), torch.from_numpy(s), dtype, out=out)
        same_object = got is out
    else:
        got = interleave_planes(torch.from_numpy(e), torch.from_numpy(s), dtype)
        same_object = True
    iv = INT_OF[dtype]
    return {"exact": bool(torch.equal(got.reshape(-1).view(iv), ref.view(iv))),
            "exact_input": bool(torch.equal(got.reshape(-1).view(iv), t.view(iv))), "same_object": same_object}


def _interp_driver(ids: list[str]) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from codecllm_format.runtime import planes as rp

    assert rp.INTERPRET
    results = {}
    for cid in ids:
        try:
            results[cid] = _run_case(cid)
        except Exception as e:  # reported per case by the parent
            results[cid] = {"error": f"{type(e).__name__}: {e}"}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interp_results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, __file__, "--interp", json.dumps(_case_ids())], env=env,
                       capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert p.returncode == 0 and lines, f"interpreter subprocess failed (rc {p.returncode}):\n{p.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


@needs_triton
@pytest.mark.parametrize("cid", _case_ids())
def test_interpreter_is_bit_exact(interp_results, cid):
    r = interp_results[cid]
    assert "error" not in r, r.get("error")
    assert r["exact"] and r["exact_input"] and r["same_object"], r


def test_cpu_path_is_the_reference():
    """Without the interpreter, CPU tensors take join_planes itself (same bits)."""
    from codecllm_format.runtime.planes import interleave_planes

    for dtype in DTYPES.values():
        t = random_float_bits(dtype, 1001, 7)
        e, s = split_planes(t)
        got = interleave_planes(torch.from_numpy(e), torch.from_numpy(s), dtype)
        assert torch.equal(got.view(INT_OF[dtype]), t.view(INT_OF[dtype]))
        empty = interleave_planes(torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8), dtype)
        assert empty.shape == (0,) and empty.dtype == dtype


def test_bad_arguments_and_f16_spare_bits():
    from codecllm_format.runtime.planes import interleave_planes

    e = torch.zeros(10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="sign_mantissa has 10 bytes, 10 values of F32 need 30"):
        interleave_planes(e, torch.zeros(10, dtype=torch.uint8), torch.float32, where="tensor 'w'")
    with pytest.raises(ValueError, match="float_planes takes bfloat16, float16 or float32"):
        interleave_planes(e, e, torch.float64)
    with pytest.raises(ValueError, match="out must be a contiguous torch.bfloat16 tensor of 10 elements"):
        interleave_planes(e, e.clone(), torch.bfloat16, out=torch.empty(11, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="planes must be uint8"):
        interleave_planes(e.to(torch.int8), e, torch.bfloat16)
    bad = torch.zeros(20, dtype=torch.uint8)
    bad[15] = 8  # value 5's high byte: bit 11 set
    with pytest.raises(DecodeError, match="tensor 'h': an F16 sign_mantissa value has bits set above bit 10"):
        interleave_planes(e, bad, torch.float16, where="tensor 'h'")
    e32 = e.clone()
    e32[3] = 32
    with pytest.raises(DecodeError, match="an F16 exponent byte is above 31"):
        interleave_planes(e32, torch.zeros(20, dtype=torch.uint8), torch.float16)


# --- on a GPU ------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()) or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs triton and a CUDA GPU (and no TRITON_INTERPRET)",
)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("n", [1, 4097, 11008 * 4096 + 3])
def test_gpu_bit_exact(dtype, n):
    from codecllm_format.runtime.planes import interleave_planes

    t = random_float_bits(dtype, n, seed=n % 1000)
    e, s = split_planes(t)
    dev = torch.device("cuda")
    out = torch.full((n,), float("nan"), dtype=dtype, device=dev)
    got = interleave_planes(torch.from_numpy(e).to(dev), torch.from_numpy(s).to(dev), dtype, out=out)
    torch.cuda.synchronize()
    assert got is out
    iv = INT_OF[dtype]
    assert torch.equal(got.cpu().view(iv), t.view(iv))


@pytest.mark.gpu
@needs_gpu
def test_gpu_real_weight_distribution_and_f16_check():
    from codecllm_format.runtime.planes import interleave_planes

    dev = torch.device("cuda")
    t = (torch.randn(4096, 4096, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    e, s = split_planes(t)
    got = interleave_planes(torch.from_numpy(e).to(dev), torch.from_numpy(s).to(dev), torch.bfloat16)
    assert torch.equal(got.cpu().view(torch.int16), t.reshape(-1).view(torch.int16))
    bad = torch.zeros(2 * 100, dtype=torch.uint8, device=dev)
    bad[150] = 0x10
    with pytest.raises(DecodeError):
        interleave_planes(torch.zeros(100, dtype=torch.uint8, device=dev), bad, torch.float16)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--interp":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _interp_driver(json.loads(sys.argv[2]))
