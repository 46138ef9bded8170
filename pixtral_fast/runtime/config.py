"""Engine limits, kept apart from the model's configuration."""
from __future__ import annotations

from dataclasses import dataclass

from pixtral_fast.runtime.graphs import DEFAULT_BUCKETS

CPU_CACHE_BYTES = 512 << 20  # default KV budget on the CPU, where there is no free-memory query


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None            # the cache's size in blocks, or:
    memory_bytes: int | None = None          # its size in bytes, or:
    gpu_memory_fraction: float = 0.9         # this fraction of the GPU memory still free
    max_batch_size: int = 32
    max_model_len: int | None = None         # prompt + generation; default: the model's context
    max_prefill_tokens: int = 16384          # tokens prefilled together in one step
    graph_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    use_cuda_graphs: bool | None = None      # None: on a GPU
    capture_on_start: bool = True
    nvtx: bool = False                       # NVTX ranges around prefill, ViT and decode steps
    progress: bool = True

    def __post_init__(self):
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be a power of two in 16..256, got {self.block_size}")
        if self.max_batch_size < 1 or self.max_prefill_tokens < 1:
            raise ValueError("max_batch_size and max_prefill_tokens must be >= 1")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
