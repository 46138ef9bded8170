"""Engine limits, kept apart from the model's configuration."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from pixtral_fast.runtime.decode_step import DEFAULT_BUCKETS

# The decode runner keeps a [max_batch_size, max_blocks] block table (and its host copies) per
# engine: 4096 rows x 8192 blocks (a 128k context in 16-token blocks) is ~130 MB each, and no
# single GPU holds the KV cache for 4096 sequences of a 12B model anyway.
MAX_BATCH_SIZE_LIMIT = 4096
DEFAULT_MAX_BATCH_SIZE = 32


def _positive_int(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")


def _flag(name: str, value, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ValueError(f"{name} must be True or False{' or None' if optional else ''}, got {value!r}")


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None            # the cache's size in blocks, or:
    memory_bytes: int | None = None          # its size in bytes (either: at most the memory left), or:
    gpu_memory_fraction: float = 0.9         # this fraction of the GPU memory still free; on the CPU
    #                                          model_runner.default_memory_bytes (the limits' need, capped)
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # at most MAX_BATCH_SIZE_LIMIT (4096)
    max_model_len: int | None = None         # prompt + generation; default: the model's context
    max_prefill_tokens: int = 16384          # tokens prefilled together in one step
    graph_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    use_cuda_graphs: bool | None = None      # None: on a GPU
    capture_on_start: bool = True
    nvtx: bool = False                       # NVTX ranges around prefill, ViT and decode steps
    progress: bool = True
    encoder_cache_bytes: int = 1 << 30       # image embeddings kept by content hash (runtime/encoder_cache.py);
    #                                          0: none
    cpu_threads: int | None = None           # a CPU engine's intra-op threads (torch.set_num_threads,
    #                                          process-wide); None: as they are. The server leaves a core
    #                                          to its HTTP side (serve --cpu-threads)

    def __post_init__(self):
        """Every field checked, with a ValueError naming it (a bool is never taken for a number)."""
        if isinstance(self.block_size, bool) or self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be a power of two in 16..256, got {self.block_size!r}")
        for name in ("num_blocks", "memory_bytes", "max_model_len", "cpu_threads"):
            _positive_int(name, getattr(self, name), optional=True)
        for name in ("max_batch_size", "max_prefill_tokens"):
            _positive_int(name, getattr(self, name))
        if self.max_batch_size > MAX_BATCH_SIZE_LIMIT:
            raise ValueError(f"max_batch_size must be at most {MAX_BATCH_SIZE_LIMIT}, got {self.max_batch_size}")
        if self.num_blocks is not None and self.memory_bytes is not None:
            raise ValueError(f"give num_blocks or memory_bytes, not both (got num_blocks={self.num_blocks}, "
                             f"memory_bytes={self.memory_bytes}): each sets the KV cache's size")
        fraction = self.gpu_memory_fraction
        if (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not math.isfinite(fraction)
                or not 0 < fraction <= 1):
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {fraction!r}")
        if not isinstance(self.graph_buckets, (tuple, list)):
            raise ValueError(f"graph_buckets must be a tuple of batch sizes, got {self.graph_buckets!r}")
        for bucket in self.graph_buckets:
            _positive_int("graph_buckets", bucket)
        self.graph_buckets = tuple(int(b) for b in self.graph_buckets)
        _flag("use_cuda_graphs", self.use_cuda_graphs, optional=True)
        if isinstance(self.encoder_cache_bytes, bool) or not isinstance(self.encoder_cache_bytes, numbers.Integral) \
                or self.encoder_cache_bytes < 0:
            raise ValueError(f"encoder_cache_bytes must be an integer >= 0 (0: no encoder cache), "
                             f"got {self.encoder_cache_bytes!r}")
        for name in ("capture_on_start", "nvtx", "progress"):
            _flag(name, getattr(self, name))
