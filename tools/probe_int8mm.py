"""Is torch._weight_int8pack_mm available on CUDA, correct for our semantics, and how fast
(launch included) against the Triton GEMV and bf16 F.linear? Usage: python tools/probe_int8mm.py"""
import time

import torch
import torch.nn.functional as F

from codecllm_format.runtime import kernels

dev = "cuda"
for n, k in ((4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
    s = torch.rand(n, device=dev) / 100 + 1e-3
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    ref = (x.double() @ (q.double() * s.double()[:, None]).t())
    w = (q.float() * s[:, None]).to(torch.bfloat16)
    cands = {"bf16 F.linear": lambda: F.linear(x, w), "int8_linear (dispatch)": lambda: kernels.int8_linear(x, q, s)}
    try:
        torch._weight_int8pack_mm(x, q, s.to(torch.bfloat16))
        cands["torch._weight_int8pack_mm"] = lambda: torch._weight_int8pack_mm(x, q, s.to(torch.bfloat16))
    except Exception as e:
        print("_weight_int8pack_mm unavailable:", type(e).__name__, str(e)[:120])
    for name, fn in cands.items():
        out = fn()
        err = ((out.double() - ref).norm() / ref.norm()).item()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 200 * 1e6
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay(); torch.cuda.synchronize()
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        for _ in range(200):
            g.replay()
        en.record(); en.synchronize()
        print(f"{n}x{k} {name:28s} wall/call {wall:7.1f} us  graph {st.elapsed_time(en) / 200 * 1e3:7.1f} us  rel err {err:.2e}")
