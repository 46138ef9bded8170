"""Build script. The package metadata lives in pyproject.toml; this file only adds the CUDA
extension (pixtral_fast._C) when nvcc is available."""
from setuptools import setup

setup()
