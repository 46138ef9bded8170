"""`pixtral-fast bench`: end-to-end speed of a full-size model with random weights made on the
device (no checkpoint exists there): time to first token for one image, decode tokens/s per batch
size, each next to its roofline (DESIGN §4: weights + KV bytes per step over HBM bandwidth).

With `scheme` ("w4a16" or "fp8"), the decoder's linears are quantized on the device as
`pixtral-fast quantize` would (round-to-nearest, pixtral_fast.model.quantized.quantize_model) and run
packed; the roofline then counts the bytes the quantized model reads (packed weights and scales).

Tensor parallelism (tensor_parallel_size N > 1): random weights exist in one process only, and
worker ranks load their shard from a checkpoint file, so `run(params, ...)` at N > 1 builds no
model: it reports the per-rank memory plan and the N-GPU decode roofline
(pixtral_fast/runtime/tp_memory.py), counted on the meta device. Decode speed at N > 1 needs a real
checkpoint: `run_checkpoint(folder, tensor_parallel_size=N)` (`bench --model DIR`) loads it
through Engine.from_pretrained and times it against that roofline."""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from pixtral_fast import hardware
from pixtral_fast.config import IMG_BREAK_ID, IMG_END_ID, IMG_ID, ModelArgs, VisionArgs
from pixtral_fast.model.load import check_dtype, resolve_device
from pixtral_fast.model.pixtral import Pixtral, build_model
from pixtral_fast.parallel.plan import ShardPlan
from pixtral_fast.quant.describe import describe_scheme
from pixtral_fast.quant.memory import decode_step_bytes, held_bytes
from pixtral_fast.runtime.engine import Engine
from pixtral_fast.tokenizer import Encoded

BOS, INST, END_INST = 1, 3, 4


@torch.no_grad()
def random_model(args: ModelArgs, device, dtype, seed: int = 0) -> Pixtral:
    """Weights drawn on the device (a 12B model in a few seconds); norms at 1 so activations stay sane."""
    torch.manual_seed(seed)
    model = build_model(args, device=device, dtype=dtype)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def image_prompt(size: int, vision: VisionArgs | int) -> Encoded:
    """One size x size image and its [IMG] block, then 16 text tokens. vision: the model's
    VisionArgs (its token ids; a grid merged by spatial_merge_size; size rounded down to a whole
    number of merged patches, at most the model's largest image) or a bare patch size (Pixtral's
    ids, no merge, size as given)."""
    if isinstance(vision, VisionArgs):
        unit = vision.patch_size * vision.spatial_merge_size
        size = max(unit, min(size, vision.image_size) // unit * unit)
        img, brk, end = vision.image_token_id, vision.image_break_token_id, vision.image_end_token_id
    else:
        unit, (img, brk, end) = vision, (IMG_ID, IMG_BREAK_ID, IMG_END_ID)
    rows = cols = size // unit
    tokens = [BOS, INST]
    for r in range(rows):
        tokens += [img] * cols + [brk if r < rows - 1 else end]
    tokens += [1000 + i for i in range(16)] + [END_INST]
    return Encoded(tokens=tokens, images=[torch.randn(3, size, size)])


def decode_bytes(model: Pixtral, batch: int, context: int) -> int:
    """HBM bytes one decode step must read: every decoder weight once as it is stored (quantized
    layers: packed words and scales), one embedding row per sequence, and each sequence's K and V
    for every layer."""
    t = model.args.text
    row = model.tok_embeddings.weight[0]
    kv = 2 * t.n_layers * t.n_kv_heads * t.head_dim * model.dtype.itemsize * context * batch
    return decode_step_bytes(model) + (batch - 1) * row.numel() * row.element_size() + kv


def parameter_count(model: Pixtral) -> int:
    """The model's weights as numbers (a quantized linear counts its in x out, not its words)."""
    from pixtral_fast.quant.linear import QuantLinear

    return (sum(p.numel() for p in model.parameters())
            + sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear)))


