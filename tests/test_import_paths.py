"""Our kernels/ folder never shadows Hugging Face's `kernels` package (README, "Why the repository
root is not on sys.path"): the test process keeps the root off sys.path, our kernels are reachable
only as pixtral_fast.kernels, a process that does put the root first still gets Hugging Face's
package for `import kernels`, and the project's commands never put it there."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ROOT / "kernels" / "__init__.py"


def hf_kernels_file() -> Path | None:
    """Hugging Face's kernels/__init__.py where that package is installed (transformers 5 needs it)."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("kernels/__init__.py")).resolve()


def run_python(code: str, *flags: str) -> dict:
    """`python FLAGS -c CODE` started in the repository root, so the root is sys.path[0], as for any
    `python -c` or `python -m` started there; CODE's last printed line is JSON."""
    proc = subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_root_is_not_an_import_path_of_the_test_process():
    assert [p for p in sys.path if Path(p or ".").resolve() == ROOT] == []
    assert Path(sys.modules["tests"].__file__).resolve() == ROOT / "tests" / "__init__.py"  # imported by location


def test_import_kernels_is_hugging_faces_and_ours_is_only_pixtral_fast_kernels():
    import pixtral_fast.kernels as ours

    assert Path(ours.__file__).resolve() == OURS and hasattr(ours, "INTERPRETING")
    spec = importlib.util.find_spec("kernels")
    hf = hf_kernels_file()
    if hf is None:
        assert spec is None
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("kernels")
        return
    assert Path(spec.origin).resolve() == hf
    kernels = importlib.import_module("kernels")
    assert Path(kernels.__file__).resolve() == hf
    assert not any(Path(getattr(m, "__file__", None) or "/").resolve() == OURS for m in list(sys.modules.values())
                   if m is not ours)


def test_transformers_imports_hugging_faces_kernels_even_with_the_root_first_on_sys_path():
    # What broke vLLM started in the root: transformers' is_kernels_available() imported our folder.
    seen = run_python(
        "import json, sys, kernels\n"
        "from transformers.utils import is_kernels_available\n"
        "available = is_kernels_available()\n"
        "import pixtral_fast.kernels as ours\n"
        "print(json.dumps({'first': sys.path[0], 'kernels': kernels.__file__, 'available': available,\n"
        "                  'ours': ours.__file__, 'interpreting': ours.INTERPRETING}))")
    assert Path(seen["first"] or ".").resolve() == ROOT or seen["first"] == ""
    assert Path(seen["ours"]).resolve() == OURS and seen["interpreting"] in (True, False)
    hf = hf_kernels_file()
    if hf is None:
        pytest.fail("transformers >= 5 requires Hugging Face's kernels package; it is not installed")
    assert Path(seen["kernels"]).resolve() == hf and seen["available"] is True


def test_with_no_other_kernels_installed_the_name_is_an_empty_shell():
    """vLLM's CPU build has transformers but not Hugging Face's kernels: started in the root,
    transformers' check (find_spec, then an import when no distribution names a version) must read
    our folder as "not installed" rather than import it or fail."""
    seen = run_python(
        "import importlib, importlib.util, json, sys\n"
        "found = importlib.util.find_spec('kernels') is not None\n"
        "module = importlib.import_module('kernels')\n"
        "try:\n"
        "    module.get_kernel\n"
        "    message = None\n"
        "except AttributeError as e:\n"
        "    message = str(e)\n"
        "try:\n"
        "    importlib.import_module('kernels.rope_2d')\n"
        "    submodule = True\n"
        "except ImportError:\n"
        "    submodule = False\n"
        "print(json.dumps({'found': found, 'file': module.__file__, 'version': getattr(module, '__version__', None),\n"
        "                  'message': message, 'submodule': submodule, 'torch': 'torch' in sys.modules,\n"
        "                  'left': sorted(m for m in sys.modules if m.split('.')[0] == 'kernels')}))",
        "-S")  # no site-packages: no other `kernels` to find
    assert seen["found"] and seen["file"] is None and seen["version"] is None  # what transformers calls absent
    assert "pixtral_fast.kernels" in seen["message"] and not seen["submodule"]
    assert seen["left"] == ["kernels"] and not seen["torch"]  # nothing of ours ran


COMMAND_FILES = ["Makefile", ".ci/run", "bench/device_check.sh", "bench/prepare_wheels.sh", "README.md"]
# Each puts the current folder (the root, where these commands run) first on sys.path.
ROOT_FIRST = [
    re.compile(r"python3?\s+-m\s+(pytest|bench|tests)\b"),    # python -m pytest / bench.x / tests.x
    re.compile(r'\$\(?PY(THON)?\)?"?\s+-m\s+(?!(pip|venv)\b)'),   # $PY -m anything but pip/venv (no -P)
    re.compile(r'\$\(?PY(THON)?\)?"?\s+-c\b'),                    # $PY -c (no -P)
    re.compile(r'\$\(?PY(THON)?\)?"?\s+-\s'),                     # $PY - (a script on stdin)
    re.compile(r"PYTHONPATH=[\"']?(\.|\$PWD|\$\(pwd\))"),       # PYTHONPATH=.
    re.compile(r"torchrun\b[^\n]*\s-m\s"),                     # torchrun -m (python -m in each rank)
]


def commands(name: str) -> str:
    """The commands a file holds: a Markdown file's fenced blocks, any other file less its comments."""
    text = (ROOT / name).read_text()
    if name.endswith(".md"):
        return "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S))
    return "\n".join(line.split(" # ")[0] for line in text.splitlines() if not line.lstrip().startswith("#"))


@pytest.mark.parametrize("name", COMMAND_FILES)
def test_no_command_of_the_project_puts_the_root_first_on_sys_path(name):
    text = commands(name)
    found = [(p.pattern, m.group(0)) for p in ROOT_FIRST for m in p.finditer(text)]
    assert found == []


def test_pytest_is_never_told_to_add_the_root():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "--import-mode=importlib" in pyproject
    assert not re.search(r"^\s*pythonpath\s*=", pyproject, re.M)


def test_tensor_parallel_workers_start_without_their_folder_on_sys_path():
    from pixtral_fast.runtime.tp_executor import SAFE_PATH

    assert SAFE_PATH == (("-P",) if sys.version_info >= (3, 11) else ())


def test_bench_scripts_run_by_name_without_the_root(tmp_path):
    usage = subprocess.run([sys.executable, str(ROOT / "bench"), "nope"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 1 and "report" in usage.stderr and "serve_load" in usage.stderr
    done = subprocess.run([sys.executable, str(ROOT / "bench"), "report", "stage", str(tmp_path), "env", "3", "15",
                           "0"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "stages.json").read_text())["env"] == {"seconds": 3, "limit_s": 15, "rc": 0,
                                                                         "timed_out": False}
