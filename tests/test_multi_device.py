"""Multi-device split (runtime/split.py, runtime/multi.py), on the CPU: device-map and budget parsing, the split
planner (against brute force), per-device plans, model placement, the activation-moving hooks
(a real cpu -> meta move), and the whole split code path on tiny models with two CPU "devices"
(logits and tokens bit-identical to the one-device load). The GPU run is tests/test_multi_gpu.py."""

from __future__ import annotations

import itertools
import os
import random
import sys
from fractions import Fraction

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import Recorder, make_folder, model_class  # noqa: E402

import codecllm_format as cf  # noqa: E402
from codecllm_format import DeviceError, LoadError  # noqa: E402
from codecllm_format import loader  # noqa: E402
from codecllm_format.convert import convert  # noqa: E402
from codecllm_format.runtime.multi import Placement, attach_device_hooks, move_to, place_model  # noqa: E402
from codecllm_format.runtime.split import (  # noqa: E402
    SplitPlan,
    parse_budgets,
    parse_device_map,
    plan_split,
    split_blocks,
)
from codecllm_format.runtime.plan import GroupCost  # noqa: E402
from codecllm_format.runtime.provider import CpuProvider  # noqa: E402

MiB = 1024 * 1024
CPU = torch.device("cpu")


def cuda(i):
    return torch.device("cuda", i)


# --- device_map / max_vram parsing -------------------------------------------------------------


def test_parse_device_map_accepts_the_documented_forms():
    assert parse_device_map("auto", 3) == [cuda(0), cuda(1), cuda(2)]
    assert parse_device_map(" AUTO ", 1) == [cuda(0)]
    assert parse_device_map("1,0", 2) == [cuda(1), cuda(0)]
    assert parse_device_map("cuda:0, cuda:1", 2) == [cuda(0), cuda(1)]
    assert parse_device_map([0, "cuda:1", torch.device("cuda", 2)], 3) == [cuda(0), cuda(1), cuda(2)]
    assert parse_device_map((1,), 2, device="cuda") == [cuda(1)]


@pytest.mark.parametrize(
    "spec,count,device,fragment",
    [
        ("0,2", 2, None, "cuda:2 does not exist: this machine has 2 CUDA device"),
        ([5], 2, None, "cuda:5 does not exist"),
        (["cpu", 0], 2, None, "'cpu' is not a GPU"),
        ("0,0", 2, None, "names cuda:0 twice"),
        ("", 2, None, "names no device"),
        ("0,", 2, None, "names no device"),
        ([], 2, None, "names no device"),
        (["cuda"], 2, None, "names no GPU index"),
        (["gpu0"], 2, None, "'gpu0' is not a device"),
        ([-1], 2, None, "-1 is not a device"),
        ([True], 2, None, "True is not a GPU"),
        (1.5, 2, None, "is not understood"),
        ({"a": 0}, 2, None, "is not understood"),
        ("auto", 0, None, "needs CUDA GPUs, and this machine has none"),
        ("auto", 2, "cpu", "device='cpu' conflicts with device_map='auto'"),
        ("0,1", 2, "cuda:1", "device='cuda:1' conflicts"),
    ],
)
def test_parse_device_map_refusals(spec, count, device, fragment):
    with pytest.raises(DeviceError) as ei:
        parse_device_map(spec, count, device)
    assert fragment in str(ei.value)


def test_parse_budgets():
    devs = [cuda(0), cuda(1)]
    assert parse_budgets(None, devs) == [None, None]
    assert parse_budgets("1GiB", devs) == [1024**3] * 2
    assert parse_budgets(5000, devs) == [5000, 5000]
    assert parse_budgets(["1GiB", 7], devs) == [1024**3, 7]
    assert parse_budgets({1: "2MiB", "cuda:0": "1MiB"}, devs) == [MiB, 2 * MiB]
    assert parse_budgets({"0": 1, torch.device("cuda", 1): 2}, devs) == [1, 2]
    for bad, fragment in [
        (["1GiB"], "max_vram has 1 entries but device_map has 2 devices"),
        ({0: "1GiB"}, "no budget for GPU(s) [1]"),
        ({0: 1, 1: 1, 2: 1}, "GPU(s) [2] are not in the device map"),
        ({0: 1, "cuda:0": 2, 1: 3}, "names GPU 0 twice"),
        ({"cpu": 1, 1: 1}, "'cpu' is not a GPU"),
        (["lots", 1], "cannot read 'lots' as a size"),
        (1.5, "is not understood"),
    ]:
        with pytest.raises(LoadError) as ei:
            parse_budgets(bad, devs)
        assert fragment in str(ei.value), (bad, str(ei.value))


