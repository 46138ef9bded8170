"""bench/device_check.sh (the one command a lent H200 runs) and bench/prepare_wheels.sh, checked
here: they parse, the stages come most informative first, the budget fits 8 minutes with margin,
at most 8 files land in $OUT, and a CPU stand-in run writes every stage's JSON as it goes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"
DEVICE_MINUTES = 8
ORDER = ["packages", "env", "build_varlen", "model", "profile", "gpu_rest", "kernels", "e2e", "hf_e2e", "serve"]


def bash(*args, env=None, timeout=60):
    # Not PYTEST_*: under pytest-xdist they make the script's own pytest runs believe they are
    # xdist workers (pytest-benchmark then refuses --benchmark-only).
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(["bash", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**inherited, **(env or {})})


@pytest.mark.parametrize("script", ["device_check.sh", "prepare_wheels.sh"])
def test_scripts_parse(script):
    proc = bash("-n", ROOT / "bench" / script)
    assert proc.returncode == 0, proc.stderr


def budget() -> tuple[list[tuple[str, int]], int, int]:
    proc = bash(SCRIPT, "--print-budget")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    stages = [(name, int(s)) for name, s in (ln.split() for ln in lines if ln and not ln.startswith("total"))]
    total, limit = map(int, re.search(r"total (\d+) of (\d+)", proc.stdout).groups())
    return stages, total, limit


def test_stages_most_informative_first():
    """Varlen attention (with the build beside it), then the fast model and the engine on the GPU,
    then the other GPU tests, then the benchmarks."""
    stages, _, _ = budget()
    assert [name for name, _ in stages] == ORDER
    text = SCRIPT.read_text()
    for name in ORDER:
        assert f"stage_{name}() {{" in text, f"no function for stage {name}"
    for test_file in ["tests/test_varlen_attention.py", "tests/test_fast_model.py", "tests/test_cuda_ext.py",
                      "tests/test_decode_attention.py", "tests/test_decode_runner.py"]:
        assert test_file in text and (ROOT / test_file).is_file(), test_file


def test_budget_fits_eight_minutes_with_margin():
    stages, total, limit = budget()
    assert limit == DEVICE_MINUTES * 60
    assert total == sum(s for _, s in stages)
    assert all(s > 0 for _, s in stages)
    # Each stage may overrun its limit by the 5 s SIGKILL grace; 30 s more for the fold and tar.
    assert total + 5 * len(stages) + 30 <= limit, f"budget {total} s leaves no margin under {limit} s"
    assert re.search(rf"# The budget \(seconds\)\. Sum {total} s", SCRIPT.read_text()), \
        "the budget comment must state the current sum"


def test_at_most_eight_files_in_out():
    names = set(re.findall(r'"\$OUT/([\w.]+)"', SCRIPT.read_text()))
    names |= set(re.findall(r"\{([\w,]+)\}\.json", SCRIPT.read_text())[0].split(","))  # the rm -f list
    names = {n if "." in n else n + ".json" for n in names}
    assert len(names) <= 8, sorted(names)
    report = (ROOT / "bench" / "report.py").read_text()
    assert '"report.json"' in report and '"stages.json"' in report


def test_prepare_wheels_resolves_once():
    """One resolution of the whole set and one download of its pins (never a download per name)."""
    text = (ROOT / "bench" / "prepare_wheels.sh").read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert code.count("pip install") == 1 and "--dry-run" in code and "--report" in code
    assert code.count("pip download") == 1 and '-r "$tmp/pins.txt"' in code
    assert "for pkg in" not in code


def test_cpu_stand_in_run_writes_each_stage(tmp_path):
    out = tmp_path / "out"
    proc = bash(SCRIPT, env={"DEVICE_CHECK_MODE": "cpu", "DEVICE_CHECK_STAGES": "env,model", "OUT": str(out),
                             "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"env.json", "stages.json", "report.json", "logs.tar.gz"} <= set(files), files
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ["env", "model"]
    assert stages["env"]["rc"] == 0 and stages["env"]["seconds"] <= stages["env"]["limit_s"]
    assert stages["model"]["rc"] == 0 and "skipped" in stages["model"]["summary"], stages["model"]
    env = json.loads((out / "env.json").read_text())
    assert env["copy_bandwidth"]["copy_bytes_per_s"] > 0
    report = json.loads((out / "report.json").read_text())
    assert report["rooflines"]["measured_copy_bytes_per_s"] == env["copy_bandwidth"]["copy_bytes_per_s"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"logs/env.log", "logs/tests_model.log"} <= set(tar.getnames())


@pytest.mark.slow
def test_full_cpu_dry_run_runs_every_stage(tmp_path):
    """Every stage runs its CPU stand-in (GPU-only tests skip with their reason), in order, and
    leaves its record; the report folds each stage's JSON, the step profile included."""
    out = tmp_path / "out"
    proc = bash(SCRIPT, env={"DEVICE_CHECK_MODE": "cpu", "OUT": str(out), "PYTHON": sys.executable,
                             "TMPDIR": str(tmp_path), "DEVICE_CHECK_LIMIT_SCALE": "10"}, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ORDER
    failed = {name: r for name, r in stages.items() if r["rc"] != 0}
    assert failed == {}, f"{failed}\n{proc.stdout[-3000:]}"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"report.json", "stages.json", "env.json", "bench.json", "e2e.json", "hf_e2e.json",
                                "serve_load.json", "logs.tar.gz"} == set(files), files
    report = json.loads((out / "report.json").read_text())
    assert report["step_profile"]["launches_per_step"]["bf16_b1"]["per_layer"] <= 10
    assert report["serve_load"]["answers_equal_offline"] == report["serve_load"]["workload"]["requests"]
    for name in ("model", "gpu_rest"):  # every test of theirs needs a GPU: skipped, with the reason
        assert "skipped" in stages[name]["summary"] and "failed" not in stages[name]["summary"], stages[name]


