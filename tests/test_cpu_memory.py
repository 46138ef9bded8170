"""A CPU rank's default KV cache (pixtral_fast/cpu_memory.py): what the engine's limits can use,
never more than 512 MiB nor a quarter of the host's available memory for all ranks together,
split evenly among the tensor-parallel ranks, and always the two blocks a cache needs."""
from __future__ import annotations

import pytest

from pixtral_fast.cpu_memory import (CPU_CACHE_CEILING_BYTES, HOST_CACHE_FRACTION, available_host_bytes,
                                     blocks_wanted, default_cpu_cache_bytes)

BLOCK = 16
PER_BLOCK = 1 << 20      # 1 MiB a block: round numbers below
PLENTY = 1 << 40         # a host whose memory is no limit
GIB = 1 << 30


def budget_blocks(max_batch: int, max_len: int, tp: int, available: int) -> int:
    return default_cpu_cache_bytes(PER_BLOCK, BLOCK, max_batch, max_len, tp, available_bytes=available) // PER_BLOCK


def test_the_limits_set_the_cache_when_they_need_less_than_the_caps():
    # 4 sequences of 100 tokens: 7 blocks each (the last one partly used), plus the scratch block
    assert blocks_wanted(BLOCK, 4, 100) == 4 * 7 + 1
    assert budget_blocks(4, 100, tp=1, available=PLENTY) == 29
    assert budget_blocks(4, 100, tp=4, available=PLENTY) == 29  # each rank caches the same blocks


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_the_ceiling_holds_for_all_ranks_together(tp):
    got = budget_blocks(32, 131072, tp, available=PLENTY)
    assert got == CPU_CACHE_CEILING_BYTES // tp // PER_BLOCK
    assert tp * got * PER_BLOCK <= CPU_CACHE_CEILING_BYTES < tp * (got + 1) * PER_BLOCK


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_short_host_caps_the_cache_at_a_fraction_of_its_available_memory(tp):
    available = GIB  # a quarter of it (256 MiB) is below the 512 MiB ceiling
    got = budget_blocks(32, 131072, tp, available)
    assert HOST_CACHE_FRACTION == 0.25 and got == 256 // tp
    assert tp * got * PER_BLOCK <= HOST_CACHE_FRACTION * available


def test_a_host_with_nothing_to_spare_still_gets_the_two_blocks_a_cache_needs():
    assert budget_blocks(32, 4096, tp=8, available=0) == 2
    assert budget_blocks(1, 1, tp=1, available=PLENTY) == 2  # one block for the token, one scratch


@pytest.mark.parametrize("field, value", [("bytes_per_block", 0), ("block_size", -16), ("max_batch_size", True),
                                          ("max_model_len", 1.5), ("tp_size", 0)])
def test_bad_arguments_are_named(field, value):
    args = dict(bytes_per_block=PER_BLOCK, block_size=BLOCK, max_batch_size=4, max_model_len=64, tp_size=2)
    with pytest.raises(ValueError, match=f"{field} must be a positive integer, got {value!r}"):
        default_cpu_cache_bytes(**{**args, field: value}, available_bytes=PLENTY)


def test_the_host_memory_is_read_from_the_system():
    total = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    assert total is not None and 0 < available_host_bytes() <= total