# --- split planner -----------------------------------------------------------------------------


def _brute_force(sizes, n, caps, fixed, enforce):
    """Best score over every contiguous split (each device >= 1 block), or None."""
    best = None
    for cuts in itertools.combinations(range(1, len(sizes)), n - 1):
        bounds = (0, *cuts, len(sizes))
        score, ok = Fraction(0), True
        for d in range(n):
            load = fixed[d] + sum(sizes[bounds[d] : bounds[d + 1]])
            if enforce and load > caps[d]:
                ok = False
                break
            score = max(score, Fraction(load) / caps[d])
        if ok and (best is None or score < best):
            best = score
    return best


def _score(assign, sizes, caps, fixed):
    loads = list(fixed)
    for s, d in zip(sizes, assign):
        loads[d] += s
    return max(Fraction(loads[d]) / caps[d] for d in range(len(caps))), loads


def test_split_is_balanced_contiguous_and_optimal():
    assert split_blocks([10] * 32, 2) == [0] * 16 + [1] * 16
    assert split_blocks([10] * 7, 3).count(2) >= 2
    # embeddings on the first device, a bigger head on the last: the last device takes fewer blocks
    a = split_blocks([100] * 10, 2, fixed=[50, 350])
    assert a == [0] * 6 + [1] * 4
    # budgets 1:3 -> about a quarter of the blocks on the first device
    a = split_blocks([1] * 40, 2, capacities=[100, 300])
    assert a.count(0) == 10
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randint(1, 4)
        sizes = [rng.randint(0, 50) for _ in range(rng.randint(n, 9))]
        caps = [rng.randint(20, 200) for _ in range(n)]
        fixed = [rng.randint(0, 30) for _ in range(n)]
        enforce = rng.random() < 0.5
        want = _brute_force(sizes, n, caps, fixed, enforce)
        if want is None:
            with pytest.raises(LoadError, match="cannot be split contiguously within the budgets"):
                split_blocks(sizes, n, caps, fixed, enforce=enforce)
            continue
        got = split_blocks(sizes, n, caps, fixed, enforce=enforce)
        assert len(got) == len(sizes)
        assert got == sorted(got) and set(got) == set(range(n)), got  # contiguous, every device used
        score, loads = _score(got, sizes, caps, fixed)
        assert score == want, (sizes, caps, fixed, got)
        if enforce:
            assert all(loads[d] <= caps[d] for d in range(n))


def test_split_refusals_name_the_problem():
    with pytest.raises(LoadError, match="has 1 transformer block.*fewer than the 2 devices"):
        split_blocks([5], 2)
    with pytest.raises(LoadError) as ei:
        split_blocks([100 * MiB] * 4, 2, capacities=[150 * MiB, 150 * MiB], enforce=True, device_names=["cuda:0", "cuda:1"])
    msg = str(ei.value)
    assert "the 4 blocks (400 MiB)" in msg and "cuda:0 150 MiB, cuda:1 150 MiB" in msg and "streaming tier" in msg


def _blocks(n=8, stored=70 * MiB, decoded=100 * MiB):
    return [[GroupCost(i + 1, f"model.layers.{i}", stored, decoded)] for i in range(n)]


