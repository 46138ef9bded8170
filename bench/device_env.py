"""The device check's env stage: versions, the GPU, and the copy bandwidth that the rooflines are
also given against. `python bench device_env OUT.json` (bench/device_check.sh)."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
import triton

from bench.bandwidth import copy_bandwidth


def describe() -> dict:
    env = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        return env | {"gpu": None, "copy_bandwidth": copy_bandwidth(64 << 20, 5, "cpu")}
    p = torch.cuda.get_device_properties(0)
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    return env | {"gpu": p.name, "sms": p.multi_processor_count, "memory_gib": p.total_memory / 2**30,
                  "driver": driver, "copy_bandwidth": copy_bandwidth(4 << 30, 20, "cuda")}


if __name__ == "__main__":
    env = describe()
    with open(sys.argv[1], "w") as f:
        f.write(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env))
