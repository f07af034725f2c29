"""Device maps for the multi-GPU split, in plain Python (tested on the CPU): device_map and
max_vram parsing, the contiguous split planner, and each device's residency plan.

runtime/multi.py places a model with these and runs it (providers per device, hooks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Sequence

import torch

from ..errors import CllmError, DeviceError, LoadError
from .plan import GroupCost, ResidencyPlan, TIERS, parse_bytes, plan_residency

MiB = 1024 * 1024


# --- parsing the arguments (pure) ----------------------------------------------------------------


def parse_device_map(spec: Any, count: int, device: Any = None) -> list[torch.device]:
    """The CUDA devices of a device_map.

    Args:
        spec: "auto" (every visible GPU), a list/tuple of GPU indices or "cuda:N" strings /
            torch.devices, or a comma-separated string ("0,1", "cuda:0,cuda:1").
        count: how many CUDA devices this machine has.
        device: load()'s device argument: None or "cuda" (any other value conflicts).

    Returns:
        The devices, in pipeline order (first runs the embeddings, last the head).

    Raises:
        DeviceError: a device that is not a GPU or does not exist, duplicates, an empty map,
            a spec that cannot be read, or device= naming something else than "cuda".
    """
    if device is not None:
        d = str(device)
        if d != "cuda":
            raise DeviceError(
                f"device={d!r} conflicts with device_map={spec!r}: device_map splits the model over GPUs; "
                "leave device out (or pass device='cuda')"
            )
    if count < 1:
        raise DeviceError(f"device_map={spec!r} needs CUDA GPUs, and this machine has none visible")
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return [torch.device("cuda", i) for i in range(count)]
    if isinstance(spec, str):
        items: list = [s.strip() for s in spec.split(",")]
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise DeviceError(
            f"device_map={spec!r} is not understood: use 'auto', a list of GPUs ([0, 1], ['cuda:0', 'cuda:1']) "
            "or a string like '0,1'"
        )
    if not items or any(i == "" for i in items):
        raise DeviceError(f"device_map={spec!r} names no device (or has an empty entry)")
    devices = []
    for item in items:
        devices.append(_one_gpu(item, spec, count))
    seen = set()
    for d in devices:
        if d.index in seen:
            raise DeviceError(f"device_map={spec!r} names {d} twice")
        seen.add(d.index)
    return devices


def _one_gpu(item: Any, spec: Any, count: int) -> torch.device:
    if isinstance(item, bool):
        raise DeviceError(f"device_map={spec!r}: {item!r} is not a GPU")
    if isinstance(item, int):
        dev = torch.device("cuda", item) if item >= 0 else None
    else:
        text = str(item).strip()
        try:
            dev = torch.device("cuda", int(text)) if text.isdigit() else torch.device(text)
        except (RuntimeError, TypeError, ValueError):
            dev = None
    if dev is None:
        raise DeviceError(f"device_map={spec!r}: {item!r} is not a device (use GPU indices or 'cuda:N')")
    if dev.type != "cuda":
        raise DeviceError(f"device_map={spec!r}: {item!r} is not a GPU (device_map splits a model over CUDA devices)")
    if dev.index is None:
        raise DeviceError(f"device_map={spec!r}: {item!r} names no GPU index; use 'cuda:N' or N")
    if dev.index >= count:
        raise DeviceError(f"device_map={spec!r}: {dev} does not exist: this machine has {count} CUDA device(s)")
    return dev


def resolve_device_map(spec: Any, device: Any = None) -> list[torch.device]:
    """parse_device_map against this machine's GPUs.

    Raises:
        DeviceError: CUDA is not available, or what parse_device_map raises.
    """
    if not torch.cuda.is_available():
        parse_device_map(spec, 1 << 16, device)  # a spec that cannot be read says so first
        raise DeviceError(
            f"device_map={spec!r} needs CUDA GPUs, but CUDA is not available (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); load on one device instead (device='cpu')"
        )
    return parse_device_map(spec, torch.cuda.device_count(), device)


def parse_budgets(max_vram: Any, devices: Sequence[torch.device]) -> list[int | None]:
    """Per-device VRAM budgets from max_vram.

    Args:
        max_vram: None, one budget for every device (bytes or "20GiB"), a list/tuple with one
            budget per device (in device_map order), or a dict {GPU index / "cuda:N" /
            torch.device: budget} naming every device.
        devices: the devices of the device map.

    Returns:
        One budget in bytes (or None) per device.

    Raises:
        LoadError: wrong length, a device missing from or foreign to the dict, an unreadable size.
    """
    n = len(devices)
    try:
        if max_vram is None or isinstance(max_vram, (int, str)) and not isinstance(max_vram, bool):
            b = parse_bytes(max_vram)
            return [b] * n
        if isinstance(max_vram, (list, tuple)):
            if len(max_vram) != n:
                raise LoadError(
                    f"max_vram has {len(max_vram)} entries but device_map has {n} devices "
                    f"({', '.join(map(str, devices))}); give one budget per device"
                )
            return [parse_bytes(v) for v in max_vram]
        if isinstance(max_vram, dict):
            by_index: dict[int, Any] = {}
            for k, v in max_vram.items():
                if isinstance(k, bool):
                    raise LoadError(f"max_vram key {k!r} is not a GPU")
                if isinstance(k, int):
                    idx = k
                else:
                    text = str(k).strip()
                    try:
                        dev = torch.device("cuda", int(text)) if text.isdigit() else torch.device(text)
                    except (RuntimeError, TypeError, ValueError):
                        raise LoadError(f"max_vram key {k!r} is not a GPU (use N or 'cuda:N')") from None
                    if dev.type != "cuda" or dev.index is None:
                        raise LoadError(f"max_vram key {k!r} is not a GPU (use N or 'cuda:N')")
                    idx = dev.index
                if idx in by_index:
                    raise LoadError(f"max_vram names GPU {idx} twice")
                by_index[idx] = v
            wanted = {d.index for d in devices}
            extra = sorted(set(by_index) - wanted)
            missing = sorted(wanted - set(by_index))
            if extra or missing:
                parts = []
                if missing:
                    parts.append(f"no budget for GPU(s) {missing}")
                if extra:
                    parts.append(f"GPU(s) {extra} are not in the device map")
                raise LoadError(f"max_vram={max_vram!r}: " + "; ".join(parts))
            return [parse_bytes(by_index[d.index]) for d in devices]
    except LoadError:
        raise
    except CllmError as e:
        raise LoadError(f"max_vram: {e}") from None
    raise LoadError(f"max_vram={max_vram!r} is not understood: one size, a list per device, or a dict {{GPU: size}}")


def budgets_for(max_vram: Any, residency: str | None, devices: Sequence[torch.device]) -> list[int | None]:
    """parse_budgets, except that with neither max_vram nor a fixed residency each GPU's budget
    is its free memory now (torch.cuda.mem_get_info), as accelerate's device_map="auto" does."""
    budgets = parse_budgets(max_vram, devices)
    if max_vram is None and residency in (None, "auto") and all(d.type == "cuda" for d in devices):
        budgets = [int(torch.cuda.mem_get_info(d)[0]) for d in devices]
    return budgets


