"""`python bench NAME [ARGS]` runs the script bench/NAME.py as `python -m bench.NAME` would, but
without putting the repository root on sys.path (README: its `kernels/` would shadow Hugging
Face's `kernels`). Example: `python bench serve_load --tiny --offline --concurrency 16`."""
import importlib.util
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith(("_", "test_", "conftest")))

if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
    sys.exit(f"usage: python bench NAME [ARGS...], NAME one of: {', '.join(NAMES)}")
del sys.path[0]  # this folder: its modules are imported as bench.*, never by their bare names
spec = importlib.util.spec_from_file_location("bench", HERE / "__init__.py")
sys.modules["bench"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["bench"])
name = sys.argv.pop(1)
sys.argv[0] = str(HERE / f"{name}.py")
runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)
