"""What scoring needs to know about the processes it runs in, and how sharded models are held.

A low layer (it imports nothing of learndyn's but `errors`): scoring and training both ask it.

Why it exists: with sharded parameters a forward pass is a collective operation. Under FSDP2
(`torch.distributed.fsdp.fully_shard`) every unit all-gathers its parameters in its pre-forward hook,
so every rank must make the same sequence of forward calls or the job hangs; and a submodule called
outside its unit's forward sees only its shard. Under DeepSpeed ZeRO-3 each module's hooks gather
its parameters the same way. This module answers "is the model sharded, and how?", splits work
evenly, and gathers picklable rows from every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from learndyn.errors import LearndynError


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(n: int, rank: int, world: int) -> range:
    """The positions `rank` of `world` takes when `n` items are dealt round-robin: counts differ by at
    most one, and when the items are sorted by size every rank gets the same mix of sizes (contiguous
    halves of a probe file sorted by length would give one rank nearly twice the tokens).
    """
    if world < 1 or not 0 <= rank < world:
        raise LearndynError(f"rank must be in [0, world) with world >= 1, got rank {rank} of world {world}")
    if n < 0:
        raise LearndynError(f"cannot share a negative number of items ({n})")
    return range(rank, n, world)


def fsdp2_units(model: Any) -> list[Any]:
    """The FSDP2 units (modules that `fully_shard` was applied to) inside `model`, in module order."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp2(model: Any) -> bool:
    """Whether any part of `model` is sharded with FSDP2 `fully_shard`."""
    return bool(fsdp2_units(model))


def fsdp2_roots(model: Any) -> list[Any]:
    """The outermost FSDP2 units: those not inside another unit. Their parameters (embeddings, final
    norm, usually the LM head) are all-gathered only by their own forward, never by a sub-unit's."""
    units = fsdp2_units(model)
    inner = {id(sub) for unit in units for sub in unit.modules() if sub is not unit}
    return [u for u in units if id(u) not in inner]


def owning_unit(model: Any, module: Any) -> Any | None:
    """The innermost FSDP2 unit of `model` that holds `module` (itself included); None if none does."""
    owner = None
    for unit in fsdp2_units(model):  # module order: an inner unit comes after the unit around it
        if any(sub is module for sub in unit.modules()):
            owner = unit
    return owner


def is_fsdp1(model: Any) -> bool:
    """Whether `model` is (or holds) the FSDP1 `FullyShardedDataParallel` wrapper."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def is_zero3(model: Any) -> bool:
    """Whether `model`'s parameters are partitioned by DeepSpeed ZeRO-3 (it tags them `ds_id`/`ds_status`)."""
    return any(hasattr(p, "ds_id") or hasattr(p, "ds_status") for p in model.parameters())


def all_gather_dicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows (picklable dicts), concatenated in rank order, returned on every rank.

    A collective: every rank must call it. Outside a process group it returns `rows` as a list.
    """
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return list(rows)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, list(rows))
    return [row for part in parts for row in part]


def check_sharding(model: Any) -> None:
    """Refuse, in one line, the sharded layouts that probe tracking cannot serve.

    FSDP1's `FullyShardedDataParallel` flattens parameters into one buffer per wrapper, so the body
    and head cannot be called apart; an FSDP2 model that is a single unit holds every parameter in
    its root, which scoring must gather whole on every rank (no sharding left, and usually the sign
    of a config without a wrap policy).
    """
    if is_fsdp1(model):
        raise LearndynError("probe tracking supports FSDP2 only, not FSDP1 (FullyShardedDataParallel): "
                            "set fsdp_version: 2 in the accelerate config")
    units = fsdp2_units(model)
    if len(units) == 1:
        raise LearndynError("the FSDP2 model is a single unit (no wrap policy: every parameter in the root): "
                            "set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP")
