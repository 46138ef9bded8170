"""Benchmarks: real shapes on a GPU, tiny ones under the Triton interpreter on the CPU (so that CI
runs every benchmark once, quickly). A summary of ratios against the peers of each group is
printed at the end of the run; bench/report.py writes the same from --benchmark-json.

The benchmarks reuse tests' helpers. Neither folder is importable from sys.path, since the
repository root is never put there (README), so `tests` is imported here by its location."""
import importlib.util
import sys
from pathlib import Path


def import_by_location(name: str, folder: Path):
    """The package `name` from `folder`/__init__.py, registered in sys.modules under that name."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


import_by_location("tests", Path(__file__).resolve().parents[1] / "tests")
