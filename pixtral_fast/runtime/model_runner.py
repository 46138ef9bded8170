"""One rank's model, paged KV cache and decode runner, and the steps an engine asks of them. A
LocalExecutor (runtime/executor.py) drives one; under tensor parallelism every rank holds one, and
the TensorParallelExecutor (runtime/tp_executor.py) has the workers run each call in step with its
own."""
from __future__ import annotations

from dataclasses import replace

import torch

from pixtral_fast.cpu_memory import MIN_BLOCKS, default_cpu_cache_bytes
from pixtral_fast.model.pixtral import Pixtral
from pixtral_fast.parallel.comm import Collectives
from pixtral_fast.runtime.config import DEFAULT_MAX_BATCH_SIZE, EngineConfig
from pixtral_fast.runtime.decode_step import DecodeRow, DecodeRunner
from pixtral_fast.runtime.encoder_cache import EncoderCache
from pixtral_fast.runtime.kv_cache import CacheShape, PagedKVCache, check_cache_fits, plan_cache
from pixtral_fast.runtime.prefill import PrefillBatch, run_prefill
from pixtral_fast.runtime.requests import EngineStats
from pixtral_fast.runtime.sampling import StepOutput


class ModelRunner:
    def __init__(self, model: Pixtral, config: EngineConfig, comm: Collectives | None = None):
        self.model = model
        if model.device.type == "cpu" and config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        model.fuse_projections()  # one GEMM for q, k and v: fewer launches per layer
        tp_size = 1 if comm is None else comm.size
        # On the CPU, with no size given: what the limits can use, within the host's share (cpu_memory).
        memory_bytes = default_memory_bytes(model, config, tp_size)
        # local_text: this rank's KV heads; the cache holds only those.
        shape = plan_cache(model.local_text, model.dtype, model.device, config.block_size, config.num_blocks,
                           memory_bytes, config.gpu_memory_fraction)
        if tp_size > 1:  # every rank's cache holds the same blocks: the smallest plan
            shape = replace(shape, num_blocks=comm.min_int(shape.num_blocks))
        self.shape = shape
        if config.num_blocks is not None or config.memory_bytes is not None:  # a size the user chose
            asked = (f"num_blocks={config.num_blocks}" if config.num_blocks is not None
                     else f"memory_bytes={config.memory_bytes}")
            check_cache_fits(shape, model.device, asked)
        usable = shape.num_blocks - 1  # the scratch block is never handed out
        if config.max_batch_size > max(usable, DEFAULT_MAX_BATCH_SIZE):
            # each running sequence holds at least one block: rows past `usable` could never run,
            # and the decode runner would still allocate buffers for them (the default always passes)
            raise ValueError(f"max_batch_size={config.max_batch_size} is more sequences than the KV cache "
                             f"could ever run at once ({usable} blocks of {shape.block_size} tokens, each running "
                             f"sequence holding at least one): lower max_batch_size or give the cache more memory")
        self.cache = PagedKVCache(shape, model.device)
        text = model.args.text
        if config.max_model_len is not None and config.max_model_len > text.max_seq_len:
            # past the context the model was trained for its positions mean nothing: not clamped silently
            raise ValueError(f"max_model_len={config.max_model_len} is more than the model's context "
                             f"({text.max_seq_len} tokens, max_seq_len / max_position_embeddings)")
        self.max_model_len = config.max_model_len or text.max_seq_len
        max_blocks = -(-self.max_model_len // shape.block_size)
        self.decode_runner = DecodeRunner(model, self.cache, config.max_batch_size, max_blocks,
                                          config.graph_buckets, config.use_cuda_graphs)
        self.stats = EngineStats()  # a worker's own; the driver passes the engine's
        budget = config.encoder_cache_bytes
        self.encoder_cache = EncoderCache(budget) if budget and model.args.vision is not None else None

    def prefill(self, batch: PrefillBatch, stats: EngineStats | None = None, nvtx: bool = False) -> StepOutput:
        stats = stats or self.stats
        out = run_prefill(self.model, self.cache, batch, stats, nvtx, self.encoder_cache)
        if self.encoder_cache is not None:
            counts = self.encoder_cache.stats
            stats.encoder_cache_hits, stats.encoder_cache_misses = counts.hits, counts.misses
            stats.encoder_cache_evictions = counts.evictions
        return out

    def decode(self, rows: list[DecodeRow]) -> StepOutput:
        return self.decode_runner.step(rows)

    def capture(self, greedy_only: bool = True, logprobs: bool = False, progress: bool = False) -> None:
        self.decode_runner.capture(greedy_only=greedy_only, progress=progress, logprobs=logprobs)

    @torch.inference_mode()
    def prompt_logits(self, tokens: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
        """Float32 [seq, vocab] logits of one causal sequence, no cache (model.forward), on the host."""
        return self.model(tokens, images).cpu()

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of this rank's weights: the decoder layers, the embedding and output, the rest."""
        out = {"decoder_layers": 0, "embedding_and_output": 0, "other": 0}
        for name, p in self.model.state_dict().items():
            key = ("decoder_layers" if name.startswith("layers.") else
                   "embedding_and_output" if name in ("tok_embeddings.weight", "output.weight") else "other")
            out[key] += p.numel() * p.element_size()
        return out


def default_memory_bytes(model, config, tp_size: int = 1) -> int | None:
    """The memory_bytes a rank's ModelRunner sizes its KV cache with: config.memory_bytes when
    given; on the CPU with neither num_blocks nor memory_bytes given, default_cpu_cache_bytes for
    this rank's KV heads (model.local_text); else None (num_blocks, or the GPU's free memory)."""
    if config.num_blocks is not None or config.memory_bytes is not None or model.device.type != "cpu":
        return config.memory_bytes
    local, whole = model.local_text, model.args.text
    per_block = CacheShape(local.n_layers, MIN_BLOCKS, config.block_size, local.n_kv_heads, local.head_dim,
                           model.dtype).bytes_per_block
    max_model_len = min(config.max_model_len or whole.max_seq_len, whole.max_seq_len)  # as ModelRunner's
    return default_cpu_cache_bytes(per_block, config.block_size, config.max_batch_size, max_model_len, tp_size)
