"""The paged KV cache: one preallocated pool of blocks per layer, and the block manager that hands
blocks to sequences. Layout per layer: K and V of [num_blocks, block_size, kv_heads, head_dim],
the layout gqa_decode_attention reads."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from pixtral_fast.config import TextArgs
from pixtral_fast.cpu_memory import available_host_bytes

# Block 0 is never handed out: padded rows of a captured decode batch write their K/V there.
SCRATCH_BLOCK = 0


class CacheFull(RuntimeError):
    """Not enough free blocks right now (the request waits, or another is preempted)."""


@dataclass(frozen=True)
class CacheShape:
    n_layers: int
    num_blocks: int
    block_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.n_layers * self.block_size * self.kv_heads * self.head_dim * elem


def plan_cache(args: TextArgs, dtype: torch.dtype, device, block_size: int = 16, num_blocks: int | None = None,
               memory_bytes: int | None = None, gpu_memory_fraction: float | None = None) -> CacheShape:
    """Sizes the pool from a block count, a byte budget, or a fraction of the GPU's free memory."""
    shape = CacheShape(args.n_layers, 2, block_size, args.n_kv_heads, args.head_dim, dtype)
    if num_blocks is None:
        if memory_bytes is None:
            if torch.device(device).type != "cuda":
                raise ValueError("on the CPU give num_blocks or memory_bytes for the KV cache")
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            memory_bytes = int(free * (gpu_memory_fraction if gpu_memory_fraction is not None else 0.9))
        num_blocks = memory_bytes // shape.bytes_per_block
    if num_blocks < 2:
        raise ValueError(f"the KV cache budget allows {num_blocks} block(s) of {shape.bytes_per_block} bytes; "
                         "at least 2 are needed (one is scratch)")
    return CacheShape(args.n_layers, int(num_blocks), block_size, args.n_kv_heads, args.head_dim, dtype)


def available_bytes(device) -> int:
    """Memory a new cache can take on `device`: the GPU's free memory, else the host's available."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_host_bytes()


def check_cache_fits(shape: CacheShape, device, asked: str) -> None:
    """ValueError naming what set the size (`asked`, e.g. "num_blocks=64") when the pool would
    take more than `device` has left: the allocator's own failure names neither."""
    need, have = shape.num_blocks * shape.bytes_per_block, available_bytes(device)
    if need > have:
        where = "free on the GPU" if torch.device(device).type == "cuda" else "available on the host"
        raise ValueError(f"{asked}: the KV cache needs {need} bytes ({shape.num_blocks} blocks of "
                         f"{shape.bytes_per_block} bytes) but {have} bytes are {where} ({device}); "
                         "give fewer num_blocks or a smaller memory_bytes")


class PagedKVCache:
    def __init__(self, shape: CacheShape, device):
        self.shape = shape
        dims = (shape.num_blocks, shape.block_size, shape.kv_heads, shape.head_dim)
        self.layers = [(torch.zeros(dims, dtype=shape.dtype, device=device),
                        torch.zeros(dims, dtype=shape.dtype, device=device)) for _ in range(shape.n_layers)]


class BlockManager:
    """Free list + per-sequence block lists. Never hands out a block twice, never loses one."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_blocks: deque[int] = deque(b for b in range(num_blocks) if b != SCRATCH_BLOCK)
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @property
    def capacity_tokens(self) -> int:
        """Tokens a single sequence can hold: every block but the scratch one."""
        return (self.num_blocks - 1) * self.block_size

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def can_allocate(self, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) <= len(self.free_blocks)

    def allocate(self, seq_id: int, n_tokens: int) -> list[int]:
        """Blocks for a new sequence's first n_tokens; CacheFull (and nothing taken) if they don't fit."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        need = self.blocks_for(n_tokens)
        if need > len(self.free_blocks):
            raise CacheFull(f"sequence {seq_id} needs {need} blocks, {len(self.free_blocks)} free")
        self.tables[seq_id] = [self.free_blocks.popleft() for _ in range(need)]
        self.lengths[seq_id] = n_tokens
        return self.tables[seq_id]

    def needs_block(self, seq_id: int) -> bool:
        """Whether appending one token to this sequence takes a new block."""
        return self.lengths[seq_id] % self.block_size == 0

    def append(self, seq_id: int) -> int:
        """Room for one more token; returns its flat slot (block * block_size + offset)."""
        n = self.lengths[seq_id]
        if n % self.block_size == 0:
            if not self.free_blocks:
                raise CacheFull(f"sequence {seq_id} needs a new block and none is free")
            self.tables[seq_id].append(self.free_blocks.popleft())
        self.lengths[seq_id] = n + 1
        return self.slot(seq_id, n)

    def slot(self, seq_id: int, position: int) -> int:
        block = self.tables[seq_id][position // self.block_size]
        return block * self.block_size + position % self.block_size

    def slots(self, seq_id: int) -> list[int]:
        return [self.slot(seq_id, p) for p in range(self.lengths[seq_id])]

    def free(self, seq_id: int) -> None:
        self.free_blocks.extend(self.tables.pop(seq_id))
        del self.lengths[seq_id]

    def usage(self) -> dict[str, float]:
        usable = self.num_blocks - 1
        used = usable - len(self.free_blocks)
        return {"used_blocks": used, "free_blocks": len(self.free_blocks), "total_blocks": usable,
                "fraction_used": used / usable if usable else 0.0, "sequences": len(self.tables)}
