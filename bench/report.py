"""Folds one device run into one JSON report: kernel benchmarks (pytest-benchmark JSON) with the
ratio of each peer's time to ours per group, the end-to-end bench, its HF peer, and the test
summaries. Usage: python bench/report.py DIR  (reads DIR/*.json and *.log, writes DIR/report.json)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from bench.timing import OURS, ratio_table


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


def pytest_summary(log: Path) -> str | None:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    return lines[-1].strip("= ") if lines else None


def main(out: Path) -> None:
    report: dict = {}
    if (out / "bench.json").is_file():
        rows, groups = kernel_results(out / "bench.json")
        report["kernels"] = rows
        report["ratios_vs_peers"] = ratio_table(groups)
        report["speedup_vs_fastest_peer"] = speedups(groups)
    for name in ("e2e", "hf_e2e", "env"):
        f = out / f"{name}.json"
        if f.is_file() and f.stat().st_size:
            try:
                report[name] = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                report[name] = {"error": f"unreadable: {e}"}
    report["tests"] = {log.stem: pytest_summary(log) for log in sorted(out.glob("*.log"))}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(report.get("ratios_vs_peers", [])))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
