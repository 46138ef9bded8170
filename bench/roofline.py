"""The GPU's limits and the ratio table, without torch: bench/report.py runs after every stage
of the device check, and must not pay torch's import each time. The limits come from
pixtral_fast/hardware.py, loaded by path for the same reason (the package imports torch)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "pixtral_fast_hardware", Path(__file__).resolve().parents[1] / "pixtral_fast" / "hardware.py")
hardware = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(hardware)

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
