"""Where the CUDA toolkit is. Standard library only: setup.py loads this file by path, before
the package (or torch) can be imported."""
from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path


def cuda_home() -> Path | None:
    """A CUDA toolkit root holding bin/nvcc and include/cuda_runtime.h. The `nvcc` on PATH may be
    a wrapper script (as on the dev machine), so its own folder is only one candidate."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in filter(None, candidates):
        path = Path(root)
        if (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file():
            return path
    return None
