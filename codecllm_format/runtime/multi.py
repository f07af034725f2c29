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
hooks take devices as parameters and run on the CPU too (with "cpu" for every device). The pure
parts live in runtime/split.py.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import constants as C
from ..errors import LoadError
from .layout import build_layouts
from .modules import CompressedEmbedding, CompressedLinear
from .plan import GroupCost
from .split import (  # re-exported: the multi-GPU API in one place
    SplitPlan,
    budgets_for,
    parse_budgets,
    parse_device_map,
    plan_split,
    resolve_device_map,
    split_blocks,
)

__all__ = [
    "MultiDeviceProvider", "Placement", "SplitPlan", "attach_device_hooks", "budgets_for", "find_blocks",
    "gpu_factory", "move_to", "parse_budgets", "parse_device_map", "place_model", "plan_split",
    "resolve_device_map", "split_blocks",
]

log = logging.getLogger("codecllm_format.runtime")

BLOCK_NAME = re.compile(r"^(?:.*\.)?(?:layers|layer|h|blocks|block)\.\d+$")
"""Module names of transformer blocks (children of a ModuleList), as the converter groups them."""

HEAD_NAME = re.compile(r"(?:^|\.)[^.]*(?:rotary|rope)[^.]*$", re.IGNORECASE)
"""Rotary tables outside the blocks are computed before them even when registered after them
(Llama's model.rotary_emb): first device, with the embeddings and whatever is registered before
the first block. (Placement only matters for speed: every module's inputs are moved to it.)"""


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
            if t.encoding in (C.Encoding.INT8_ROW, C.Encoding.INT8_GROUP) and t.group in self._by_group:
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

    def fusion_sets(self) -> list[tuple[str, ...]]:
        return [m for p in self.providers if hasattr(p, "fusion_sets") for m in p.fusion_sets()]

    def fused_weight(self, members: tuple[str, ...]):
        p = self._owner(members[0])
        if self._current_ok(p):
            return p.fused_weight(members)
        with torch.cuda.device(p.device):
            return p.fused_weight(members)

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
            previous = torch.cuda.current_device()
            self._previous.append(previous)
            if previous != self.device.index:
                torch.cuda.set_device(self.device.index)
        return move_to(args, self.device, self.cache), move_to(kwargs, self.device, self.cache)

    def post(self, module, args, kwargs, output):
        if self.device.type == "cuda" and self._previous:
            previous = self._previous.pop()
            if previous != self.device.index:
                torch.cuda.set_device(previous)
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
