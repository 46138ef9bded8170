"""The repository root is never an import path (README, "Why the repository root is not on
sys.path"): its `kernels/` folder would shadow Hugging Face's `kernels` package, which
transformers imports. pytest imports tests/ and bench/ by their location (--import-mode=importlib,
set in pyproject.toml); this file registers both packages under their names before any test
module imports the other, and undoes what `python -m pytest` did before pytest started: put the
current folder first on sys.path."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

if "bench" not in sys.modules:  # bench/__init__.py registers `tests` the same way
    _spec = importlib.util.spec_from_file_location("bench", ROOT / "bench" / "__init__.py")
    sys.modules["bench"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["bench"])
