"""The static issue-rate ceilings of the decode kernels (issue 17), as text for the benchmark report.

tests/test_sass_ceiling.py measures them from the sm_90 SASS (tests/support/sass.py explains how)
and, with PIXTRAL_FAST_SASS_TABLE=FILE set, writes them to FILE as JSON:
{"gpu", "issue_rate_warp_instr_per_s", "hbm_bytes_per_s", "target_bytes_per_s", "rows": [...]}.
This file only formats that JSON (no torch, no Triton: bench/report.py may fold it after every
stage). `python bench sass_table FILE` prints the table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPORT_KEY = "sass_ceilings"  # the key and file stem (sass_ceilings.json) the report would use


def lines(table: dict) -> list[str]:
    """One header and one line per kernel: instructions and bytes per main-loop iteration, their
    ratio and the bandwidth at which the SMs' issue rate would saturate, against 2x HBM."""
    hbm, target = table["hbm_bytes_per_s"], table["target_bytes_per_s"]
    out = [f"static issue-rate ceilings, sm_90 SASS ({table['gpu']}: "
           f"{table['issue_rate_warp_instr_per_s'] / 1e12:.3f}e12 warp instr/s; HBM {hbm / 1e12:.1f} TB/s; "
           f"required >= {target / 1e12:.1f} TB/s)",
           f"{'kernel':34s} {'config':22s} {'instr/it':>8s} {'warps':>5s} {'B/it':>7s} {'loadB/it':>8s} "
           f"{'instr/B':>8s} {'TB/s':>6s} {'xHBM':>5s}  verdict"]
    for r in table["rows"]:
        if r.get("error"):
            out.append(f"{r['kernel']:34s} ERROR {r['error'].splitlines()[0][:100]}")
            continue
        load = "tma" if r["load_bytes_per_iter"] is None else f"{r['load_bytes_per_iter']:8d}"
        out.append(f"{r['kernel']:34s} {r['config']:22s} {r['warp_instr_per_iter']:8d} {r['warps']:5d} "
                   f"{r['stream_bytes_per_iter']:7.0f} {load:>8s} {r['instr_per_byte']:8.4f} "
                   f"{r['ceiling_bytes_per_s'] / 1e12:6.2f} {r['ceiling_bytes_per_s'] / hbm:5.2f}  {r['verdict']}")
    return out


def main(path: Path) -> None:
    print("\n".join(lines(json.loads(path.read_text()))))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
