"""Where a decode step's time goes, for the device check's first run: launches per step (counted
as tests/test_launches.py counts them, for bf16, W4A16 and FP8 at batch 1 and 32) and the device
time of every kernel of one batch-1 bf16 decode step, run eagerly under the torch profiler (a
CUDA graph would hide the kernels from it), with the profiler's own kernel count beside ours.

    python bench step_profile --params tests/data/params.json --out FILE     # a GPU: Pixtral-12B
    python bench step_profile --tiny --device cpu --out FILE                  # the CPU stand-in

The launch counts come from the tiny model (Pixtral-12B's structure; counts do not depend on
sizes); the profile from the full-size model on a GPU, random weights made on the device."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pixtral_fast as pf
from pixtral_fast.benchmark import random_model, random_quantized_model
from pixtral_fast.config import ModelArgs
from pixtral_fast.model.load import resolve_device
from pixtral_fast.runtime.launches import decode_step_launches
from pixtral_fast.tiny import TINY_ARGS

SCHEMES = (None, "w4a16", "fp8")
BATCHES = (1, 32)
TOP = 25


def launch_counts(device: torch.device, dtype: torch.dtype, schemes=SCHEMES, batches=BATCHES) -> dict:
    out = {}
    for scheme in schemes:
        model = (random_model(TINY_ARGS, device, dtype).set_backend("fast") if scheme is None
                 else random_quantized_model(TINY_ARGS, device, dtype, scheme, 32, "fast"))
        engine = pf.Engine.from_model(model, None, max_batch_size=max(batches), num_blocks=64, use_cuda_graphs=False)
        for batch in batches:
            c = decode_step_launches(engine.decode_runner, batch)
            out[f"{scheme or 'bf16'}_b{batch}"] = {k: c[k] for k in ("per_layer", "outside_layers",
                                                                      "per_layer_by_kernel")}
        engine.close()
    return out


def profile_step(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> dict:
    """One batch-1 decode step body, eager, under the profiler: kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    model = random_model(args, device, dtype).set_backend("fast")
    engine = pf.Engine.from_model(model, None, max_batch_size=1, memory_bytes=1 << 30, use_cuda_graphs=False)
    runner, key = engine.decode_runner, (1, True, False, False)
    runner.fill_scratch(1)
    for _ in range(3):  # JIT compiles and caches before the measured step
        runner.run_body(key)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), profile(activities=activities) as prof:
        runner.run_body(key)
        if on_gpu:
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == on_gpu]
    time_of = (lambda e: e.device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    rows = sorted(({"kernel": e.key[:120], "count": e.count, "us": time_of(e)} for e in events),
                  key=lambda r: -r["us"])
    busy = sum(r["us"] for r in rows)
    engine.close()
    return {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
            "step_wall_ms": 1e3 * wall, "kernels_busy_ms": busy / 1e3,
            "kernel_launches_seen": sum(r["count"] for r in rows), "top_kernels": rows[:TOP]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--params", help="params.json of the model to profile (random weights)")
    src.add_argument("--tiny", action="store_true", help="the tiny model (the CPU stand-in)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # The CPU stand-in counts bf16 at batch 1 only: the interpreter makes the rest minutes long.
    quick = dict(schemes=(None,), batches=(1,)) if device.type == "cpu" else {}
    report: dict = {"launches_per_step": launch_counts(device, dtype, **quick)}
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")  # kept if the profile is cut short
    args = TINY_ARGS if a.tiny else ModelArgs.from_params_json(a.params)
    report["profile_batch1_bf16" if device.type == "cuda" else "profile_batch1_cpu"] = profile_step(args, device, dtype)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["launches_per_step"]["bf16_b1"]))
    return report


if __name__ == "__main__":
    main()