def check_scheme(args: ModelArgs, scheme: str | None, group_size: int) -> None:
    """A ValueError naming the argument before any weight is made."""
    if scheme is None:
        return
    if scheme not in ("w4a16", "fp8"):
        raise ValueError(f"scheme must be 'w4a16' or 'fp8', got {scheme!r}")
    if scheme == "w4a16":
        t = args.text
        ins = {"dim": t.dim, "n_heads * head_dim": t.n_heads * t.head_dim, "hidden_dim": t.hidden_dim}
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
            raise ValueError(f"group_size must be a positive multiple of 8, got {group_size!r}")
        for what, k in ins.items():
            if k % group_size:
                raise ValueError(f"group_size {group_size} does not divide the decoder's {what} ({k}): "
                                 "every quantized linear's in_features must be a whole number of groups")


def random_quantized_model(args: ModelArgs, device, dtype, scheme: str, group_size: int, backend: str) -> Pixtral:
    """random_model with its decoder linears quantized in place on the device; the dense weights
    are freed once their packed form exists (the peak is the dense model plus the packed one)."""
    from pixtral_fast.model.quantized import quantize_model

    model = quantize_model(random_model(args, device, dtype).set_backend(backend), scheme, group_size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def free_bytes(device: torch.device) -> int:
    """Memory the weights may take on `device`: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what can be allocated without swapping
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> None:
    """ValueError before any weight is made when the dense model (which a quantized bench also
    builds first) cannot fit: the weights are counted on the meta device."""
    need = held_bytes(build_model(args, device="meta", dtype=dtype))
    have = free_bytes(device)
    if need > have:
        raise ValueError(f"the model's weights need {need / 1e9:.1f} GB in {str(dtype).removeprefix('torch.')} but "
                         f"{device} has {have / 1e9:.1f} GB free: it does not fit one device (a larger model needs "
                         "--tensor-parallel-size N to plan it over N GPUs)")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_to_first_token(engine: Engine, prompt: Encoded, reps: int) -> dict:
    engine.generate(prompt, max_new_tokens=1)  # warm-up: kernel compilation, autotuning
    ttft, vit = [], []
    for _ in range(reps):
        before = engine.stats.vit_seconds
        _sync(engine.model.device)
        t0 = time.perf_counter()
        engine.generate(prompt, max_new_tokens=1)
        ttft.append(time.perf_counter() - t0)
        vit.append(engine.stats.vit_seconds - before)
    return {"prompt_tokens": len(prompt.tokens), "ttft_ms": 1e3 * statistics.median(ttft),
            "vit_ms": 1e3 * statistics.median(vit)}


def decode_throughput(engine: Engine, batch: int, context: int, steps: int, ideal=None) -> dict:
    """ideal(batch, context) -> (bytes, seconds) of the step's roofline; default: one device's."""
    vocab = engine.model.args.text.vocab_size
    g = torch.Generator().manual_seed(batch)
    prompts = [Encoded(tokens=[BOS] + torch.randint(1000, vocab, (context - 1,), generator=g).tolist(), images=[])
               for _ in range(batch)]
    seqs = [engine.add_request(p, engine_params(steps + 2, vocab)) for p in prompts]
    while any(not s.generated for s in seqs):  # prefill everyone (and one warm decode step)
        engine.step()
    engine.step()
    before = (engine.stats.decode_seconds, engine.stats.decode_steps, engine.stats.decode_tokens)
    for _ in range(steps):
        engine.step()
    seconds = engine.stats.decode_seconds - before[0]
    n_steps = engine.stats.decode_steps - before[1]
    tokens = engine.stats.decode_tokens - before[2]
    while engine.has_unfinished():
        engine.step()
    step_s = seconds / n_steps
    if ideal is None:
        step_bytes = decode_bytes(engine.model, batch, context)
        ideal_s = step_bytes / hardware.current().hbm_bytes_per_s
    else:
        step_bytes, ideal_s = ideal(batch, context)
    return {"batch": batch, "context": context, "stopped_early": sum(s.finish_reason != "length" for s in seqs),
            "step_ms": 1e3 * step_s, "tok_per_s": tokens / seconds,
            "roofline_tok_per_s": batch / ideal_s, "fraction_of_roofline": ideal_s / step_s,
            "achieved_GB_per_s": step_bytes / step_s / 1e9}


def engine_params(max_new_tokens: int, vocab_size: int):
    """Greedy, stopping only at the length limit in practice: the stop token is the last id of the
    vocabulary instead of EOS (the engine has no "ignore EOS"; SamplingParams refuses ids outside
    the vocabulary). A sequence that still draws it is counted in the report's stopped_early."""
    from pixtral_fast.runtime.sampling import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(vocab_size - 1,))


