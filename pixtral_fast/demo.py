"""`pixtral-fast demo`: the whole pipeline on an embedded default — a tiny checkpoint in the real
format (made on first use), a drawn test image and a prompt — with token counts and stage times."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixtral_fast.config import IMG_BREAK_ID, IMG_END_ID, IMG_ID
from pixtral_fast.model.load import load_model, resolve_device
from pixtral_fast.runtime.engine import Engine
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Tokenizer

PROMPT = "Describe this image in one sentence."


def default_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "pixtral_fast" / "tiny-seed0"


def demo_image(width: int = 200, height: int = 120) -> Image.Image:
    """A colour gradient with a dark disc: something to look at, made without any file."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width, y / height, 1 - x / width], axis=-1)
    rgb[(x - width * 0.6) ** 2 + (y - height * 0.5) ** 2 < (height * 0.3) ** 2] *= 0.2
    return Image.fromarray((rgb * 255).astype(np.uint8))


def run(folder: Path | None = None, max_new_tokens: int = 24, device=None, backend: str = "auto") -> None:
    folder = Path(folder) if folder else default_dir()
    device = resolve_device(device)  # before making anything: a bad device fails first
    clock = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        clock[name] = time.perf_counter() - t0
        return out

    if not (folder / "consolidated.safetensors").is_file():
        timed("make tiny checkpoint", lambda: make_tiny(folder, seed=0))
        print(f"made a tiny checkpoint (random weights, real format) in {folder}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = timed("load weights", lambda: load_model(folder, device=device, dtype=dtype, backend=backend,
                                                         progress=False))
    tokenizer = Tokenizer.for_checkpoint(folder)
    messages = [{"role": "user", "content": [{"type": "image", "image": demo_image()},
                                             {"type": "text", "text": PROMPT}]}]
    encoded = timed("tokenize + preprocess", lambda: tokenizer.encode(messages))
    engine = timed("engine set-up", lambda: Engine.from_model(model, tokenizer))
    completion = timed("generate", lambda: engine.generate(encoded, max_new_tokens=max_new_tokens))

    t, st = encoded.tokens, engine.stats
    n_img, n_break, n_end = t.count(IMG_ID), t.count(IMG_BREAK_ID), t.count(IMG_END_ID)
    _, h, w = encoded.images[0].shape
    print(f"model: {folder.name} on {device} ({dtype}), backend={model.backend}")
    print(f"image: {w}x{h} px -> {w // 16}x{h // 16} patches")
    print(f"prompt tokens: {len(t)} = {n_img} [IMG] + {n_break} [IMG_BREAK] + {n_end} [IMG_END] + "
          f"{len(t) - n_img - n_break - n_end} text/control")
    print(f"generated ({completion.finish_reason}, {len(completion.tokens)} tokens): {completion.tokens}")
    print(f"text: {completion.text!r}")
    print("time per stage:")
    for name, seconds in clock.items():
        print(f"  {name:<24}{seconds * 1e3:9.1f} ms")
    print(f"  {'  of which ViT+adapter':<24}{st.vit_seconds * 1e3:9.1f} ms")
    print(f"  {'  of which prefill':<24}{st.prefill_seconds * 1e3:9.1f} ms ({st.prefill_tokens} tokens)")
    print(f"  {'  of which decode':<24}{st.decode_seconds * 1e3:9.1f} ms ({st.decode_steps} steps, "
          f"{st.decode_tokens / max(st.decode_seconds, 1e-9):.1f} tok/s)")