# --- the split planner (pure) --------------------------------------------------------------------


def split_blocks(
    sizes: Sequence[int],
    n_devices: int,
    capacities: Sequence[int] | None = None,
    fixed: Sequence[int] | None = None,
    *,
    enforce: bool = False,
    device_names: Sequence[str] | None = None,
) -> list[int]:
    """Assign blocks to devices contiguously (block order kept, every device gets at least one).

    Minimizes the largest (fixed[d] + sum of its blocks' sizes) / capacities[d] — with equal
    capacities, the most loaded device; with budgets, the fullest one relative to its budget.

    Args:
        sizes: bytes of each block, in forward order.
        n_devices: number of devices.
        capacities: bytes each device can give to blocks + fixed (None: equal shares).
        fixed: bytes already on each device (embeddings on the first, head on the last).
        enforce: also require fixed[d] + load[d] <= capacities[d] (a resident tier).
        device_names: for error messages.

    Returns:
        The device index of every block (non-decreasing).

    Raises:
        LoadError: fewer blocks than devices; with enforce, no split fits the capacities.
    """
    n = len(sizes)
    names = list(device_names or [f"device {d}" for d in range(n_devices)])
    if n_devices < 1:
        raise LoadError("a device map needs at least one device")
    if n < n_devices:
        raise LoadError(f"the model has {n} transformer block(s), fewer than the {n_devices} devices of the device map")
    if any(s < 0 for s in sizes):
        raise LoadError("block sizes must be >= 0")
    fixed = list(fixed) if fixed is not None else [0] * n_devices
    caps = list(capacities) if capacities is not None else [1] * n_devices
    if len(fixed) != n_devices or len(caps) != n_devices:
        raise LoadError("capacities and fixed need one entry per device")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + int(s))
    INF = None  # infeasible

    def cost(d: int, i: int, j: int):
        """Score of device d holding blocks i..j-1 (None: over its capacity with enforce)."""
        load = fixed[d] + prefix[j] - prefix[i]
        if enforce and load > caps[d]:
            return INF
        cap = caps[d] if caps[d] > 0 else Fraction(1, 10**9)  # a used-up budget: as few blocks as possible
        return Fraction(load, 1) / cap

    # best[d][i]: (score, previous cut) for the first i blocks on the first d+1 devices
    best: list[list[tuple[Fraction, int] | None]] = [[None] * (n + 1) for _ in range(n_devices)]
    for i in range(1, n - n_devices + 2):
        c = cost(0, 0, i)
        if c is not INF:
            best[0][i] = (c, 0)
    for d in range(1, n_devices):
        for i in range(d + 1, n - (n_devices - d - 1) + 1):
            choice = None
            for j in range(d, i):
                prev = best[d - 1][j]
                if prev is None:
                    continue
                c = cost(d, j, i)
                if c is INF:
                    continue
                score = max(prev[0], c)
                if choice is None or score < choice[0]:
                    choice = (score, j)
            best[d][i] = choice
    if best[n_devices - 1][n] is None:
        total = prefix[-1]
        avail = ", ".join(f"{names[d]} {max(caps[d] - fixed[d], 0) / MiB:.0f} MiB" for d in range(n_devices))
        raise LoadError(
            f"the {n} blocks ({total / MiB:.0f} MiB) cannot be split contiguously within the budgets "
            f"(room for blocks after reserve and embeddings/head: {avail}); raise max_vram or use a "
            f"streaming tier (residency='auto' or 'host')"
        )
    out = [0] * n
    i = n
    for d in range(n_devices - 1, -1, -1):
        entry = best[d][i]
        assert entry is not None
        j = entry[1]
        for k in range(j, i):
            out[k] = d
        i = j
    return out


