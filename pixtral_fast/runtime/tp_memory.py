"""The per-rank memory plan and decode roofline of an N-way tensor-parallel model, counted on the
meta device from the module structure each rank really builds (build_model(..., comm=
Collectives(ShardPlan(N, r)))): no weights, no process group, so it runs for Pixtral-Large on a
laptop.

Memory: does each of N GPUs hold its rank's weights plus a *useful* KV cache? The KV cache gets
what the engine would give it (EngineConfig.gpu_memory_fraction, 0.9, of the memory left after
the weights); "useful" means it holds `max_batch_size` sequences of `context` tokens at once
(default 32 x 8192: the bench's largest batch, each with one 1024x1024 image, 4160 tokens, and as
much text again).

Roofline of one decode step at batch B, context C, per rank (every rank runs the same step):
    HBM time       = (the rank's decoder weight bytes, replicated norms included, + B x C x KV
                      bytes per token per rank) / the GPU's HBM bandwidth
    all-reduces    = 2 per layer + 1 (the vocabulary-parallel embedding) of [B, dim] in the model
                     dtype, ring: 2 (N - 1) / N x bytes / its NVLink bandwidth per direction
    logits gather  = all-gather of [B, N x ceil(V / N)] in the model dtype: (N - 1) / N x bytes / NVLINK
    tok/s          = B / (HBM time + all-reduces + gather)
The collectives cannot overlap the matmuls of a decode step (each waits for the one before it),
so the times add. Bandwidth only: each NCCL call also has a fixed latency (ALL_REDUCE_LATENCY_S,
an assumption, not a measurement here) that no bandwidth term shows; `latency_floor_ms` reports
it separately. The ViT is held by every rank but not read by a decode step."""
from __future__ import annotations

import torch

from pixtral_fast import hardware
from pixtral_fast.config import ModelArgs
from pixtral_fast.parallel.comm import Collectives
from pixtral_fast.parallel.plan import ShardPlan

ALL_REDUCE_LATENCY_S = 10e-6      # assumed fixed cost of one small NCCL collective inside a CUDA graph
KV_MEMORY_FRACTION = 0.9          # EngineConfig.gpu_memory_fraction's default
USEFUL_BATCH = 32                 # DEFAULT_MAX_BATCH_SIZE, the bench's largest default batch
USEFUL_CONTEXT = 8192             # tokens per sequence: one 1024x1024 image (4160) and as much text


def is_replicated(name: str, args: ModelArgs) -> bool:
    """Whether every rank of any tensor-parallel plan holds `name` whole (the ViT, the adapter,
    the patch merger, every norm); at size 1 the same tensors count as replicated."""
    return ShardPlan(2, 0).slice_for(name, args.text) is None


