"""Timing helpers: pytest-benchmark rounds with the GPU synchronised inside the timed call, an
optional L2 flush before each round (memory-bound kernels are measured cold), and throughput plus
the fraction of the H200's limits in extra_info."""
from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

HBM_BYTES_PER_S = 4.8e12   # H200 HBM3e
BF16_FLOPS = 790e12        # dense bf16 tensor-core rate measured on this H200 (DESIGN §4)
ON_GPU = torch.cuda.is_available()
OURS = "pixtral_fast"

RESULTS: dict[str, dict[str, float]] = defaultdict(dict)  # group -> impl -> seconds

_flush_buffer = None


def flush_l2() -> None:
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # > 60 MB of L2
    _flush_buffer.zero_()


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def event_seconds(fn, reps: int, cold: bool) -> float:
    """Median device time of fn from CUDA events (no launch or sync latency), L2 flushed if cold."""
    times = []
    for _ in range(reps):
        if cold:
            flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure(benchmark, fn, *, group: str, impl: str, flops: float | None = None, nbytes: float | None = None,
            cold_l2: bool = False, budget_s: float = 1.0) -> float:
    """Benchmarks fn (already warm) and records throughput; returns the seconds used for ratios."""
    benchmark.group = group
    fn()
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    once = max(time.perf_counter() - t0, 1e-6)
    rounds = max(3, min(50, int(budget_s / once))) if ON_GPU else 1

    def timed():
        fn()
        _sync()

    benchmark.pedantic(timed, setup=flush_l2 if (ON_GPU and cold_l2) else None, rounds=rounds, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    info = {"impl": impl, "wall_median_ms": seconds * 1e3, "rounds": rounds}
    if ON_GPU:
        seconds = event_seconds(fn, rounds, cold_l2)
        info["device_median_ms"] = seconds * 1e3
    if flops:
        info |= {"TFLOP_per_s": flops / seconds / 1e12, "fraction_of_bf16_peak": flops / seconds / BF16_FLOPS}
    if nbytes:
        info |= {"GB_per_s": nbytes / seconds / 1e9, "fraction_of_hbm": nbytes / seconds / HBM_BYTES_PER_S}
    benchmark.extra_info.update(info)
    RESULTS[group][impl] = seconds
    return seconds


def ratio_table(results: dict[str, dict[str, float]]) -> list[str]:
    """One line per group: our time and each peer's time over ours (> 1: we are faster)."""
    lines = []
    for group, impls in sorted(results.items()):
        ours = {k: v for k, v in impls.items() if k.startswith(OURS)}
        for name, t in ours.items():
            peers = ", ".join(f"{p} x{impls[p] / t:.2f}" for p in sorted(impls) if not p.startswith(OURS))
            lines.append(f"{group:<40} {name:<28} {t * 1e3:9.3f} ms   {peers}")
    return lines
