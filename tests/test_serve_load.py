"""bench/serve_load.py --offline, the device check's serve stage, run for real on the tiny model:
the offline engine is built by the server's own argument parser (a namespace missing any field the
server reads fails here), it is closed before the server starts, and both sides answer alike."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
REQUESTS = 4


def test_serve_load_offline_on_the_tiny_model(tmp_path):
    out = tmp_path / "serve_load.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "serve_load", "--tiny", "--device", "cpu", "--dtype", "float32",
         "--backend", "reference", "--offline", "--concurrency", "2", "--num-requests", str(REQUESTS),
         "--max-tokens", "4", "--image-every", "2", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["workload"] == {"requests": REQUESTS, "max_tokens": 4, "image_every": 2, "with_images": 2}
    assert report["server_exit_code"] == 0
    assert report["offline"]["output_tokens"] == report["server"]["output_tokens"] > 0
    assert report["answers_equal_offline"] == REQUESTS  # greedy fp32: the same text on both sides
    assert report["server_vs_offline_output_tok_per_s"] > 0
    assert "ratio" in proc.stderr
