"""distributed.py in one process: the balanced split, sharding detection and the refusals' wording."""

from __future__ import annotations

import pytest
import torch

from learndyn.distributed import (
    all_gather_dicts,
    check_sharding,
    is_fsdp1,
    is_fsdp2,
    is_zero3,
    rank_and_world,
    share,
)
from learndyn.errors import LearndynError


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 10])
def test_shares_cover_everything_once_and_differ_by_at_most_one(n, world):
    parts = [list(share(n, rank, world)) for rank in range(world)]
    assert sorted(i for part in parts for i in part) == list(range(n))
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dealing_sorted_items_gives_every_rank_the_same_mix_of_sizes():
    sizes = sorted([5, 90, 7, 60, 30, 31, 8, 88])
    halves = [[sizes[i] for i in share(len(sizes), rank, 2)] for rank in range(2)]
    assert all(min(h) < 10 and max(h) > 80 for h in halves)  # a contiguous split: all short vs all long


@pytest.mark.parametrize("rank, world", [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_the_world_is_refused(rank, world):
    with pytest.raises(LearndynError, match="rank must be in"):
        share(3, rank, world)


def test_outside_a_process_group_there_is_one_rank_and_gathering_is_the_identity():
    assert rank_and_world() == (0, 1)
    rows = [{"a": 1}, {"a": 2}]
    assert all_gather_dicts(rows) == rows


def test_a_plain_model_is_neither_sharded_nor_refused(tiny_llama):
    model, _ = tiny_llama
    assert not (is_fsdp1(model) or is_fsdp2(model) or is_zero3(model))
    check_sharding(model)


def test_fsdp1_is_refused_in_one_line_naming_the_setting():
    """FSDP1 cannot be built without an accelerator; an instance made without its __init__ stands in
    for it (detection is by type, like the real wrapper's)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(wrapper)
    outer = torch.nn.Sequential(wrapper)
    assert is_fsdp1(outer)
    with pytest.raises(LearndynError) as error:
        check_sharding(outer)
    assert "fsdp_version: 2" in str(error.value) and "\n" not in str(error.value)


def test_zero3_is_recognised_by_its_parameter_tags():
    layer = torch.nn.Linear(2, 2)
    assert not is_zero3(layer)
    layer.weight.ds_id = 0  # what DeepSpeed ZeRO-3 sets on each partitioned parameter
    assert is_zero3(layer)
