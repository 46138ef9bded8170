"""Static estimates of Pixtral-12B's batch-1 decode step on an H200 and an H100, made without a
GPU from three counts: the weight bytes a step reads (counted on the meta device, per kernel
that reads them), each weight-streaming kernel's issue-rate ceiling (the SASS table of
tests/test_sass_ceiling.py) and the launches per step (the table of tests/test_launches.py).

    step = sum over kernels of bytes / min(HBM bandwidth, the kernel's ceiling)
           + launches x 1.5..2.5 us (a kernel's start inside a CUDA graph; no overlap assumed)

Dense GEMVs run on cuBLAS, whose SASS is not ours to read: they are taken at HBM bandwidth, which
the device check's first run must confirm. These are estimates until a device run measures them.
tests/conftest.py prints the table at the end of `make test` from the two tables above; by hand:
`python bench decode_estimate LAUNCHES.json SASS.json` (the JSON files those tests publish)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

PARAMS = Path(__file__).resolve().parents[1] / "tests" / "data" / "params.json"  # Pixtral-12B
LAYERS = 40
LAUNCH_S = (1.5e-6, 2.5e-6)
SCHEMES = ("bf16", "w4a16", "fp8")
GROUP = 128  # the group size `pixtral-fast quantize` writes by default


def bytes_by_kernel(scheme: str) -> dict[str, int]:
    """Weight bytes of one batch-1 decode step, by the kernel that streams them."""
    import torch

    from pixtral_fast.config import ModelArgs
    from pixtral_fast.model.pixtral import build_model
    from pixtral_fast.quant.linear import QuantLinear
    from pixtral_fast.model.quantized import build_quantized_meta_model

    args = ModelArgs.from_params_json(PARAMS)
    model = (build_model(args, device="meta", dtype=torch.bfloat16) if scheme == "bf16"
             else build_quantized_meta_model(args, scheme, GROUP))
    out = {"dense": 0, scheme: 0} if scheme != "bf16" else {"dense": 0}
    for name, module in model.named_modules():
        if not name.startswith(("layers.", "norm", "output")) or next(module.children(), None) is not None:
            continue
        held = sum(t.numel() * t.element_size() for t in list(module.parameters(recurse=False))
                   + list(module.buffers(recurse=False)))
        out[scheme if isinstance(module, QuantLinear) else "dense"] += held
    emb = model.tok_embeddings.weight
    out["dense"] += emb.shape[1] * emb.element_size()  # one embedding row per token
    return out


def ceilings(sass: dict) -> dict[str, float]:
    """The issue-rate ceiling (bytes/s) of each quantized decode kernel (W4A16 at GROUP)."""
    found = {}
    for row in sass["rows"]:
        if row.get("error"):
            continue
        if row["kernel"].startswith("w4a16") and row["kernel"].endswith(f"g{GROUP}"):
            found["w4a16"] = row["ceiling_bytes_per_s"]
        elif row["kernel"].startswith("fp8"):
            found["fp8"] = row["ceiling_bytes_per_s"]
    return found


def estimate(launches: dict, sass: dict) -> list[str]:
    from pixtral_fast import hardware

    limits = ceilings(sass)
    lines = [f"{'weights':8s} {'GB/step':>7s} {'launches':>8s} {'GPU':9s} {'roofline tok/s':>14s} "
             f"{'estimate tok/s':>15s} {'of roofline':>11s}  bound by"]
    for scheme in SCHEMES:
        counts = launches.get(f"{scheme}_b1")
        if counts is None:
            continue
        n_launches = LAYERS * counts["per_layer"] + counts["outside_layers"]
        parts = bytes_by_kernel(scheme)
        total = sum(parts.values())
        for gpu in (hardware.H200, hardware.H100_SXM):
            stream_s = sum(b / min(gpu.hbm_bytes_per_s, limits.get(k, gpu.hbm_bytes_per_s)) for k, b in parts.items())
            slow, fast = (stream_s + n_launches * t for t in reversed(LAUNCH_S))
            roofline = gpu.hbm_bytes_per_s / total
            limit = "issue" if stream_s > total / gpu.hbm_bytes_per_s * 1.01 else "HBM"
            lines.append(f"{scheme:8s} {total / 1e9:7.2f} {n_launches:8g} {gpu.name:9s} {roofline:14.0f} "
                         f"{1 / slow:7.0f}-{1 / fast:<7.0f} {1 / slow / roofline:5.2f}-{1 / fast / roofline:<5.2f}  "
                         f"{limit} + launches")
    return lines


if __name__ == "__main__":
    launches, sass = (json.loads(Path(p).read_text()) for p in sys.argv[1:3])
    print("\n".join(estimate(launches, sass)))
