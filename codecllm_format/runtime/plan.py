"""Residency planning: which tier each layer group lives in, and what that costs in VRAM.

Pure Python over sizes from the index, so it is tested on the CPU. Tiers, fastest first:
  gpu             int8 weights decoded once at load and kept in VRAM (no per-forward decode)
  gpu-compressed  compressed chunks kept in VRAM, decoded into a slot every forward
  host            compressed chunks in pinned host RAM, copied + decoded every forward
  disk            chunks read from the memory-mapped file (page cache) every forward
Streaming tiers share `slots` reusable output buffers (decoded int8 + scales), each sized for
the largest streamed group, and the staged tiers (host, disk) up to STAGING_BUFFERS staging
buffers for the compressed bytes copied to the GPU, sized for the largest staged group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import CllmError

TIERS = ("gpu", "gpu-compressed", "host", "disk")
STREAMING_TIERS = ("gpu-compressed", "host", "disk")
STAGED_TIERS = ("host", "disk")
STAGING_BUFFERS = 2
"""Staging buffers are taken in turn, whatever the slots: copies run in order on one stream and
decodes in the same order on another, so the copy of the group two ahead only has to wait for
the decode of this one, long done by then. A third slot (prefetch two ahead) costs one more
output buffer, not one more staging buffer."""


@dataclass(frozen=True)
class GroupCost:
    """Sizes of one layer group's int8 payload."""

    gid: int
    name: str
    stored_bytes: int
    """Bytes of the group's byte range in the file (what is copied to the GPU)."""
    decoded_bytes: int
    """Bytes of its decoded int8 values and scales, as laid out in a slot."""


@dataclass
class ResidencyPlan:
    tiers: dict[int, str]
    slots: int
    staging_bytes: int
    """Each compressed staging buffer (0 when nothing is staged; see staging_buffers)."""
    slot_bytes: int
    """Per-slot decoded output buffer (0 when nothing streams)."""
    resident_bytes: int
    """VRAM held by gpu and gpu-compressed groups."""
    reserve_bytes: int
    names: dict[int, str] = field(default_factory=dict)
    scratch_bytes: int = 0
    """Fixed working buffers (the re-interleave buffer of lossless weights)."""
    decode_scratch_bytes: int = 0
    """nvCOMP's temporary memory for the decodes the chosen tiers run every forward."""

    @property
    def staging_buffers(self) -> int:
        """How many staging buffers the streaming slots share: one per slot, at most STAGING_BUFFERS."""
        return min(self.slots, STAGING_BUFFERS) if self.staging_bytes else 0

    @property
    def weight_vram(self) -> int:
        """Expected VRAM for weights: residents, slots, staging buffers, the fixed and the decode scratch."""
        return (self.resident_bytes + self.slots * self.slot_bytes + self.staging_buffers * self.staging_bytes
                + self.scratch_bytes + self.decode_scratch_bytes)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.tiers.values():
            counts[t] = counts.get(t, 0) + 1
        tiers = ", ".join(f"{n} {t}" for t, n in counts.items())
        mib = 1024 * 1024
        lines = [
            f"residency plan: {len(self.tiers)} layer groups: {tiers}",
            f"  expected weight VRAM {self.weight_vram / mib:.1f} MiB = resident {self.resident_bytes / mib:.1f} MiB"
            f" + {self.slots} slots x decoded {self.slot_bytes / mib:.1f} MiB"
            + (f" + {self.staging_buffers} x staging {self.staging_bytes / mib:.1f} MiB" if self.staging_buffers else "")
            + (f" + scratch {self.scratch_bytes / mib:.1f} MiB" if self.scratch_bytes else "")
            + (f" + decode scratch {self.decode_scratch_bytes / mib:.1f} MiB" if self.decode_scratch_bytes else "")
            + f"; reserved for KV cache/activations {self.reserve_bytes / mib:.1f} MiB",
        ]
        for gid, tier in self.tiers.items():
            lines.append(f"  {self.names.get(gid, gid)}: {tier}")
        return "\n".join(lines)


