"""Running a test script in a fresh Python with TRITON_INTERPRET=1: what a user gets who imports
the package alone (no tests/conftest.py, none of its shims), on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path



def run_interpreted(script: str, cwd: Path, timeout: float = 600) -> dict:
    """The JSON object the script prints on its last line; asserts that the script succeeded."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