@dataclass
class SplitPlan:
    """Where every block and int8 layer group goes, and each device's residency plan."""

    devices: list[str]
    block_names: list[str]
    block_device: list[int]
    group_device: dict[int, int]
    """Device index of every int8 layer group."""
    plans: list[ResidencyPlan]
    budgets: list[int | None]
    residency: str
    group_names: dict[int, str] = field(default_factory=dict)

    def groups_on(self, d: int) -> set[int]:
        return {g for g, dd in self.group_device.items() if dd == d}

    def summary(self) -> str:
        lines = [f"device map: {len(self.block_names)} blocks over {len(self.devices)} devices, residency {self.residency}"]
        for d, dev in enumerate(self.devices):
            idx = [i for i, bd in enumerate(self.block_device) if bd == d]
            blocks = f"{self.block_names[idx[0]]} .. {self.block_names[idx[-1]]} ({len(idx)} blocks)" if idx else "no blocks"
            p = self.plans[d]
            budget = f"max_vram {self.budgets[d] / MiB:.0f} MiB" if self.budgets[d] is not None else "no budget"
            lines.append(
                f"  {dev}: {blocks}; expected weight VRAM {p.weight_vram / MiB:.1f} MiB "
                f"(resident {p.resident_bytes / MiB:.1f} + {p.slots} slots x {p.slot_bytes / MiB:.1f} + {p.staging_buffers} "
                f"staging x {p.staging_bytes / MiB:.1f}), {budget}"
            )
        for g in sorted(self.group_device):
            d = self.group_device[g]
            lines.append(f"  {self.group_names.get(g, g)}: {self.devices[d]} {self.plans[d].tiers.get(g, '?')}")
        return "\n".join(lines)


