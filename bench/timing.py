"""Timing helpers: pytest-benchmark rounds with the GPU synchronised inside the timed call, an
optional L2 flush before each round (memory-bound kernels are measured cold), and throughput plus
the fraction of this GPU's limits in extra_info (an H200's on the CPU)."""
from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from bench.roofline import OURS, hardware, ratio_table  # noqa: F401  (re-exported)

ON_GPU = torch.cuda.is_available()
SPEC = hardware.spec_for(torch.cuda.get_device_name(0) if ON_GPU else None)

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


def check_output(actual, expected, dtype: torch.dtype, label: str) -> float:
    """The benchmarked call's output against the reference's (computed in fp32 from the same
    inputs), within tests/tolerances.py's bound for `dtype`: a fast wrong kernel (or a peer
    called with the wrong layout) fails here instead of being timed. Returns the max error."""
    from tests.tolerances import TOL

    atol, rtol = TOL[dtype]
    pairs = list(zip(actual, expected)) if isinstance(actual, (tuple, list)) else [(actual, expected)]
    worst = 0.0
    for a, e in pairs:
        a, e = a.float(), e.float().to(a.device)
        assert a.shape == e.shape, f"{label}: output shape {tuple(a.shape)} != reference {tuple(e.shape)}"
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{label}: output differs from the reference before timing: {m}")
        worst = max(worst, float((a - e).abs().max()) if a.numel() else 0.0)
    return worst


def measure(benchmark, fn, *, group: str, impl: str, flops: float | None = None, nbytes: float | None = None,
            cold_l2: bool = False, budget_s: float = 1.0, expected, dtype: torch.dtype,
            output=lambda out: out) -> float:
    """Checks fn's output once against `expected` (output() maps it to the reference's layout),
    then benchmarks fn and records throughput; returns the seconds used for ratios."""
    benchmark.group = group
    out = fn()
    _sync()
    benchmark.extra_info["max_abs_error_vs_reference"] = check_output(output(out), expected, dtype,
                                                                      f"{group}/{impl}")
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
    info = {"impl": impl, "wall_median_ms": seconds * 1e3, "rounds": rounds, "limits_of": SPEC.name}
    if ON_GPU:
        seconds = event_seconds(fn, rounds, cold_l2)
        info["device_median_ms"] = seconds * 1e3
    if flops:
        info |= {"TFLOP_per_s": flops / seconds / 1e12, "fraction_of_bf16_peak": flops / seconds / SPEC.bf16_flops}
    if nbytes:
        info |= {"GB_per_s": nbytes / seconds / 1e9, "fraction_of_hbm": nbytes / seconds / SPEC.hbm_bytes_per_s}
    benchmark.extra_info.update(info)
    RESULTS[group][impl] = seconds
    return seconds
