"""Host memory for a CPU engine's KV cache: what the machine has available now, and the cache a
rank takes by default when neither num_blocks nor memory_bytes is given (a GPU asks the device how
much is free; on the CPU the budget comes from here).

The default is what the engine can use, never more than the host can spare: enough blocks for
max_batch_size sequences of max_model_len tokens (plus the scratch block), capped, for all ranks
together, at CPU_CACHE_CEILING_BYTES and at HOST_CACHE_FRACTION of the memory available at start,
and split evenly among the tensor-parallel ranks (each holds its own cache of the same blocks)."""
from __future__ import annotations

import os

CPU_CACHE_CEILING_BYTES = 512 << 20  # every rank's cache together, whatever the host has
HOST_CACHE_FRACTION = 0.25           # of the available host memory: the weights, activations and other processes need the rest
MIN_BLOCKS = 2                       # the scratch block and one a sequence can use


def available_host_bytes() -> int:
    """Bytes the host can still hand out without swapping: /proc/meminfo's MemAvailable (which
    counts reclaimable page cache), else the free physical pages (os.sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the figure is in kB
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def blocks_wanted(block_size: int, max_batch_size: int, max_model_len: int) -> int:
    """Blocks that hold max_batch_size sequences of max_model_len tokens at once, plus the scratch one."""
    return max_batch_size * -(-max_model_len // block_size) + 1


def default_cpu_cache_bytes(bytes_per_block: int, block_size: int, max_batch_size: int, max_model_len: int,
                            tp_size: int = 1, available_bytes: int | None = None) -> int:
    """One rank's KV-cache budget in bytes (bytes_per_block: that rank's, its share of the KV heads).
    available_bytes: the host's (default: available_host_bytes()), given by tests."""
    for name, value in (("bytes_per_block", bytes_per_block), ("block_size", block_size),
                        ("max_batch_size", max_batch_size), ("max_model_len", max_model_len), ("tp_size", tp_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if available_bytes is None:
        available_bytes = available_host_bytes()
    all_ranks_cap = min(CPU_CACHE_CEILING_BYTES, int(HOST_CACHE_FRACTION * max(0, available_bytes)))
    per_rank_blocks = min(blocks_wanted(block_size, max_batch_size, max_model_len),
                          all_ranks_cap // tp_size // bytes_per_block)
    return max(MIN_BLOCKS, per_rank_blocks) * bytes_per_block