def check_run_args(args: ModelArgs, where, batches, image_size: int, decode_steps: int, context) -> None:
    if args.vision is None:
        raise ValueError(f"{where}: bench times an image prompt, and this model has no vision encoder")
    patch, merge, largest = args.vision.patch_size, args.vision.spatial_merge_size, args.vision.image_size
    unit = patch * merge
    if image_size % unit or not unit <= image_size <= largest:
        merged = f" x spatial merge {merge}" if merge > 1 else ""
        raise ValueError(f"image_size {image_size} must be a multiple of {unit} (the patch size {patch}{merged}) "
                         f"in [{unit}, {largest}] (the model's largest image)")
    if not batches or min(batches) < 1:
        raise ValueError(f"batches must be a non-empty list of sizes >= 1, got {list(batches)}")
    if decode_steps < 1:
        raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
    if context is not None and context < 2:
        raise ValueError(f"context must be >= 2 (BOS + one token), got {context}")


def check_parallel_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    return size


def engine_limits(batches, context: int, prompt: Encoded, decode_steps: int) -> dict:
    longest = max(context, len(prompt.tokens)) + decode_steps + 8
    return dict(max_batch_size=max(batches), max_model_len=longest, num_blocks=max(batches) * -(-longest // 16) + 64,
                max_prefill_tokens=max(batches) * context)  # every batch starts together


def run(params, batches=(1, 8, 32), image_size=1024, decode_steps=32, context=None, device=None,
        dtype=torch.bfloat16, backend="auto", nvtx=False, reps: int = 3, out: str | Path | None = None,
        cuda_graphs: bool = True, scheme: str | None = None, group_size: int = 128,
        tensor_parallel_size: int = 1) -> dict:
    """The report; with `out`, also written there after each section, so that a run cut short
    still leaves what it measured. scheme: None (bf16/fp16/fp32 weights), "w4a16" (int4, one
    scale per group_size inputs) or "fp8" (e4m3, one scale per output channel).
    tensor_parallel_size > 1: the memory plan and roofline only (see the module docstring)."""
    args = ModelArgs.from_params_json(params)
    device, dtype = resolve_device(device), check_dtype(dtype)
    check_run_args(args, params, batches, image_size, decode_steps, context)
    check_scheme(args, scheme, group_size)
    if check_parallel_size(tensor_parallel_size) > 1:
        return parallel_plan_report(args, tensor_parallel_size, batches, image_size, context, dtype, scheme, out)
    check_fits(args, device, dtype)
    if scheme is None:
        model = random_model(args, device, dtype).set_backend(backend)
    else:
        model = random_quantized_model(args, device, dtype, scheme, group_size, backend)
    prompt = image_prompt(image_size, args.vision)
    context = context or len(prompt.tokens)
    engine = Engine.from_model(model, nvtx=nvtx, use_cuda_graphs=None if cuda_graphs else False,
                               **engine_limits(batches, context, prompt, decode_steps))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "engine": engine.describe(),
        "quantization": describe_scheme(model),
        "parameters": parameter_count(model),
        "weights_held_GB": held_bytes(model) / 1e9,
        "decode_weight_bytes_per_step_GB": decode_bytes(model, 1, 0) / 1e9,
        "hbm_bytes_per_s_assumed": hardware.current().hbm_bytes_per_s,
        "roofline_gpu": hardware.current().name,
    }
    return measure(engine, report, prompt, batches, context, decode_steps, reps, image_size, out)


