"""The tensor-parallel tests' common set-up: tiny checkpoints in both formats (the HF one sharded
over several safetensors files with an index, as published checkpoints are), engines of N CPU
ranks (gloo) in fp32 on the reference backend, chat requests with small pictures, and the
process-table checks that no worker outlives its engine."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import pixtral_fast as pf
from pixtral_fast.hf_export import convert_consolidated_to_hf

CPU_FP32 = {"device": "cpu", "dtype": torch.float32, "backend": "reference", "progress": False}
TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v7m1")


def tp_engine(path, size: int, **limits) -> pf.Engine:
    """An engine of `size` CPU ranks (size - 1 spawned workers) with a 64-block KV cache unless
    limits say otherwise."""
    return pf.Engine.from_pretrained(path, tensor_parallel_size=size, **(CPU_FP32 | {"num_blocks": 64} | limits))


def write_sharded_hf(consolidated: Path, dst: Path, shards: int = 2) -> Path:
    """The consolidated checkpoint as an HF folder split over `shards` files listed in
    model.safetensors.index.json. Tensors are dealt to the files in turn, so each file holds part
    of every layer and a rank reads its slices from all of them. The tokenizer file comes along."""
    convert_consolidated_to_hf(consolidated, dst)  # bf16, like the source: the values are unchanged
    whole = dst / "model.safetensors"
    tensors = load_file(str(whole))
    whole.unlink()
    names = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map = {key: names[i % shards] for i, key in enumerate(sorted(tensors))}
    for name in names:
        save_file({k: t for k, t in tensors.items() if weight_map[k] == name}, str(dst / name),
                  metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name in TOKENIZER_FILES:
        if (consolidated / name).is_file():
            shutil.copyfile(consolidated / name, dst / name)
    return dst


def picture(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def chat(text: str, *images) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images]
             + [{"type": "text", "text": text}]}]


def request_with_images() -> list[dict]:
    return chat("Describe these two pictures in a few words.", picture(64, 48, 1), picture(32, 80, 2))


def greedy_batch() -> list[list[dict]]:
    """Three requests with images, of different lengths."""
    return [chat("First: what is it?", picture(70, 40, 3)),
            chat("A second, rather longer prompt about two pictures side by side.", picture(40, 40, 4),
                 picture(100, 20, 5)),
            chat("Third: and this one?", picture(30, 30, 6))]


# -- the process table ------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc/<pid>/stat, or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1])


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie is dead, but unreaped: also a leak)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def exists(pid: int) -> bool:
    """Any entry in the process table, zombies included."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return _stat(pid) is not None


def worker_children() -> list[int]:
    """This process's living children that are tensor-parallel workers (`python -m
    pixtral_fast.runtime.tp_worker_main`), read from the process table (a given pid's zombie: see exists)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[1] != os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"pixtral_fast.runtime.tp_worker_main" in argv:
            found.append(int(entry.name))
    return found


def wait_until_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """The pids still in the process table (zombies included) after up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if exists(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if exists(p)]
    return left
