"""Residency planning and decode layouts: pure functions over the index, tested on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import codecllm_format as cf
from codecllm_format.runtime.layout import SLOT_ALIGNMENT, build_layouts
from codecllm_format.errors import CllmError
from codecllm_format.runtime.plan import GroupCost, parse_bytes, plan_residency

MiB = 1024 * 1024


def _groups(n=8, stored=100 * MiB, decoded=120 * MiB):
    return [GroupCost(i, f"model.layers.{i}", stored, decoded) for i in range(n)]


def test_parse_bytes():
    assert parse_bytes("6GiB") == 6 * 1024**3
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5G") == int(1.5 * 10**9)
    assert parse_bytes(1234) == 1234
    assert parse_bytes(None) is None
    with pytest.raises(cf.CllmError, match="cannot read"):
        parse_bytes("lots")


@pytest.mark.parametrize("tier", ["gpu", "gpu-compressed", "host", "disk"])
def test_fixed_tier_costs(tier):
    p = plan_residency(_groups(), tier)
    assert set(p.tiers.values()) == {tier}
    if tier == "gpu":
        assert p.slots == 0 and p.resident_bytes == 8 * 120 * MiB
    elif tier == "gpu-compressed":
        assert p.staging_bytes == 0 and p.resident_bytes == 8 * 100 * MiB and p.slot_bytes == 120 * MiB
    else:
        assert p.resident_bytes == 0 and p.weight_vram == 2 * (100 + 120) * MiB


@pytest.mark.parametrize("slots", [1, 2, 3, 4])
def test_staging_buffers_are_shared_beyond_two_slots(slots):
    """One output buffer per slot, one staging buffer per slot up to two: a third slot costs a
    decoded buffer only (the copies and decodes run in order, see plan.STAGING_BUFFERS)."""
    p = plan_residency(_groups(), "host", slots=slots)
    assert p.slots == slots and p.staging_buffers == min(slots, 2)
    assert p.weight_vram == slots * 120 * MiB + min(slots, 2) * 100 * MiB
    g = plan_residency(_groups(), "gpu-compressed", slots=slots)
    assert g.staging_buffers == 0 and g.weight_vram == 8 * 100 * MiB + slots * 120 * MiB


def test_auto_prefers_fastest_tier_that_fits():
    groups = _groups()
    assert set(plan_residency(groups, "auto", max_vram=8 * 120 * MiB + 300 * MiB).tiers.values()) == {"gpu"}
    p = plan_residency(groups, "auto", max_vram=900 * MiB, reserve=0)
    assert p.weight_vram <= 900 * MiB
    assert "host" in p.tiers.values() or "gpu-compressed" in p.tiers.values()
    tight = plan_residency(groups, "auto", max_vram=2 * 220 * MiB, reserve=0)
    assert set(tight.tiers.values()) == {"host"}
    with pytest.raises(cf.CllmError, match="cannot hold even the streaming buffers"):
        plan_residency(groups, "auto", max_vram=100 * MiB, reserve=0)


def test_auto_keeps_a_large_head_when_that_is_what_lets_the_slots_fit():
    """TinyLlama's proportions: 22 blocks (stored 39, decoded 44 MiB) and an lm_head of 57 / 66
    MiB. With 3 slots (and 2 staging buffers), all-host needs 3 x 66 + 2 x 57 = 312 MiB; the head
    on the GPU (66 MiB) shrinks every buffer to a block's: 66 + 3 x 44 + 2 x 39 = 276 MiB. A
    300 MiB budget is refused by the first plan and held by the second (the head resident, the
    blocks streamed)."""
    groups = _groups(22, 39 * MiB, 44 * MiB) + [GroupCost(22, "lm_head", 57 * MiB, 66 * MiB)]
    p = plan_residency(groups, "auto", max_vram=300 * MiB, reserve=0, slots=3)
    assert p.tiers[22] == "gpu" and p.weight_vram <= 300 * MiB
    assert sum(t == "host" for t in p.tiers.values()) >= 21
    assert p.slot_bytes == 44 * MiB and p.staging_bytes == 39 * MiB and p.staging_buffers == 2
    with pytest.raises(cf.CllmError, match="cannot hold even the streaming buffers.*with 3 slots.*fewer slots"):
        plan_residency(groups, "auto", max_vram=270 * MiB, reserve=0, slots=3)
    # blocks of one size: moving one to the GPU shrinks nothing, so nothing moves before the budget check
    assert plan_residency(_groups(), "auto", max_vram=2 * 220 * MiB, reserve=0).tiers == {i: "host" for i in range(8)}


def test_budget_checks_and_bad_options():
    with pytest.raises(cf.CllmError, match="over max_vram"):
        plan_residency(_groups(), "gpu", max_vram="500MiB")
    with pytest.raises(cf.CllmError, match="residency must be one of"):
        plan_residency(_groups(), "vram")
    with pytest.raises(cf.CllmError, match="needs max_vram"):
        plan_residency(_groups(), "auto")


def test_layout_maps_every_int8_chunk(tmp_path):
    path = tmp_path / "m.cllm"
    g = torch.Generator().manual_seed(1)
    with cf.CllmWriter(path, chunk_size=4096) as w:
        w.begin_group("model.layers.0")
        w.add_tensor("model.layers.0.a.weight", torch.randn(100, 300, generator=g), cf.Encoding.INT8_ROW)
        w.add_tensor("model.layers.0.norm.weight", torch.randn(300, generator=g))
        w.add_tensor("model.layers.0.b.weight", torch.randn(70, 129, generator=g), cf.Encoding.INT8_ROW)
        w.finish()
    with cf.open(path) as f:
        (lay,) = build_layouts(f.index).values()
        group = bytes(f.group_bytes(0))
        # decode the layout on the CPU exactly as the GPU would, and compare with get_raw
        import zstandard

        out = bytearray(lay.decoded_bytes)
        for off, size, o_off, o_size in zip(lay.in_offsets, lay.in_sizes, lay.out_offsets, lay.out_sizes):
            out[o_off : o_off + o_size] = zstandard.ZstdDecompressor().decompress(group[off : off + size])
        buf = torch.frombuffer(out, dtype=torch.uint8)
        for name, sl in lay.tensors.items():
            assert sl.q_offset % SLOT_ALIGNMENT == 0 and sl.scale_offset % SLOT_ALIGNMENT == 0
            rows, cols = sl.shape
            raw = f.get_raw(name)
            assert torch.equal(buf[sl.q_offset : sl.q_offset + rows * cols].view(torch.int8).view(rows, cols), raw.data)
            assert torch.equal(buf[sl.scale_offset : sl.scale_offset + 4 * rows].view(torch.float32), raw.scales)
        assert "model.layers.0.norm.weight" not in lay.tensors
        assert np.all(np.diff(lay.out_offsets) > 0)
        # the CPU fill (row tables decoded at load without the GPU) lands the same tensors
        from codecllm_format.runtime.layout import fill_on_cpu, slice_views
        from codecllm_format.runtime.provider import CpuProvider

        filled = torch.full((lay.decoded_bytes,), 0xAB, dtype=torch.uint8)
        fill_on_cpu(CpuProvider(f), lay, filled)
        for sl in lay.tensors.values():
            for a, b in zip(slice_views(filled, sl), slice_views(buf, sl)):
                assert torch.equal(a, b)


@pytest.mark.parametrize("limit", [4096, 10000, 3 * 4096, 1 << 20])
def test_merged_chunks_cover_the_same_bytes(tmp_path, limit):
    """In-memory copies may merge a group's chunks (fewer chunks per nvCOMP call): the merged
    chunks must decode to exactly the bytes the file's chunks fill, never bridge an alignment gap,
    and stay within the limit."""
    from codecllm_format.runtime.nvcomp_decoder import merge_chunks

    path = tmp_path / "m.cllm"
    g = torch.Generator().manual_seed(2)
    with cf.CllmWriter(path, chunk_size=4096) as w:
        w.begin_group("model.layers.0")
        w.add_tensor("model.layers.0.a.weight", torch.randn(100, 300, generator=g), cf.Encoding.INT8_ROW)
        w.add_tensor("model.layers.0.b.weight", torch.randn(70, 129, generator=g), cf.Encoding.INT8_ROW)
        w.finish()
    with cf.open(path) as f:
        (lay,) = build_layouts(f.index).values()
    offsets, sizes = merge_chunks(lay.out_offsets, lay.out_sizes, limit)
    def covered(o, n):
        mask = np.zeros(lay.decoded_bytes, dtype=bool)
        for a, b in zip(o.tolist(), n.tolist()):
            assert not mask[a : a + b].any()  # no overlap
            mask[a : a + b] = True
        return mask
    assert np.array_equal(covered(offsets, sizes), covered(lay.out_offsets, lay.out_sizes))
    originals = set(zip(lay.out_offsets.tolist(), lay.out_sizes.tolist()))
    assert all(n <= limit or (o, n) in originals for o, n in zip(offsets.tolist(), sizes.tolist()))
    assert len(offsets) <= len(lay.out_offsets)
    if limit >= 1 << 20:  # one merged chunk per run of touching chunks: here one per stream
        assert len(offsets) == sum(len(t.streams) for t in f.index.tensors if t.group == 0)
    if limit == 4096:
        assert np.array_equal(offsets, lay.out_offsets) and np.array_equal(sizes, lay.out_sizes)


def test_gpu_gate_refuses_bad_frames_before_the_gpu(tmp_path):
    """verify_group (CPU side of the GPU runtime) checks checksums AND frame structure: a chunk
    whose checksum was recomputed but whose frame declares another size never reaches nvCOMP."""
    import zstandard
    import xxhash

    from codecllm_format.runtime.gpu import verify_group

    path = tmp_path / "m.cllm"
    g = torch.Generator().manual_seed(2)
    with cf.CllmWriter(path, chunk_size=4096) as w:
        w.begin_group("model.layers.0")
        w.add_tensor("model.layers.0.a.weight", torch.randn(64, 256, generator=g), cf.Encoding.INT8_ROW)
        w.finish()
    with cf.open(path) as f:
        (lay,) = build_layouts(f.index).values()
        good = bytearray(f.group_bytes(0))
        verify_group(f, lay, memoryview(good))  # sound
        off, size = int(lay.in_offsets[1]), int(lay.in_sizes[1])
        # a frame of the same stored length whose header declares one byte less
        frame = zstandard.ZstdCompressor(level=1).compress(bytes(4095))
        bad = bytearray(good)
        bad[off : off + len(frame)] = frame
        sums = lay.checksums.copy()
        sums[1] = xxhash.xxh3_64_intdigest(bytes(bad[off : off + size]))
        import dataclasses

        lay2 = dataclasses.replace(lay, checksums=sums)
        with pytest.raises(cf.DecodeError, match=r"chunk 1 .*declares 4095 decoded bytes"):
            verify_group(f, lay2, memoryview(bad))
        flipped = bytearray(good)
        flipped[off + 3] ^= 1
        with pytest.raises(cf.ChecksumError, match="refusing to send it to the GPU"):
            verify_group(f, lay, memoryview(flipped))


def test_decode_scratch_counts_for_the_tiers_in_use():
    """nvCOMP's scratch for per-forward decodes is part of weight_vram for the streaming tiers a
    plan uses (the largest of them), and budgets include it; an all-gpu plan needs none."""
    groups = _groups()
    scratch = {"disk": 300 * MiB, "host": 2 * MiB, "gpu-compressed": 2 * MiB}
    disk = plan_residency(groups, "disk", decode_scratch=scratch)
    plain = plan_residency(groups, "disk")
    assert disk.decode_scratch_bytes == 300 * MiB
    assert disk.weight_vram == plain.weight_vram + 300 * MiB
    assert "decode scratch 300.0 MiB" in disk.summary()
    assert plan_residency(groups, "gpu", decode_scratch=scratch).decode_scratch_bytes == 0
    assert plan_residency(groups, "host", decode_scratch=scratch).decode_scratch_bytes == 2 * MiB
    with pytest.raises(CllmError, match="needs about"):
        plan_residency(groups, "disk", max_vram=plain.weight_vram + plain.reserve_bytes + MiB,
                       reserve=plain.reserve_bytes, decode_scratch=scratch)
    auto = plan_residency(groups, "auto", max_vram="100GiB", decode_scratch=scratch)
    assert set(auto.tiers.values()) == {"gpu"} and auto.decode_scratch_bytes == 0
    tight = plan_residency(groups, "auto", max_vram="1GiB", reserve="100MiB", decode_scratch=scratch)
    assert "host" in tight.tiers.values() and tight.decode_scratch_bytes == 2 * MiB
    assert tight.weight_vram + tight.reserve_bytes <= 2**30


def test_scratch_counts_toward_the_budget():
    """A provider's fixed scratch (the lossless re-interleave buffer) is part of weight_vram, so
    a budget that fits the plan without it can refuse it, and auto picks slower tiers."""
    groups = [GroupCost(i, f"layers.{i}", 90 * MiB, 100 * MiB) for i in range(4)]
    plain = plan_residency(groups, "gpu", reserve=0)
    with_scratch = plan_residency(groups, "gpu", reserve=0, scratch_bytes=64 * MiB)
    assert with_scratch.weight_vram == plain.weight_vram + 64 * MiB
    assert "scratch 64.0 MiB" in with_scratch.summary()
    plan_residency(groups, "gpu", max_vram=plain.weight_vram, reserve=0)
    with pytest.raises(CllmError, match="needs about"):
        plan_residency(groups, "gpu", max_vram=plain.weight_vram, reserve=0, scratch_bytes=64 * MiB)
    # all-gpu needs 400 + 64 MiB; streaming everything 2 x (90 + 100) + 64 = 444 MiB
    auto = plan_residency(groups, "auto", max_vram=450 * MiB, reserve=0, scratch_bytes=64 * MiB)
    assert set(auto.tiers.values()) != {"gpu"} and auto.weight_vram <= 450 * MiB
    assert plan_residency(groups, "auto", max_vram=450 * MiB, reserve=0).tiers == plain.tiers


def test_auto_takes_the_upgrade_that_shrinks_the_slots_first():
    """The largest streamed group sizes every slot: holding it resident can free more VRAM than it
    takes, and the budget then keeps more blocks off PCIe than upgrading in file order would."""
    blocks = [GroupCost(i, f"model.layers.{i}", 30 * MiB, 40 * MiB) for i in range(10)]
    head = GroupCost(10, "lm_head", 50 * MiB, 66 * MiB)
    groups = blocks + [head]
    base = plan_residency(groups, "host")
    assert base.weight_vram == 2 * (50 + 66) * MiB
    budget = base.weight_vram + 40 * MiB
    p = plan_residency(groups, "auto", max_vram=budget, reserve=0)
    assert p.weight_vram <= budget
    # lm_head resident (66 MiB) shrinks two slots from 116 to 70 MiB: VRAM drops by 26 MiB;
    # the 66 MiB left then hold two blocks compressed
    assert p.tiers[10] == "gpu"
    assert sorted(p.tiers.values()).count("gpu-compressed") == 2
    streamed = sum(g.stored_bytes for g in groups if p.tiers[g.gid] == "host")
    assert streamed == 8 * 30 * MiB  # upgrading in file order would stream 9 blocks + lm_head


def test_auto_planning_prices_moves_like_whole_plans_and_stays_cheap(monkeypatch):
    """The planner prices most moves by their resident bytes alone: it must choose exactly what
    pricing every move with a whole plan chooses, and price few moves wholly on a 160-block model."""
    import random

    from codecllm_format.runtime import plan as plan_mod

    def reference(groups, budget, reserve, scratch):
        tiers = {g.gid: "host" for g in groups}

        def weight_vram(t):  # ResidencyPlan.weight_vram, from scratch
            staging, slot = plan_mod._streaming_cost(groups, t, 2)
            used = [scratch.get(x, 0) for x in t.values() if x in plan_mod.STREAMING_TIERS]
            return plan_mod._resident(groups, t) + (2 * (staging + slot) if slot else 0) + max(used, default=0)

        current = weight_vram(tiers)
        while True:
            best = None
            for g in groups:
                tier = tiers[g.gid]
                for target in plan_mod._UPGRADES[tier]:
                    tiers[g.gid] = target
                    vram = weight_vram(tiers)
                    tiers[g.gid] = tier
                    if vram + reserve > budget:
                        continue
                    value = (plan_mod.PCIE_WEIGHT * g.stored_bytes if tier in plan_mod.STAGED_TIERS else 0) + (
                        g.decoded_bytes if target == "gpu" else 0)
                    score = value / max(vram - current, 1)
                    if best is None or score > best[0]:
                        best = (score, g.gid, target, vram)
            if best is None:
                return tiers
            _, gid, target, current = best
            tiers[gid] = target

    rng = random.Random(7)
    scratch = {"gpu-compressed": 10 * MiB, "host": 40 * MiB}
    for trial in range(90):
        n = rng.randint(2, 14)
        # odd trials: equal decoded sizes and few distinct stored ones (ties at the slot sizes)
        groups = [GroupCost(i, f"g{i}", rng.randint(20, 24 if trial % 2 else 60) * MiB, 0) for i in range(n)]
        groups = [GroupCost(g.gid, g.name, g.stored_bytes, 64 * MiB if trial % 2 else g.stored_bytes + rng.randint(1, 30) * MiB)
                  for g in groups]
        if trial % 3 == 0:  # a head larger than any block: it alone sizes the slots
            groups.append(GroupCost(n, "lm_head", 70 * MiB, 100 * MiB))
        base = plan_residency(groups, "host", decode_scratch=scratch)
        budget = base.weight_vram + rng.randint(0, 400) * MiB
        got = plan_residency(groups, "auto", max_vram=budget, reserve=0, decode_scratch=scratch)
        if set(got.tiers.values()) == {"gpu"}:
            continue
        assert got.tiers == reference(groups, budget, 0, scratch), trial

    groups = [GroupCost(i, f"model.layers.{i}", (180 + i % 37) * MiB, 260 * MiB) for i in range(160)]
    whole_plans = []
    streaming_cost = plan_mod._streaming_cost
    monkeypatch.setattr(plan_mod, "_streaming_cost", lambda *a: whole_plans.append(1) or streaming_cost(*a))
    p = plan_residency(groups, "auto", max_vram="20GiB", reserve="1GiB")
    # pricing every move wholly would build a plan per candidate per upgrade: ~30,000 here
    assert len(whole_plans) < 4 * len(groups)
    assert p.weight_vram + p.reserve_bytes <= 20 * 2**30
    assert "gpu-compressed" in p.tiers.values() and "host" in p.tiers.values()
