"""The device's copy bandwidth: one large device-to-device copy (read + write), timed with CUDA
events, the best of several. It is what a memory-bound kernel can hope for on this very device,
next to the datasheet's figure for this GPU; bench/report.py gives every roofline against both. Prints JSON.
On a CPU (the device check's stand-in mode) it times a small host copy instead."""
from __future__ import annotations

import argparse
import json
import time

import torch

from bench.roofline import hardware


def copy_bandwidth(nbytes: int, reps: int, device: str) -> dict:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    assert torch.equal(dst[:: max(1, nbytes // 4096)], src[:: max(1, nbytes // 4096)]), "the copy is wrong"
    best = min(times)
    datasheet = hardware.spec_for(torch.cuda.get_device_name(0) if device == "cuda" else None).hbm_bytes_per_s
    bytes_moved = 2 * nbytes  # each byte read once and written once
    return {"copy_bytes": nbytes, "reps": reps, "best_ms": 1e3 * best, "median_ms": 1e3 * sorted(times)[reps // 2],
            "copy_bytes_per_s": bytes_moved / best, "datasheet_bytes_per_s": datasheet,
            "fraction_of_datasheet": bytes_moved / best / datasheet}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0, help="buffer size (GiB) on a GPU")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    nbytes = int(a.gib * 2**30) if device == "cuda" else 64 << 20
    print(json.dumps({"device": device, **copy_bandwidth(nbytes, a.reps, device)}, indent=2))


if __name__ == "__main__":
    main()