def test_plan_split_per_device_plans():
    head = [GroupCost(0, "model", 30 * MiB, 40 * MiB)]
    tail = [GroupCost(9, "lm_head", 30 * MiB, 40 * MiB)]
    # resident: 8 x 100 MiB does not fit one 600 MiB GPU but fits two
    p = plan_split(_blocks(), head, tail, ["cuda:0", "cuda:1"], "gpu", [600 * MiB, 600 * MiB], reserve=0)
    assert p.block_device == [0] * 4 + [1] * 4
    assert p.group_device[0] == 0 and p.group_device[9] == 1
    assert p.plans[0].tiers == {0: "gpu", 1: "gpu", 2: "gpu", 3: "gpu", 4: "gpu"}
    assert all(pl.weight_vram <= 600 * MiB for pl in p.plans)
    text = p.summary()
    assert "model.layers.5: cuda:1 gpu" in text and "model: cuda:0 gpu" in text and "lm_head: cuda:1 gpu" in text
    # unequal budgets: the split follows them
    p = plan_split(_blocks(), head, tail, ["cuda:0", "cuda:1"], "gpu", [300 * MiB, 900 * MiB], reserve=0)
    assert p.block_device.count(0) == 2
    # auto with budgets: all resident when the split fits, else every device fills what it can
    p = plan_split(_blocks(), head, tail, ["cuda:0", "cuda:1"], None, [500 * MiB, 500 * MiB], reserve=0)
    assert p.residency == "auto" and all(set(pl.tiers.values()) == {"gpu"} for pl in p.plans)
    p = plan_split(_blocks(), head, tail, ["cuda:0", "cuda:1"], None, [400 * MiB, 400 * MiB], reserve=0)
    for pl in p.plans:
        assert pl.weight_vram <= 400 * MiB
        assert set(pl.tiers.values()) != {"gpu"} and "gpu" in set(pl.tiers.values()) | {"gpu-compressed"}
    # without budgets: host by default, balanced
    p = plan_split(_blocks(), head, tail, ["a", "b"])
    assert p.residency == "host" and p.block_device == [0] * 4 + [1] * 4
    with pytest.raises(LoadError, match="cannot be split contiguously"):
        plan_split(_blocks(), head, tail, ["cuda:0", "cuda:1"], "gpu", [350 * MiB, 350 * MiB], reserve=0)
    with pytest.raises(LoadError, match=r"cuda:1 \(1 blocks\): max_vram=100 MiB cannot hold even the streaming buffers"):
        plan_split(_blocks(), head, tail, ["cuda:0", "cuda:1"], "auto", [1000 * MiB, 100 * MiB], reserve=0)
    with pytest.raises(LoadError, match="needs a max_vram budget for every device"):
        plan_split(_blocks(), head, tail, ["cuda:0", "cuda:1"], "auto", [1000 * MiB, None])
    with pytest.raises(LoadError, match="residency must be one of"):
        plan_split(_blocks(), head, tail, ["cuda:0", "cuda:1"], "vram")


def test_auto_split_keeps_every_group_on_one_device_and_uses_both_budgets():
    p = plan_split(_blocks(), [], [], ["cuda:0", "cuda:1"], "auto", [700 * MiB, 700 * MiB], reserve=0)
    tiers = [p.plans[p.group_device[g]].tiers[g] for g in sorted(p.group_device)]
    assert tiers.count("gpu") >= 8  # (700 - 2 slots) per device holds most blocks resident
    for d in (0, 1):
        assert set(p.plans[d].tiers) == p.groups_on(d)


# --- the moving hooks, with a real device change (cpu -> meta) ---------------------------------


class _Seen(nn.Module):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def forward(self, x, shared=None, pair=None, cache=None):
        self.log.append((x.device, shared.device, pair[0].device, id(shared), cache))
        return x * 2 + shared.sum()


class _Toy(nn.Module):
    def __init__(self, log):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.layers = nn.ModuleList([_Seen(log) for _ in range(4)])
        self.norm = nn.LayerNorm(3)

    def forward(self, ids):
        x = self.embed(ids)
        shared = torch.ones(2)
        for layer in self.layers:
            x = layer(x, shared=shared, pair=(shared, shared), cache=self)
        return x