def plan_split(
    blocks: Sequence[Sequence[GroupCost]],
    head: Sequence[GroupCost],
    tail: Sequence[GroupCost],
    devices: Sequence[str],
    residency: str | None = None,
    budgets: Sequence[int | None] | None = None,
    *,
    slots: int = 2,
    reserve: int | str | None = None,
    block_names: Sequence[str] | None = None,
) -> SplitPlan:
    """Split blocks over devices and plan each device's residency (no allocation: pure).

    Args:
        blocks: the int8 layer groups of each block, blocks in forward order.
        head: int8 groups that run before the blocks (embeddings): on the first device.
        tail: int8 groups that run after them (final head): on the last device.
        devices: device names (their number is what matters).
        residency: one tier for every device, or "auto"; None: "auto" with budgets, else "host".
        budgets: per-device max_vram in bytes (None entries: no budget).
        slots, reserve: as for plan_residency, per device.
        block_names: for the summary and errors.

    Returns:
        A SplitPlan; its per-device plans are what each device's GpuProvider will compute.

    Raises:
        LoadError: fewer blocks than devices, a split that cannot fit, a device whose budget cannot
            hold its plan (naming the device), an unknown tier.
    """
    n = len(devices)
    budgets = list(budgets) if budgets is not None else [None] * n
    if len(budgets) != n:
        raise LoadError(f"{len(budgets)} budgets for {n} devices")
    have_budgets = all(b is not None for b in budgets)
    if residency is None:
        residency = "auto" if have_budgets else "host"
    if residency not in TIERS and residency != "auto":
        raise LoadError(f"residency must be one of {TIERS + ('auto',)}, got {residency!r}")
    if residency == "auto" and not have_budgets:
        raise LoadError('residency="auto" over a device map needs a max_vram budget for every device')
    names = [f"block {i}" for i in range(len(blocks))] if block_names is None else list(block_names)
    sizes = [sum(g.decoded_bytes for g in b) for b in blocks]
    fixed = [0] * n
    fixed[0] += sum(g.decoded_bytes for g in head)
    fixed[-1] += sum(g.decoded_bytes for g in tail)
    capacities = None
    if have_budgets:
        capacities = []
        for b in budgets:
            r = parse_bytes(reserve) if reserve is not None else max(256 * MiB, b // 10)
            capacities.append(b - r)
    block_device = split_blocks(sizes, n, capacities, fixed, enforce=residency == "gpu" and have_budgets,
                                device_names=[str(d) for d in devices])
    group_device: dict[int, int] = {}
    group_names: dict[int, str] = {}

    def put(g: GroupCost, d: int, where: str) -> None:
        if group_device.get(g.gid, d) != d:
            raise LoadError(
                f"layer group {g.name!r} holds weights of {where} and of modules placed on another device; "
                "a device map needs one layer group per transformer block (as cllm-convert writes them)"
            )
        group_device[g.gid] = d
        group_names[g.gid] = g.name

    for g in head:
        put(g, 0, "the embeddings")
    for b, d in zip(blocks, block_device):
        for g in b:
            put(g, d, "a block")
    for g in tail:
        put(g, n - 1, "the head")
    costs = {g.gid: g for b in blocks for g in b} | {g.gid: g for g in head} | {g.gid: g for g in tail}
    plans = []
    for d in range(n):
        mine = [costs[g] for g in sorted(group_device) if group_device[g] == d]
        try:
            plans.append(plan_residency(mine, residency, budgets[d], slots=slots, reserve=reserve))
        except CllmError as e:
            raise LoadError(f"{devices[d]} ({sum(1 for x in block_device if x == d)} blocks): {e}") from None
    return SplitPlan([str(d) for d in devices], names, block_device, group_device, plans, budgets, residency, group_names)