def measure(engine: Engine, report: dict, prompt: Encoded, batches, context: int, decode_steps: int, reps: int,
            image_size: int, out, ideal=None) -> dict:
    """Adds the time to first token and the decode throughput per batch size to `report`."""
    def emit(key, value):
        report[key] = value
        if out is not None:
            Path(out).write_text(json.dumps(report, indent=2) + "\n")

    emit("time_to_first_token", {**time_to_first_token(engine, prompt, reps), "image": f"{image_size}x{image_size}"})
    emit("decode", [])
    for b in batches:
        emit("decode", report["decode"] + [decode_throughput(engine, b, context, decode_steps, ideal)])
    return report


def parallel_plan_report(args: ModelArgs, size: int, batches, image_size: int, context, dtype, scheme, out) -> dict:
    """`bench --params P --random-weights --tensor-parallel-size N`: the plan, on the meta device."""
    from pixtral_fast.runtime.tp_memory import tensor_parallel_report

    if scheme is not None:
        raise ValueError(f"scheme={scheme!r} with tensor_parallel_size={size}: quantized weights are not split "
                         "across ranks yet; plan the dense model (no --scheme)")
    ShardPlan(size).check(args.text)
    context = context or len(image_prompt(image_size, args.vision).tokens)
    report = {"tensor_parallel_size": size, "parameters": parameter_count(build_model(args, device="meta", dtype=dtype)),
              "decode_context": context,
              **tensor_parallel_report(args, size, sorted(set(batches)), context, dtype),
              "note": (f"plan only, counted on the meta device: no model was built. Random weights exist in one "
                       f"process and the {size - 1} worker ranks load their shards from a checkpoint file, so "
                       f"tensor-parallel decode speed needs a real checkpoint: pixtral-fast bench --model DIR "
                       f"--tensor-parallel-size {size} (on {size} GPUs)")}
    if not torch.cuda.is_available():
        report["note"] += (f"; no GPU here: each GPU is assumed to be an {hardware.DEFAULT.name} "
                           f"({hardware.DEFAULT.memory_bytes / 1e9:.0f} GB)")
    if out is not None:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_checkpoint(path, batches=(1, 8, 32), image_size=1024, decode_steps=32, context=None, device=None,
                   dtype=torch.bfloat16, backend="auto", nvtx=False, reps: int = 3, out: str | Path | None = None,
                   cuda_graphs: bool = True, tensor_parallel_size: int = 1) -> dict:
    """`bench --model DIR [--tensor-parallel-size N]`: the checkpoint's real weights through
    Engine.from_pretrained, timed like run(); the roofline is the N-GPU one of
    pixtral_fast/runtime/tp_memory.py (rank 0's bytes, plus the collectives when N > 1)."""
    from pixtral_fast.model.load import checkpoint_path, read_args
    from pixtral_fast.runtime.tp_memory import decode_roofline, rank_plan, tensor_parallel_report

    size = check_parallel_size(tensor_parallel_size)
    args, dtype = read_args(checkpoint_path(path)), check_dtype(dtype)
    check_run_args(args, path, batches, image_size, decode_steps, context)
    prompt = image_prompt(image_size, args.vision)
    context = context or len(prompt.tokens)
    rank0 = rank_plan(args, size, 0, dtype)
    engine = Engine.from_pretrained(path, device=device, dtype=dtype, backend=backend, tensor_parallel_size=size,
                                    nvtx=nvtx, use_cuda_graphs=None if cuda_graphs else False, progress=False,
                                    **engine_limits(batches, context, prompt, decode_steps))

    def ideal(batch: int, ctx: int) -> tuple[int, float]:
        line = decode_roofline(args, rank0, size, batch, ctx, dtype)
        return line["hbm_bytes_per_rank"], line["step_ms"] / 1e3

    with engine:
        device = engine.model.device
        report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "engine": engine.describe(), "tensor_parallel_size": size,
                  "weights_per_rank_GB": [sum(parts.values()) / 1e9 for parts in engine.weight_bytes()],
                  **tensor_parallel_report(args, size, sorted(set(batches)), context, dtype)}
        return measure(engine, report, prompt, batches, context, decode_steps, reps, image_size, out, ideal)
