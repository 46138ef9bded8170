"""Folds one device run into one JSON report: kernel benchmarks (pytest-benchmark JSON) with the
ratio of each peer's time to ours per group, the end-to-end bench, its HF peer, the copy
bandwidth, and every stage's record (time, limit, exit status, test summary and failures).
Every bandwidth figure is given against both the datasheet's HBM bandwidth of the GPU that ran
(env.json names it; an H200's 4.8 TB/s where none did) and the copy bandwidth measured on the same
device in the same run.

  python bench report DIR                         reads DIR/*.json, writes DIR/report.json
  python bench report stage DIR NAME SECONDS LIMIT RC [LOG]
                                                  adds one stage's record to DIR/stages.json, then
                                                  folds as above (no torch import: fast)
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from bench.roofline import OURS, hardware, ratio_table


def kernel_results(path: Path) -> tuple[list[dict], dict[str, dict[str, float]]]:
    rows, by_group = [], {}
    for b in json.loads(path.read_text())["benchmarks"]:
        info = b.get("extra_info", {})
        seconds = info.get("device_median_ms", info.get("wall_median_ms", 0.0)) / 1e3
        rows.append({"group": b["group"], "name": b["name"], **info})
        by_group.setdefault(b["group"], {})[info.get("impl", b["name"])] = seconds
    return rows, by_group


def speedups(groups: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per group: the fastest peer's time over each of our variants' (> 1: we win)."""
    out = {}
    for group, impls in groups.items():
        peers = [t for k, t in impls.items() if not k.startswith(OURS)]
        if peers:
            out[group] = {k: min(peers) / t for k, t in impls.items() if k.startswith(OURS)}
    return out


def pytest_record(log: Path) -> dict:
    """The summary line of a pytest log and the names of what failed (from -rfE lines)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = text.splitlines()
    summary = [ln for ln in lines if re.search(r"\d+ (passed|failed|skipped|error|deselected)", ln)]
    return {"summary": summary[-1].strip("= ") if summary else None,
            "failed": [ln.split(" ", 1)[1][:300] for ln in lines if ln.startswith(("FAILED ", "ERROR "))][:50]}


def with_copy_rooflines(node, copy_bytes_per_s: float | None, datasheet_bytes_per_s: float):
    """Adds fraction_of_datasheet and fraction_of_copy_bw next to every GB/s figure."""
    if isinstance(node, list):
        return [with_copy_rooflines(x, copy_bytes_per_s, datasheet_bytes_per_s) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: with_copy_rooflines(v, copy_bytes_per_s, datasheet_bytes_per_s) for k, v in node.items()}
    for key in ("GB_per_s", "achieved_GB_per_s"):
        if key in node:
            node.setdefault("fraction_of_datasheet", node[key] * 1e9 / datasheet_bytes_per_s)
            if copy_bytes_per_s:
                node["fraction_of_copy_bw"] = node[key] * 1e9 / copy_bytes_per_s
    return node


def read_json(path: Path):
    if not (path.is_file() and path.stat().st_size):
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return {"error": f"unreadable: {e}"}


def main(out: Path) -> None:
    report: dict = {}
    env = read_json(out / "env.json") or {}
    copy_bw = (env.get("copy_bandwidth") or {}).get("copy_bytes_per_s")
    spec = hardware.spec_for(env.get("gpu"))
    datasheet = spec.hbm_bytes_per_s
    report["rooflines"] = {"gpu": env.get("gpu"), "limits_of": spec.name,
                           "limits_assumed": not hardware.is_listed(env.get("gpu")),
                           "datasheet_bytes_per_s": datasheet, "bf16_flops": spec.bf16_flops,
                           "measured_copy_bytes_per_s": copy_bw,
                           "copy_over_datasheet": copy_bw / datasheet if copy_bw else None}
    if (out / "bench.json").is_file() and (out / "bench.json").stat().st_size:
        rows, groups = kernel_results(out / "bench.json")
        report["kernels"] = with_copy_rooflines(rows, copy_bw, datasheet)
        report["ratios_vs_peers"] = ratio_table(groups)
        report["speedup_vs_fastest_peer"] = speedups(groups)
    for name in ("env", "stages", "e2e", "hf_e2e", "serve_load"):
        data = read_json(out / f"{name}.json")
        if data is not None:
            report[name] = with_copy_rooflines(data, copy_bw, datasheet)
    # Stages whose JSON stays out of OUT (the device returns 8 files at most) are folded in here.
    for extra in filter(None, os.environ.get("DEVICE_CHECK_EXTRA", "").split(os.pathsep)):
        data = read_json(Path(extra))
        if data is not None:
            report[Path(extra).stem] = data
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(report.get("ratios_vs_peers", [])))


def record_stage(out: Path, name: str, seconds: str, limit: str, rc: str, log: str | None = None) -> None:
    path = out / "stages.json"
    stages = read_json(path) or {}
    record = {"seconds": int(seconds), "limit_s": int(limit), "rc": int(rc),
              "timed_out": int(rc) in (124, 130, 137)}
    if log:  # a test stage's pytest log
        record |= pytest_record(Path(log))
    stages[name] = record
    path.write_text(json.dumps(stages, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "stage":
        record_stage(Path(sys.argv[2]), *sys.argv[3:])
        main(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
