"""The H200's limits and the ratio table, without torch: bench/report.py runs after every stage
of the device check, and must not pay torch's import each time."""
from __future__ import annotations

HBM_BYTES_PER_S = 4.8e12   # H200 HBM3e, datasheet
BF16_FLOPS = 790e12        # dense bf16 tensor-core rate measured on this H200 (DESIGN §4)
OURS = "pixtral_fast"


def ratio_table(results: dict[str, dict[str, float]]) -> list[str]:
    """One line per group: our time and each peer's time over ours (> 1: we are faster)."""
    lines = []
    for group, impls in sorted(results.items()):
        ours = {k: v for k, v in impls.items() if k.startswith(OURS)}
        for name, t in ours.items():
            peers = ", ".join(f"{p} x{impls[p] / t:.2f}" for p in sorted(impls) if not p.startswith(OURS))
            lines.append(f"{group:<40} {name:<28} {t * 1e3:9.3f} ms   {peers}")
    return lines
