"""`python bench host_overhead` runs end to end on small batches and reports, per batch, the step,
the model's share and the host's share, the host's share beside Pixtral-12B's roofline step."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_host_overhead_reports_every_batch(tmp_path):
    out = tmp_path / "host.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench"), "host_overhead", "--batches", "1", "3", "--steps", "3",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 3] and report["steps"] == 3
    for row in report["rows"]:
        assert 0 < row["model_and_sampling_ms"] < row["step_ms"]
        assert abs(row["step_ms"] - row["model_and_sampling_ms"] - row["host_ms"]) < 0.5 * row["step_ms"]
        assert row["pixtral_12b_bf16_roofline_ms"] > 4.0  # 24 GB of bf16 weights at 4.8 TB/s, at least
        assert row["host_fraction_of_roofline"] == row["host_ms"] / row["pixtral_12b_bf16_roofline_ms"]