def rank_plan(args: ModelArgs, size: int, rank: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Bytes rank `rank` of a `size`-way model holds, by part; its decode-step weight reads; its
    KV bytes per token."""
    from pixtral_fast.model.pixtral import build_model
    from pixtral_fast.quant.memory import decode_step_bytes

    plan = ShardPlan(size, rank)
    model = build_model(args, device="meta", dtype=dtype, comm=Collectives(plan))
    parts = {"split": 0, "replicated": 0, "decoder_layers": 0, "embedding_and_output": 0, "vision": 0}
    for name, t in model.state_dict().items():
        n = t.numel() * t.element_size()
        parts["replicated" if is_replicated(name, args) else "split"] += n
        if name.startswith("layers."):
            parts["decoder_layers"] += n
        elif name in ("tok_embeddings.weight", "output.weight"):
            parts["embedding_and_output"] += n
        elif not name.startswith("norm."):
            parts["vision"] += n
    local = model.local_text
    kv_per_token = 2 * local.n_layers * local.n_kv_heads * local.head_dim * dtype.itemsize
    emb = model.tok_embeddings.weight
    return {"rank": rank, "weights_bytes": parts["split"] + parts["replicated"], **{f"{k}_bytes": v for k, v in
            parts.items()}, "decode_weight_bytes": decode_step_bytes(model),
            "embedding_row_bytes": emb.shape[1] * emb.element_size(), "kv_heads": local.n_kv_heads,
            "kv_bytes_per_token": kv_per_token}


def device_memory() -> tuple[int, str]:
    """(bytes of one GPU, where the figure comes from): GPU 0's total memory, or the H200's."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), f"{props.name} (read from the device)"
    spec = hardware.DEFAULT
    return int(spec.memory_bytes), f"{spec.name}, {spec.memory_bytes / 1e9:.0f} GB (assumed: no GPU here)"


def memory_plan(args: ModelArgs, size: int, dtype: torch.dtype = torch.bfloat16, memory_bytes: int | None = None,
                max_batch_size: int = USEFUL_BATCH, context: int = USEFUL_CONTEXT,
                ranks: list[dict] | None = None) -> dict:
    """Whether `size` GPUs of `memory_bytes` each (default: device_memory()) hold the model plus a
    useful KV cache (max_batch_size sequences of `context` tokens). ranks: the rank_plans, if
    already made."""
    if memory_bytes is None:
        memory_bytes, source = device_memory()
    else:
        source = "given"
    ranks = ranks or [rank_plan(args, size, r, dtype) for r in range(size)]
    largest = max(ranks, key=lambda r: r["weights_bytes"])  # every rank's cache holds the same blocks
    kv_budget = max(0, int(KV_MEMORY_FRACTION * (memory_bytes - largest["weights_bytes"])))
    kv_tokens = kv_budget // largest["kv_bytes_per_token"]
    useful = max_batch_size * context
    weights_fit = largest["weights_bytes"] < memory_bytes
    return {
        "tensor_parallel_size": size, "dtype": str(dtype).removeprefix("torch."),
        "gpu_memory_bytes": memory_bytes, "gpu_memory_source": source,
        "weights_per_rank_bytes": largest["weights_bytes"], "replicated_per_rank_bytes": largest["replicated_bytes"],
        "kv_bytes_per_token_per_rank": largest["kv_bytes_per_token"],
        "kv_cache_per_rank_bytes": kv_budget, "kv_tokens_that_fit": kv_tokens,
        "useful_kv_tokens": useful, "useful_means": f"{max_batch_size} sequences x {context} tokens",
        "weights_fit": weights_fit, "fits": weights_fit and kv_tokens >= useful,
        "ranks": ranks,
    }


def ring_all_reduce_s(nbytes: float, size: int) -> float:
    return 0.0 if size == 1 else 2 * (size - 1) / size * nbytes / hardware.current().nvlink_bytes_per_s


def ring_all_gather_s(total_bytes: float, size: int) -> float:
    return 0.0 if size == 1 else (size - 1) / size * total_bytes / hardware.current().nvlink_bytes_per_s


def decode_roofline(args: ModelArgs, rank: dict, size: int, batch: int, context: int,
                    dtype: torch.dtype = torch.bfloat16) -> dict:
    """The roofline of one decode step at `batch` x `context` for rank `rank` (a rank_plan)."""
    t = args.text
    elem = dtype.itemsize
    hbm_bytes = (rank["decode_weight_bytes"] + (batch - 1) * rank["embedding_row_bytes"]
                 + batch * context * rank["kv_bytes_per_token"])
    hbm_s = hbm_bytes / hardware.current().hbm_bytes_per_s
    n_reduces = 0 if size == 1 else 2 * t.n_layers + 1
    reduce_s = n_reduces * ring_all_reduce_s(batch * t.dim * elem, size)
    vocab_padded = size * ShardPlan(size).vocab_rows_per_rank(t.vocab_size)
    gather_s = ring_all_gather_s(batch * vocab_padded * elem, size)
    step_s = hbm_s + reduce_s + gather_s
    collectives = n_reduces + (size > 1)
    return {"batch": batch, "context": context, "hbm_bytes_per_rank": hbm_bytes, "hbm_ms": 1e3 * hbm_s,
            "all_reduces": n_reduces, "all_reduce_ms": 1e3 * reduce_s, "logits_gather_ms": 1e3 * gather_s,
            "step_ms": 1e3 * step_s, "roofline_tok_per_s": batch / step_s,
            "latency_floor_ms": 1e3 * collectives * ALL_REDUCE_LATENCY_S}


def constants() -> dict:
    spec = hardware.current()
    return {"gpu": spec.name, "hbm_bytes_per_s": spec.hbm_bytes_per_s,
            "nvlink_bytes_per_s_per_direction": spec.nvlink_bytes_per_s,
            "assumed_collective_latency_s": ALL_REDUCE_LATENCY_S, "kv_memory_fraction": KV_MEMORY_FRACTION}


def tensor_parallel_report(args: ModelArgs, size: int, batches, context: int, dtype: torch.dtype = torch.bfloat16,
                           memory_bytes: int | None = None, useful_context: int = USEFUL_CONTEXT) -> dict:
    """The memory plan for `size` GPUs (useful: max(batches) sequences of useful_context tokens)
    and the decode roofline at each batch size with `context` tokens per sequence."""
    ranks = [rank_plan(args, size, r, dtype) for r in range(size)]
    plan = memory_plan(args, size, dtype, memory_bytes, max(batches), useful_context, ranks)
    largest = max(ranks, key=lambda r: r["decode_weight_bytes"])
    return {"memory_plan": plan, "roofline": [decode_roofline(args, largest, size, b, context, dtype) for b in batches],
            "roofline_constants": constants()}
