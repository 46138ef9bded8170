"""`pixtral-fast demo`: the whole pipeline on the model that ships with the package, a small Pixtral
trained on easy-VQA (pixtral_fast/demo_model, made by `pixtral-fast train-demo`): a few test
images and the questions asked about them, the answers, the accuracy on a fixed sample of the
test split, and the time each stage took."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixtral_fast import easy_vqa
from pixtral_fast.model.load import load_model, resolve_device
from pixtral_fast.runtime.engine import Engine
from pixtral_fast.runtime.requests import EngineStats
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Tokenizer
from pixtral_fast.train_demo import SHIPPED_DIR

SHOWN_IMAGES = 3
QUESTIONS_PER_IMAGE = 3
SAMPLE_SIZE = 200


def render(path: Path, cells: int = 16) -> list[str]:
    """The picture in cells x cells/2 terminal characters: each '▀' shows two pixels, the upper
    as the foreground colour and the lower as the background (24-bit ANSI colours)."""
    rgb = np.asarray(Image.open(path).convert("RGB").resize((cells, cells), Image.Resampling.BOX))
    lines = []
    for y in range(0, cells - 1, 2):
        row = "".join(f"\x1b[38;2;{a[0]};{a[1]};{a[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m▀"
                      for a, b in zip(rgb[y], rgb[y + 1]))
        lines.append(row + "\x1b[0m")
    return lines


def _colour_terminal() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb" and "NO_COLOR" not in os.environ


def shown_questions(n_images: int = SHOWN_IMAGES, per_image: int = QUESTIONS_PER_IMAGE) -> list[list[easy_vqa.Question]]:
    """The first n_images images of the test split, with their first per_image questions."""
    groups: dict[int, list[easy_vqa.Question]] = {}
    for q in easy_vqa.questions("test"):
        if q.image_id in groups or len(groups) < n_images:
            group = groups.setdefault(q.image_id, [])
            if len(group) < per_image:
                group.append(q)
    return list(groups.values())


def run(folder: Path | None = None, device=None, backend: str = "auto", sample_size: int = SAMPLE_SIZE) -> float:
    """Prints the demo; returns the accuracy on the sample. `folder`: another checkpoint (a random
    tiny one is made there if it holds none); default: the shipped easy-VQA model."""
    device = resolve_device(device)  # before making anything: a bad device fails first
    folder = Path(folder) if folder else SHIPPED_DIR
    clock: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        clock[name] = time.perf_counter() - t0
        return out

    if not (folder / "consolidated.safetensors").is_file():
        if folder == SHIPPED_DIR:
            raise FileNotFoundError(f"{folder}: the shipped demo model is missing (pixtral-fast train-demo --out {folder})")
        timed("make tiny checkpoint", lambda: make_tiny(folder, seed=0))
        print(f"made a tiny checkpoint (random weights, real format) in {folder}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = timed("load weights", lambda: load_model(folder, device=device, dtype=dtype, backend=backend,
                                                         progress=False))
    tokenizer = Tokenizer.for_checkpoint(folder)
    engine = timed("engine set-up", lambda: Engine.from_model(model, tokenizer))
    print(f"model: {folder} on {device} ({dtype}), backend={model.backend}\n")

    try:
        colour = _colour_terminal()
        for group in shown_questions():
            print(group[0].image_path)
            if colour:
                print("\n".join("  " + line for line in render(group[0].image_path)))
            answered = timed(f"answer image {group[0].image_id}", lambda: easy_vqa.evaluate(engine, group, batch_size=1))
            for q, a in zip(group, answered.answers):
                print(f"  Q: {q.text:<44} A: {a:<10} {'right' if a == q.answer else f'wrong (expected {q.answer})'}")
            print()

        sample = easy_vqa.sample("test", sample_size)
        engine.stats = EngineStats()  # the stage split below covers the sample's batches only
        result = timed(f"answer {len(sample)} questions", lambda: easy_vqa.evaluate(engine, sample, batch_size=64))
        print(f"accuracy on a fixed sample of {len(sample)} test questions: {result}")
        st = engine.stats
        print("time per stage:")
        for name, seconds in clock.items():
            print(f"  {name:<28}{seconds * 1e3:9.1f} ms")
        print(f"  {'  of which ViT+adapter':<28}{st.vit_seconds * 1e3:9.1f} ms")
        print(f"  {'  of which prefill':<28}{st.prefill_seconds * 1e3:9.1f} ms ({st.prefill_tokens} tokens)")
        print(f"  {'  of which decode':<28}{st.decode_seconds * 1e3:9.1f} ms ({st.decode_steps} steps, "
              f"{st.decode_tokens / max(st.decode_seconds, 1e-9):.1f} tok/s)")
        return result.accuracy
    finally:  # its scheduler and cache go with it, whatever happened above
        engine.close()
