"""Build script. The package metadata lives in pyproject.toml; this file only adds the CUDA
extension pixtral_fast._C when nvcc is available AND torch is importable here (DESIGN §5): nvcc
compiles the pure-CUDA csrc/*.cu files for sm_80 and sm_90a into objects, and the host compiler
builds csrc/bindings.cpp against that torch (CPU or CUDA build alike) and links them with the
static CUDA runtime.

torch is importable at build time with `pip install --no-build-isolation` (what `make` does).
With build isolation (pip's default) the build runs in a fresh environment without torch, so
nothing is compiled: pixtral_fast._cuda_decode builds the same sources just in time on the first
CUDA use, into a cache folder (the sources ship in the wheel as pixtral_fast/csrc). Without nvcc
nothing is built either way, and decode attention uses its Triton kernel.
PIXTRAL_FAST_BUILD_CUDA=0 skips the extension even where it could be built."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# sm_80 and sm_90a cubins, plus compute_80 PTX that the driver can JIT on newer GPUs.
# PIXTRAL_FAST_CUDA_ARCHS="90a" (space or comma separated) builds only those cubins: the device
# check builds for its own GPU only, in half the time.
DEFAULT_NVCC_ARCH = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
                     "-gencode", "arch=compute_80,code=compute_80"]


def nvcc_arch_flags() -> list[str]:
    archs = os.environ.get("PIXTRAL_FAST_CUDA_ARCHS", "").replace(",", " ").split()
    if not archs:
        return DEFAULT_NVCC_ARCH
    flags = []
    for arch in archs:
        if not arch.rstrip("a").isdigit():
            raise SystemExit(f"PIXTRAL_FAST_CUDA_ARCHS: {arch!r} is not an arch like 90a or 80")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "--threads", "2"]


def find_cuda_home() -> Path | None:
    """pixtral_fast/_cuda_home.py, loaded by path: the package itself needs torch and its kernels."""
    spec = importlib.util.spec_from_file_location("_cuda_home", ROOT / "pixtral_fast" / "_cuda_home.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cuda_home()


def _cuda_extension(cuda: Path):
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cu_sources = sorted(CSRC.glob("*.cu"))
    headers = sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))

    class BuildWithNvcc(BuildExtension):
        """Compiles the .cu files with nvcc first, then links their objects into the extension."""

        def build_extensions(self):
            obj_dir = Path(self.build_temp) / "nvcc"
            obj_dir.mkdir(parents=True, exist_ok=True)
            newest_input = max(p.stat().st_mtime for p in cu_sources + headers)
            objects = []
            for src in cu_sources:
                obj = obj_dir / (src.stem + ".o")
                if not obj.exists() or obj.stat().st_mtime < newest_input:
                    cmd = [str(cuda / "bin" / "nvcc"), "-c", str(src), "-o", str(obj), f"-I{CSRC}",
                           *NVCC_FLAGS, *nvcc_arch_flags()]
                    print(" ".join(cmd), flush=True)
                    subprocess.run(cmd, check=True)
                objects.append(str(obj))
            for ext in self.extensions:
                ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extensions()

    ext = CppExtension(
        "pixtral_fast._C",
        sources=["csrc/bindings.cpp"],
        include_dirs=[str(CSRC)],
        depends=[str(p.relative_to(ROOT)) for p in cu_sources + headers],
        extra_compile_args=["-O2", "-g0"],  # no debug info: the .so stays small
        # The static runtime: the extension needs no libcudart.so at import (CPU torch, no driver).
        extra_link_args=[f"-L{cuda / 'lib64'}", "-lcudart_static", "-lrt", "-ldl", "-lpthread"],
    )
    return [ext], {"build_ext": BuildWithNvcc}


def _extensions():
    if os.environ.get("PIXTRAL_FAST_BUILD_CUDA", "1") == "0":
        print("pixtral_fast: PIXTRAL_FAST_BUILD_CUDA=0: building without the CUDA extension.", file=sys.stderr)
        return [], {}
    cuda = find_cuda_home()
    if cuda is None:
        print("pixtral_fast: nvcc not found (set CUDA_HOME to a CUDA toolkit root): building without "
              "the CUDA extension pixtral_fast._C; decode attention uses its Triton kernel.", file=sys.stderr)
        return [], {}
    if importlib.util.find_spec("torch") is None:
        print("pixtral_fast: torch is not importable in this build environment (pip's build isolation): "
              "building without pixtral_fast._C. On the first CUDA use the extension is built just in "
              "time into ~/.cache/pixtral_fast (PIXTRAL_FAST_CACHE); to build it now instead, install with "
              "`pip install --no-build-isolation .` into an environment that has torch.", file=sys.stderr)
        return [], {}
    return _cuda_extension(cuda)


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