def test_hooks_move_arguments_to_each_block_device():
    log = []
    model = _Toy(log)
    meta = torch.device("meta")
    model.norm.to(meta)
    blocks = ["layers.0", "layers.1", "layers.2", "layers.3"]
    split = SplitPlan(["cpu", "meta"], blocks, [0, 0, 1, 1], {}, [], [None, None], "host")
    placement = Placement([CPU, meta], split, blocks, dict(zip(blocks, [CPU, CPU, meta, meta])), {"embed"}, {})
    assert placement.device_of("layers.2.x") == meta and placement.device_of("embed.weight") == CPU
    assert placement.module_device("norm") == meta and placement.module_device("") == CPU
    handles = attach_device_hooks(model, placement)
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.device == meta  # the last block's output; the norm was not called
    assert [e[:3] for e in log] == [(CPU, CPU, CPU)] * 2 + [(meta, meta, meta)] * 2
    assert log[2][3] == log[3][3]  # the tensor shared by blocks 2 and 3 moved once
    assert all(e[4] is model for e in log)  # non-tensors untouched
    y = model.norm(torch.zeros(1, 3))  # a module outside the blocks gets its input moved to its tensors
    assert y.device == meta
    for h in handles:
        h.remove()
    log.clear()
    model(torch.tensor([[1]]))
    assert {e[0] for e in log} == {CPU}


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "mistral", "qwen2", "gpt2", "bert"])
def test_real_blocks_run_split_over_two_devices(arch, tmp_path):
    """place_model's decisions + the hooks on real transformers blocks: the second device is
    'meta', where any tensor left on the CPU makes an op fail. Logits land where the head is,
    each layer's KV cache on its block's device, and a cached second step runs too. (A head
    tied to the embeddings runs on the first device, and nothing comes back from meta: for
    those the forward is not run, only where the head is.)"""
    import json

    folder = tmp_path / arch
    make_folder(arch, folder)
    path = tmp_path / f"{arch}.cllm"
    convert(folder, path, chunk_size=4096)
    meta = torch.device("meta")
    with cf.open(path) as f:
        from transformers import AutoConfig

        config = AutoConfig.for_model(**json.loads(f.read_file("config.json")))
        torch.manual_seed(0)
        model = model_class(arch).from_config(config, dtype=torch.float32).eval()
        slots, _ = loader._model_slots(model)
        _, to_model = loader._prefix_mapping(model, slots.keys(), set(f.keys()))
        pl = place_model(model, f, to_model, [CPU, meta])
    ids = torch.randint(4, 30, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
    moved: set[int] = set()
    for mname, mod in model.named_modules():  # like the loader: a shared tensor goes where it is first met
        for store in (mod._parameters, mod._buffers):
            for leaf, t in list(store.items()):
                if t is None or id(t) in moved:
                    continue
                moved.add(id(t))
                dev = pl.device_of(f"{mname}.{leaf}" if mname else leaf)
                new = t.to(dev)
                new = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
                moved.add(id(new))
                for m2 in model.modules():  # every owner of the shared tensor
                    for s2 in (m2._parameters, m2._buffers):
                        for k2, v2 in list(s2.items()):
                            if v2 is t:
                                s2[k2] = new
    assert pl.split.block_device == [0, 1]
    head = model.get_output_embeddings()
    if arch in ("llama-tied", "gpt2"):
        assert head is not None and head.weight.device == CPU
        return
    with pytest.raises(RuntimeError, match="device"):  # without the hooks the split cannot run
        with torch.no_grad():
            model(ids)
    handles = attach_device_hooks(model, pl)
    with torch.no_grad():
        out = model(ids, use_cache=True) if arch != "bert" else model(ids)
    if arch == "bert":
        assert out.last_hidden_state.device == meta
        return
    assert out.logits.device == meta and out.logits.shape == ref.logits.shape
    cache = out.past_key_values
    assert [layer.keys.device for layer in cache.layers] == [CPU, meta]
    with torch.no_grad():
        step = model(ids[:, :1], past_key_values=cache, use_cache=True)
    assert step.logits.device == meta and cache.get_seq_length() == ids.shape[1] + 1
    for h in handles:
        h.remove()


def test_move_to_nested_structures():
    from collections import namedtuple

    Pair = namedtuple("Pair", "a b")
    meta = torch.device("meta")
    t = torch.zeros(2)
    obj = {"x": (t, [t, None]), "p": Pair(t, 3), "s": "text"}
    cache: dict = {}
    out = move_to(obj, meta, cache)
    assert out["x"][0].device == meta and out["x"][1][0] is out["x"][0] and out["x"][1][1] is None
    assert isinstance(out["p"], Pair) and out["p"].a.device == meta and out["p"].b == 3 and out["s"] == "text"
    assert move_to(t, CPU) is t


# --- the whole split on tiny models, two CPU "devices" -------------------------------------------


def _split_factory(f, device, groups, **options):
    return CpuProvider(f, device=device, **options)


@pytest.fixture(scope="module", params=["llama", "llama-tied", "gpt2"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi") / request.param
    make_folder(request.param, folder)
    out = folder.parent / f"{request.param}.cllm"
    convert(folder, out, chunk_size=4096)
    return request.param, out


def test_split_path_on_cpu_matches_one_device(tiny):
    arch, path = tiny
    ids = torch.randint(4, 30, (2, 11), generator=torch.Generator().manual_seed(1))
    with cf.load(path, device="cpu", dtype=torch.float32) as one:
        ref = one(ids).logits
        ref_tokens = one.generate(ids[:1], max_new_tokens=12, do_sample=False)
    with loader._load_resolved(path, CPU, CpuProvider, torch.float32, devices=[CPU, CPU], factory=_split_factory) as m:
        pl = m.provider.placement
        assert len(pl.blocks) == 2 and pl.split.block_device == [0, 1]
        recs = [Recorder(p) for p in m.provider.providers]
        got = m(ids).logits
        assert torch.equal(got, ref)
        tokens = m.generate(ids[:1], max_new_tokens=12, do_sample=False)
        assert torch.equal(tokens, ref_tokens)
        names = [g.name for g in m.file.index.groups]
        for d, rec in enumerate(recs):
            owned = m.provider.plan.groups_on(d)
            for meth, arg in rec.events:
                gid = arg if meth in ("begin_group", "end_group") else m.file.entry(arg).group
                if gid in m.provider.plan.group_device:
                    assert gid in owned, (d, meth, names[gid])
            assert any(meth == "begin_group" for meth, _ in rec.events), d
        hooks_before = len(m._hooks)
        assert hooks_before > 0
        embed = next(n for n, mod in m.model.named_modules() if isinstance(mod, cf.loader.CompressedEmbedding))
        assert embed in pl.head_modules or any(embed.startswith(h + ".") for h in pl.head_modules)
        head = m.model.get_output_embeddings()
        head_group = head.group if hasattr(head, "group") else None
        if arch in ("llama-tied", "gpt2"):  # tied head: runs where the embedding table's group is
            assert pl.group_devices[head_group] == pl.devices[0]
        text = m.provider.plan.summary()
        assert "device map: 2 blocks over 2 devices" in text


def test_placement_of_a_llama(tmp_path):
    """Where each part goes, with distinct devices (planning only: nothing is allocated)."""
    make_folder("llama", tmp_path / "llama")
    path = tmp_path / "l.cllm"
    convert(tmp_path / "llama", path, chunk_size=4096)
    meta = torch.device("meta")
    with cf.open(path) as f:
        import json
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**json.loads(f.read_file("config.json")))
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        slots, _ = loader._model_slots(model)
        _, to_model = loader._prefix_mapping(model, slots.keys(), set(f.keys()))
        pl = place_model(model, f, to_model, [CPU, meta])
        assert pl.blocks == ["model.layers.0", "model.layers.1"]
        assert pl.device_of("model.embed_tokens.weight") == CPU
        assert pl.device_of("model.rotary_emb.inv_freq") == CPU
        assert pl.device_of("model.layers.0.input_layernorm.weight") == CPU
        assert pl.device_of("model.layers.1.mlp.up_proj.weight") == meta
        assert pl.device_of("model.norm.weight") == meta
        assert pl.device_of("lm_head.weight") == meta
        groups = {g.name: i for i, g in enumerate(f.index.groups)}
        assert pl.group_devices[groups["model"]] == CPU and pl.group_devices[groups["lm_head"]] == meta
        assert pl.hf_device_map() == {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
                                      "model.layers.0": "cpu", "model.layers.1": "meta"}
        with pytest.raises(LoadError, match="fewer than the 3 devices"):
            place_model(model, f, to_model, [CPU, CPU, CPU])


def test_load_refuses_device_maps_it_cannot_use(tmp_path):
    make_folder("llama", tmp_path / "llama")
    path = tmp_path / "l.cllm"
    convert(tmp_path / "llama", path, chunk_size=4096)
    with pytest.raises(DeviceError, match="device='cpu' conflicts with device_map"):
        cf.load(path, device="cpu", device_map="auto")
    with pytest.raises(DeviceError, match="is not understood"):
        cf.load(path, device_map=3.5)
    with pytest.raises(DeviceError, match="'cpu' is not a GPU"):
        cf.load(path, device_map=["cpu", "cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="needs CUDA GPUs, but CUDA is not available"):
            cf.load(path, device_map="auto")
    else:
        with pytest.raises(DeviceError, match="does not exist"):
            cf.load(path, device_map=[0, torch.cuda.device_count()])


def test_cli_device_map_arguments(tmp_path, capsys):
    from codecllm_format.cli import generate_main

    with pytest.raises(SystemExit):
        generate_main(["x.cllm", "hi", "--device-map", "0,1", "--device", "cpu"])
    assert "leave --device out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main(["x.cllm", "hi", "--residency", "gpu"])
    assert "need --device cuda or --device-map" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main(["x.cllm", "hi", "--slots", "3"])
    assert "need --device cuda or --device-map" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main(["x.cllm", "hi", "--device", "cuda", "--slots", "0"])
    assert "--slots must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        make_folder("llama", tmp_path / "llama")
        path = tmp_path / "l.cllm"
        convert(tmp_path / "llama", path, chunk_size=4096)
        capsys.readouterr()
        rc = generate_main([str(path), "paris", "--device-map", "auto", "--max-vram", "1GiB,2GiB"])
        err = capsys.readouterr().err
        assert rc == 1 and err.startswith("cllm-generate: error: ") and "CUDA is not available" in err
