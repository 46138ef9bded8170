#!/usr/bin/env bash
# Run HERE (with network) before bench/device_check.sh: downloads the wheels the lent GPU machine
# lacks (it has no network; its Python is 3.12) into .whl/, which the device run carries.
# The device image already has torch, triton, safetensors, numpy, pillow, opencv, tiktoken,
# requests, attrs, pytest, pytest-benchmark, hypothesis, transformers and tqdm.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-python3}
for pkg in mistral_common pycountry typing-extensions pydantic pydantic-core annotated-types typing-inspection pydantic-extra-types \
           jsonschema jsonschema-specifications referencing rpds-py; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pkg"
done
du -sh .whl