def parse_bytes(value: int | str | None) -> int | None:
    """'6GiB', '512MB', '1.5G', 123 -> bytes (None stays None)."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?)b?\s*", str(value).lower())
    if not m:
        raise CllmError(f"cannot read {value!r} as a size (examples: 6GiB, 512MB, 1.5G, 1000000)")
    num, unit, binary = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if binary or unit == "" else 1000
    scale = {"": 1, "k": base, "m": base**2, "g": base**3, "t": base**4}[unit]
    return int(num * scale)


def _streaming_cost(groups: list[GroupCost], tiers: dict[int, str], slots: int) -> tuple[int, int]:
    staged = [g.stored_bytes for g in groups if tiers[g.gid] in STAGED_TIERS]
    streamed = [g.decoded_bytes for g in groups if tiers[g.gid] in STREAMING_TIERS]
    return (max(staged) if staged else 0), (max(streamed) if streamed else 0)


def _resident(groups: list[GroupCost], tiers: dict[int, str]) -> int:
    total = 0
    for g in groups:
        if tiers[g.gid] == "gpu":
            total += g.decoded_bytes
        elif tiers[g.gid] == "gpu-compressed":
            total += g.stored_bytes
    return total


def plan_residency(
    groups: list[GroupCost],
    residency: str = "host",
    max_vram: int | str | None = None,
    *,
    slots: int = 2,
    reserve: int | str | None = None,
    scratch_bytes: int = 0,
    decode_scratch: dict[str, int] | None = None,
) -> ResidencyPlan:
    """Choose a tier for every group.

    Args:
        groups: the int8 layer groups, in file order.
        residency: one tier for all groups, or "auto" (needs max_vram) to fit a budget.
        max_vram: budget in bytes or a size string; with a fixed tier it is checked.
        slots: streaming buffers (2 = decode the next group while this one computes).
        reserve: VRAM kept free for the KV cache and activations (default: 10% of the
            budget, at least 256 MiB).
        scratch_bytes: fixed working VRAM the provider allocates whatever the tiers (counted in
            weight_vram, so budgets include it).
        decode_scratch: VRAM the decoder needs while a streaming tier decodes, by tier (e.g.
            nvCOMP's zstd scratch for "disk"); a plan counts the largest among the tiers it uses.

    Raises:
        CllmError: unknown tier, or the budget cannot hold even the streaming slots.
    """
    budget = parse_bytes(max_vram)
    if residency not in TIERS and residency != "auto":
        raise CllmError(f"residency must be one of {TIERS + ('auto',)}, got {residency!r}")
    if residency == "auto" and budget is None:
        raise CllmError('residency="auto" needs max_vram (e.g. max_vram="6GiB")')
    if slots < 1:
        raise CllmError(f"slots must be >= 1, got {slots}")
    reserve_bytes = parse_bytes(reserve) if reserve is not None else (
        max(256 * 1024 * 1024, budget // 10) if budget is not None else 0
    )
    names = {g.gid: g.name for g in groups}

    def make(tiers: dict[int, str]) -> ResidencyPlan:
        staging, slot = _streaming_cost(groups, tiers, slots)
        n_slots = slots if slot else 0
        used = {t for t in tiers.values() if t in STREAMING_TIERS}
        decode = max((decode_scratch or {}).get(t, 0) for t in used) if used else 0
        return ResidencyPlan(tiers, n_slots, staging, slot, _resident(groups, tiers), reserve_bytes, names,
                             scratch_bytes, decode)

    if residency != "auto":
        plan = make({g.gid: residency for g in groups})
        if budget is not None and plan.weight_vram + reserve_bytes > budget:
            raise CllmError(
                f'residency="{residency}" needs about {plan.weight_vram / 2**20:.0f} MiB of VRAM for weights plus '
                f"{reserve_bytes / 2**20:.0f} MiB reserve, over max_vram={budget / 2**20:.0f} MiB; "
                f'try residency="auto" or a streaming tier'
            )
        return plan

    # auto: everything on the GPU if it fits; else stream from host and upgrade, best value first.
    all_gpu = make({g.gid: "gpu" for g in groups})
    if all_gpu.weight_vram + reserve_bytes <= budget:
        return all_gpu
    tiers = {g.gid: "host" for g in groups}
    base = make(tiers)
    if base.weight_vram + reserve_bytes > budget:
        _shrink_slots(groups, tiers, make)  # a head much larger than a block: keep it, stream the rest
        base = make(tiers)
    if base.weight_vram + reserve_bytes > budget:
        raise CllmError(
            f"max_vram={budget / 2**20:.0f} MiB cannot hold even the streaming buffers "
            f"({base.weight_vram / 2**20:.0f} MiB with {slots} slots) plus the {reserve_bytes / 2**20:.0f} MiB reserve"
            + (" (fewer slots= need less)" if slots > 2 else "")
        )
    _upgrade_greedily(groups, tiers, make, lambda vram: vram + reserve_bytes <= budget)
    return make(tiers)


def _shrink_slots(groups: list[GroupCost], tiers: dict[int, str], make) -> None:
    """The smallest plan from all-host: while moving the group that sizes the slots (the
    largest streamed one) to the GPU shrinks the whole plan (every slot gets smaller by more
    than the group costs resident: an lm_head twice a block's size, with 3 slots), do it."""
    current = make(tiers).weight_vram
    while True:
        streamed = [g for g in groups if tiers[g.gid] in STREAMING_TIERS]
        if not streamed:
            return
        top_stored = max(g.stored_bytes for g in streamed)
        top_decoded = max(g.decoded_bytes for g in streamed)
        best = None
        for g in streamed:
            if g.stored_bytes < top_stored and g.decoded_bytes < top_decoded:
                continue  # sizes neither buffer
            for target in _UPGRADES[tiers[g.gid]]:
                tier = tiers[g.gid]
                tiers[g.gid] = target
                vram = make(tiers).weight_vram
                tiers[g.gid] = tier
                if vram < current and (best is None or vram < best[0]):
                    best = (vram, g.gid, target)
        if best is None:
            return
        current, gid, target = best
        tiers[gid] = target


PCIE_WEIGHT = 16
"""In "auto" planning, a byte no longer copied over PCIe per token counts as much as this many
bytes of decode work saved: pinned host->GPU runs at ~55 GB/s, nvCOMP ANS decodes ~900 GB/s of
output (H200, 2026-11-27), so leaving the host tier comes first."""

_UPGRADES = {"host": ("gpu-compressed", "gpu"), "gpu-compressed": ("gpu",), "gpu": ()}


def _upgrade_greedily(groups: list[GroupCost], tiers: dict[int, str], make, fits) -> None:
    """Move groups to faster tiers, best value per VRAM byte first, while the plan fits.

    Value of an upgrade: PCIE_WEIGHT x the group's stored bytes if it stops being copied per
    token, plus its decoded bytes if it stops being decoded per token. Cost: the change in the
    whole plan's weight VRAM, so that an upgrade which shrinks the streaming slots (the largest
    streamed group, often lm_head, sizes them all) is seen as cheap or free, and is taken first.
    Ties go to the first group in file order.
    """
    current = make(tiers).weight_vram
    while True:
        # Only the one group that sizes the slots, or the last of its tier (decode scratch is
        # per tier in use), changes more than the resident bytes: price those with a whole plan.
        staged = [g.stored_bytes for g in groups if tiers[g.gid] in STAGED_TIERS]
        streamed = [g.decoded_bytes for g in groups if tiers[g.gid] in STREAMING_TIERS]
        top_staged, top_streamed = max(staged, default=0), max(streamed, default=0)
        sole_staged = staged.count(top_staged) == 1  # only then can one move shrink the slots
        sole_streamed = streamed.count(top_streamed) == 1
        count: dict[str, int] = {}
        for t in tiers.values():
            count[t] = count.get(t, 0) + 1
        best = None
        for g in groups:
            tier = tiers[g.gid]
            for target in _UPGRADES[tier]:
                if ((sole_staged and tier in STAGED_TIERS and g.stored_bytes == top_staged)
                        or (sole_streamed and target == "gpu" and g.decoded_bytes == top_streamed)
                        or count[tier] == 1 or (target in STREAMING_TIERS and count.get(target, 0) == 0)):
                    tiers[g.gid] = target
                    vram = make(tiers).weight_vram
                    tiers[g.gid] = tier
                else:
                    vram = current + _resident_cost(g, target) - _resident_cost(g, tier)
                if not fits(vram):
                    continue
                value = (PCIE_WEIGHT * g.stored_bytes if tier in STAGED_TIERS else 0) + (
                    g.decoded_bytes if target == "gpu" else 0)
                score = value / max(vram - current, 1)  # free (or shrinking) upgrades first
                if best is None or score > best[0]:
                    best = (score, g.gid, target, vram)
        if best is None:
            return
        _, gid, target, current = best
        tiers[gid] = target


def _resident_cost(g: GroupCost, tier: str) -> int:
    return g.decoded_bytes if tier == "gpu" else g.stored_bytes if tier == "gpu-compressed" else 0
