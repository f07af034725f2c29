"""The launch fast path of the fused int8 kernels (triton_kernels.LinearPlan): per-module plans,
cached per-layout entries, direct launches verified against Triton's normal launch, fallbacks.

On the CPU the scenarios run under Triton's interpreter (TRITON_INTERPRET=1) in one subprocess
(this process's Triton stays a compiler for the GPU tests); there the "direct launch" is the JIT
function launched with the recorded grid and constants, so everything but the final low-level
launcher call is exercised. Every result is compared bit for bit with int8_linear_triton, the
normal launch path. Where CUDA exists, the GPU tests check the real direct launch
(CompiledKernel.run) bit for bit against the normal launch at Llama-2-7B shapes.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch

from codecllm_format.runtime import kernels

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _inputs(m_shape, n, k, dtype, bias, seed, device="cpu", group=0):
    """(x, q, s, b); group > 0: int8_group scales, bfloat16 [n, ceil(k / group)]."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(*m_shape, k, generator=g, device=device).to(dtype)
    q = torch.randint(-128, 128, (n, k), generator=g, device=device, dtype=torch.int8)
    if group:
        s = (torch.rand(n, -(-k // group), generator=g, device=device) * 0.02 + 1e-3).to(torch.bfloat16)
    else:
        s = torch.rand(n, generator=g, device=device) * 0.02 + 1e-3
    b = torch.randn(n, generator=g, device=device).to(dtype) if bias else None
    return x, q, s, b


def _same(a, b) -> bool:
    return a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.view(torch.int16), b.view(torch.int16)
    )


# ---------------------------------------------------------------------------------------------
# Interpreter scenarios (run in the subprocess; each returns a dict of facts the tests assert).

# (m_shape, n, k, dtype, bias): GEMV, GEMV with split-K (reduce kernel), GEMM, 3-D x, fp16
LAYOUTS = {
    "gemv": ((1,), 37, 300, "bfloat16", True),
    "gemv-splitk": ((1,), 16, 2048, "bfloat16", False),
    "gemm": ((12,), 40, 96, "bfloat16", True),
    "gemv-3d-fp16": ((2, 3), 24, 160, "float16", False),
    # int8_group scales (group size last): GEMV, GEMV with split-K, GEMM
    "group-gemv": ((1,), 37, 300, "bfloat16", True, 64),
    "group-gemv-splitk": ((1,), 16, 2048, "bfloat16", False, 128),
    "group-gemm": ((12,), 40, 96, "float16", True, 32),
}


def _scenario_reuse(tk, name):
    """Three calls of one layout, fresh x each time: one bind, one build, then direct launches."""
    m_shape, n, k, dt, bias, *group = LAYOUTS[name]
    group = group[0] if group else 0
    dtype = getattr(torch, dt)
    _, q, s, b = _inputs(m_shape, n, k, dtype, bias, 1, group=group)
    plan = tk.LinearPlan()
    same, entries = [], []
    for i in range(3):
        x = _inputs(m_shape, n, k, dtype, bias, 10 + i)[0]
        y = plan(x, q, s, b)
        same.append(_same(y, tk.int8_linear_triton(x, q, s, b)))
        e = plan.entry(x)
        entries.append(id(e))
    e = plan.entry(x)
    return {
        "same": same,
        "binds": plan.binds,
        "builds": tk.STATS["builds"],
        "verified": tk.STATS["verified"],
        "entry": type(e).__name__,
        "one_entry": len(set(entries)) == 1,
        "direct_calls": getattr(e, "calls", None),
        "launches": len(getattr(e, "launches", ())),
        "status": tk.direct_launch_status(),
    }


def _scenario_layouts(tk):
    """New activation layouts get their own entries; new weights of the same layout share them
    (and their own values are used); x that needs a copy goes through the normal path."""
    n, k = 40, 160
    _, q, s, b = _inputs((1,), n, k, torch.bfloat16, True, 2)
    plan = tk.LinearPlan()
    out = {"same": []}

    def check(x, qq=q, ss=s, bb=b):
        y = plan(x, qq, ss, bb)
        out["same"].append(_same(y, tk.int8_linear_triton(x, qq, ss, bb)))
        return plan.entry(x)

    x1 = _inputs((1,), n, k, torch.bfloat16, False, 20)[0]
    check(x1)
    x4 = _inputs((4,), n, k, torch.bfloat16, False, 21)[0]
    check(x4)
    out["builds_two_m"] = tk.STATS["builds"]
    wide = _inputs((3,), n, k + 40, torch.bfloat16, False, 22)[0]
    xr = wide[:, 8 : 8 + k]  # rows padded (a view, row stride k + 40, address + 16 bytes)
    out["row_stride_entry"] = type(check(xr)).__name__
    flat = _inputs((1,), n, 2 * k, torch.bfloat16, False, 23)[0].reshape(-1)
    xm = flat[1 : 1 + k]  # 1-D x at an address 2 bytes past 16-byte alignment
    assert xm.data_ptr() % 16 != 0
    out["misaligned_entry"] = type(check(xm)).__name__
    out["builds_after_layouts"] = tk.STATS["builds"]
    out["binds_before_new_weights"] = plan.binds
    q2 = torch.randint(-128, 128, (n, k), generator=torch.Generator().manual_seed(5), dtype=torch.int8)
    s2 = s * 3
    e = check(x1, q2, s2, b)  # same layout, other values: shared entry, this call's tensors
    out["binds_after_new_weights"] = plan.binds
    out["builds_after_new_weights"] = tk.STATS["builds"]
    out["new_weights_differ"] = not _same(plan(x1, q2, s2, b), plan(x1, q, s, b))
    for qq, ss in ((q2, s2), (q, s), (q2, s2), (q, s)):  # two weight sets in turn (streaming slots)
        out["same"].append(_same(plan(x1, qq, ss, b), tk.int8_linear_triton(x1, qq, ss, b)))
    out["binds_after_alternating"] = plan.binds
    # as many weight sets as a plan remembers (slots=4), in turn: bound once each, then never again
    sets = [(q, s), (q2, s2)] + [(q.roll(j, 0), s * (j + 1)) for j in (1, 2)]
    for qq, ss in sets * 3:
        out["same"].append(_same(plan(x1, qq, ss, b), tk.int8_linear_triton(x1, qq, ss, b)))
    out["binds_after_four_sets"] = plan.binds
    for qq, ss in (sets + [(q.roll(3, 0), s * 5)]) * 2:  # one set more than it remembers: each call re-binds
        plan(x1, qq, ss, b)
    out["binds_after_five_sets"] = plan.binds
    xt = torch.randn(k, 3, generator=torch.Generator().manual_seed(24)).bfloat16().t()  # (3, k) column-major
    out["transposed_entry"] = type(check(xt)).__name__
    out["normal_calls"] = tk.STATS["normal_calls"]
    bt = torch.randn(2 * n).bfloat16()[::2]  # strided bias: needs .contiguous() every call
    out["strided_bias_entry"] = type(check(x1, q, s, bt)).__name__
    out["shared_plan_same"] = _same(tk.maybe_int8_linear(x1, q, s, b), tk.int8_linear_triton(x1, q, s, b))
    out["status"] = tk.direct_launch_status()
    return out


def _scenario_unsupported(tk):
    _, q, s, b = _inputs((1,), 24, 64, torch.bfloat16, True, 3)
    plan = tk.LinearPlan()
    x32 = torch.randn(1, 64)
    out = {"float32": plan(x32, q, s, None) is None, "float32_entry": type(plan.entry(x32)).__name__}
    xg = _inputs((1,), 24, 64, torch.bfloat16, True, 30)[0].requires_grad_()
    out["grad_none"] = plan(xg, q, s, b) is None
    out["grad_no_entry"] = plan.entry(xg) is None
    with torch.no_grad():
        y = plan(xg, q, s, b)
    out["no_grad_same"] = _same(y, tk.int8_linear_triton(xg.detach(), q, s, b))
    xk = torch.randn(1, 65).bfloat16()
    out["wrong_k_none"] = plan(xk, q, s, b) is None
    why = plan.entry(xk)
    out["wrong_k_why"] = getattr(why, "why", None)
    return out


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _scenario_fallback(tk, when):
    """The direct launcher raises (at the verification, or at a later call), or launches a wrong
    grid (caught by the verification): results stay those of the normal path, the direct launch
    is switched off with one debug message, and later calls take the normal path."""
    handler = _Records()
    lg = logging.getLogger("codecllm_format.runtime")
    lg.addHandler(handler)
    old_level = lg.level
    lg.setLevel(logging.DEBUG)
    orig_call, orig_init = tk._DirectLaunch.__call__, tk._DirectLaunch.__init__

    def boom(self, stream, tensors):
        raise RuntimeError("simulated launcher failure")

    def short_grid(self, rec):
        orig_init(self, rec)
        self.grid = (self.grid[0] - 1, *self.grid[1:])  # one block of output rows never written

    out = {"same": []}
    try:
        _, q, s, b = _inputs((1,), 37, 300, torch.bfloat16, True, 4)
        plan = tk.LinearPlan()
        xs = [_inputs((1,), 37, 300, torch.bfloat16, True, 40 + i)[0] for i in range(4)]
        if when == "build":
            tk._DirectLaunch.__call__ = boom
        elif when == "wrong-grid":
            tk._DirectLaunch.__init__ = short_grid
        y = plan(xs[0], q, s, b)
        out["same"].append(_same(y, tk.int8_linear_triton(xs[0], q, s, b)))
        out["entry_after_first"] = type(plan.entry(xs[0])).__name__
        if when == "later":
            tk._DirectLaunch.__call__ = boom
        for x in xs[1:]:
            y = plan(x, q, s, b)
            out["same"].append(_same(y, tk.int8_linear_triton(x, q, s, b)))
        # a second weight layout after the switch-off: normal path, no new message
        _, q2, s2, _ = _inputs((2,), 20, 64, torch.bfloat16, False, 5)
        x2 = _inputs((2,), 20, 64, torch.bfloat16, False, 50)[0]
        y = plan(x2, q2, s2, None)
        out["same"].append(_same(y, tk.int8_linear_triton(x2, q2, s2, None)))
        out["second_entry"] = type(plan.entry(x2)).__name__
    finally:
        tk._DirectLaunch.__call__, tk._DirectLaunch.__init__ = orig_call, orig_init
        lg.removeHandler(handler)
        lg.setLevel(old_level)
    out["status"] = tk.direct_launch_status()
    out["messages"] = [m for m in handler.messages if "direct Triton launch off" in m]
    out["normal_calls"] = tk.STATS["normal_calls"]
    return out


def _scenario_hooks(tk):
    """An active launch hook (a profiler) sends calls to the normal path, which calls it."""
    import triton

    _, q, s, b = _inputs((1,), 37, 300, torch.bfloat16, True, 6)
    x = _inputs((1,), 37, 300, torch.bfloat16, True, 60)[0]
    plan = tk.LinearPlan()
    plan(x, q, s, b)
    e = plan.entry(x)
    before = (e.calls, tk.STATS["normal_calls"])
    hook = triton.knobs.runtime.launch_enter_hook
    seen = []
    if hasattr(hook, "add"):
        fn = seen.append
        hook.add(fn)
        try:
            y = plan(x, q, s, b)
        finally:
            hook.remove(fn)
    else:
        triton.knobs.runtime.launch_enter_hook = seen.append
        try:
            y = plan(x, q, s, b)
        finally:
            triton.knobs.runtime.launch_enter_hook = hook
    during = (e.calls, tk.STATS["normal_calls"])
    y2 = plan(x, q, s, b)
    after = (e.calls, tk.STATS["normal_calls"])
    ref = tk.int8_linear_triton(x, q, s, b)
    return {"before": before, "during": during, "after": after, "same": [_same(y, ref), _same(y2, ref)]}


def _interp_driver() -> None:
    """Subprocess body (TRITON_INTERPRET=1): print one JSON line of {scenario: facts}."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from codecllm_format.runtime import triton_kernels as tk

    assert tk.INTERPRET
    tk._POISON_WORKSPACE = True
    scenarios = {f"reuse-{name}": (lambda name=name: _scenario_reuse(tk, name)) for name in LAYOUTS}
    scenarios["layouts"] = lambda: _scenario_layouts(tk)
    scenarios["unsupported"] = lambda: _scenario_unsupported(tk)
    for when in ("build", "later", "wrong-grid"):
        scenarios[f"fallback-{when}"] = lambda when=when: _scenario_fallback(tk, when)
    scenarios["hooks"] = lambda: _scenario_hooks(tk)
    results = {}
    for name, fn in scenarios.items():
        tk.reset_launch_cache()
        try:
            results[name] = fn()
        except Exception as e:  # reported per scenario by the parent
            import traceback

            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"}
    print("RESULTS " + json.dumps(results, default=str))


@pytest.fixture(scope="module")
def interp():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, __file__, "--interp"], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert p.returncode == 0 and lines, f"interpreter subprocess failed (rc {p.returncode}):\n{p.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS ") :])


def _get(interp, name):
    r = interp[name]
    assert "error" not in r, r.get("error")
    return r


@needs_triton
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_plan_is_built_once_and_reused(interp, name):
    r = _get(interp, f"reuse-{name}")
    assert r["same"] == [True, True, True]  # bit-identical to the normal launch path, every call
    assert r["binds"] == 1 and r["builds"] == 1 and r["verified"] == 1 and r["one_entry"]
    assert r["entry"] == "_Fast" and r["direct_calls"] == 2  # the first call was the normal launch
    assert r["launches"] == (2 if name.endswith("gemv-splitk") else 1)  # split-K: GEMV + reduce, both direct
    assert r["status"] == [True, None]


@needs_triton
def test_plan_layouts_weights_and_copies(interp):
    r = _get(interp, "layouts")
    assert all(r["same"]) and len(r["same"]) == 23
    assert r["builds_two_m"] == 2  # M=1 and M=4: one entry each
    assert r["row_stride_entry"] == "_Fast" and r["misaligned_entry"] == "_Fast"
    assert r["builds_after_layouts"] == 4
    assert r["binds_after_new_weights"] == r["binds_before_new_weights"] + 1
    assert r["builds_after_new_weights"] == 4  # same weight layout: the entry is shared
    assert r["new_weights_differ"]  # ... and the launch used this call's tensors
    assert r["binds_after_alternating"] == r["binds_after_new_weights"]  # both bindings remembered
    assert r["binds_after_four_sets"] == r["binds_after_alternating"] + 2  # the two new sets, once each
    # five sets: the fifth is new, then (least recently used first out) every call of the second round misses
    assert r["binds_after_five_sets"] == r["binds_after_four_sets"] + 1 + 5
    assert r["transposed_entry"] == "_Normal" and r["strided_bias_entry"] == "_Normal"
    assert r["normal_calls"] >= 1
    assert r["shared_plan_same"]
    assert r["status"] == [True, None]


@needs_triton
def test_plan_unsupported_inputs_return_none(interp):
    r = _get(interp, "unsupported")
    assert r["float32"] and r["float32_entry"] == "_Unsupported"
    assert r["grad_none"] and r["grad_no_entry"]  # autograd is decided per call, never cached
    assert r["no_grad_same"]
    assert r["wrong_k_none"] and "in_features" in r["wrong_k_why"]


@needs_triton
@pytest.mark.parametrize("when", ["build", "later", "wrong-grid"])
def test_direct_launch_falls_back_to_the_normal_path(interp, when):
    r = _get(interp, f"fallback-{when}")
    assert r["same"] == [True] * 5  # every result is the normal path's, bit for bit
    on, why = r["status"]
    assert not on
    assert ("differs from the normal launch" in why) if when == "wrong-grid" else ("simulated launcher failure" in why)
    assert len(r["messages"]) == 1  # one debug message, not one per call or per layout
    assert r["entry_after_first"] == ("_Fast" if when == "later" else "_Normal")
    assert r["second_entry"] == "_Normal"
    assert r["normal_calls"] >= 3


@needs_triton
def test_active_launch_hook_takes_the_normal_path(interp):
    r = _get(interp, "hooks")
    assert r["same"] == [True, True]
    assert r["during"] == [r["before"][0], r["before"][1] + 1]  # normal path while the hook is set
    assert r["after"] == [r["during"][0] + 1, r["during"][1]]  # direct again once it is removed


# ---------------------------------------------------------------------------------------------
# CPU, no Triton needed: the kernels-level holder and the module.


def test_kernels_plan_on_cpu_is_the_reference_and_stays_empty():
    x, q, s, b = _inputs((2, 3), 40, 48, torch.bfloat16, True, 7)
    plan = kernels.LinearPlan()
    y = kernels.int8_linear(x, q, s, b, plan=plan)
    assert torch.equal(y, kernels.int8_linear_reference(x, q, s, b))
    assert plan.fused is None  # nothing built (and Triton not needed) for CPU tensors
    qc = q.t().contiguous()
    assert torch.equal(
        kernels.int8_linear(x, qc, torch.ones(48), layout="conv1d", plan=plan),
        kernels.int8_linear_reference(x, qc, torch.ones(48), layout="conv1d"),
    )


def test_compressed_linear_holds_a_plan_that_copies_empty():
    from codecllm_format.runtime import CompressedLinear

    class Provider:
        device = torch.device("cpu")

        def __init__(self, q, s):
            self.w = (q, s)

        def linear_weight(self, name):
            return self.w

    x, q, s, b = _inputs((1, 4), 24, 32, torch.bfloat16, True, 8)
    lin = CompressedLinear("w", 0, Provider(q, s), 32, 24, b)
    assert isinstance(lin._plan, kernels.LinearPlan)
    y = lin(x)
    assert torch.equal(y, kernels.int8_linear_reference(x, q, s, b))
    lin._plan.fused = object()  # stands for a built plan: copies must not share or carry it
    dup = copy.deepcopy(lin)
    assert isinstance(dup._plan, kernels.LinearPlan) and dup._plan is not lin._plan and dup._plan.fused is None
    restored = pickle.loads(pickle.dumps(kernels.LinearPlan()))
    assert isinstance(restored, kernels.LinearPlan) and restored.fused is None


@needs_triton
def test_triton_plan_copies_empty():
    from codecllm_format.runtime import triton_kernels as tk

    plan = tk.LinearPlan()
    plan._w, plan._prev = ("not", "empty"), (("not", "empty"),)
    for dup in (copy.deepcopy(plan), pickle.loads(pickle.dumps(plan))):
        assert dup._w is None and dup._prev == () and dup.binds == 0


# ---------------------------------------------------------------------------------------------
# GPU: the real direct launch (CompiledKernel.run) against the normal launch.

needs_gpu = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()) or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs triton and a CUDA GPU (and no TRITON_INTERPRET)",
)
LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)]  # (out, in)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
def test_gpu_direct_launch_is_the_normal_launch_bit_for_bit(n, k, m):
    from codecllm_format.runtime import triton_kernels as tk

    tk.reset_launch_cache()
    bias = m != 4
    _, q, s, b = _inputs((m,), n, k, torch.bfloat16, bias, n + k + m, "cuda")
    plan = tk.LinearPlan()
    with torch.no_grad():
        x0 = _inputs((m,), n, k, torch.bfloat16, bias, 1, "cuda")[0]
        y0 = plan(x0, q, s, b)  # builds: normal launch, then the verified direct launch
        assert _same(y0, tk.int8_linear_triton(x0, q, s, b))
        e = plan.entry(x0)
        assert type(e).__name__ == "_Fast", f"direct launch not used: {tk.direct_launch_status()}"
        for seed in (2, 3):
            x = _inputs((m,), n, k, torch.bfloat16, bias, seed, "cuda")[0]
            y = plan(x, q, s, b)
            ref = tk.int8_linear_triton(x, q, s, b)  # Triton's normal launch path
            assert _same(y, ref), (n, k, m, seed)
        assert e.calls == 2
        # on another stream, and for a 3-D x of the same rows
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            x3 = _inputs((1, m), n, k, torch.bfloat16, bias, 4, "cuda")[0]
            y3 = plan(x3, q, s, b)
            ref3 = tk.int8_linear_triton(x3, q, s, b)
        torch.cuda.current_stream().wait_stream(side)
        assert _same(y3, ref3)
    assert tk.direct_launch_status() == (True, None)


@pytest.mark.gpu
@needs_gpu
def test_gpu_direct_launch_split_k_and_fp16():
    from codecllm_format.runtime import triton_kernels as tk

    tk.reset_launch_cache()
    for (m, n, k, dtype) in ((1, 256, 8192, torch.bfloat16), (3, 333, 4100, torch.float16), (24, 1000, 512, torch.float16)):
        _, q, s, b = _inputs((m,), n, k, dtype, True, n + k, "cuda")
        plan = tk.LinearPlan()
        with torch.no_grad():
            for seed in (1, 2, 3):
                x = _inputs((m,), n, k, dtype, True, seed, "cuda")[0]
                y = plan(x, q, s, b)
                assert _same(y, tk.int8_linear_triton(x, q, s, b)), (m, n, k, seed)
        e = plan.entry(x)
        assert type(e).__name__ == "_Fast" and e.calls == 2, tk.direct_launch_status()
    assert tk.direct_launch_status() == (True, None)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_direct_launch_on_a_device_that_is_not_current():
    """Modules on another GPU than the current one (device_map-style): built and launched under
    x's device, as the normal path does."""
    from codecllm_format.runtime import triton_kernels as tk

    tk.reset_launch_cache()
    torch.cuda.set_device(0)
    plans = {}
    with torch.no_grad():
        for dev in ("cuda:1", "cuda:0", "cuda:1"):
            _, q, s, b = _inputs((1,), 4096, 4096, torch.bfloat16, True, 7, dev)
            plan = plans.setdefault(dev, tk.LinearPlan())
            for seed in (1, 2):
                x = _inputs((1,), 4096, 4096, torch.bfloat16, True, seed, dev)[0]
                y = plan(x, q, s, b)
                assert y.device == x.device and _same(y, tk.int8_linear_triton(x, q, s, b)), (dev, seed)
            assert type(plan.entry(x)).__name__ == "_Fast", tk.direct_launch_status()
    assert torch.cuda.current_device() == 0
    assert tk.direct_launch_status() == (True, None)


@pytest.mark.gpu
@needs_gpu
def test_gpu_int8_linear_with_plan_matches_without():
    from codecllm_format.runtime import triton_kernels as tk

    tk.reset_launch_cache()
    x, q, s, b = _inputs((1, 1), 4096, 4096, torch.bfloat16, False, 9, "cuda")
    plan = kernels.LinearPlan()
    with torch.no_grad():
        ys = [kernels.int8_linear(x, q, s, b, plan=plan) for _ in range(3)]
    assert isinstance(plan.fused, tk.LinearPlan)
    ref = tk.int8_linear_triton(x, q, s, b)
    assert all(_same(y, ref) for y in ys)
    assert _same(kernels.int8_linear(x, q, s, b), ref)  # no plan: the shared entries


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        _interp_driver()
    else:
        sys.exit("usage: test_launch_plan.py --interp (run by the tests)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_direct_launch_with_group_scales(m):
    """int8_group scales take the direct launch too, bit for bit with the normal launch."""
    from codecllm_format.runtime import triton_kernels as tk

    tk.reset_launch_cache()
    n, k = 11008, 4096
    _, q, s, b = _inputs((m,), n, k, torch.bfloat16, True, 11, "cuda", group=128)
    plan = tk.LinearPlan()
    with torch.no_grad():
        for seed in (1, 2, 3):
            x = _inputs((m,), n, k, torch.bfloat16, True, seed, "cuda")[0]
            assert _same(plan(x, q, s, b), tk.int8_linear_triton(x, q, s, b)), seed
        e = plan.entry(x)
        assert type(e).__name__ == "_Fast" and e.calls == 2, tk.direct_launch_status()
