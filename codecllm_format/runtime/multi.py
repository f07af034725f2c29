"""Pipeline split over several GPUs: `load(path, device_map="auto" | [0, 1] | "0,1")`.

The transformer blocks are split contiguously over the devices (balanced by int8 bytes under each
device's budget); the embeddings go to the first device, the final norm and the head to the last
(a head tied to the embeddings runs where the embedding table is). Each device gets its own
GpuProvider owning only the layer groups placed on it — its own residency plan under its own
`max_vram`, its own slots, streams and prefetch — and a MultiDeviceProvider routes every
weight request and begin/end_group call to the provider that owns the group.

Activations move at block boundaries: a forward pre-hook on every decoder block (and on every
module outside the blocks that holds tensors) moves the tensors among its positional and keyword
arguments to the block's device and makes that device current for the block's forward, as
accelerate's AlignDevicesHook does. Tensors shared by all blocks of one forward (rotary cos/sin,
masks, cache positions) are moved once per device per forward. transformers' DynamicCache
creates each layer's keys and values on the device of that layer's key states, so the KV cache
of every layer lives on its layer's device.

The runtime moves tensors with torch's peer copies (no NCCL). Pure parts — device map parsing,
budgets, the split planner — are plain Python and tested on the CPU; the model placement and the
hooks take devices as parameters and run on the CPU too (with "cpu" for every device).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import constants as C
from ..errors import CllmError, DeviceError, LoadError
from .layout import build_layouts
from .modules import CompressedEmbedding, CompressedLinear
from .plan import GroupCost, ResidencyPlan, TIERS, parse_bytes, plan_residency

log = logging.getLogger("codecllm_format.runtime")

MiB = 1024 * 1024

BLOCK_NAME = re.compile(r"^(?:.*\.)?(?:layers|layer|h|blocks|block)\.\d+$")
"""Module names of transformer blocks (children of a ModuleList), as the converter groups them."""

HEAD_NAME = re.compile(r"(?:^|\.)[^.]*(?:rotary|rope)[^.]*$", re.IGNORECASE)
"""Rotary tables outside the blocks are computed before them even when registered after them
(Llama's model.rotary_emb): first device, with the embeddings and whatever is registered before
the first block. (Placement only matters for speed: every module's inputs are moved to it.)"""


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
                f"(resident {p.resident_bytes / MiB:.1f} + {p.slots} slots x {(p.staging_bytes + p.slot_bytes) / MiB:.1f}), {budget}"
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


# --- placing a model -----------------------------------------------------------------------------


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks (children of ModuleLists named like layers.N / h.N /
    blocks.N), in registration order (= forward order for decoder stacks)."""
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList):
            continue
        for cname in mod._modules:
            full = f"{name}.{cname}" if name else cname
            if BLOCK_NAME.match(full) and not any(full.startswith(b + ".") for b in out):
                out.append(full)
    return out


def _inside(child: str, parent: str) -> bool:
    """Module `child` is `parent` or lies inside it ("" is the root, around everything)."""
    return child == parent or not parent or child.startswith(parent + ".")


@dataclass
class Placement:
    """Which device every part of a model runs on (see module docstring)."""

    devices: list[torch.device]
    split: SplitPlan
    blocks: list[str]
    block_devices: dict[str, torch.device]
    head_modules: set[str]
    """Modules outside the blocks that run before them (first device)."""
    group_positions: dict[int, int]
    """Every layer group's index in `devices` (int8 groups by the split, the rest by their modules)."""

    @property
    def group_devices(self) -> dict[int, torch.device]:
        return {g: self.devices[d] for g, d in self.group_positions.items()}

    def block_of(self, name: str) -> str | None:
        """The block holding module/tensor `name` (None: outside the blocks)."""
        # block names are like "model.layers.12": cut the name after that many components
        for b in self._block_set_by_depth():
            depth, names = b
            parts = name.split(".")
            if len(parts) >= depth and ".".join(parts[:depth]) in names:
                return ".".join(parts[:depth])
        return None

    def _block_set_by_depth(self):
        cache = getattr(self, "_depths", None)
        if cache is None:
            by: dict[int, set[str]] = {}
            for b in self.blocks:
                by.setdefault(b.count(".") + 1, set()).add(b)
            cache = self._depths = sorted(by.items())
        return cache

    def module_position(self, module_name: str) -> int:
        """Index in `devices` of a module by name: its block's, else first (head) or last (after
        the blocks)."""
        b = self.block_of(module_name)
        if b is not None:
            return self.split.block_device[self.blocks.index(b)]
        if any(_inside(module_name, h) for h in self.head_modules):
            return 0
        if any(_inside(b, module_name) for b in self.blocks):  # an ancestor of the blocks
            return 0
        return len(self.devices) - 1

    def module_device(self, module_name: str) -> torch.device:
        """Device of a module by name (see module_position)."""
        return self.devices[self.module_position(module_name)]

    def device_of(self, tensor_name: str) -> torch.device:
        """Device of a parameter / buffer by qualified name (its module's device)."""
        return self.module_device(tensor_name.rsplit(".", 1)[0] if "." in tensor_name else "")

    def hf_device_map(self) -> dict[str, Any]:
        """transformers' hf_device_map (module -> GPU index), so generate() knows the model is split."""
        def key(dev: torch.device):
            return dev.index if dev.type == "cuda" and dev.index is not None else str(dev)

        out: dict[str, Any] = {}
        for h in sorted(self.head_modules):
            out[h] = key(self.devices[0])
        for b in self.blocks:
            out[b] = key(self.block_devices[b])
        return out


def place_model(
    model: nn.Module,
    cllm,
    to_model: Callable[[str], str | None],
    devices: Sequence[torch.device],
    residency: str | None = None,
    budgets: Sequence[int | None] | None = None,
    *,
    slots: int = 2,
    reserve: int | str | None = None,
) -> Placement:
    """Plan where every part of `model` (still on the meta device) runs.

    Args:
        model: the transformers model built on meta.
        cllm: the open CllmFile.
        to_model: file tensor name -> model name (None: outside the model), as the loader maps them.
        devices: the devices, in pipeline order.
        residency, budgets, slots, reserve: see plan_split.

    Raises:
        LoadError: no transformer blocks, or what plan_split raises.
    """
    blocks = find_blocks(model)
    if not blocks:
        raise LoadError(
            f"{type(model).__name__} has no transformer blocks (a ModuleList of layers.N / h.N / blocks.N), "
            "so it cannot be split over devices; load it on one device"
        )
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    first_block = min(order[b] for b in blocks)
    head_modules = set()
    for name, mod in model.named_modules():
        if not name or any(_inside(name, b) for b in blocks) or any(_inside(b, name) for b in blocks):
            continue
        if isinstance(mod, nn.Embedding) or HEAD_NAME.search(name) or order[name] < first_block:
            head_modules.add(name)
    block_index = {b: i for i, b in enumerate(blocks)}
    probe = Placement([torch.device("meta")] * len(devices), None, blocks, {}, head_modules, {})  # type: ignore[arg-type]

    layouts = build_layouts(cllm.index)
    per_block: list[list[GroupCost]] = [[] for _ in blocks]
    head: dict[int, GroupCost] = {}
    tail: dict[int, GroupCost] = {}
    seen_block: dict[int, int] = {}
    for t in cllm.index.tensors:
        if t.encoding != C.Encoding.INT8_ROW or t.group not in layouts:
            continue
        m = to_model(t.name)
        if m is None:
            continue  # a head the model does not have: never asked for
        module = m.rsplit(".", 1)[0] if "." in m else ""
        cost = layouts[t.group].cost
        b = probe.block_of(module)
        if b is not None:
            bi = block_index[b]
            if seen_block.setdefault(t.group, bi) != bi:
                raise LoadError(
                    f"layer group {cost.name!r} holds weights of {blocks[seen_block[t.group]]} and {b}; a device map "
                    "needs one layer group per transformer block (as cllm-convert writes them)"
                )
            if all(g.gid != t.group for g in per_block[bi]):
                per_block[bi].append(cost)
        elif any(_inside(module, h) for h in head_modules):
            head[t.group] = cost
        else:
            tail[t.group] = cost
    for gid in set(head) | set(tail):
        if gid in seen_block:
            raise LoadError(
                f"layer group {layouts[gid].name!r} holds weights of a block and of modules outside the blocks; "
                "a device map needs one layer group per transformer block (as cllm-convert writes them)"
            )
    tail = {g: c for g, c in tail.items() if g not in head}  # a group serving both runs first
    split = plan_split(per_block, list(head.values()), list(tail.values()), [str(d) for d in devices], residency,
                       budgets, slots=slots, reserve=reserve, block_names=blocks)
    devs = list(devices)
    block_devices = {b: devs[d] for b, d in zip(blocks, split.block_device)}
    placement = Placement(devs, split, blocks, block_devices, head_modules, {})
    for gid, g in enumerate(cllm.index.groups):
        if gid in split.group_device:
            placement.group_positions[gid] = split.group_device[gid]
        else:  # no int8 tensors: routed by the module named like the group (nothing to serve)
            m = to_model(g.name)
            placement.group_positions[gid] = placement.module_position(m) if m is not None else 0
    return placement


# --- routing weight requests ---------------------------------------------------------------------


ProviderFactory = Callable[..., Any]
"""factory(cllm, device, groups, **options) -> a WeightProvider serving `groups` on `device`."""


def gpu_factory(cllm, device: torch.device, groups: set[int], **options):
    """A GpuProvider owning only `groups` (the layer groups placed on `device`)."""
    from .gpu import GpuProvider

    return GpuProvider(cllm, device=device, groups=groups, **options)


class MultiDeviceProvider:
    """WeightProvider over several devices: one provider per device, each owning the layer
    groups placed there; every call goes to the owner of the tensor's / group's layer group,
    with that provider's CUDA device current.

    Args:
        cllm: the open file.
        placement: from place_model.
        factory: builds one device's provider (gpu_factory, or CpuProvider for CPU tests).
        options: runtime options for every device's provider (codec=, slots=, verify=, ...);
            residency and max_vram come from the placement's per-device plan.

    Attributes:
        providers: one per device, in device_map order.
        plan: the SplitPlan (its summary lists device and tier per layer group).
    """

    def __init__(self, cllm, placement: Placement, factory: ProviderFactory = gpu_factory, options: dict | None = None):
        options = dict(options or {})
        verbose = bool(options.pop("verbose", False))
        self.device = placement.devices[0]
        self.devices = list(placement.devices)
        self.placement = placement
        self.plan = placement.split
        self.file = cllm
        self.providers: list = []
        try:
            for d, dev in enumerate(self.devices):
                extra = {}
                if dev.type == "cuda":
                    extra = {"residency": self.plan.residency, "max_vram": self.plan.budgets[d]}
                self.providers.append(factory(cllm, dev, self.plan.groups_on(d), **extra, **options))
        except BaseException:
            self.close()
            raise
        self._by_group = {g: self.providers[d] for g, d in placement.group_positions.items()}
        self._by_name: dict[str, Any] = {}
        for t in cllm.index.tensors:
            if t.encoding == C.Encoding.INT8_ROW and t.group in self._by_group:
                self._by_name[t.name] = self._by_group[t.group]
        for alias, target in cllm.index.aliases.items():
            if target in self._by_name:
                self._by_name[alias] = self._by_name[target]
        summary = self.plan.summary()
        codec = getattr(self.providers[0], "codec", None)
        if codec is not None:
            summary += f"\n  in-memory codec of host/gpu-compressed groups: {codec}"
        log.info(summary)
        if verbose:
            print(summary)

    @staticmethod
    def _current_ok(p) -> bool:
        dev = p.device
        return dev.type != "cuda" or torch.cuda.current_device() == dev.index

    def _owner(self, name: str):
        p = self._by_name.get(name)
        if p is None:
            raise LoadError(f"tensor {name!r} is not an int8 tensor of a layer group placed on a device")
        return p

    def linear_weight(self, name: str):
        p = self._owner(name)
        if self._current_ok(p):
            return p.linear_weight(name)
        with torch.cuda.device(p.device):
            return p.linear_weight(name)

    def embedding_rows(self, name: str, ids: torch.Tensor):
        p = self._owner(name)
        if self._current_ok(p):
            return p.embedding_rows(name, ids)
        with torch.cuda.device(p.device):
            return p.embedding_rows(name, ids)

    def begin_group(self, group: int) -> None:
        p = self._by_group.get(group)
        if p is None:
            return
        if self._current_ok(p):
            p.begin_group(group)
        else:
            with torch.cuda.device(p.device):
                p.begin_group(group)

    def end_group(self, group: int) -> None:
        p = self._by_group.get(group)
        if p is None:
            return
        if self._current_ok(p):
            p.end_group(group)
        else:
            with torch.cuda.device(p.device):
                p.end_group(group)

    @property
    def stats(self) -> dict:
        """Sum of the per-device providers' counters."""
        out: dict = {}
        for p in self.providers:
            for k, v in getattr(p, "stats", {}).items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        errors = []
        for p in self.providers:
            try:
                if p.device.type == "cuda":
                    with torch.cuda.device(p.device):
                        p.close()
                else:
                    p.close()
            except Exception as e:  # close every device, then report
                errors.append(e)
        if errors:
            raise errors[0]


# --- moving activations between devices ----------------------------------------------------------


def move_to(obj: Any, device: torch.device, cache: dict | None = None) -> Any:
    """`obj` with every tensor in it (nested in tuples, lists, dicts) on `device`; other
    objects (a transformers Cache, None, ints) are returned as they are. `cache` (id -> (source,
    {device: copy})) makes a tensor shared by many calls move once per device."""
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        if cache is not None:
            hit = cache.get(id(obj))
            if hit is not None and hit[0] is obj:
                moved = hit[1].get(device)
                if moved is None:
                    moved = hit[1][device] = obj.to(device, non_blocking=True)
                return moved
            moved = obj.to(device, non_blocking=True)
            cache[id(obj)] = (obj, {device: moved})  # keeps obj alive: its id is not reused meanwhile
            return moved
        return obj.to(device, non_blocking=True)
    if type(obj) is tuple:
        return tuple(move_to(o, device, cache) for o in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(move_to(o, device, cache) for o in obj))
    if type(obj) is list:
        return [move_to(o, device, cache) for o in obj]
    if type(obj) is dict:
        return {k: move_to(v, device, cache) for k, v in obj.items()}
    return obj


class _DeviceHooks:
    """The pre/post forward hooks of one module: move inputs to `device`, make it current."""

    def __init__(self, device: torch.device, cache: dict | None, clear_before: bool = False, clear_after: bool = False):
        self.device = device
        self.cache = cache
        self.clear_before = clear_before
        self.clear_after = clear_after
        self._previous: list[int] = []

    def pre(self, module, args, kwargs):
        if self.clear_before and self.cache is not None:
            self.cache.clear()
        if self.device.type == "cuda":
            self._previous.append(torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        return move_to(args, self.device, self.cache), move_to(kwargs, self.device, self.cache)

    def post(self, module, args, kwargs, output):
        if self.device.type == "cuda" and self._previous:
            torch.cuda.set_device(self._previous.pop())
        if self.clear_after and self.cache is not None:
            self.cache.clear()
        return None


def attach_device_hooks(model: nn.Module, placement: Placement) -> list:
    """Register the moving hooks (run before the loader's begin_group hooks) on every block
    and on every module outside the blocks that holds tensors or is compressed. Call after the
    loader bound the weights. Returns the hook handles.

    A module outside the blocks runs where its own tensors are (a compressed module: where its
    layer group is), so a head tied to the embedding table runs on the first device.
    """
    handles = []
    shared: dict = {}

    def hook(mod: nn.Module, dev: torch.device, cache: dict | None, **flags) -> None:
        h = _DeviceHooks(dev, cache, **flags)
        handles.append(mod.register_forward_pre_hook(h.pre, with_kwargs=True, prepend=True))
        handles.append(mod.register_forward_hook(h.post, with_kwargs=True, always_call=True))

    named = dict(model.named_modules())
    last = len(placement.blocks) - 1
    for i, b in enumerate(placement.blocks):
        hook(named[b], placement.block_devices[b], shared, clear_before=i == 0, clear_after=i == last)
    for name, mod in named.items():
        if not name or placement.block_of(name) is not None or any(_inside(b, name) for b in placement.blocks):
            continue
        if isinstance(mod, (CompressedLinear, CompressedEmbedding)):
            pos = placement.group_positions.get(mod.group)
            dev = placement.devices[pos] if pos is not None else placement.module_device(name)
        else:
            own = [t for t in list(mod._parameters.values()) + list(mod._buffers.values()) if t is not None]
            if not own:
                continue
            dev = own[0].device
        hook(mod, dev, None)  # called once per forward: nothing to share, nothing kept
    return handles
