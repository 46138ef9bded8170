#!/usr/bin/env bash
# Run HERE (with network) before bench/device_check.sh: downloads the wheels the lent GPU machine
# lacks (it has no network; its Python is 3.12) into .whl/, which the device run carries.
#
# The versions are resolved TOGETHER, once, for the device's Python and platform (one
# `pip install --dry-run --report` of the whole set), and then exactly those pins are downloaded
# in one `pip download --no-deps`: pydantic always comes with the pydantic-core it was released
# with (downloading each name on its own can pair a new pydantic with an old core, which breaks
# every import of mistral_common on the device).
# The device image already has the packages in DEVICE_HAS; they take part in the resolution (so
# the rest is consistent with some version of them) but are not downloaded.
# Usage: bench/prepare_wheels.sh [--dry-run]   (--dry-run: print the pins, download nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REQUIREMENTS=("mistral_common[opencv]>=1.8" "pycountry" "fastapi>=0.110" "uvicorn>=0.29" "prometheus_client>=0.20"
              "httpx>=0.27")  # httpx: bench/serve_load.py's clients
DEVICE_HAS="torch triton safetensors numpy pillow opencv-python opencv-python-headless tiktoken requests urllib3 \
idna certifi charset-normalizer regex attrs pytest pytest-benchmark hypothesis transformers tqdm huggingface-hub \
tokenizers pyyaml packaging filelock fsspec"
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$PY" -m pip install -q --dry-run --ignore-installed --disable-pip-version-check --report "$tmp/report.json" \
  --target "$tmp/target" "${TARGET[@]}" "${REQUIREMENTS[@]}"
"$PY" -P - "$tmp/report.json" "$DEVICE_HAS" > "$tmp/pins.txt" <<'PYEOF'
import json, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
skip = {norm(n) for n in sys.argv[2].split()}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if norm(meta["name"]) not in skip:
        print(f"{meta['name']}=={meta['version']}")
PYEOF
echo "resolved together: $(tr '\n' ' ' < "$tmp/pins.txt")"
if [ "${1:-}" = "--dry-run" ]; then exit 0; fi

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --disable-pip-version-check "${TARGET[@]}" -d .whl -r "$tmp/pins.txt"
cp "$tmp/pins.txt" .whl/pins.txt
# Every pin has its wheel, and nothing else came along.
"$PY" -P - .whl <<'PYEOF'
import re, sys
from pathlib import Path
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
folder = Path(sys.argv[1])
pins = {norm(line.split("==")[0]): line.split("==")[1] for line in (folder / "pins.txt").read_text().split()}
wheels = {norm(w.name.split("-")[0]): w.name.split("-")[1] for w in folder.glob("*.whl")}
assert wheels == pins, f"wheels {wheels} != pins {pins}"
PYEOF
du -sh .whl
