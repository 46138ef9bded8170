"""`pip install .` and `pip install -e .` with build isolation ON (pip's default), for real, in a
fresh virtual environment that has torch: the build must not need torch (the isolated build
environment cannot see it; it used to fail with ModuleNotFoundError: torch wherever nvcc exists),
the wheel must carry the CUDA sources that the just-in-time build of the extension reads, and the
installed package must import. The source tree is copied first, so the build writes nothing here.

The fresh venv sees this environment's packages (torch, triton, mistral_common, ...) through a
.pth file naming a folder of links to them (everything but pixtral_fast itself), the way a user's
venv has torch installed. The isolated build fetches setuptools and wheel from the package index;
without one it skips. Deselect with `-m "not install"`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.install
SKIP_NAMES = ("pixtral_fast", "pixtral-fast", "__editable__", "_pixtral_fast")
CUDA_SOURCES = {"bindings.cpp", "decode_attention.cu", "decode_attention.cuh", "decode_attention_api.h",
                "decode_plan.h"}
PROBE = """
import json, pixtral_fast, pixtral_fast.kernels, pixtral_fast._cuda_decode as c
print(json.dumps({"package": pixtral_fast.__file__, "kernels": pixtral_fast.kernels.__file__,
                  "csrc": str(c.CSRC), "sources": sorted(p.name for p in c.CSRC.iterdir()),
                  "loaded": c.loaded(), "status": c.status()}))
"""


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)


def copy_source_tree(dest: Path) -> Path:
    """The files git would ship (tracked, plus new files not ignored), as they are on disk."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    for name in filter(None, listed.stdout.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new venv whose site-packages links to this environment's packages, pixtral_fast excepted."""
    base = tmp_path_factory.mktemp("install")
    outer = Path(sysconfig.get_paths()["purelib"])
    linked = base / "outer-site"
    linked.mkdir()
    for entry in outer.iterdir():
        if not entry.name.startswith(SKIP_NAMES) and entry.suffix != ".pth":
            (linked / entry.name).symlink_to(entry)
    venv = base / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(purelib, "outer-site.pth").write_text(f"{linked}\n")
    return python, copy_source_tree(base / "src")


def pip_install(python: Path, *args: str) -> None:
    # No PIP_NO_BUILD_ISOLATION / PYTHONPATH from the caller: isolation must be on for real.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    proc = run([python, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", *args], env=env)
    if proc.returncode != 0 and "No matching distribution found for setuptools" in proc.stdout + proc.stderr:
        pytest.skip("no package index reachable for the isolated build's setuptools")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "No module named 'torch'" not in proc.stderr


def probe(python: Path, cwd: Path) -> dict:
    proc = run([python, "-c", PROBE], cwd=cwd, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_torch_visible_in_fresh_venv(fresh_venv, tmp_path):
    python, _ = fresh_venv
    proc = run([python, "-c", "import torch, sys; print(torch.__file__); print(sys.prefix)"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pixtral_fast" not in run([python, "-m", "pip", "list"]).stdout.lower().replace("-", "_")


def test_pip_install_with_build_isolation(fresh_venv, tmp_path):
    python, src = fresh_venv
    pip_install(python, src)
    got = probe(python, tmp_path)
    venv = python.parent.parent
    assert Path(got["package"]).is_relative_to(venv), got  # the wheel's copy, not the source tree
    assert Path(got["kernels"]).is_relative_to(venv / "lib")
    # The wheel carries the sources of the just-in-time build.
    assert Path(got["csrc"]).is_relative_to(venv) and CUDA_SOURCES <= set(got["sources"]), got
    if not got["loaded"]:  # built without torch: no _C; the status says how it will be built
        assert "pixtral_fast._C not importable" in got["status"], got
    assert (venv / "bin" / "pixtral-fast").is_file()
    run([python, "-m", "pip", "uninstall", "-y", "-q", "pixtral-fast"])


def test_pip_install_editable_with_build_isolation(fresh_venv, tmp_path):
    python, src = fresh_venv
    pip_install(python, "-e", src)
    got = probe(python, tmp_path)
    assert Path(got["package"]).is_relative_to(src), got  # the tree itself
    assert Path(got["kernels"]) == src / "kernels" / "__init__.py"
    assert Path(got["csrc"]) == src / "csrc" and CUDA_SOURCES <= set(got["sources"]), got
    run([python, "-m", "pip", "uninstall", "-y", "-q", "pixtral-fast"])
