"""Tables a test measures and `make test` prints at its end (the SASS ceilings, the launch budget):
a test publishes its lines into a folder that tests/conftest.py makes once per run and reads in its
terminal summary. A file, not memory, because pytest-xdist runs the tests in worker processes."""
from __future__ import annotations

import json
import os
from pathlib import Path

FOLDER_VARIABLE = "PIXTRAL_FAST_TEST_TABLES"


def publish(name: str, lines: list[str], data: dict | None = None) -> None:
    """Writes NAME.txt (printed at the end of the run) and, with `data`, NAME.json."""
    folder = os.environ.get(FOLDER_VARIABLE)
    if not folder:
        return
    Path(folder, f"{name}.txt").write_text("\n".join(lines) + "\n")
    if data is not None:
        Path(folder, f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def published() -> list[tuple[str, list[str]]]:
    folder = os.environ.get(FOLDER_VARIABLE)
    if not folder or not Path(folder).is_dir():
        return []
    return [(p.stem, p.read_text().splitlines()) for p in sorted(Path(folder).glob("*.txt"))]


def published_data(*names: str) -> tuple[dict, ...] | None:
    """The JSON each of `names` published, or None unless all of them did."""
    folder = os.environ.get(FOLDER_VARIABLE)
    paths = [Path(folder or ".", f"{name}.json") for name in names]
    if not folder or not all(p.is_file() for p in paths):
        return None
    return tuple(json.loads(p.read_text()) for p in paths)