def test_report_gives_rooflines_against_both_bandwidths(tmp_path):
    from bench import report

    (tmp_path / "env.json").write_text(json.dumps({"copy_bandwidth": {"copy_bytes_per_s": 4.0e12}}))
    (tmp_path / "e2e.json").write_text(json.dumps({"decode": [{"batch": 1, "achieved_GB_per_s": 2000.0}]}))
    report.main(tmp_path)
    row = json.loads((tmp_path / "report.json").read_text())["e2e"]["decode"][0]
    assert row["fraction_of_copy_bw"] == pytest.approx(0.5)
    assert row["fraction_of_datasheet"] == pytest.approx(2000e9 / 4.8e12)  # no GPU named: an H200's


@pytest.mark.parametrize("gpu, datasheet, assumed", [("NVIDIA H100 80GB HBM3", 3.35e12, False),
                                                      ("NVIDIA H200", 4.8e12, False),
                                                      ("NVIDIA H100 PCIe", 2.0e12, False),
                                                      ("NVIDIA A100-SXM4-80GB", 4.8e12, True)])
def test_report_takes_the_limits_of_the_gpu_that_ran(tmp_path, gpu, datasheet, assumed):
    """The device check runs on an H100 as well as an H200: fractions are of that card's datasheet."""
    from bench import report

    (tmp_path / "env.json").write_text(json.dumps({"gpu": gpu, "copy_bandwidth": {"copy_bytes_per_s": 3.0e12}}))
    (tmp_path / "e2e.json").write_text(json.dumps({"decode": [{"batch": 1, "achieved_GB_per_s": 1500.0}]}))
    report.main(tmp_path)
    folded = json.loads((tmp_path / "report.json").read_text())
    assert folded["rooflines"]["datasheet_bytes_per_s"] == datasheet
    assert folded["rooflines"]["limits_assumed"] is assumed
    assert folded["e2e"]["decode"][0]["fraction_of_datasheet"] == pytest.approx(1500e9 / datasheet)


def test_report_records_failures(tmp_path):
    from bench import report

    log = tmp_path / "t.log"
    log.write_text("F.s\nFAILED tests/test_x.py::test_y - AssertionError: no\n1 failed, 1 passed, 1 skipped in 2.0s\n")
    report.record_stage(tmp_path, "model", "12", "60", "1", str(log))
    rec = json.loads((tmp_path / "stages.json").read_text())["model"]
    assert rec == {"seconds": 12, "limit_s": 60, "rc": 1, "timed_out": False,
                   "summary": "1 failed, 1 passed, 1 skipped in 2.0s",
                   "failed": ["tests/test_x.py::test_y - AssertionError: no"]}


def test_benchmark_output_check_catches_a_wrong_kernel():
    from bench.timing import check_output

    expected = torch.randn(4, 8, 64)
    assert check_output(expected.bfloat16(), expected, torch.bfloat16, "ok") < 1e-2
    with pytest.raises(AssertionError, match="differs from the reference before timing"):
        check_output((expected * 1.05).bfloat16(), expected, torch.bfloat16, "scaled")
    with pytest.raises(AssertionError, match="shape"):
        check_output(expected[:, :, :32], expected, torch.bfloat16, "sliced")
